"""Target-network training, Sec. 3.4: min_theta L_full = L_CE + L_EM + beta * L_AT (Eq. 12).

One trainer covers the paper's rows and ablations by configuration (:class:`daaa.config.AdaptConfig`):
``train_data`` picks the streams (S, T_f, S+T_f, T_f+T, S+T_f+T+S_f; Tables 1-2), ``beta`` the attention penalty,
``attention``/``discrepancy`` Tables A1/4, ``async_posterior``/``filtering``/``restart_schedule`` Table 3. Source-only
training is the same trainer with ``train_data="S"`` and ``beta=0``.

What cannot change between syncs is computed once: the frozen source network's normalised attention maps of the
fixed anchor images (S and S_f; Eq. 5 only ever feeds those to the source net) and M_post's posteriors of T. The four
streams go through the target network in one batched forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttentionAlignmentLoss, FeatureRecorder
from ..batches import MixedBatch, MixedBatchSampler
from ..config import AdaptConfig, DataConfig
from ..data.domain import ImageTensors
from ..data.transforms import prepare, train_crops
from ..distributed import Context, unwrap
from ..em import PosteriorNetwork, confidence_mask, em_loss
from ..errors import DaaaError
from ..evaluate import evaluate
from ..optim import build_optimizer, set_lr
from ..runs import Stage
from ..validation import summarize_selection
from .loop import TrainingLoop, guard_finite

LOG = logging.getLogger("daaa")


@dataclass
class DomainData:
    """The four streams. ``synthetic_target[i] = G_ST(source[i])``, ``synthetic_source[j] = G_TS(target[j])``."""

    source: ImageTensors
    target: ImageTensors | None = None
    synthetic_target: torch.Tensor | None = None
    synthetic_source: torch.Tensor | None = None
    target_test: ImageTensors | None = None


class DAAATrainer:
    """Trains ``target_net`` on mixed batches with Eq. 12, guided by the frozen ``source_net`` (None: no L_AT)."""

    def __init__(self, spec: AdaptConfig, data_cfg: DataConfig, data: DomainData, ctx: Context, stage: Stage,
                 target_net: nn.Module, source_net: nn.Module | None = None, seed: int = 0, progress: bool = True,
                 desc: str = "adapt", probe: Any = None):
        self.spec, self.data_cfg, self.data, self.ctx, self.stage = spec, data_cfg, data, ctx, stage
        self.seed, self.progress, self.desc = seed, progress, desc
        self.probe = probe  # daaa.validation.SelectionProbe: label-free selection criteria at each evaluation
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
        # L_AT needs the frozen source net; it is computed (and logged, Fig. 4 left) even when beta = 0
        self.source_net = source_net
        self.alignment = AttentionAlignmentLoss(spec.attention, spec.discrepancy, reduction="sum")
        self.layers = list(getattr(self.net, "aligned_layers", []))
        self.target_features = FeatureRecorder(self.net, self.layers) if source_net is not None else None
        self.source_maps: list[torch.Tensor] | None = None  # per layer: the maps of S, then those of S_f
        if source_net is not None:
            self.source_net = source_net.to(ctx.device).eval().requires_grad_(False)
            if ctx.channels_last:
                self.source_net = self.source_net.to(memory_format=torch.channels_last)
            if spec.cache_source_attention and not data_cfg.augment:
                self.source_maps = self._source_map_cache()

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

    # ------------------------------------------------------------------ caches of what cannot change
    @torch.no_grad()
    def _maps_of(self, net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
        """Normalised attention maps of ``images`` through ``net`` at every aligned layer, on this rank's device."""
        out: list[list[torch.Tensor]] = [[] for _ in self.layers]
        with FeatureRecorder(net, self.layers) as rec:
            for i in range(0, images.shape[0], batch_size):
                x = prepare(images[i:i + batch_size], self.data_cfg, device=self.ctx.device,
                            channels_last=self.ctx.channels_last)
                with self.ctx.autocast():
                    net(x)
                for slot, m in zip(out, self.alignment.maps(rec.features)):
                    slot.append(m)
        return [torch.cat(s) for s in out]

    def _source_map_cache(self) -> list[torch.Tensor]:
        """The frozen source net's maps of every S and S_f image (the anchors of Eq. 5), computed once; per layer
        one tensor, S_f image j at row len(S) + j, so a step's anchors are one lookup per layer."""
        s = self._maps_of(self.source_net, self.data.source.images)
        sf = self._maps_of(self.source_net, self.data.synthetic_source)
        return [torch.cat(pair) for pair in zip(s, sf)]

    @torch.no_grad()
    def _refresh_posteriors(self) -> None:
        """p_post(z | x^T) of every real target image (Eq. 8-10), recomputed only when M_post is synced."""
        images = self.data.target.images
        shard = torch.arange(self.ctx.rank, len(images), self.ctx.world_size)
        probs = torch.zeros(len(images), self.n_classes, device=self.ctx.device)
        for i in range(0, len(shard), 512):
            idx = shard[i:i + 512]
            x = prepare(images[idx], self.data_cfg, device=self.ctx.device, channels_last=self.ctx.channels_last)
            with self.ctx.autocast():
                probs[idx.to(self.ctx.device)] = self.posterior_net(x)
        self.posterior_cache = self.ctx.all_reduce_sum(probs)

    @property
    def n_classes(self) -> int:
        return len(self.data.source.classes) if self.data.source.classes else int(self.data.source.labels.max()) + 1

    # ------------------------------------------------------------------ one step = Eq. 12
    def _images(self, batch: MixedBatch) -> torch.Tensor:
        d = self.data
        parts = [d.source.images[batch.source_idx]]
        parts.append(d.synthetic_target[batch.tf_idx] if len(batch.tf_idx) else parts[0][:0])
        parts.append(d.target.images[batch.target_idx] if len(batch.target_idx) else parts[0][:0])
        parts.append(d.synthetic_source[batch.sf_idx] if len(batch.sf_idx) else parts[0][:0])
        return torch.cat(parts)

    def _anchor_maps(self, batch: MixedBatch, crops: torch.Tensor | None,
                     target_rows: torch.Tensor, src_idx: torch.Tensor, sf_idx: torch.Tensor) -> list[torch.Tensor]:
        """The source net's maps of each pair's anchor image: from the cache, or one frozen forward when the
        images are augmented (the anchor is cropped like its paired row)."""
        if self.source_maps is not None:
            idx = torch.cat([src_idx, sf_idx + len(self.data.source)]).to(self.ctx.device)
            return [m[idx] for m in self.source_maps]
        anchors = torch.cat([self.data.source.images[src_idx], self.data.synthetic_source[sf_idx]])
        x = prepare(anchors, self.data_cfg, train=True, crops=None if crops is None else crops[target_rows],
                    device=self.ctx.device, channels_last=self.ctx.channels_last)
        with torch.no_grad(), FeatureRecorder(self.source_net, self.layers) as rec, self.ctx.autocast():
            self.source_net(x)
            return self.alignment.maps(rec.features)

    def _posteriors(self, batch: MixedBatch, target_logits: torch.Tensor) -> torch.Tensor:
        """p_post for the T rows then the S_f rows (each S_f row takes its real target image's posterior)."""
        if self.spec.async_posterior:
            idx = torch.cat([batch.target_idx, batch.sf_idx]).to(self.ctx.device)
            return self.posterior_cache[idx]
        # EM-A: the current network's own prediction, detached; S_f rows are the first T rows' translations
        p = F.softmax(target_logits.detach().float(), dim=1)
        return torch.cat([p, p[: len(batch.sf_idx)]])

    def step(self, step: int) -> dict[str, Any]:
        spec, ctx = self.spec, self.ctx
        if self.uses_em and self.posterior_net.due(step):
            self.posterior_net.sync(self.net, step)
            if spec.async_posterior:
                self._refresh_posteriors()
        since_restart = step - self.posterior_net.last_sync_step if spec.restart_schedule else step
        lr = set_lr(self.optimizer, spec.optim, since_restart)

        batch = self.sampler.batch(step)
        sl = batch.slices()
        images = self._images(batch)
        crops = train_crops(images, self.data_cfg, self.seed, step)
        x = prepare(images, self.data_cfg, train=True, crops=crops, device=ctx.device, channels_last=ctx.channels_last)

        self.model.train()
        with ctx.autocast():
            logits = self.model(x)  # one forward for S | T_f | T | S_f
        logits = logits.float()

        # L_CE, Eq. 6: real source and synthetic target images with the source labels
        labelled = slice(sl["S"].start, sl["Tf"].stop)
        labels = torch.cat([self.data.source.labels[batch.source_idx], self.data.source.labels[batch.tf_idx]])
        loss_ce = F.cross_entropy(logits[labelled], labels.to(ctx.device), reduction="sum")

        # L_EM, Eq. 11: real target and synthetic source images against p_post, confident samples only
        unlabelled = slice(sl["T"].start, sl["Sf"].stop)
        kept = torch.zeros((), device=ctx.device)
        loss_em = torch.zeros((), device=ctx.device)
        # before the first sync with p_t = 1 no posterior is needed: every EM sample would be dropped
        has_posterior = self.posterior_cache is not None or not spec.async_posterior
        if self.uses_em and unlabelled.stop > unlabelled.start and has_posterior:
            posterior = self._posteriors(batch, logits[sl["T"]])
            p_t = self.posterior_net.threshold(spec.confidence_threshold, spec.initial_confidence_threshold)
            keep = confidence_mask(posterior, p_t if spec.filtering else 0.0)
            loss_em = em_loss(logits[unlabelled], posterior, keep, reduction="sum")
            kept = keep.sum().float()

        # L_AT, Eq. 5: the four pair terms over every aligned layer
        loss_at = torch.zeros((), device=ctx.device)
        if self.source_net is not None:
            target_rows, src_idx, sf_idx = batch.anchor_rows()
            anchor_maps = self._anchor_maps(batch, crops, target_rows, src_idx, sf_idx)
            rows = target_rows.to(ctx.device)
            with torch.set_grad_enabled(spec.beta > 0):
                # maps of the whole batch, then the paired rows: picking rows of the small maps rather than of the
                # conv features keeps each feature gradient one dense tensor (no scatter into zeros)
                target_maps = [m[rows] for m in self.alignment.maps(self.target_features.features)]
                loss_at = self.alignment.from_maps(anchor_maps, target_maps)

        # Eq. 12. Sums over the global batch divided by its size (a constant factor of the paper's sums); times the
        # world size because DDP averages the ranks' gradients.
        scale = ctx.world_size / self.global_batch
        loss = (loss_ce + loss_em + spec.beta * loss_at) * scale
        # the global sums come before the update: every rank sees the same values, so a NaN on one rank's shard
        # stops all ranks at the same step (no rank left waiting in backward's all-reduce)
        sums = ctx.all_reduce_sum(torch.stack([loss_ce.detach(), loss_em.detach(), loss_at.detach(), kept]))
        ce, em, at, n_kept = sums.tolist()  # the step's one read-back of values (a device sync on CUDA)
        guard_finite(step, {"L_CE": ce, "L_EM": em, "L_AT": at}, self.stage)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

        n = self.sampler.counts
        n_lab, n_unlab = n["S"] + n["Tf"], n["T"] + n["Sf"]
        return {"loss": (ce + em + spec.beta * at) / self.global_batch,
                "L_CE": ce / max(n_lab, 1), "L_EM": em / max(n_unlab, 1),
                "L_AT": at / self.global_batch, "em_kept": n_kept,
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

    def evaluate(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.data.target_test is not None and self.data.target_test.labels is not None:
            out["target_test_accuracy"] = evaluate(self.net, self.data.target_test, self.data_cfg, self.ctx)["accuracy"]
        if self.probe is not None:
            out.update(self.probe(self.net))
        return out

    def fit(self) -> dict[str, Any]:
        """Train for ``spec.steps`` steps (resuming from the stage's checkpoint) and return the stage result."""
        spec = self.spec
        if self.uses_em and spec.async_posterior and (spec.initial_confidence_threshold < 1 or not spec.filtering):
            self._refresh_posteriors()  # M_post = the initial network; used before the first sync
        loop = TrainingLoop(self.stage, self.ctx, spec.steps, spec.checkpoint_interval, spec.eval_interval,
                            self.progress, self.desc)
        history = loop.run(self.step, self.state, self.load_state, self.evaluate)
        result: dict[str, Any] = {"steps": spec.steps, "resumed_from": loop.resumed_from}
        if self.data.target_test is not None and self.data.target_test.labels is not None:
            final = evaluate(self.net, self.data.target_test, self.data_cfg, self.ctx)
            curve = [(r["step"], r["target_test_accuracy"]) for r in history if "target_test_accuracy" in r]
            result.update({"target_test_accuracy": final["accuracy"], "target_test": final,
                           "oracle_best_accuracy": max(a for _, a in curve), "oracle_best_step":
                           max(curve, key=lambda c: c[1])[0], "accuracy_curve": curve})
        if self.probe is not None:
            result.update(summarize_selection(history, self.probe.criteria))
        return result


def trained_model_state(trainer: DAAATrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap(trainer.model).state_dict().items()}
