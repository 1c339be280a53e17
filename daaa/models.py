"""Networks of Sec. 4.2: the four-conv digit CNN and ResNet-50, each naming the conv layers whose attention is aligned.

Every network here has the same small interface, used by the trainers, the baselines and the attention loss:

* ``features(x) -> (N, D)``: the representation the classifier reads (used by DANN/JAN baselines);
* ``head(f) -> logits``;  ``forward(x) = head(features(x))``;
* ``aligned_layers: list[str]``: names (as in ``named_modules()``) of the conv layers whose attention maps
  (Eq. 4) are aligned by L_AT (Eq. 5), in forward order;
* ``backbone_parameters()`` / ``head_parameters()``: for the 0.1x backbone learning rate when fine-tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import DaaaError
from .runs import load_torch_file

LOG = logging.getLogger("daaa")


class DigitCNN(nn.Module):
    """The digit network of Sec. 4.2: four conv layers; the first three extract features, the fourth classifies.

    conv(3x3, w) - ReLU - maxpool - conv(3x3, 2w) - ReLU - maxpool - conv(3x3, 4w) - ReLU - maxpool -
    conv(k x k, num_classes) where k is the remaining spatial size, so the last conv is a linear classifier.
    (The paper gives no kernel sizes; 3x3 kernels train 1.5x faster on CPU than 5x5 ones at the same width.)
    Attention is aligned at ``conv1``, ``conv2``, ``conv3`` (the paper aligns "the three convolutional layers").
    No batch norm: it keeps a DDP run equal to a one-process run with the same global batch.
    """

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
        self.aligned_layers = ["conv1", "conv2", "conv3"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.pool(self.act(self.conv3(x)))
        return x.flatten(1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv4(f.view(f.shape[0], *self.feature_shape)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("conv4")]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.conv4.parameters())


class ResNet50(nn.Module):
    """torchvision's ResNet-50 with a new ``num_classes`` classifier.

    Aligned layers: every ``nn.Conv2d`` except the stem's ``conv1`` (and no pooling layer), as in
    Supplementary Sec. 1 -- 52 layers, including the four projection shortcuts.
    """

    def __init__(self, num_classes: int, pretrained: str = "none"):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        _load_resnet_weights(net, pretrained)
        self.in_features = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.fc = nn.Linear(self.in_features, num_classes)
        self.aligned_layers = [n for n, m in self.named_modules()
                               if isinstance(m, nn.Conv2d) and n != "backbone.conv1"]

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


def _load_resnet_weights(net: nn.Module, pretrained: str) -> None:
    if pretrained in ("none", ""):
        LOG.info("ResNet-50: random initialisation (model.pretrained=none)")
        return
    if pretrained == "imagenet":
        from torchvision.models import ResNet50_Weights

        weights = ResNet50_Weights.IMAGENET1K_V1  # the weights JAN and the paper's baselines start from
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise DaaaError(
                f"ImageNet weights for ResNet-50 are not available ({type(e).__name__}): download {weights.url} "
                f"to {cache}, or pass model.pretrained=PATH to a state-dict file, or model.pretrained=none") from None
        net.load_state_dict(state)
        return
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise DaaaError(f"option model.pretrained: {path} is not a file (expected imagenet, none or a state-dict path)")
    state = load_torch_file(path, " (option model.pretrained: expected a state-dict file)")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise DaaaError(f"option model.pretrained: {path} does not fit ResNet-50 "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    if cfg.arch == "digit_cnn":
        return DigitCNN(num_classes, in_channels, cfg.width, image_size)
    if cfg.arch == "resnet50":
        if in_channels != 3:
            raise DaaaError("option data.channels: resnet50 needs 3 channels")
        return ResNet50(num_classes, cfg.pretrained)
    raise DaaaError(f"option model.arch: unknown architecture {cfg.arch!r}")

