"""Label-free pairing quality: does the translation keep what the images show? (RUN/translate/quality.json)

DAAA stands on its pairs (Sec. 3.1): T_f = G_ST(x^S) inherits x^S's label, and L_AT aligns x^S with G_ST(x^S) and
G_TS(x^T) with x^T (Eq. 5). A CycleGAN that changes the content -- a digit 8 drawn as a 2 -- still "succeeds", and a
user without target labels cannot see it. These figures need no target label; f is the frozen source network:

* ``source_round_trip_agreement``: f gives x^S and G_TS(G_ST(x^S)) the same label;
* ``source_round_trip_accuracy``: f gives G_TS(G_ST(x^S)) the true label of x^S;
* ``target_round_trip_agreement``: f gives G_ST(G_TS(x^T)) the label it gives x^T, over the x^T where f is confident
  (softmax maximum >= ``cyclegan.quality.confidence``; their share is ``target_confident_share``);
* ``target_sf_agreement``: f gives S_f = G_TS(x^T) that label too (over the same x^T; what CyCADA's semantic loss asks);
* ``tf_legibility`` (needs no f): a network of the configured kind fitted briefly on T_f alone, with the source labels
  (``cyclegan.quality.fit_steps`` steps of the source optimiser), reads that share of held-out T_f as their source
  label. A coloured blur is illegible; note that a *consistent* relabelling (every 8 drawn as a 2) stays legible --
  the round trips see that one.
* ``target_route_agreement``: the two translation directions label the real target alike: that T_f-fitted network
  reads x^T (the G_ST route: it learnt the classes from translated source images) and f reads G_TS(x^T) (the G_TS
  route), over every x^T. Unlike the figures above it also drops when G_ST misses a part of the target's style (a
  T_f-fitted network then fails on those x^T), not only when the content changes; it tracked DAAA's accuracy across
  good and bad CycleGAN settings on two MNIST-M pairs (BENCHMARKS.md).

``warning`` is one line when a round-trip or S_f agreement is below ``cyclegan.quality.min_agreement``, the
legibility below ``cyclegan.quality.min_legibility`` or the route agreement below
``cyclegan.quality.min_route_agreement``: the translation then likely changes the content, and DAAA
trains on wrong pairs. The figures are a diagnostic of the pairs, not a part of the method.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, DataConfig
from .data.domain import fingerprint
from .data.streaming import take
from .data.transforms import center_crop, normalize, prepare, train_crops
from .distributed import Context
from .evaluate import predict
from .models import build_model
from .optim import build_optimizer
from .runs import atomic_write_json, read_json_or

LOG = logging.getLogger("daaa")

FORMAT = "daaa-pairing-quality/2"  # /2: target_route_agreement
AGREEMENTS = ("source_round_trip_agreement", "target_round_trip_agreement", "target_sf_agreement")
# figure -> what it says, in the table of the log and of `daaa report`
DESCRIPTIONS = {
    "source_round_trip_agreement": "source round trip: f(x^S) = f(G_TS(G_ST(x^S)))",
    "source_round_trip_accuracy": "source round trip: f(G_TS(G_ST(x^S))) = true label of x^S",
    "target_confident_share": "target: share of x^T where f is confident (pseudo-labelled)",
    "target_round_trip_agreement": "target round trip: f(G_ST(G_TS(x^T))) = confident f(x^T)",
    "target_sf_agreement": "target -> S_f: f(G_TS(x^T)) = confident f(x^T)",
    "tf_legibility": "T_f legibility: a brief T_f-only fit reads held-out T_f as their source label",
    "target_route_agreement": "target routes: the T_f-only fit's label of x^T = f(G_TS(x^T))",
}
# figure -> the cyclegan.quality option below which it warns
LIMITS = {**dict.fromkeys(AGREEMENTS, "min_agreement"), "tf_legibility": "min_legibility",
          "target_route_agreement": "min_route_agreement"}
_LEGIBILITY_SEED = 104729  # the held-out split and batches of the T_f-only fit: apart from every other draw


def local_context(device: torch.device | str) -> Context:
    """This process alone on ``device``, fp32: the figures are measured on rank 0."""
    return Context(0, 1, torch.device(device), None, False)


def weights_fingerprint(net: nn.Module) -> str:
    """The identity of a network's weights (for stage keys: a translation guided by it, its quality figures)."""
    return fingerprint(*net.state_dict().values())


def model_range_classifier(net: nn.Module, data_cfg: DataConfig,
                           device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen copy of the classifier ``net``, on ``device``, taking CycleGAN images: float in [-1, 1], a whole
    stored image at any side. They are shown as an evaluated image is (resized to ``data.load_size``, centre crop of
    ``data.image_size``, normalised); gradients flow to the input only (CyCADA's semantic loss)."""
    frozen = copy.deepcopy(net).to(device).eval()
    frozen.requires_grad_(False)
    load, size = data_cfg.load_size, data_cfg.image_size

    def classify(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != load or x.shape[-2] != load:
            x = F.interpolate(x, size=(load, load), mode="bilinear", align_corners=False)
        return frozen(normalize(center_crop((x + 1.0) * 127.5, size), data_cfg))

    return classify


# ---------------------------------------------------------------------------------------------- the figures
def share_equal(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    """The share of positions where the label vectors ``a`` and ``b`` agree (within ``mask``); None when empty."""
    same = a == b
    if mask is not None:
        same = same[mask]
    return round(float(same.float().mean()), 6) if same.numel() else None


def source_figures(f: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                   round_trip: torch.Tensor) -> dict[str, float | None]:
    """The source round trip x^S -> G_ST -> G_TS read by the source network ``f`` (uint8 images -> logits)."""
    real, back = f(images).argmax(1), f(round_trip).argmax(1)
    return {"source_round_trip_agreement": share_equal(real, back),
            "source_round_trip_accuracy": share_equal(back, labels)}


def target_figures(f: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, sf_labels: torch.Tensor,
                   round_trip: torch.Tensor | None, confidence: float) -> dict[str, float | None]:
    """The target round trip x^T -> G_TS -> G_ST and S_f = G_TS(x^T) (``sf_labels``: ``f``'s labels of S_f, which
    :func:`route_agreement` reads too), read by ``f`` against its own confident labels of x^T (pseudo-labels: the
    target has none)."""
    prob = f(images).softmax(1)
    conf, pseudo = prob.max(1)
    keep = conf >= confidence
    out = {"target_confident_share": share_equal(keep, torch.ones_like(keep)),
           "target_sf_agreement": share_equal(sf_labels, pseudo, keep),
           "target_round_trip_agreement": None}
    if round_trip is not None:
        out["target_round_trip_agreement"] = share_equal(f(round_trip).argmax(1), pseudo, keep)
    return out


def fit_tf_reader(synthetic_target: torch.Tensor, labels: torch.Tensor, cfg: Config,
                  device: torch.device | str) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """A network that learnt the classes from T_f alone: the preset's network, fresh, fitted for
    ``cyclegan.quality.fit_steps`` steps of the source optimiser with the training augmentation on all but a
    held-out share of T_f (with their source labels). Returns (reader: uint8 images -> logits, held-out indices);
    None when switched off (0 steps) or with fewer than 2 images. The run's global RNG is left as it was."""
    q = cfg.cyclegan.quality
    if q.fit_steps == 0 or len(synthetic_target) < 2:
        return None
    gen = torch.Generator().manual_seed(cfg.runtime.seed + _LEGIBILITY_SEED)
    order = torch.randperm(len(synthetic_target), generator=gen)
    n_held = min(len(order) - 1, max(1, round(len(order) * q.held_out_fraction)))
    held, fit = order[:n_held], order[n_held:]
    with torch.random.fork_rng(devices=[]):  # its own weights; the run's global RNG is left as it was
        torch.manual_seed(cfg.runtime.seed + _LEGIBILITY_SEED)
        net = build_model(cfg.model, int(labels.max()) + 1, cfg.data.channels, cfg.data.image_size).to(device)
    opt = build_optimizer(net, cfg.source.optim)
    net.train()
    for step in range(q.fit_steps):
        idx = fit[torch.randint(len(fit), (q.fit_batch_size,), generator=gen)]
        batch = synthetic_target[idx]
        x = prepare(batch, cfg.data, train=True, crops=train_crops(batch, cfg.data, cfg.runtime.seed, step),
                    device=torch.device(device))
        loss = F.cross_entropy(net(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ctx = local_context(device)
    return (lambda images: predict(net, images, cfg.data, ctx)), held


def tf_legibility(synthetic_target: torch.Tensor, labels: torch.Tensor, cfg: Config,
                  device: torch.device | str) -> float | None:
    """The share of held-out T_f that :func:`fit_tf_reader`'s network reads as their source label (None: not
    measured)."""
    fitted = fit_tf_reader(synthetic_target, labels, cfg, device)
    return None if fitted is None else _legibility(fitted, synthetic_target, labels)


def _legibility(fitted: tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], synthetic_target: torch.Tensor,
                labels: torch.Tensor) -> float | None:
    read, held = fitted
    return share_equal(read(take(synthetic_target, held)).argmax(1), labels[held])


def route_agreement(read_tf: Callable[[torch.Tensor], torch.Tensor], target_images: torch.Tensor,
                    sf_labels: torch.Tensor) -> float | None:
    """The share of x^T that the G_ST route (``read_tf``: a network fitted on T_f) and the G_TS route
    (``sf_labels``: the source network's labels of S_f = G_TS(x^T)) give the same label; no target label is used."""
    return share_equal(read_tf(target_images).argmax(1), sf_labels)


def warning_of(figures: dict[str, Any], cfg: Config) -> str | None:
    """One line when the figures say the translation changes what the images show, else None."""
    q = cfg.cyclegan.quality
    low = [f"{k} {figures[k] * 100:.1f}% < {getattr(q, option) * 100:.0f}%" for k, option in LIMITS.items()
           if figures.get(k) is not None and figures[k] < getattr(q, option)]
    if not low:
        return None
    return ("the translation seems to change what the images show or to miss part of the target's look ("
            + "; ".join(low) + "): DAAA would train on wrong pairs; see README 'Pairing quality' (e.g. more "
            "cyclegan.steps, another cyclegan.lambda_cycle)")


# ---------------------------------------------------------------------------------------------- measure, keep, show
def quality_key(cfg: Config, data: Any, round_trips: tuple[torch.Tensor | None, torch.Tensor | None],
                source_net: nn.Module | None) -> dict[str, Any]:
    """What decides the figures: the pairs, the source network, and (for the T_f fit) its settings."""
    d = {k: v for k, v in dataclasses.asdict(cfg.data).items()
         if k not in ("data_root", "download", "cache_bytes", "num_workers")}  # not what the figures depend on
    legibility = {"synthetic_target": fingerprint(data.synthetic_target, data.source.labels),
                  "quality": dataclasses.asdict(cfg.cyclegan.quality), "model": dataclasses.asdict(cfg.model),
                  "data": d, "seed": cfg.runtime.seed,
                  # the T_f fit uses the source optimiser but no weight average
                  "optim": {k: v for k, v in dataclasses.asdict(cfg.source.optim).items() if k != "ema_decay"}}
    pairs = fingerprint(data.source.images, data.target.images, data.synthetic_source, *round_trips)
    return {"legibility": legibility, "pairs": pairs,
            "source_network": weights_fingerprint(source_net) if source_net is not None else None}


def measure(cfg: Config, data: Any, round_trips: tuple[torch.Tensor | None, torch.Tensor | None],
            source_net: nn.Module | None, device: torch.device | str,
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """quality.json's content for the pairs of ``data`` (a :class:`~daaa.data.domain.DomainData` with its
    synthetic streams) and ``round_trips`` = (G_TS(G_ST(x^S)), G_ST(G_TS(x^T))) (None: not known). Without a
    ``source_net`` only the T_f legibility is measured, and ``previous`` (an earlier quality.json) lends its
    legibility when the T_f fit would be the same (with one, the fit is needed again for the route agreement)."""
    key = quality_key(cfg, data, round_trips, source_net)
    figures: dict[str, float | None] = dict.fromkeys(DESCRIPTIONS)
    old, fitted = previous or {}, None
    if source_net is None and (old.get("key") or {}).get("legibility") == key["legibility"]:
        figures["tf_legibility"] = (old.get("figures") or {}).get("tf_legibility")  # the route agreement needs f
    else:
        fitted = fit_tf_reader(data.synthetic_target, data.source.labels, cfg, device)
        figures["tf_legibility"] = None if fitted is None else _legibility(fitted, data.synthetic_target,
                                                                           data.source.labels)
    notes = []
    if source_net is None:
        notes.append("no finished source network in the run folder: only the T_f legibility is measured "
                     "(`daaa run` measures every figure after the source stage)")
    else:
        net = source_net.to(device)
        ctx = local_context(device)

        def f(images: torch.Tensor) -> torch.Tensor:
            return predict(net, images, cfg.data, ctx)

        if round_trips[0] is None:
            notes.append("the translation holds no round trips (user folders, or made by an older daaa): the "
                         "round-trip figures are not measured")
        else:
            figures.update(source_figures(f, data.source.images, data.source.labels, round_trips[0]))
        sf_labels = f(data.synthetic_source).argmax(1)  # one pass over S_f for both figures that read it
        figures.update(target_figures(f, data.target.images, sf_labels, round_trips[1],
                                      cfg.cyclegan.quality.confidence))
        if fitted is not None:
            figures["target_route_agreement"] = route_agreement(fitted[0], data.target.images, sf_labels)
    if cfg.cyclegan.lambda_semantic > 0:
        # measured on the demo pair: agreements up (S_f 95 -> 100%), DAAA down (90.8 -> 72.3%; BENCHMARKS.md)
        notes.append("cyclegan.lambda_semantic > 0 trains the generators to agree with the source network f, the "
                     "figures' own judge: its agreements are no independent evidence that content is kept")
    return {"format": FORMAT, "key": key, "figures": figures, "warning": warning_of(figures, cfg), "notes": notes,
            "n_source": len(data.source), "n_target": len(data.target)}


def measure_into(stage_dir: Path, cfg: Config, data: Any,
                 round_trips: tuple[torch.Tensor | None, torch.Tensor | None], source_net: nn.Module | None,
                 device: torch.device | str) -> dict[str, Any]:
    """Measure (or reuse, when its key is unchanged) ``stage_dir``/quality.json, write it, log its table and
    warning; returns its content."""
    path = Path(stage_dir) / "quality.json"
    old = read_json_or(path, {})
    old = old if isinstance(old, dict) else {}
    key = quality_key(cfg, data, round_trips, source_net)
    if old.get("format") == FORMAT and old.get("key") == key:
        quality = old
    else:
        quality = measure(cfg, data, round_trips, source_net, device, old)
        atomic_write_json(path, quality)
    LOG.info("pairing quality (label-free, f = the frozen source network; %s):\n%s", path, format_table(quality))
    if quality.get("warning"):
        LOG.warning("pairing quality: %s", quality["warning"])
    return quality


def table_rows(quality: dict[str, Any]) -> list[list[str]]:
    """[figure, what it says, value, warning below] for every figure of a quality.json."""
    figures = quality.get("figures") or {}
    q = (quality.get("key") or {}).get("legibility", {}).get("quality", {})
    rows = []
    for name, text in DESCRIPTIONS.items():
        v = figures.get(name)
        limit = q.get(LIMITS[name]) if name in LIMITS else None
        rows.append([name, text, "-" if v is None else f"{v * 100:.1f}%",
                     "-" if limit is None else f"{limit * 100:.0f}%"])
    return rows


def format_table(quality: dict[str, Any]) -> str:
    """The figures as a short text table (for the log), then the notes."""
    lines = [f"  {text:<78s} {value:>6s}" for _, text, value, _ in table_rows(quality)]
    return "\n".join(lines + [f"  ({note})" for note in quality.get("notes") or []])


def report_blocks(run_dir: Path) -> list[tuple]:
    """The blocks of `daaa report` (see :mod:`daaa.report`) for RUN/translate/quality.json; none without it."""
    quality = read_json_or(Path(run_dir) / "translate" / "quality.json")
    if not isinstance(quality, dict) or quality.get("format") != FORMAT:
        return []
    blocks: list[tuple] = [("h", 3, "pairing quality (label-free)"),
                           ("table", ["figure", "what it measures (f: the frozen source network)", "value",
                                      "warning below"], table_rows(quality))]
    if quality.get("warning"):
        blocks.append(("p", f"Warning: {quality['warning']}"))
    blocks += [("p", note) for note in quality.get("notes") or []]
    return blocks
