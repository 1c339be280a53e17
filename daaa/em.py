"""Training with EM on unlabelled target data (Sec. 3.3, Eq. 8-11) and its three stabilising modifications.

* (E-step, Eq. 8-10) the posterior p(z | x^T) comes from a posterior network M_post, a copy of the target
  network synchronised every N steps: theta^post_t = theta_{floor(t/N) * N}  -- modification A;
* samples whose max_z p(z | x^T) is below the threshold p_t are dropped                -- modification B;
* the learning-rate schedule restarts after every sync (:func:`daaa.optim.set_lr` with the steps since the last
  sync, :meth:`daaa.trainers.adapt.DAAATrainer.steps_since_restart`) -- modification C;
* (M-step, Eq. 11) L_EM = -sum_i sum_z p_post(z | x_i^T) log p_theta(z | x_i^T)
                          -sum_j sum_z p_post(z | x_j^T) log p_theta(z | G_TS(x_j^T)),
  i.e. a synthetic source image uses the posterior of its real target image.

Ablations of Table 3: EM-A (``async_posterior=False``: no M_post; the posterior is the current network's, from a
separate no-grad, eval-mode forward: :meth:`daaa.trainers.adapt.DAAATrainer.posterior`),
EM-B (``filtering=False``), EM-C (``restart_schedule=False``, handled by the trainer's schedule).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def em_loss(logits: torch.Tensor, posterior: torch.Tensor, keep: torch.Tensor | None = None,
            reduction: str = "sum") -> torch.Tensor:
    """Eq. 11: cross-entropy of the network's prediction against the soft posterior p_post(z | x^T).

    ``logits`` (N, K) of real target images or of their synthetic source images, ``posterior`` (N, K) of the
    real target images (a target: no gradient flows into it), ``keep`` (N,) bool from :func:`confidence_mask`.
    ``reduction="sum"`` is Eq. 11 literally; ``"mean"`` divides by the rows kept (at least 1).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if posterior.shape != logits.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and posterior {tuple(posterior.shape)}: expected the same "
                         "(N, K) shape")
    if not posterior.is_floating_point():
        raise ValueError(f"posterior: expected probabilities (a floating-point tensor), got {posterior.dtype}")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != logits.shape[:1]):
        raise ValueError(f"keep: expected an (N,) = ({logits.shape[0]},) bool mask, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    per_sample = -(posterior.detach() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if keep is not None:
        per_sample = per_sample * keep.to(per_sample.dtype)
    if reduction == "sum":
        return per_sample.sum()
    n = per_sample.shape[0] if keep is None else int(keep.sum())
    return per_sample.sum() / max(n, 1)  # an empty batch (or none kept) is 0, as L_AT's mean


def confidence_mask(posterior: torch.Tensor, threshold: float) -> torch.Tensor:
    """Modification B: keep a sample when max_z p(z | x) >= p_t.

    A threshold of 1 keeps none: the paper sets p_t = 1 before the first sync so that the network first learns
    from labelled data only (Supplementary Sec. 1); a float32 softmax may round to exactly 1.0, which must not
    sneak samples in.
    """
    if not 0.0 <= threshold <= 1.0:  # also nan
        raise ValueError(f"confidence threshold p_t must be in [0, 1], got {threshold}")
    if threshold >= 1.0:
        return torch.zeros(posterior.shape[0], dtype=torch.bool, device=posterior.device)
    return posterior.max(dim=1).values >= threshold


class PosteriorNetwork(nn.Module):
    """M_post: a frozen copy of the target network, re-synchronised every ``sync_interval`` (N) steps.

    Because M_post only changes at a sync, the trainer computes its posteriors of all real target images once per
    sync and looks them up by index: nothing that cannot change is recomputed. It stays in eval mode (batch norm
    with its running statistics) whatever ``train()`` a parent module calls, and the copy carries none of the target
    network's hooks (a :class:`daaa.attention.FeatureRecorder` on the target net keeps recording the target net only).
    """

    def __init__(self, target_net: nn.Module, sync_interval: int):
        super().__init__()
        if sync_interval < 1:
            raise ValueError(f"sync_interval N must be at least 1, got {sync_interval}")
        self.net = copy.deepcopy(target_net).eval()
        for m in self.net.modules():  # deepcopy copies hooks: a recorder's would fill with M_post's features
            for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
                hooks.clear()
        self.net.requires_grad_(False)
        self.sync_interval = sync_interval
        self.last_sync_step = 0
        self.syncs = 0

    def train(self, mode: bool = True) -> "PosteriorNetwork":
        """M_post is always in eval mode (Eq. 8's posterior is a fixed function between syncs)."""
        return super().train(False)

    def due(self, step: int) -> bool:
        """A sync happens at steps N, 2N, ... (theta^post_t = theta_{floor(t/N) N})."""
        return step > 0 and step % self.sync_interval == 0

    @torch.no_grad()
    def sync(self, target_net: nn.Module, step: int) -> None:
        self.net.load_state_dict(target_net.state_dict())
        self.last_sync_step = step
        self.syncs += 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p_{theta^post}(z | x), Eq. 8 with uniform p(z) and p(x): the softmax output of M_post."""
        return F.softmax(self.net(x).float(), dim=1)

    def threshold(self, confidence_threshold: float, initial_confidence_threshold: float) -> float:
        """p_t in force: the initial threshold until the first sync, then the regular one."""
        return initial_confidence_threshold if self.syncs == 0 else confidence_threshold

    def extra_state(self) -> dict:
        return {"last_sync_step": self.last_sync_step, "syncs": self.syncs}

    def load_extra_state(self, state: dict) -> None:
        self.last_sync_step = state["last_sync_step"]
        self.syncs = state["syncs"]
