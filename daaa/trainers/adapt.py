"""Target-network training, Sec. 3.4: min_theta L_full = L_CE + L_EM + beta * L_AT (Eq. 12).

One trainer covers the paper's rows and ablations by configuration (:class:`daaa.config.AdaptConfig`):
``train_data`` picks the streams (S, T_f, S+T_f, T_f+T, S+T_f+T+S_f; Tables 1-2), ``beta`` the attention penalty,
``attention``/``discrepancy`` Tables A1/4, ``async_posterior``/``filtering``/``restart_schedule`` Table 3. Source-only
training is the same trainer with ``train_data="S"`` and ``beta=0``.

What cannot change between syncs is computed once: the frozen source network's normalised attention maps of the
fixed anchor images (S and S_f; Eq. 5 only ever feeds those to the source net) and M_post's posteriors of T. With
random crops the anchors change every step: the source net then runs on each step's cropped anchors, or
(``adapt.anchor_crops="cached"``) its maps of the uncropped anchors are computed once and cropped like the step's rows.
The four streams go through the target network in one batched forward.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttentionAlignmentLoss, FeatureRecorder, crop_attention_maps
from ..batches import MixedBatch, MixedBatchSampler
from ..config import AdaptConfig, DataConfig
from ..data.domain import DomainData
from ..data.streaming import cache_room, prefetching, scan
from ..data.transforms import prepare, train_crops
from ..distributed import Context
from ..em import PosteriorNetwork, confidence_mask, em_loss
from ..errors import DaaaError
from ..models import attention_taps
from ..optim import build_optimizer, set_lr
from ..runs import Stage
from .base import Trainer
from .loop import guard_finite

LOG = logging.getLogger("daaa")


def unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(rows, dim=0, return_inverse=True)`` for a CPU matrix of non-negative integers, rows in the same
    (lexicographic) order: each row read as one mixed-radix int64, so one 1-D unique. Why: ``unique`` along a
    dimension compares rows pairwise, ~100 more small operations per step on the anchors' keys, and a GPU step at
    office31's batch waits on the CPU's dispatch (``benchmarks/step_probes.py opcount``)."""
    bases = rows.amax(dim=0) + 1 if len(rows) else None
    if bases is None or math.prod(bases.tolist()) >= 2 ** 63:  # no row, or codes that would not fit an int64
        return torch.unique(rows, dim=0, return_inverse=True)
    place = torch.cat([bases.flip(0).cumprod(0).flip(0)[1:], bases.new_ones(1)])  # each column's place value
    codes, inverse = torch.unique(rows @ place, return_inverse=True)
    first = torch.empty(len(codes), dtype=torch.long).scatter_(0, inverse, torch.arange(len(rows)))
    return rows[first], inverse


class _AllRecorded(Exception):
    """Ends a forward whose remaining layers are not needed (:meth:`DAAATrainer._grouped_maps`)."""


class GraphedForward:
    """``fn`` (a no-grad function of one image batch, returning tensors) replayed as one CUDA graph for batches of
    up to ``rows`` images: the frozen source net's forward on the anchors and their maps (``runtime.cuda_graphs``).
    At a GPU's batch sizes that forward is ~1,400 small kernels whose launches the GPU waits on; replayed, it is one
    launch. The same computation (values to float rounding: cuDNN may pick other kernels for the padded batch). A
    batch of fewer rows fills the first rows of the captured input (every row is computed on its own: batch norm is
    in eval mode); the outputs are views of the graph's memory, valid until the next call."""

    def __init__(self, fn: Callable[[torch.Tensor], list[torch.Tensor]], example: torch.Tensor, rows: int):
        channels_last = example.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.rows = rows
        self.input = example.new_zeros((rows, *example.shape[1:])).contiguous(memory_format=fmt)
        self.input[:len(example)].copy_(example)
        side = torch.cuda.Stream(example.device)  # warm-up (cudnn's autotuning) off the capture, as torch's recipe
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(self.input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = fn(self.input)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.input[:len(x)].copy_(x)
        self.graph.replay()
        return [out[:len(x)] for out in self.output]


class DAAATrainer(Trainer):
    """Trains ``target_net`` on mixed batches with Eq. 12, guided by the frozen ``source_net`` (None: no L_AT).

    :meth:`losses` holds the maths (Eq. 6, 11, 5); :meth:`step` syncs M_post, sets the learning rate and updates.
    """

    def __init__(self, spec: AdaptConfig, data_cfg: DataConfig, data: DomainData, ctx: Context, stage: Stage,
                 target_net: nn.Module, source_net: nn.Module | None = None, seed: int = 0, progress: bool = True,
                 desc: str = "adapt", probe: Any = None):
        self.spec, self.data_cfg, self.data, self.ctx, self.stage = spec, data_cfg, data, ctx, stage
        self.seed, self.progress, self.desc = seed, progress, desc
        self.probe = probe  # daaa.selection.SelectionProbe: label-free selection criteria at each evaluation
        self.streams = set(spec.train_data.split("+"))
        self._check_inputs(source_net)
        self.net = target_net.to(ctx.device)
        if ctx.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.model = ctx.wrap(self.net)
        self.optimizer = build_optimizer(self.net, spec.optim)
        self.scaler = ctx.grad_scaler()  # fp16 autocast only; a pass-through otherwise
        self.sampler = MixedBatchSampler(len(data.source), len(data.target) if data.target is not None else 1,
                                         spec.batch_size, spec.proportions, spec.train_data, seed, ctx.rank,
                                         ctx.world_size)
        self.global_batch = spec.batch_size
        self.uses_em = bool(self.streams & {"T", "Sf"})
        self.posterior_net = PosteriorNetwork(self.net, spec.sync_interval)
        self.posterior_cache: torch.Tensor | None = None
        # L_AT needs the frozen source net; at beta = 0 it is still logged (Fig. 4 left), every
        # adapt.attention_log_interval-th step
        self.source_net = source_net
        self.alignment = AttentionAlignmentLoss(spec.attention, spec.discrepancy, reduction="sum")
        # Eq. 4's F_l of each aligned layer, read where adapt.attention_tap says (a ViT: one line, no layer)
        self.layers = attention_taps(self.net, spec.attention_tap) if source_net is not None else []
        # whether both networks' recorders take Eq. 4's energies on the way (FeatureRecorder(energy=True))
        self.energy_taps = self._energy_taps_work()
        self.source_maps: list[torch.Tensor] | None = None  # per group of layers: the maps of S, then those of S_f
        # with crops: those maps are of the uncropped images, and a crop's map has anchor_sides[g] pixels a side
        self.anchor_sides: list[int] | None = None
        # runtime.cuda_graphs: the anchors' frozen forward as a captured graph (None: not yet; False: cannot be)
        self._graphed: GraphedForward | bool | None = None
        if source_net is not None:
            self.source_net = source_net.to(ctx.device).eval().requires_grad_(False)
            if ctx.channels_last:
                self.source_net = self.source_net.to(memory_format=torch.channels_last)
            if spec.cache_source_attention and (not data_cfg.augment or spec.anchor_crops == "cached"):
                self.source_maps = self._source_map_cache()
        # streamed data sets: DataLoader workers decode the images of the coming steps ahead (the batches and their
        # pairing stay the sampler's, a function of (seed, step); each rank decodes its own rows), Eq. 5's anchors
        # too unless their maps are cached
        reads_anchors = source_net is not None and self.source_maps is None
        self.sampler = prefetching(self.sampler, data, spec.steps, data_cfg.num_workers,
                                   spec.target_anchors if reads_anchors else None, self.computes_attention)
        self.init_average()

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, source_net: nn.Module | None) -> None:
        d = self.data
        if d.source.labels is None:
            raise DaaaError(f"source domain {d.source.name} has no labels")
        needs = {"Tf": d.synthetic_target, "T": d.target, "Sf": d.synthetic_source}
        for s, v in needs.items():
            if s in self.streams and v is None:
                raise DaaaError(f"option adapt.train_data: stream {s} is trained on but not available (translate first)")
        if "Sf" in self.streams and "T" not in self.streams:
            raise DaaaError("option adapt.train_data: Sf needs T (a synthetic source image takes the posterior of its real target image)")
        if source_net is not None and (d.synthetic_target is None or d.synthetic_source is None):
            raise DaaaError("L_AT needs the synthetic target and synthetic source images (translate first)")

    def _energy_taps_work(self) -> bool:
        """Whether L_AT can read Eq. 4's energies as the layers' outputs pass by (``FeatureRecorder(energy=True)``:
        the backward adds 2 F dL/dA to the network's gradient in one operation; issue 18): for l2 maps, on a
        network that does not change an aligned layer's output in place (one image through it in eval mode tells,
        where the first training forward would fail). Otherwise the features are recorded and mapped after."""
        if self.spec.attention != "l2" or not self.layers:
            return False
        x = prepare(self.data.source.images[:1], self.data_cfg, device=self.ctx.device,
                    channels_last=self.ctx.channels_last)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.enable_grad(), FeatureRecorder(self.net, self.layers, energy=True), self.ctx.autocast():
                self.net(x)
        except RuntimeError as e:
            if "inplace" not in str(e):
                raise
            LOG.info("%s: the network changes an aligned layer's output in place: L_AT maps its recorded features "
                     "(a slower backward)", self.desc)
            return False
        finally:
            self.net.train(was_training)
        return True

    # ------------------------------------------------------------------ caches of what cannot change
    @torch.no_grad()
    def _maps_of(self, net: nn.Module, images: torch.Tensor, batch_size: int = 256,
                 uncropped: bool = False) -> list[torch.Tensor]:
        """Normalised attention maps of ``images`` through ``net`` at every aligned layer, stacked by size
        (:meth:`AttentionAlignmentLoss.grouped_maps`), on this rank's device; of the images centre-cropped to
        ``data.image_size`` as evaluated, or ``uncropped`` (at the size they were loaded)."""
        cfg = dataclasses.replace(self.data_cfg, image_size=images.shape[-1]) if uncropped else self.data_cfg
        parts = [self._grouped_maps(net, prepare(images[i:i + batch_size], cfg, device=self.ctx.device,
                                                 channels_last=self.ctx.channels_last), stop_early=uncropped)
                 for i in range(0, images.shape[0], batch_size)]
        return [torch.cat(group) for group in zip(*parts)]

    def _grouped_maps(self, net: nn.Module, x: torch.Tensor, stop_early: bool = False) -> list[torch.Tensor]:
        """``net``'s normalised maps of the prepared batch ``x`` at the aligned layers, stacked by size;
        ``stop_early``: the forward stops once every aligned layer is recorded (a head that takes only the training
        size, as the digit CNN's, is then never reached by an uncropped image)."""
        with FeatureRecorder(net, self.layers, energy=self.energy_taps) as rec, self.ctx.autocast():
            def stop(*_: Any) -> None:
                if rec.complete:
                    raise _AllRecorded

            modules = dict(net.named_modules())
            handles = [modules[name].register_forward_hook(stop) for name in rec.layers] if stop_early else []
            try:
                net(x)
            except _AllRecorded:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            return self.alignment.grouped_maps(rec.energies if rec.energy else rec.features, energies=rec.energy)

    def _source_map_cache(self) -> list[torch.Tensor] | None:
        """The frozen source net's maps of every S and S_f image (the anchors of Eq. 5), computed once; per group
        of layers one tensor, S_f image j at row len(S) + j, so a step's anchors are one lookup per group. With
        ``data.augment`` (``adapt.anchor_crops="cached"``), the maps of the uncropped images, which each step crops.

        None when they do not fit what ``data.cache_bytes`` leaves beside the decoded images and M_post's posteriors
        (N_T x K floats, always kept: small), or when the maps of uncropped images do not correspond layer by layer
        to those of crops: each step's anchors then go through the source net."""
        sets = (self.data.source.images, self.data.synthetic_source)
        uncropped = self.data_cfg.augment
        try:
            probe = self._maps_of(self.source_net, sets[0][:1], uncropped=uncropped)
        except (RuntimeError, ValueError, AssertionError) as e:  # e.g. a ViT's fixed input size
            if not uncropped:
                raise
            LOG.warning("%s: adapt.anchor_crops=cached: the source net does not take the uncropped %d-px images (%s); "
                        "the anchors' crops go through it at each step", self.desc, sets[0].shape[-1],
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        sides = self._crop_sides(probe) if uncropped else None
        if uncropped and sides is None:
            return None
        per_image = sum(m[0].numel() * m.element_size() for m in probe)
        need = per_image * (len(sets[0]) + len(sets[1]))
        posteriors = 4 * len(self.data.target) * self.data.num_classes if self.uses_em else 0
        room = cache_room(self.data_cfg, self.data) - posteriors
        if need > room:
            LOG.info("%s: the source net's attention maps (%.0f MiB) exceed what is left of data.cache_bytes "
                     "(%.0f MiB): computed at each step", self.desc, need / 2 ** 20, max(room, 0) / 2 ** 20)
            return None
        parts = [self._maps_of(self.source_net, batch, uncropped=uncropped)
                 for images in sets for _, batch in scan(images, 256)]
        self.anchor_sides = sides  # set with the maps it describes
        return [torch.cat(layer) for layer in zip(*parts)]

    def _crop_sides(self, uncropped: list[torch.Tensor]) -> list[int] | None:
        """Per group of layers, the side of a crop's map, checked against the maps of an uncropped image
        (``uncropped``): the same groups, each about load_size / image_size times larger. None (with a warning)
        when they do not correspond, e.g. a network that takes one input size only."""
        load, size = self.data.source.images.shape[-1], self.data_cfg.image_size
        cropped = self._maps_of(self.source_net, self.data.source.images[:1])
        sides = [math.isqrt(m.shape[-1]) for m in cropped]
        fulls = [math.isqrt(m.shape[-1]) for m in uncropped]
        same_groups = len(cropped) == len(uncropped) and all(c.shape[1] == u.shape[1]
                                                             for c, u in zip(cropped, uncropped))
        scaled = all(s * s == c.shape[-1] and abs(f - s * load / size) <= 1 for s, f, c in zip(sides, fulls, cropped))
        if not (same_groups and scaled):
            LOG.warning("%s: adapt.anchor_crops=cached: the source net's maps of %d-px images do not correspond to "
                        "those of its %d-px crops (map sides %s vs %s); the anchors' crops go through it at each "
                        "step", self.desc, load, size, fulls, sides)
            return None
        return sides

    @torch.no_grad()
    def _refresh_posteriors(self) -> None:
        """p_post(z | x^T) of every real target image (Eq. 8-10), recomputed only when M_post is synced."""
        images = self.data.target.images
        shard = torch.arange(self.ctx.rank, len(images), self.ctx.world_size)
        probs = torch.zeros(len(images), self.data.num_classes, device=self.ctx.device)
        for idx, batch in scan(images, 512, shard):  # a streamed T: decoded ahead by the DataLoader workers
            probs[idx.to(self.ctx.device)] = self._probabilities(self.posterior_net, batch)
        self.posterior_cache = self.ctx.all_reduce_sum(probs)

    def _probabilities(self, probs_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """``probs_of`` (a network's softmax) of the uint8 ``images`` as the evaluation sees them (no crop)."""
        x = prepare(images, self.data_cfg, device=self.ctx.device, channels_last=self.ctx.channels_last)
        with self.ctx.autocast():
            return probs_of(x)

    # ------------------------------------------------------------------ Eq. 12, term by term
    def _images(self, batch: MixedBatch) -> torch.Tensor:
        """The batch's uint8 images in row order S | T_f | T | S_f."""
        d = self.data
        parts = [d.source.images[batch.source_idx]]
        parts.append(d.synthetic_target[batch.tf_idx] if len(batch.tf_idx) else parts[0][:0])
        parts.append(d.target.images[batch.target_idx] if len(batch.target_idx) else parts[0][:0])
        parts.append(d.synthetic_source[batch.sf_idx] if len(batch.sf_idx) else parts[0][:0])
        return torch.cat(parts)

    def losses(self, batch: MixedBatch, step: int) -> dict[str, torch.Tensor]:
        """Eq. 12's terms on one mixed batch, each a sum over the batch's rows (Eq. 6, 11 and 5 are sums):

        ``L_CE`` (Eq. 6) on S and T_f with the source labels, ``L_EM`` (Eq. 11) on T and S_f against M_post's
        posteriors, ``L_AT`` (Eq. 5) over every aligned layer and pair; ``em_kept`` counts the EM rows kept by p_t.
        One forward of the target network takes the four streams and records its aligned layers' features for L_AT;
        the crops come from (seed, step).
        """
        posterior = self.posterior(batch)
        images = self._images(batch)
        crops = train_crops(images, self.data_cfg, self.seed, step)
        if crops is not None:  # a pair (x^S, G_ST(x^S)) or (x^T, G_TS(x^T)) is cropped alike
            crops = crops[batch.crop_partners()]
        x = prepare(images, self.data_cfg, train=True, crops=crops, device=self.ctx.device,
                    channels_last=self.ctx.channels_last)
        self.model.train()
        attention = self.computes_attention(step)
        # the aligned layers' features are recorded only by this forward (not by evaluation or EM-A's forwards)
        with FeatureRecorder(self.net, self.layers if attention else [], energy=self.energy_taps) as rec, \
                self.ctx.autocast():
            logits = self.model(x).float()  # S | T_f | T | S_f
            features = rec.energies if rec.energy else rec.features
        sl = batch.slices()
        loss_em, kept = self.em_loss(logits[sl["T"].start:sl["Sf"].stop], posterior)
        return {"L_CE": self.classification_loss(batch, logits[sl["S"].start:sl["Tf"].stop]),
                "L_EM": loss_em, "em_kept": kept,
                "L_AT": self.attention_loss(batch, crops, features, x) if attention else None}

    def computes_attention(self, step: int) -> bool:
        """Whether step ``step`` computes L_AT: always when it trains (beta > 0) or costs nothing (no source network:
        zero); at beta = 0 it is only logged, on every ``adapt.attention_log_interval``-th step (and the last)."""
        spec = self.spec
        return (self.source_net is None or spec.beta > 0 or (step + 1) % spec.attention_log_interval == 0
                or step + 1 == spec.steps)

    def classification_loss(self, batch: MixedBatch, logits: torch.Tensor) -> torch.Tensor:
        """L_CE, Eq. 6: real source images and their translations T_f = G_ST(x^S), both with y^S."""
        labels = torch.cat([self.data.source.labels[batch.source_idx], self.data.source.labels[batch.tf_idx]])
        return F.cross_entropy(logits, labels.to(self.ctx.device), reduction="sum")

    def em_loss(self, logits: torch.Tensor, posterior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """L_EM, Eq. 11, on the T rows then the S_f rows (``logits``) against :meth:`posterior` (None: no EM row can
        count yet), with modification B's filter. Returns (the loss, how many rows p_t kept)."""
        zero = torch.zeros((), device=self.ctx.device)
        if posterior is None or len(logits) == 0:
            return zero, zero
        keep = confidence_mask(posterior, self.confidence_threshold())
        return em_loss(logits, posterior, keep, reduction="sum"), keep.sum().float()

    def posterior(self, batch: MixedBatch) -> torch.Tensor | None:
        """p_post(z | x^T) for the T rows, then for the S_f rows: an S_f row G_TS(x^T_j) takes the posterior of its
        real target image x^T_j (Eq. 11's second sum; Sec. 3.3 assumes p(z | G_TS(x^T)) = p(z | x^T)). None when no
        EM row can count: no EM stream in the batch, or p_t = 1 (before the first sync), which keeps none.

        Modification A (Sec. 3.3): the posterior comes from M_post, synced every N steps (theta^post_t =
        theta_{floor(t/N) N}); its posteriors of every real target image are cached at each sync.

        EM-A (Table 3, ``async_posterior=False``, "without asynchronous update of M_post") reads: M_post synced at
        every step, i.e. the posterior of the *current* network in a separate no-grad forward in eval mode. The
        training forward's own softmax cannot be meant: its L_EM gradient on a T row is exactly zero (softmax(z) - p).
        With batch norm (ResNet-50, as in the paper's Office-31 runs) the eval-mode forward differs from the
        training forward, and so does an augmented row (``data.augment``'s crops) from the uncropped image; on a
        network without batch norm or dropout (the digit CNN) and uncropped images the gradient on the T rows is
        zero and EM-A reduces to L_EM on the S_f rows only.
        """
        idx = torch.cat([batch.target_idx, batch.sf_idx])
        if not self.uses_em or len(idx) == 0 or self.confidence_threshold() >= 1.0:
            return None
        if not self.spec.async_posterior:
            return self._current_posterior(idx)
        if self.posterior_cache is None:
            return None
        return self.posterior_cache[idx.to(self.ctx.device)]

    @torch.no_grad()
    def _current_posterior(self, target_idx: torch.Tensor) -> torch.Tensor:
        """EM-A: the current network's softmax in eval mode on the real target images ``target_idx`` (each distinct
        image once: S_f rows share their T row's image)."""
        unique, inverse = torch.unique(target_idx, return_inverse=True)
        was_training = self.net.training
        self.net.eval()
        try:
            probs = self._probabilities(lambda x: F.softmax(self.net(x).float(), dim=1),
                                        self.data.target.images[unique])
        finally:
            self.net.train(was_training)
        return probs[inverse.to(probs.device)]

    def confidence_threshold(self) -> float:
        """Modification B: p_t in force (the initial threshold until the first sync); 0 keeps every row (EM-B)."""
        if not self.spec.filtering:
            return 0.0
        return self.posterior_net.threshold(self.spec.confidence_threshold, self.spec.initial_confidence_threshold)

    def steps_since_restart(self, step: int) -> int:
        """Modification C: the learning-rate schedule restarts at every M_post sync (EM-C: it never restarts)."""
        return step - self.posterior_net.last_sync_step if self.spec.restart_schedule else step

    def attention_loss(self, batch: MixedBatch, crops: torch.Tensor | None, target_features: list[torch.Tensor],
                       inputs: torch.Tensor | None = None) -> torch.Tensor:
        """L_AT, Eq. 5: the four pair terms over every aligned layer, between the frozen source network's maps of
        each pair's anchor and the target network's maps of the batch's rows (``target_features``: per aligned
        layer, as recorded during :meth:`losses`' forward; Eq. 4's energies with ``energy_taps``). Zero without a
        source network. ``inputs``: the batch as the target network took it (anchors that are rows of it, the S and
        S_f rows, are not prepared again).

        Which rows take part is :meth:`daaa.batches.MixedBatch.anchor_rows`: with ``target_anchors="all"`` (default)
        every real target row n has its fourth-term anchor G_TS(x^T_n), as Eq. 5's sum over n reads, also in the
        ``Tf+T`` rows that train on no S_f."""
        if self.source_net is None:
            return torch.zeros((), device=self.ctx.device)
        target_rows, src_idx, sf_idx = batch.anchor_rows(self.spec.target_anchors)
        # index tensors go to the device before the frozen forward: on CUDA a copy from the host waits for the
        # kernels queued before it, and after the forward's graph that would be all of them
        rows = target_rows.to(self.ctx.device)
        anchor_maps, anchor_of_pair = self._anchor_maps(batch, crops, inputs, target_rows, src_idx, sf_idx)
        with torch.set_grad_enabled(self.spec.beta > 0):  # computed and logged (Fig. 4) even when beta = 0
            # maps of the whole batch, then the paired rows: picking rows of the small maps rather than of the
            # conv features keeps each feature gradient one dense tensor (no scatter into zeros)
            target_maps = self.alignment.grouped_maps(target_features, energies=self.energy_taps)
            if len(rows) == len(target_maps[0]):  # every row is paired (term 4 on all T rows): Eq. 5 is a sum, so
                # the anchors are put in row order instead (no gradient to route)
                anchor_of_row = anchor_of_pair[torch.argsort(rows)]
                return self.alignment.from_maps(anchor_maps, target_maps, source_rows=anchor_of_row)
            return self.alignment.from_maps(anchor_maps, [m[rows] for m in target_maps], source_rows=anchor_of_pair)

    def _anchor_maps(self, batch: MixedBatch, crops: torch.Tensor | None, inputs: torch.Tensor | None,
                     target_rows: torch.Tensor, src_idx: torch.Tensor,
                     sf_idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The source net's maps of the pairs' anchor images -- S[src_idx], then S_f[sf_idx] (an S_f image is
        indexed by its real target image, so a T row's anchor needs no S_f row) -- as (maps, index): maps stacked by
        size (:meth:`AttentionAlignmentLoss.grouped_maps`), pair k's anchor maps at row ``index[k]`` of each. The
        anchor is cropped like its paired row when the images are augmented (so the T_f and S_f rows' anchors are
        those of the S and T rows). From the cache (with crops: each pair's crop read off the uncropped anchor's
        maps, ``adapt.anchor_crops="cached"``), else one frozen forward of each distinct (image, crop)."""
        device = self.ctx.device
        if self.source_maps is not None:
            anchor_of_pair = torch.cat([src_idx, sf_idx + len(self.data.source)]).to(device)
            if self.anchor_sides is None:
                return self.source_maps, anchor_of_pair
            # maps of the uncropped anchors, cropped like each pair's row
            crop = crops[target_rows]
            return ([crop_attention_maps(m[anchor_of_pair], crop, self.data_cfg.image_size, side)
                     for m, side in zip(self.source_maps, self.anchor_sides)],
                    torch.arange(len(target_rows), device=device))
        which = torch.cat([torch.zeros_like(src_idx), torch.ones_like(sf_idx)])
        crop = crops[target_rows] if crops is not None else torch.zeros(len(which), 3, dtype=torch.long)
        key = torch.cat([which[:, None], torch.cat([src_idx, sf_idx])[:, None], crop], dim=1)
        unique, inverse = unique_rows(key)
        # the pairs of Eq. 5's first and third terms, (x^S, x^S) and (G_TS(x^T), G_TS(x^T)), have their own row as
        # anchor: that row of the prepared inputs is the same image, crop and normalisation
        row_of: dict[tuple, int] = {}
        if inputs is not None:
            sl = batch.slices()
            own = torch.zeros(len(target_rows), dtype=torch.bool)
            for stream in ("S", "Sf"):
                own |= (target_rows >= sl[stream].start) & (target_rows < sl[stream].stop)
            row_of = dict(zip(map(tuple, key[own].tolist()), target_rows[own].tolist()))
        keys = [tuple(k) for k in unique.tolist()]
        found = [k for k, u in enumerate(keys) if u in row_of]
        missing = [k for k, u in enumerate(keys) if u not in row_of]
        parts = []
        if found:
            parts.append(inputs[torch.tensor([row_of[keys[k]] for k in found], device=device)])
        if missing:
            todo = unique[missing]
            n_src = int((todo[:, 0] == 0).sum())  # sorted: the S anchors first
            images = torch.cat([self.data.source.images[todo[:n_src, 1]],
                                self.data.synthetic_source[todo[n_src:, 1]]])
            parts.append(prepare(images, self.data_cfg, train=True, crops=None if crops is None else todo[:, 2:],
                                 device=device, channels_last=self.ctx.channels_last))
        position = torch.empty(len(keys), dtype=torch.long)
        position[torch.tensor(found + missing, dtype=torch.long)] = torch.arange(len(keys))
        anchors = torch.cat(parts) if len(parts) > 1 else parts[0]
        anchor_of_pair = position[inverse].to(device)  # before the forward (see attention_loss)
        return self._source_maps_of(anchors, len(target_rows)), anchor_of_pair

    @torch.no_grad()
    def _source_maps_of(self, images: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """The frozen source net's grouped maps of prepared ``images``; as a CUDA graph for up to ``rows`` images
        (the batch's pairs: anchors are never more) when ``runtime.cuda_graphs`` is on."""
        maps_of = functools.partial(self._grouped_maps, self.source_net)
        if not self.ctx.cuda_graphs or self._graphed is False:
            return maps_of(images)
        if self._graphed is None or len(images) > self._graphed.rows:
            try:
                self._graphed = GraphedForward(maps_of, images, max(rows, len(images)))
            except RuntimeError as e:  # e.g. a network that reads values back to Python in its forward
                LOG.warning("%s: runtime.cuda_graphs: the source network's forward cannot be captured as a CUDA "
                            "graph (%s); it runs eagerly", self.desc, str(e).splitlines()[0] if str(e) else e)
                self._graphed = False
                return maps_of(images)
        return self._graphed(images)

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, Any]:
        """Sync M_post when due (modification A), set the learning rate (C), and take one update of Eq. 12."""
        spec, ctx = self.spec, self.ctx
        if self.uses_em and self.posterior_net.due(step):
            self.posterior_net.sync(self.evaluated_net if spec.posterior_from == "average" else self.net, step)
            if spec.async_posterior:
                self._refresh_posteriors()
        lr = set_lr(self.optimizer, spec.optim, self.steps_since_restart(step))
        t = self.losses(self.sampler.batch(step), step)
        # Eq. 12. Sums over the global batch divided by its size (a constant factor of the paper's sums); times the
        # world size because DDP averages the ranks' gradients.
        logged_at = t["L_AT"] is not None
        if not logged_at:  # beta = 0 and not a logging step: the sums below carry a zero in its place
            t["L_AT"] = torch.zeros((), device=ctx.device)
        loss = (t["L_CE"] + t["L_EM"] + spec.beta * t["L_AT"]) * (ctx.world_size / self.global_batch)
        self.optimizer.zero_grad(set_to_none=True)
        # backward is queued before the values are read back: on a GPU its launches overlap the forward's last
        # kernels (the frozen net's graph, L_AT) instead of waiting for them to finish
        self.scaler.scale(loss).backward()
        # the global sums come before the update: every rank sees the same values, so a NaN on one rank's shard
        # stops all ranks at the same step, before any weight changes
        sums = ctx.all_reduce_sum(torch.stack([t[k].detach() for k in ("L_CE", "L_EM", "L_AT", "em_kept")]))
        ce, em, at, n_kept = sums.tolist()  # the step's one read-back of values (a device sync on CUDA)
        guard_finite(step, {"L_CE": ce, "L_EM": em, "L_AT": at}, self.stage)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_average()
        n = self.sampler.counts
        n_lab, n_unlab = n["S"] + n["Tf"], n["T"] + n["Sf"]
        return {"loss": (ce + em + spec.beta * at) / self.global_batch,
                "L_CE": ce / max(n_lab, 1), "L_EM": em / max(n_unlab, 1),
                "L_AT": at / self.global_batch if logged_at else None, "em_kept": n_kept,
                "em_kept_fraction": n_kept / max(n_unlab, 1), "lr": lr,
                "syncs": self.posterior_net.syncs}

    # ------------------------------------------------------------------ state and the loop
    def state(self) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "posterior_net": self.posterior_net.net.state_dict(), "em": self.posterior_net.extra_state(),
                "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.posterior_net.net.load_state_dict(state["posterior_net"])
        self.posterior_net.load_extra_state(state["em"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.uses_em and self.spec.async_posterior and self.posterior_net.syncs > 0:
            self._refresh_posteriors()

    def before_fit(self) -> None:
        if self.uses_em and self.spec.async_posterior and (
                self.spec.initial_confidence_threshold < 1 or not self.spec.filtering):
            self._refresh_posteriors()  # M_post = the initial network; used before the first sync
