"""Networks of Sec. 4.2 and any torchvision / timm classifier, the rule that names the layers L_AT aligns, and the
self-describing model file.

Every network here has the same small interface, used by the trainers, the baselines and the attention loss:

* ``features(x) -> (N, D)``: the representation the classifier reads (used by DANN/JAN baselines);
* ``head(f) -> logits``;  ``forward(x) = head(features(x))``;
* ``aligned_layers: list[str]``: names (as in ``named_modules()``) of the layers whose attention maps (Eq. 4) are
  aligned by L_AT (Eq. 5), chosen by :func:`aligned_layers` (``model.aligned_layers``);
* ``backbone_parameters()`` / ``head_parameters()``: for the 0.1x backbone learning rate when fine-tuning.

``model.arch`` is ``digit_cnn`` (:class:`DigitCNN`), any torchvision classification model (``resnet50``,
``resnet101``, ``efficientnet_b0``, ...; ``torchvision.models.list_models(module=torchvision.models)``) or
``timm/NAME``: the network's last linear layer is removed and :class:`Classifier` puts a new one for the data set's
classes on top.

A model file (``RUN/<stage>/model.pt``, :func:`save_model_file`) holds the weights and :func:`model_info` --
architecture, class names, input size, channels, normalisation, daaa version -- as plain types, so that a run
folder's network can be rebuilt and used without its configuration (:func:`load_model_file`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import ALIGN_RULES, ATTENTION_TAPS, Config, ModelConfig
from .errors import ConfigError, DaaaError
from .runs import atomic_torch_save, load_torch_file

LOG = logging.getLogger("daaa")

MODEL_FORMAT = "daaa-model"
MODEL_FORMAT_VERSION = 1
#: a stage's snapshot chosen by label-free selection (``daaa predict --stage selected`` reads RUN/adapt's)
SELECTED_FILE = "model-selected.pt"


class DigitCNN(nn.Module):
    """The digit network of Sec. 4.2: four conv layers; the first three extract features, the fourth classifies.

    conv(3x3, w) - ReLU - maxpool - conv(3x3, 2w) - ReLU - maxpool - conv(3x3, 4w) - ReLU - maxpool -
    conv(k x k, num_classes) where k is the remaining spatial size, so the last conv is a linear classifier.
    (The paper gives no kernel sizes; 3x3 kernels train 1.5x faster on CPU than 5x5 ones at the same width.)
    Attention is aligned at ``conv1``, ``conv2``, ``conv3`` (the paper aligns "the three convolutional layers").
    No batch norm: it keeps a DDP run equal to a one-process run with the same global batch.
    """

    stem_layers: tuple[str, ...] = ()  # no stem: all three feature convs are aligned (Sec. 4.2)
    head_layers: tuple[str, ...] = ("conv4",)  # the classifier conv

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32):
        super().__init__()
        if image_size % 8 != 0:
            raise DaaaError(f"option data.image_size: digit_cnn needs a multiple of 8, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU(inplace=False)
        self.feature_shape = (4 * width, image_size // 8, image_size // 8)
        self.conv4 = nn.Conv2d(4 * width, num_classes, image_size // 8)
        self.aligned_layers = aligned_layers(self)  # conv1, conv2, conv3

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU(maxpool(.)) is maxpool(ReLU(.)) exactly, values and gradients (the ReLU is monotone): the ReLU then
        # runs on a quarter of the values
        x = self.act(self.pool(self.conv1(x)))
        x = self.act(self.pool(self.conv2(x)))
        x = self.act(self.pool(self.conv3(x)))
        return x.flatten(1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv4(f.view(f.shape[0], *self.feature_shape)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("conv4")]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.conv4.parameters())


class Classifier(nn.Module):
    """A backbone -- a torchvision or timm classification network whose last linear layer is removed -- and a new
    linear classifier ``fc`` of ``num_classes`` outputs on its ``in_features``-wide output.

    ``backbone_parameters()`` are everything but ``fc``: fine-tuned at ``optim.backbone_lr_mult`` (0.1 in the
    Office-31 presets, as tllib does) of the head's learning rate.
    """

    head_layers: tuple[str, ...] = ("fc",)

    def __init__(self, backbone: nn.Module, in_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.in_features = in_features
        self.fc = nn.Linear(in_features, num_classes)
        self.aligned_layers: list[str] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())


class ResNet50(Classifier):
    """torchvision's ResNet-50 with a new ``num_classes`` classifier (``build_model`` with ``model.arch=resnet50``).

    Aligned layers: every ``nn.Conv2d`` except the stem's ``conv1`` (and no pooling layer), as in
    Supplementary Sec. 1 -- 52 layers, including the four projection shortcuts.
    """

    def __init__(self, num_classes: int, pretrained: str = "none"):
        backbone, width = _torchvision_backbone("resnet50", pretrained)
        super().__init__(backbone, width, num_classes)
        self.aligned_layers = aligned_layers(self)


# ------------------------------------------------------------------------------------------ backbones by name
def torchvision_names() -> list[str]:
    """The classification models of ``torchvision.models`` (not detection, segmentation, video)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("option model.arch: timm/NAME needs the timm package (pip install 'daaa[timm]')") from None
    return timm


def check_arch(arch: str) -> None:
    """ConfigError with a few close names when ``arch`` names no network daaa can build."""
    if arch == "digit_cnn":
        return
    if arch.startswith("timm/"):
        timm, name = _timm(), arch.removeprefix("timm/")
        if timm.is_model(name.split(".")[0]):  # NAME.TAG picks one of a model's pretrained weights
            return
        close = ["timm/" + n for n in difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)]
    else:
        names = torchvision_names()
        if arch in names:
            return
        close = difflib.get_close_matches(arch, names + ["digit_cnn"], n=4, cutoff=0.6)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise ConfigError(f"option model.arch: unknown architecture {arch!r}{hint}; use digit_cnn, a torchvision "
                      "classification model (resnet50, resnet101, efficientnet_b0, ...) or timm/NAME")


def model_key(cfg: ModelConfig) -> dict[str, Any]:
    """The model section of a stage key: ``aligned_layers`` only when it is not the paper's rule, so run folders made
    before the option existed stay valid."""
    key = dataclasses.asdict(cfg)
    if key["aligned_layers"] == "all-but-stem":
        del key["aligned_layers"]
    return key


def _last_linear(net: nn.Module, arch: str) -> str:
    """The name of the network's classifier: its last ``nn.Linear`` (torchvision registers it last)."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"option model.arch: {arch} has no linear classifier to replace (e.g. SqueezeNet's is a "
                          "conv); choose another network")
    return names[-1]


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def _torchvision_backbone(arch: str, pretrained: str) -> tuple[nn.Module, int]:
    """torchvision's ``arch`` with its pretrained weights, its classifier replaced by ``nn.Identity``; and the
    width of the classifier's input."""
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    head = _last_linear(net, arch)
    width = net.get_submodule(head).in_features
    if _is_weights_name(pretrained):
        net.load_state_dict(_torchvision_weights(arch, pretrained))
    elif pretrained not in ("none", ""):
        load_pretrained_file(net, pretrained, head, arch)
    if getattr(net, "aux_logits", False):  # GoogLeNet / Inception-v3: no auxiliary outputs, as torchvision does
        net.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(net, aux):
                setattr(net, aux, None)
    _replace(net, head, nn.Identity())
    return net, width


def _is_weights_name(pretrained: str) -> bool:
    return pretrained == "imagenet" or (pretrained.isupper() and not Path(pretrained).expanduser().exists())


def _torchvision_weights(arch: str, pretrained: str) -> dict[str, torch.Tensor]:
    """torchvision's weights of ``arch`` from its cache (downloaded when online): ``imagenet`` = IMAGENET1K_V1 (the
    weights JAN and the paper's baselines start from) where it exists, else the default; or a named entry."""
    from torchvision.models import get_model_weights

    entries = get_model_weights(arch).__members__
    name = pretrained if pretrained != "imagenet" else "IMAGENET1K_V1" if "IMAGENET1K_V1" in entries else "DEFAULT"
    if name not in entries:
        raise ConfigError(f"option model.pretrained: {arch} has no weights {name!r} (choose imagenet, none, "
                          f"{', '.join(entries)} or a state-dict file)")
    weights = entries[name]
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DaaaError(
            f"ImageNet weights for {arch} are not available ({type(e).__name__}): download {weights.url} "
            f"to {cache}, or pass model.pretrained=PATH to a state-dict file, or model.pretrained=none") from None


def _timm_backbone(arch: str, pretrained: str) -> nn.Module:
    """timm's ``timm/NAME`` without its classifier (``num_classes=0``: the pooled features), with its weights."""
    timm, name = _timm(), arch.removeprefix("timm/")
    if pretrained == "imagenet":
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:
            raise DaaaError(f"pretrained weights for {arch} are not available ({type(e).__name__}): put them in "
                            "timm's Hugging Face cache, or pass model.pretrained=PATH to a state-dict file, or "
                            "model.pretrained=none") from None
    net = timm.create_model(name, pretrained=False, num_classes=0)
    if pretrained not in ("none", ""):
        cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", {})
        load_pretrained_file(net, pretrained, cfg.get("classifier") or "fc", arch)
    return net


def load_pretrained_file(net: nn.Module, pretrained: str, head: str, arch: str) -> None:
    """Weights of a state-dict file (a ``state_dict`` entry, ``module.`` prefixes and a daaa model file are
    understood) into ``net``; the classifier ``head``'s are left out. One line when the file does not fit."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"option model.pretrained: {path} is not a file (expected imagenet, none, a weights name "
                          "or a state-dict path)")
    state = load_torch_file(path, " (option model.pretrained: expected a state-dict file)")
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:  # another run's network: its backbone
        state = {k.removeprefix("backbone."): v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise DaaaError(f"option model.pretrained: {path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    state = {k: v for k, v in state.items() if not _under(k, head)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _under(k, head)]
    if missing or unexpected:
        raise DaaaError(f"option model.pretrained: {path} does not fit {arch} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _feature_width(backbone: nn.Module, arch: str, in_channels: int, image_size: int) -> int:
    """The width of the backbone's output on one ``image_size`` image (eval mode, no gradient); a network that
    cannot take that size (ViT's fixed 224 px, Inception's 75 px minimum) is a one-line error."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"option data.image_size: {arch} cannot take {image_size} px images ({first})") from None
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"option model.arch: {arch} does not end in a feature vector (output "
                          f"{type(out).__name__}); choose another network")
    return int(out.shape[1])


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int,
                log: bool = True) -> nn.Module:
    """The network ``cfg.arch`` for ``num_classes`` classes of ``in_channels`` x ``image_size`` images, with its
    ``aligned_layers`` chosen by ``cfg.aligned_layers`` (logged with ``log``)."""
    check_arch(cfg.arch)
    if cfg.arch == "digit_cnn":
        net: nn.Module = DigitCNN(num_classes, in_channels, cfg.width, image_size)
    else:
        if in_channels != 3:
            raise ConfigError(f"option data.channels: {cfg.arch} needs 3 channels")
        if cfg.arch.startswith("timm/"):
            backbone = _timm_backbone(cfg.arch, cfg.pretrained)
        else:
            backbone, _ = _torchvision_backbone(cfg.arch, cfg.pretrained)
        net = Classifier(backbone, _feature_width(backbone, cfg.arch, in_channels, image_size), num_classes)
    # nothing in place (activations, dropout): Eq. 4 reads an aligned conv's own output, which a ReLU(inplace=True)
    # right after it (torchvision's VGG, AlexNet) would rectify under the recorder's eyes, and L_AT's energy taps pass
    # that output on as a view autograd does not let the network change (FeatureRecorder(energy=True)); the trainer
    # checks the rest in eval mode, where a dropout does nothing
    for module in net.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    net.arch = cfg.arch
    net.aligned_layers = aligned_layers(net, cfg.aligned_layers)
    if log:
        LOG.info("model: %s, %d aligned layer(s) for L_AT (model.aligned_layers=%s)", cfg.arch,
                 len(net.aligned_layers), cfg.aligned_layers)
    return net


# ------------------------------------------------------------------------------------------ aligned layers
def aligned_layers(net: nn.Module, rule: str | list[str] = "all-but-stem") -> list[str]:
    """The layers (names of ``net.named_modules()``) whose attention maps (Eq. 4) L_AT aligns (Eq. 5), by ``rule``:

    * ``"all-but-stem"`` -- the paper's: every ``nn.Conv2d`` except the stem's and the classifier's (Supp. Sec. 1;
      52 layers of ResNet-50, projection shortcuts included; ``conv1``-``conv3`` of the digit CNN);
    * ``"stage-outputs"`` -- the outputs of the stages after the stem (ResNet: ``layer1``-``layer4``), the layers of
      Zagoruyko & Komodakis' attention transfer;
    * a list of module names -- those, as given.

    The stem and stages come from the module tree: the *trunk* is the first module, from the root down, with two
    or more children that hold a conv; its first such child is the stem, the others are the stages. A network may
    declare ``stem_layers`` (the digit CNN has no stem) and ``head_layers`` (always left out). A network without a
    conv after its stem (ViT, Swin) gets no layer: :func:`alignable_layers` refuses it for L_AT.
    """
    modules = dict(net.named_modules())
    if isinstance(rule, (list, tuple)):
        missing = [n for n in rule if n not in modules or n == ""]
        if missing:
            close = difflib.get_close_matches(missing[0], list(modules), n=3, cutoff=0.6)
            raise ConfigError(f"option model.aligned_layers: no module {missing[0]!r} in the network"
                              + (f" (close: {', '.join(close)})" if close else ""))
        return list(rule)
    if rule not in ALIGN_RULES:
        raise ConfigError(f"option model.aligned_layers: {rule!r} is not one of {', '.join(ALIGN_RULES)} or a list "
                          "of module names")
    trunk, holders = _trunk(net)
    stem = getattr(net, "stem_layers", None)
    stem = tuple(stem) if stem is not None else tuple(holders[:1])
    leave_out = stem + tuple(getattr(net, "head_layers", ()))
    if rule == "stage-outputs":
        return [n for n in holders if n not in leave_out]
    return [n for n, m in modules.items()
            if isinstance(m, nn.Conv2d) and not any(_under(n, p) for p in leave_out)]


#: activation modules an "activation" tap may apply (the first one found beside the conv, else ReLU)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def attention_taps(net: nn.Module, tap: str = "conv") -> list[Any]:
    """Where L_AT reads the feature maps F_l of Eq. 4 for each of ``net.aligned_layers`` (``adapt.attention_tap``),
    as :class:`daaa.attention.FeatureRecorder` layers:

    * ``"conv"`` (default) -- the conv's own output: before the ReLU in the digit CNN, before batch norm in ResNet.
      The paper's A(x) = sum_c |F_c(x)|^2 takes an absolute value, which only means something for signed features:
      we read "the feature maps w.r.t. layer l" as the layer's linear output;
    * ``"activation"`` -- after the nonlinearity that follows the conv: act(norm(conv)) where a norm layer follows
      it (ResNet's bnK after convK; for a bottleneck's last conv this is the branch before the residual sum);
    * ``"block"`` -- the outputs of the residual blocks holding the aligned convs (ResNet's ``layerX.Y``, after the
      sum and its ReLU: 16 maps on ResNet-50); a conv that is a stage of its own (the digit CNN's) reads as
      ``"activation"``.

    Layers that are not convs (``model.aligned_layers=stage-outputs`` or named modules) are read as they are.
    """
    if tap not in ATTENTION_TAPS:
        raise ConfigError(f"option adapt.attention_tap: {tap!r} is not one of {', '.join(ATTENTION_TAPS)}")
    layers = alignable_layers(net)
    if tap == "conv":
        return layers
    modules = dict(net.named_modules())
    _, stages = _trunk(net)
    out: list[Any] = []
    for name in layers:
        if not isinstance(modules[name], nn.Conv2d):
            item: Any = name
        elif tap == "block" and (block := _block_of(name, stages)) is not None:
            item = block
        else:
            item = _activation_tap(net, modules, name)
        if item not in out:
            out.append(item)
    return out


def _block_of(name: str, stages: list[str]) -> str | None:
    """The residual block holding conv ``name``: the child of its stage it lies under (None: the conv is a stage)."""
    for stage in stages:
        if _under(name, stage) and name != stage:
            return f"{stage}.{name[len(stage) + 1:].split('.')[0]}"
    return None


def _activation_tap(net: nn.Module, modules: dict[str, nn.Module], conv: str) -> tuple[str, Any]:
    """(module to hook, activation) for conv ``conv``: the norm layer registered right after it in the same parent
    (if any), and a copy, never in place, of the first activation module beside it (its parent's, else the net's)."""
    parent = conv.rpartition(".")[0]
    siblings = list((modules[parent] if parent else net).named_children())
    names = [n for n, _ in siblings]
    own = conv.rpartition(".")[2]
    hooked = conv
    i = names.index(own) if own in names else -1
    if 0 <= i < len(siblings) - 1 and isinstance(siblings[i + 1][1], _NORMS):
        hooked = f"{parent}.{names[i + 1]}" if parent else names[i + 1]
    found = [m for _, m in siblings if isinstance(m, _ACTIVATIONS)] or \
        [m for m in net.modules() if isinstance(m, _ACTIVATIONS)]
    act = copy.deepcopy(found[0]) if found else nn.ReLU()
    if hasattr(act, "inplace"):
        act.inplace = False
    # ReLU keeps its output for backward; others keep their input, which the network may change in place after
    return hooked, act if isinstance(act, nn.ReLU) else (lambda t, act=act: act(t.clone()))


def _holds_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.Conv2d) for x in m.modules())


def _trunk(net: nn.Module) -> tuple[str, list[str]]:
    """The trunk's name and the full names of its conv-holding children, in order (see :func:`aligned_layers`).
    Containers with one conv-holding child (``backbone``, torchvision's ``features``) are stepped into."""
    prefix, node = "", net
    while True:
        holders = [(n, m) for n, m in node.named_children() if _holds_conv(m)]
        if len(holders) == 1 and not isinstance(holders[0][1], nn.Conv2d):
            prefix, node = f"{prefix}{holders[0][0]}.", holders[0][1]
            continue
        return prefix.rstrip("."), [prefix + n for n, _ in holders]


def alignable_layers(net: nn.Module) -> list[str]:
    """``net.aligned_layers`` for L_AT; one line when there is none (a network without conv feature maps)."""
    layers = list(getattr(net, "aligned_layers", []))
    if not layers:
        arch = getattr(net, "arch", type(net).__name__)
        raise ConfigError(f"option model.arch: {arch} has no conv layer after its stem, so L_AT (Eq. 4-5) has no "
                          "attention map to align (a transformer such as ViT or Swin); use a convolutional network, "
                          "or one without a source-network guide (daaa train-source, the DANN/DAN/JAN rows)")
    return layers


# ------------------------------------------------------------------------------------------ the model file
def model_info(cfg: Config, classes: list[str] | None, num_classes: int) -> dict[str, Any]:
    """What a model file says of its network, as plain types: enough to rebuild it (:func:`load_model_file`) and
    to feed it images as training did (size, channels, normalisation; :func:`data_config`)."""
    from . import __version__

    d = cfg.data
    return {"arch": cfg.model.arch, "model": dataclasses.asdict(cfg.model), "num_classes": int(num_classes),
            "classes": list(classes) if classes else None, "channels": d.channels, "image_size": d.image_size,
            "load_size": d.load_size, "mean": [float(v) for v in d.mean[:d.channels]],
            "std": [float(v) for v in d.std[:d.channels]], "daaa_version": __version__}


def describe(net: nn.Module, info: dict[str, Any]) -> nn.Module:
    """``net`` with ``info`` (:func:`model_info`) attached: the stage runner writes it into the model file."""
    net.model_info = info
    return net


def data_config(info: dict[str, Any], base: Any = None):
    """The :class:`~daaa.config.DataConfig` that shapes images for the network of ``info`` as training did: sizes,
    channels and normalisation from ``info``, the rest (where built-in data sets live, ...) from ``base``."""
    from .config import DataConfig

    return dataclasses.replace(base or DataConfig(), image_size=info["image_size"], load_size=info["load_size"],
                               channels=info["channels"], mean=list(info["mean"]), std=list(info["std"]))


def save_model_file(path: str | Path, net: nn.Module, **extra: Any) -> None:
    """``net``'s weights (on the CPU) and ``net.model_info``, plus ``extra`` plain entries, atomically."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save({"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                       "info": getattr(net, "model_info", None), **extra, "state_dict": state}, path)


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(weights, info or None, the whole record) of a model file; a bare state dict (daaa 0.1's ``model.pt``)
    has no info."""
    obj = load_torch_file(path)
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return obj["state_dict"], obj.get("info"), obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, {}
    raise DaaaError(f"{path}: not a daaa model file (neither a model record nor a state dict)")


def load_state(net: nn.Module, state: dict[str, torch.Tensor], path: str | Path, assign: bool = False) -> None:
    """``net.load_state_dict(state)``; one line naming the file and every mismatch when it does not fit."""
    try:
        net.load_state_dict(state, assign=assign)
    except RuntimeError as e:  # a network of another shape: name the mismatch, not just the class
        raise DaaaError(f"{path}: does not fit the configured network ({_mismatch(str(e))})") from None


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _mismatch(text: str) -> str:
    """torch's several-line ``load_state_dict`` error as one short clause: each size mismatch as 'NAME is (file
    shape) in the file, (network shape) here', then the missing and unexpected keys."""
    sizes = [f"{name} is ({a}) in the file, ({b}) here" for name, a, b in _SIZE_MISMATCH.findall(text)]
    others = [ln.strip() for ln in text.splitlines()[1:] if ln.strip() and "size mismatch" not in ln]
    return "; ".join(sizes + others)[:400]


def network_from_info(info: dict[str, Any], state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """The network ``info`` describes with the weights ``state`` (from ``path``), in eval mode on the CPU. It is
    built without storage and takes the file's tensors: no ImageNet weights fetched, no initialisation."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = dataclasses.replace(ModelConfig(**{k: v for k, v in info["model"].items() if k in fields}),
                              pretrained="none")
    args = (cfg, info["num_classes"], info["channels"], info["image_size"])
    try:
        with torch.device("meta"):
            net, assign = build_model(*args, log=False), True
    except Exception:  # a network whose construction reads values (torchvision's RegNet): built for real
        net, assign = build_model(*args, log=False), False
    load_state(net, state, path, assign=assign)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        raise DaaaError(f"{path}: does not hold every tensor of the network")
    return describe(net, info).eval()


def load_model_file(path: str | Path, fallback: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a model file and its info; ``fallback`` describes a bare state dict (from the run's
    config.yaml). One line naming the file when it cannot be used."""
    state, info, _ = read_model_file(path)
    info = info or fallback
    if info is None:
        raise DaaaError(f"{path}: a bare state dict without a description of its network (and no config.yaml)")
    return network_from_info(info, state, path), info
