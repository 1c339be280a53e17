"""Attention maps (Eq. 4) and the attention alignment penalty L_AT (Eq. 5), Sec. 3.2.

Usable in any training loop::

    from daaa import AttentionAlignmentLoss, FeatureRecorder

    align = AttentionAlignmentLoss()                      # L2 between normalised maps, Eq. 5
    with FeatureRecorder(source_net, layers) as src, FeatureRecorder(target_net, layers) as tgt:
        with torch.no_grad():
            source_net(x_anchor)                          # e.g. x^S, or x^S paired with G_ST(x^S)
        logits = target_net(x_paired)
        loss_at = align(src.features, tgt.features)       # sum over layers and pairs
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

AttentionKind = Literal["l2", "l1", "linf", "fm"]
Discrepancy = Literal["l2", "l1", "mmd", "jmmd"]


def attention_map(features: torch.Tensor, kind: AttentionKind = "l2") -> torch.Tensor:
    """Vectorised, L2-normalised attention map of conv features (N, C, H, W) -> (N, H*W).

    ``"l2"`` is the paper's Eq. 4, A(x) = sum_c |F_c(x)|^2, divided by its L2 norm as in Eq. 5.
    The variants of Table A1: ``"l1"`` = sum_c |F_c|, ``"linf"`` = max_c |F_c|, ``"fm"`` = the raw feature maps
    flattened to (N, C*H*W). Computed in float32 whatever the autocast dtype: squares of bf16 activations lose
    the small values that the normalisation then amplifies.
    """
    _check_spatial(features)
    if kind == "l2":
        return _NormalisedEnergy.apply(features)[:, 0]
    f = features.float()
    if kind == "l1":
        a = f.abs().sum(dim=1)
    elif kind == "linf":
        a = f.abs().amax(dim=1)
    elif kind == "fm":
        a = f
    else:
        raise ValueError(f"unknown attention kind {kind!r} (l2, l1, linf, fm)")
    return F.normalize(a.flatten(1), p=2, dim=1, eps=_EPS)


def grouped_attention_maps(features: Sequence[torch.Tensor], kind: AttentionKind = "l2",
                           energies: bool = False) -> list[torch.Tensor]:
    """The maps of several layers, stacked by spatial size: (N, L_g, H*W) per group of the L_g layers whose maps
    have one size, groups in the order of their first layer. L_AT is a sum over layers (Eq. 5), so
    :meth:`AttentionAlignmentLoss.from_maps` takes these groups as it takes single layers. ``energies``: the inputs
    are already Eq. 4's A_l (N, 1, H, W), as :class:`FeatureRecorder` records them with ``energy=True``; only
    normalised here.

    Why: ResNet-50 aligns 52 layers in 4 sizes; a few dozen small operations per layer (and as many autograd nodes)
    made the DAAA step launch-bound on a GPU (2.4x a plain step at batch 32). ``"l2"`` maps are computed group by
    group in one autograd node; the other kinds layer by layer (one layer per group)."""
    if energies and kind != "l2":
        raise ValueError(f"grouped_attention_maps: energies are Eq. 4's l2 maps, not {kind!r} ones")
    for f in features:
        _check_spatial(f)
        if energies and f.shape[1] != 1:
            raise ValueError(f"grouped_attention_maps: expected energies (N, 1, ...), got shape {tuple(f.shape)}")
    if kind != "l2":
        return [attention_map(f, kind).unsqueeze(1) for f in features]
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for f in features:
        groups.setdefault(tuple(f.shape[2:]), []).append(f)
    node = _NormalisedMaps if energies else _NormalisedEnergy
    return [node.apply(*group) for group in groups.values()]


def crop_attention_maps(maps: torch.Tensor, crops: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """Normalised maps of cropped images read off the maps of the uncropped ones: (N, L, D) maps of square images
    (D = an H x H map per layer) and (N, 3) crop rows (top, left, flip) of ``size``-pixel crops
    (:func:`daaa.data.transforms.crop_params`) -> (N, L, side * side), each layer's map renormalised as Eq. 5 reads.

    Map pixel j of a crop covers input pixels [left + j s, left + (j + 1) s), s = size / side, i.e. pixel
    left / s + j of the uncropped image's map: sampled bilinearly (exact at whole-pixel offsets), mirrored for a
    flipped crop. An approximation of the maps a network computes on the crop itself: near the crop's border that
    network sees its padding where the uncropped image had pixels, a stride-s layer at an offset that is not a
    multiple of s pools other windows, and the map of a mirrored image is only about the mirror of its map. What it
    buys: the frozen source network's maps of every anchor are computed once at load size instead of a forward of
    each step's crops (``adapt.anchor_crops``; issue 18)."""
    n, layers, d = maps.shape
    full = math.isqrt(d)
    if full * full != d or crops.shape != (n, 3):
        raise ValueError(f"crop_attention_maps: expected square maps (N, L, H*H) and (N, 3) crops, got "
                         f"{tuple(maps.shape)} and {tuple(crops.shape)}")
    crops = crops.to(maps.device)
    # grid_sample's coordinates run from -1 to 1 over the pixel centres (align_corners); past the last one: border.
    # Few operations on purpose: this runs at every step, on small tensors (issue 18)
    to_unit, offsets = 2.0 / max(full - 1, 1), torch.arange(side, device=maps.device, dtype=maps.dtype)
    ys, xs = ((crops[:, :2, None].to(maps.dtype) / (size / side) + offsets) * to_unit - 1).unbind(1)
    xs = torch.where(crops[:, 2:3].bool(), xs.flip(1), xs)
    grid = torch.stack((xs[:, None, :].expand(n, side, side), ys[:, :, None].expand(n, side, side)), dim=-1)
    cropped = F.grid_sample(maps.view(n, layers, full, full), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
    return F.normalize(cropped.flatten(2), p=2, dim=2, eps=_EPS)


def _check_spatial(features: torch.Tensor) -> None:
    if features.dim() < 3:
        raise ValueError(f"attention_map: expected features (N, C, ...) with spatial dimensions, got shape "
                         f"{tuple(features.shape)}")


_EPS = 1e-12  # F.normalize's: an all-zero map stays zero


def _energy(features: torch.Tensor) -> torch.Tensor:
    """Eq. 4, A = sum_c F_c^2: (N, C, ...) -> (N, 1, ...), as a vector norm over channels squared -- one read of the
    features, in float32 without a float32 copy of bf16 ones (float64 for float64 features). No autograd: the nodes
    below hold its derivative, dA/dF_c = 2 F_c."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    root = torch.linalg.vector_norm(features, ord=2, dim=1, keepdim=True, dtype=dtype)
    return root.mul_(root)  # square_() is pow_() underneath: three more dispatcher calls per layer (issue 18's GPU)


def _normalise(energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5's A_l / |A_l|_2 of same-sized maps stacked to (N, L, H*W), normalised in place: (maps, norms, which
    norms were clamped)."""
    norm = torch.linalg.vector_norm(energy, ord=2, dim=2, keepdim=True)
    clamped = norm < _EPS  # F.normalize's eps: an all-zero map has no direction, its gradient is g / eps
    norm = norm.clamp_min_(_EPS)
    return energy.div_(norm), norm, clamped


def _normalise_backward(maps: torch.Tensor, norm: torch.Tensor, clamped: torch.Tensor, grad: torch.Tensor,
                        spatial: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """dL/dA_l of :func:`_normalise` for m = A / s, s = |A|_2: (g - m <m, g>) / s, times ``scale``, as one
    contiguous (L, N, *spatial) tensor (one copy for the group; layer l's slice is [l])."""
    radial = (maps * grad).sum(dim=2, keepdim=True).masked_fill_(clamped, 0.0)
    grad_energy = (grad - maps * radial).div_(norm)
    if scale != 1.0:
        grad_energy.mul_(scale)
    n, layers = grad.shape[:2]
    return grad_energy.transpose(0, 1).reshape(layers, n, *spatial)


class _NormalisedEnergy(torch.autograd.Function):
    """A_l / |A_l|_2 with A_l = sum_c F_l,c^2 (Eq. 4 and the normalisation of Eq. 5) for layers l = 1..L of one
    spatial size, stacked to (N, L, H*W), as one autograd node.

    Backward in one pass over each layer's features: dL/dF_c = 2 F_c dL/dA (:func:`_normalise_backward`).
    Autograd's own graph of these ops makes several passes over the largest activations of the network and a dozen
    small nodes per layer; per layer, forward and backward are one operation each (a GPU step at batch 32 waits on
    the launches of small operations: issue 18)."""

    @staticmethod
    def forward(ctx, *features: torch.Tensor) -> torch.Tensor:
        energies = [_energy(f) for f in features]
        maps, norm, clamped = _normalise((energies[0] if len(energies) == 1 else torch.cat(energies, 1)).flatten(2))
        ctx.save_for_backward(maps, norm, clamped, *features)
        return maps

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        maps, norm, clamped, *features = ctx.saved_tensors
        # one (N, 1, H, W) slice per layer, in the features' dtype, made by one copy for the whole group
        per_layer = _normalise_backward(maps, norm, clamped, grad, (1, *features[0].shape[2:]), scale=2.0)
        if per_layer.dtype != features[0].dtype:
            per_layer = per_layer.to(features[0].dtype)
        return tuple(f * g if needed else None for f, g, needed in zip(features, per_layer, ctx.needs_input_grad))


class _NormalisedMaps(torch.autograd.Function):
    """Eq. 5's normalisation of Eq. 4 energies A_l (N, 1, H, W) of one spatial size, stacked to (N, L, H*W): the half of
    :class:`_NormalisedEnergy` after the energies, for those :class:`_EnergyTap` took during the forward."""

    @staticmethod
    def forward(ctx, *energies: torch.Tensor) -> torch.Tensor:
        maps, norm, clamped = _normalise(torch.cat(energies, 1).flatten(2))  # a copy: normalised in place
        ctx.save_for_backward(maps, norm, clamped)
        ctx.spatial = tuple(energies[0].shape[1:])  # (1, H, W): each layer's gradient in its energy's shape
        return maps

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        maps, norm, clamped = ctx.saved_tensors
        return tuple(_normalise_backward(maps, norm, clamped, grad, ctx.spatial).unbind(0))


class _EnergyTap(torch.autograd.Function):
    """Eq. 4 taken from a layer's output on its way through the network: F -> (F, A = sum_c F_c^2).

    Backward: dL/dF = (the network's own gradient of F) + 2 F dL/dA in one ``addcmul``, where a separate energy node
    would write 2 F dL/dA to a new tensor of the features' size and autograd would then add the two (two more passes
    over the largest activations: ~0.05 of a source-only step of the digit CNN on a CPU, issue 18). F passes on as a
    view, which the network may not change in place (autograd refuses): :class:`FeatureRecorder` ``energy=True`` is
    for networks that do not."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(features)
        return features.view_as(features), _energy(features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_energy: torch.Tensor | None) -> torch.Tensor | None:
        (features,) = ctx.saved_tensors
        if grad_energy is None:
            return grad_out
        if grad_energy.dtype != features.dtype:  # bf16 features: their gradient in bf16, as the network's
            grad_energy = grad_energy.to(features.dtype)
        if grad_out is None:  # the factor on the small map: one pass over the features, not two
            return features * (grad_energy * 2.0)
        return torch.addcmul(grad_out, features, grad_energy, value=2.0)


#: a layer to record: its name in ``named_modules()``, or (name, fn) to record ``fn(output)`` instead of its output
#: (e.g. the activation applied to a conv's batch-normed output: :func:`daaa.models.attention_taps`)
Tap = Union[str, Tuple[str, Callable[[torch.Tensor], torch.Tensor]]]


class FeatureRecorder:
    """Records the outputs of named layers of a network during its forward passes (forward hooks).

    ``features`` holds the outputs of the last forward, in the order of ``layers`` (names, or (name, fn) pairs whose
    ``fn`` is applied to the output as it is recorded). A context manager, so the hooks never outlive their use.

    ``energy=True`` records Eq. 4's A_l = sum_c F_l,c^2 (N, 1, H, W) of each output instead, read as ``energies``
    (float32; float64 for float64 features), for :func:`grouped_attention_maps` with ``energies=True``. A layer's
    own output then passes on through a node whose backward adds 2 F dL/dA to the network's gradient in one
    operation (:class:`_EnergyTap`): the cheapest backward of Eq. 4, but the network must not change that output in
    place (autograd raises if it does).
    """

    def __init__(self, model: nn.Module, layers: Sequence[Tap], energy: bool = False):
        modules = dict(model.named_modules())
        taps = [(t, None) if isinstance(t, str) else tuple(t) for t in layers]
        missing = [n for n, _ in taps if n not in modules]
        if missing:
            raise KeyError(f"model has no layer(s) {missing}")
        self._slots: dict[str, torch.Tensor] = {}
        self.layers = [n for n, _ in taps]
        self.energy = energy
        self._handles = [modules[n].register_forward_hook(self._hook(n, fn)) for n, fn in taps]
        # each forward of the model starts empty: a layer it skipped is not read from an earlier forward
        self._handles.append(model.register_forward_pre_hook(lambda _m, _i: self._slots.clear()))

    def _hook(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor] | None):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.energy:
                self._slots[name] = output if fn is None else fn(output)
            elif fn is None:  # the output goes on through the tap (its return value replaces the layer's output)
                output, self._slots[name] = _EnergyTap.apply(output)
                return output
            else:
                self._slots[name] = _EnergyTap.apply(fn(output))[1]
            return None
        return hook

    @property
    def features(self) -> list[torch.Tensor]:
        if self.energy:  # energies taken for features would give maps of A^2, silently
            raise RuntimeError("FeatureRecorder(energy=True) holds Eq. 4's energies, not features: read .energies "
                               "and map them with energies=True")
        return self._recorded()

    @property
    def energies(self) -> list[torch.Tensor]:
        """Eq. 4's A_l (N, 1, H, W) of each layer in the last forward (``energy=True`` only)."""
        if not self.energy:
            raise RuntimeError("FeatureRecorder holds features: .energies needs FeatureRecorder(..., energy=True)")
        return self._recorded()

    def _recorded(self) -> list[torch.Tensor]:
        missing = [n for n in self.layers if n not in self._slots]
        if missing:
            raise RuntimeError(f"FeatureRecorder: layer(s) {missing} produced no output in the model's last forward")
        return [self._slots[n] for n in self.layers]

    @property
    def complete(self) -> bool:
        """Whether every layer has produced its output in the current forward."""
        return len(self._slots) == len(self.layers)

    def clear(self) -> None:
        self._slots.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._slots.clear()

    def __enter__(self) -> "FeatureRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def pair_distances(source_maps: torch.Tensor, target_maps: torch.Tensor,
                   discrepancy: Literal["l2", "l1"] = "l2") -> torch.Tensor:
    """Per-pair distance between normalised maps (N, D) x (N, D) -> (N,): the summand of Eq. 5; maps stacked by
    layer (N, L, D) give (N, L).

    ``"l2"`` is the paper's (not squared) L2 distance; ``"l1"`` the L1 distance of Table 4.
    """
    diff = source_maps - target_maps
    if discrepancy == "l2":
        # sqrt of a clamped sum: the gradient of ||0||_2 would be NaN for identical maps
        return diff.pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()
    if discrepancy == "l1":
        return diff.abs().sum(dim=-1)
    raise ValueError(f"not a per-pair discrepancy: {discrepancy!r}")


class AttentionAlignmentLoss(nn.Module):
    """L_AT of Eq. 5: sum over aligned layers l and pairs of || A^S_l / |A^S_l| - A^T_l / |A^T_l| ||_2.

    ``forward(source_features, target_features)`` takes, per layer, the source network's conv features of the
    anchor images and the target network's conv features of the paired images (row k of one pairs with row k of
    the other). The four pair terms of Eq. 5 are simply four groups of rows: (x^S, x^S), (x^S, G_ST(x^S)),
    (G_TS(x^T), G_TS(x^T)) and (G_TS(x^T), x^T) -- see :func:`daaa.batches.MixedBatch.anchor_rows`.

    ``discrepancy`` selects Table 4's measures: ``"l2"`` (paper), ``"l1"``, and the distribution distances
    ``"mmd"`` (per layer, summed) and ``"jmmd"`` (joint over layers), which ignore the pairing. The paper does not
    say how its JMMD joins the layers; JAN's product kernel at per-layer bandwidths is numerically the identity
    matrix over ResNet-50's 52 aligned layers, so ``"jmmd"`` scales every layer's bandwidths by the number of
    layers (:func:`daaa.baseline_losses.jmmd` with ``normalize_layers=True``). ``reduction="sum"`` is
    Eq. 5 literally; ``"mean"`` divides by the number of pairs. With ``weights`` (N,), pairs are weighted
    (e.g. 0 for rows that do not take part).
    """

    def __init__(self, kind: AttentionKind = "l2", discrepancy: Discrepancy = "l2",
                 reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        for name, value, allowed in (("kind", kind, ("l2", "l1", "linf", "fm")),
                                     ("discrepancy", discrepancy, ("l2", "l1", "mmd", "jmmd")),
                                     ("reduction", reduction, ("sum", "mean"))):
            if value not in allowed:
                raise ValueError(f"AttentionAlignmentLoss: {name}={value!r} is not one of {', '.join(allowed)}")
        self.kind = kind
        self.discrepancy = discrepancy
        self.reduction = reduction

    def maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One normalised map (N, D) per layer (e.g. to look at them)."""
        return [attention_map(f, self.kind) for f in features]

    def grouped_maps(self, features: Sequence[torch.Tensor], energies: bool = False) -> list[torch.Tensor]:
        """The same maps stacked by size, (N, L_g, D) (:func:`grouped_attention_maps`): fewer, larger operations;
        what :meth:`forward` uses. ``energies``: ``features`` are Eq. 4's energies (``FeatureRecorder(energy=True)``,
        ``kind="l2"`` only)."""
        return grouped_attention_maps(features, self.kind, energies)

    def forward(self, source_features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor],
                weights: torch.Tensor | None = None, source_are_maps: bool = False,
                energies: bool = False) -> torch.Tensor:
        """L_AT of the features (per layer, in the same order on both sides); ``source_are_maps``: the source side
        is already maps, from :meth:`maps` or :meth:`grouped_maps`; ``energies``: the features are Eq. 4's energies
        (``FeatureRecorder(energy=True).energies``)."""
        if source_are_maps:
            grouped = any(s.dim() == 3 for s in source_features)
            if energies and not grouped:
                raise ValueError("L_AT: energies=True pairs with source maps from grouped_maps (N, L, D), not "
                                 "per-layer ones")
            return self.from_maps(source_features, self.grouped_maps(target_features, energies) if grouped
                                  else self.maps(target_features), weights)
        return self.from_maps(self.grouped_maps(source_features, energies),
                              self.grouped_maps(target_features, energies), weights)

    def from_maps(self, source_maps: Sequence[torch.Tensor], target_maps: Sequence[torch.Tensor],
                  weights: torch.Tensor | None = None, source_rows: torch.Tensor | None = None) -> torch.Tensor:
        """L_AT from already normalised maps (e.g. the frozen source net's cached maps): per layer (N, D) or per
        group of layers (N, L, D), alike on both sides. Pair k is (``source_maps[i][k]``, ``target_maps[i][k]``), or
        (``source_maps[i][source_rows[k]]``, ``target_maps[i][k]``) when ``source_rows`` is given (one lookup per
        group instead of a copy of every layer's anchors)."""
        if not target_maps or len(source_maps) != len(target_maps):
            raise ValueError(f"L_AT: {len(source_maps)} source and {len(target_maps)} target layers (one map per "
                             "aligned layer on each side, at least one)")
        n = target_maps[0].shape[0]
        if source_rows is not None:
            if source_rows.shape != (n,):
                raise ValueError(f"L_AT: source_rows {tuple(source_rows.shape)}: expected one per pair, ({n},)")
            source_maps = [s[source_rows] for s in source_maps]
        for layer, (s, t) in enumerate(zip(source_maps, target_maps)):
            if s.shape != t.shape:
                raise ValueError(f"L_AT: layer {layer}: source maps {tuple(s.shape)} and target maps "
                                 f"{tuple(t.shape)} differ (row k of one pairs with row k of the other)")
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"L_AT: weights {tuple(weights.shape)}: expected one per pair, ({n},)")
        if self.discrepancy in ("l2", "l1"):
            per_pair = sum(_per_row(pair_distances(s, t, self.discrepancy)) for s, t in zip(source_maps, target_maps))
            if weights is not None:
                per_pair = per_pair * weights
            total = per_pair.sum()
        else:
            from .baseline_losses import jmmd, mmd
            source_maps, target_maps = _layers(source_maps), _layers(target_maps)
            if weights is not None:  # distribution distances use the rows that take part only
                keep = weights > 0
                source_maps = [s[keep] for s in source_maps]
                target_maps = [t[keep] for t in target_maps]
                n = int(keep.sum())
            if n < 2:
                return target_maps[0].new_zeros(())
            if self.discrepancy == "mmd":
                dist = sum(mmd(s, t) for s, t in zip(source_maps, target_maps))
            else:
                # the bandwidths scale with the number of layers: JAN's own product of 52 ResNet-50 layers is
                # numerically the identity kernel (daaa.baseline_losses.jmmd)
                dist = jmmd(list(source_maps), list(target_maps), normalize_layers=True)
            total = dist * n  # on the scale of a per-pair sum, so beta means the same across measures
        return total / max(n, 1) if self.reduction == "mean" else total


def _per_row(distances: torch.Tensor) -> torch.Tensor:
    """(N,) from one layer's distances, or the sum over a group's layers (N, L)."""
    return distances.sum(dim=1) if distances.dim() == 2 else distances


def _layers(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer maps (N, D) from maps that may be stacked by group (N, L, D)."""
    return [m for g in maps for m in (g.unbind(1) if g.dim() == 3 else (g,))]
