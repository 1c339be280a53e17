"""Eq. 12 re-derived the plain way, independently of :meth:`daaa.trainers.adapt.DAAATrainer.losses`: the reference
of the equality test (tests/test_bench.py) and the comparison point of benchmarks/step_before_after.py.

One target-network forward per stream (S, T_f, T, S_f); one frozen-source-network forward per pair term of Eq. 5
(x^S for the S and T_f rows, G_TS(x^T) for the S_f rows and for every T row); M_post's posteriors of the batch's real
target images recomputed by a forward (for T and again for S_f), or for EM-A the current network's, by an eval-mode
forward; nothing cached, no batched forward, no row picking of precomputed maps. Only the trainer's networks,
sampler, optimiser and M_post are read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from daaa.attention import FeatureRecorder
from daaa.batches import STREAM_ORDER
from daaa.data.transforms import prepare, train_crops
from daaa.em import confidence_mask, em_loss
from daaa.optim import set_lr


def _stream_images(trainer, batch) -> dict[str, torch.Tensor | None]:
    d = trainer.data
    return {"S": d.source.images[batch.source_idx],
            "Tf": d.synthetic_target[batch.tf_idx] if len(batch.tf_idx) else None,
            "T": d.target.images[batch.target_idx] if len(batch.target_idx) else None,
            "Sf": d.synthetic_source[batch.sf_idx] if len(batch.sf_idx) else None}


def naive_daaa_losses(trainer, step: int) -> dict[str, torch.Tensor]:
    """Eq. 12's terms for ``step``: ``loss`` (the scaled Eq. 12, with its graph), ``L_CE``, ``L_EM``, ``L_AT``
    (sums over the batch) and ``kept``. Changes nothing (no sync, no update)."""
    spec, ctx, d, cfg = trainer.spec, trainer.ctx, trainer.data, trainer.data_cfg
    batch = trainer.sampler.batch(step)
    sl = batch.slices()
    streams = _stream_images(trainer, batch)
    # the crops are drawn for the whole batch in row order S | T_f | T | S_f, from (seed, step)
    all_rows = torch.cat([v for v in streams.values() if v is not None])
    crops = train_crops(all_rows, cfg, trainer.seed, step)
    if crops is not None:  # a T_f row takes the crop of the S row it translates, an S_f row that of its T row
        for j in range(len(batch.tf_idx)):
            if j < len(batch.source_idx) and batch.tf_idx[j] == batch.source_idx[j]:
                crops[sl["Tf"].start + j] = crops[sl["S"].start + j]
        for m in range(len(batch.sf_idx)):
            if m < len(batch.target_idx) and batch.sf_idx[m] == batch.target_idx[m]:
                crops[sl["Sf"].start + m] = crops[sl["T"].start + m]

    def prep(imgs: torch.Tensor, rows: slice | None, train: bool = True) -> torch.Tensor:
        c = None if crops is None or rows is None else crops[rows]
        return prepare(imgs, cfg, train=train, crops=c, device=ctx.device, channels_last=ctx.channels_last)

    at_on = trainer.source_net is not None
    trainer.model.train()
    logits: dict[str, torch.Tensor] = {}
    maps: dict[str, list[torch.Tensor]] = {}
    for s in STREAM_ORDER:  # four target-network forwards
        if sl[s].stop == sl[s].start:
            continue
        with FeatureRecorder(trainer.net, trainer.layers if at_on else []) as rec:
            with ctx.autocast():
                logits[s] = trainer.model(prep(streams[s], sl[s])).float()
            if at_on:
                with torch.set_grad_enabled(spec.beta > 0):
                    maps[s] = trainer.alignment.maps(rec.features)

    dev = ctx.device
    zero = torch.zeros((), device=dev)
    loss_ce = zero  # Eq. 6
    for s, idx in (("S", batch.source_idx), ("Tf", batch.tf_idx)):
        if s in logits:
            loss_ce = loss_ce + F.cross_entropy(logits[s], d.source.labels[idx].to(dev), reduction="sum")

    loss_em, kept = zero, zero  # Eq. 11
    if trainer.uses_em and ("T" in logits or "Sf" in logits):
        p_t = trainer.posterior_net.threshold(spec.confidence_threshold, spec.initial_confidence_threshold)
        p_t = p_t if spec.filtering else 0.0
        for s, real_idx in (("T", batch.target_idx), ("Sf", batch.sf_idx)):
            if s not in logits:
                continue
            post = _posterior(trainer, prep(d.target.images[real_idx], None, train=False))
            keep = confidence_mask(post, p_t)
            loss_em = loss_em + em_loss(logits[s], post, keep, reduction="sum")
            kept = kept + keep.sum().float()

    loss_at = _attention_loss(trainer, batch, maps, prep) if at_on else zero  # Eq. 5
    scale = ctx.world_size / trainer.global_batch
    loss = (loss_ce + loss_em + spec.beta * loss_at) * scale
    return {"loss": loss, "L_CE": loss_ce, "L_EM": loss_em, "L_AT": loss_at, "kept": kept}


def _posterior(trainer, x: torch.Tensor) -> torch.Tensor:
    """p_post(z | x^T) of the prepared real target images ``x``: M_post's forward (modification A), or for EM-A the
    current network's, in eval mode and without gradient (M_post synced at every step)."""
    net = trainer.posterior_net.net if trainer.spec.async_posterior else trainer.net
    was = net.training
    net.eval()
    with torch.no_grad(), trainer.ctx.autocast():
        p = F.softmax(net(x).float(), dim=1)
    net.train(was)
    return p


def _attention_loss(trainer, batch, maps, prep) -> torch.Tensor:
    """Eq. 5's four terms: one frozen-source forward per term, on the anchors of that term's rows. The fourth term
    covers every real target row n, with anchor G_TS(x^T_n) (``adapt.target_anchors="paired"``: only the leading T
    rows that are the real images of the batch's S_f rows)."""
    d, sl = trainer.data, batch.slices()
    n_pair = len(batch.target_idx)
    if trainer.spec.target_anchors == "paired":  # the earlier reading: only T rows whose S_f is a row
        n_sf = len(batch.sf_idx)
        n_pair = n_sf if torch.equal(batch.target_idx[:n_sf], batch.sf_idx) else 0
    t0 = sl["T"].start
    terms = [(d.source.images[batch.source_idx], sl["S"], maps.get("S")),
             (d.source.images[batch.tf_idx], sl["Tf"], maps.get("Tf")),
             (d.synthetic_source[batch.sf_idx], sl["Sf"], maps.get("Sf")),
             (d.synthetic_source[batch.target_idx[:n_pair]], slice(t0, t0 + n_pair),
              None if "T" not in maps else [m[:n_pair] for m in maps["T"]])]
    anchor_maps: list[list[torch.Tensor]] = []
    target_maps: list[list[torch.Tensor]] = []
    for anchors, rows, tmaps in terms:
        if rows.stop == rows.start or tmaps is None:
            continue
        with torch.no_grad(), FeatureRecorder(trainer.source_net, trainer.layers) as rec, trainer.ctx.autocast():
            trainer.source_net(prep(anchors, rows))
            anchor_maps.append(trainer.alignment.maps(rec.features))
        target_maps.append(tmaps)
    with torch.set_grad_enabled(trainer.spec.beta > 0):
        return trainer.alignment.from_maps([torch.cat(m) for m in zip(*anchor_maps)],
                                           [torch.cat(m) for m in zip(*target_maps)])


def naive_daaa_step(trainer, step: int) -> dict[str, Any]:
    """One optimisation step with :func:`naive_daaa_losses`; logs what :meth:`DAAATrainer.step` logs. M_post is
    synced at steps N, 2N, ... and the schedule restarts there (modification C), re-derived here. One process."""
    spec, post = trainer.spec, trainer.posterior_net
    if trainer.uses_em and step > 0 and step % spec.sync_interval == 0:
        post.sync(trainer.net, step)
    since_restart = step - post.last_sync_step if spec.restart_schedule else step
    lr = set_lr(trainer.optimizer, spec.optim, since_restart)
    t = naive_daaa_losses(trainer, step)
    trainer.optimizer.zero_grad(set_to_none=True)
    t["loss"].backward()
    trainer.optimizer.step()
    n = trainer.sampler.counts
    n_lab, n_unlab = n["S"] + n["Tf"], n["T"] + n["Sf"]
    ce, em, at, kept = (float(t[k].detach()) for k in ("L_CE", "L_EM", "L_AT", "kept"))
    return {"loss": (ce + em + spec.beta * at) / trainer.global_batch, "L_CE": ce / max(n_lab, 1),
            "L_EM": em / max(n_unlab, 1), "L_AT": at / trainer.global_batch, "em_kept": kept,
            "em_kept_fraction": kept / max(n_unlab, 1), "lr": lr, "syncs": post.syncs}
