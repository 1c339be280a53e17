"""Feature-alignment baselines of Tables 1-2 trained under exactly the DAAA rows' settings.

* ``dann`` -- DANN / RevGrad (Ganin & Lempitsky, ICML 2015): a domain discriminator on ``features`` behind a
  gradient reversal layer whose coefficient warms up as 2 / (1 + exp(-alpha p)) - 1, p = step / steps;
* ``dan`` -- DAN (Long et al., ICML 2015): multi-kernel MMD between the source and target ``features``;
* ``jan`` -- JAN (Long et al., ICML 2017): joint MMD over [features, softmax(logits)];
* ``jan-a`` -- JAN-A (JAN's Sec. 4.3): the same JMMD after adversarial layers theta that maximise it while the
  network minimises it (:class:`daaa.baseline_losses.JointAdversarialLayers`; theta learns at the head's rate).

Identical settings to the DAAA rows: the same data (real S and real T only: the CycleGAN images are not used),
network, optimiser and learning-rate schedule (``adapt.optim``; never restarted, as there is no M_post), steps and
batch size (``adapt.steps``, ``adapt.batch_size``; mini-batches half S, half T by ``baseline.proportions``), seed,
evaluation interval, target-test evaluation and label-free selection probe. The network starts from the fine-tuned
source network (``baseline.init_from_source``), as the DAAA target network does and as tllib's baselines do after
source pretraining; the discriminator (DANN) is new and trained at the head's learning rate (tllib's choice). Each
mini-batch goes through the network in one forward (S | T), so batch-norm statistics mix both domains as in tllib.

Under torchrun each rank computes the MMD / JMMD of its own shard of the batch (DDP averages the gradients): an
estimate of the global-batch MMD, not the same number.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..baseline_losses import (DomainAdversarialLoss, DomainDiscriminator, JointAdversarialLayers, dann_coefficient,
                               jmmd, mmd)
from ..batches import MixedBatchSampler
from ..config import BaselineConfig, Config
from ..data.domain import DomainData
from ..data.streaming import prefetching
from ..data.transforms import prepare, train_crops
from ..distributed import Context
from ..errors import DaaaError
from ..optim import build_optimizer, set_lr
from ..runs import Stage
from .base import Trainer
from .loop import guard_finite

LOG = logging.getLogger("daaa")

Method = Literal["dann", "dan", "jan", "jan-a"]
METHODS: dict[str, str] = {"dann": "DANN (RevGrad, gradient reversal)", "dan": "DAN (MK-MMD on features)",
                           "jan": "JAN (JMMD on features and softmax)",
                           "jan-a": "JAN-A (JMMD behind adversarial layers)"}


class BaselineNet(nn.Module):
    """The classifier plus, for DANN, the adversarial domain loss (for JAN-A, the adversarial layers theta) -- one
    module, so DDP sees every parameter used in ``forward``.
    ``forward(x, n_source, coeff) -> (features, logits, domain_loss or None)``."""

    def __init__(self, net: nn.Module, adversary: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.adversary = adversary

    def forward(self, x: torch.Tensor, n_source: int, coeff: float = 0.0):
        f = self.net.features(x)
        logits = self.net.head(f)
        d = None
        if isinstance(self.adversary, DomainAdversarialLoss):
            d = self.adversary(f[:n_source], f[n_source:], coeff)
        return f, logits, d

    # the optimiser's parameter groups (daaa.optim.build_optimizer): the discriminator learns at the head's rate
    def backbone_parameters(self) -> list[nn.Parameter]:
        return self.net.backbone_parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        extra = list(self.adversary.parameters()) if self.adversary is not None else []
        return self.net.head_parameters() + extra


def feature_dim(net: nn.Module, channels: int, image_size: int) -> int:
    """Width of ``net.features`` (one dummy forward in eval mode, on the network's device)."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    with torch.no_grad():
        d = net.features(torch.zeros(2, channels, image_size, image_size, device=device)).flatten(1).shape[1]
    net.train(was)
    return int(d)


class BaselineTrainer(Trainer):
    """Trains ``net`` with L_CE(S) + tradeoff * L_transfer(S, T) for ``cfg.adapt.steps`` steps."""

    def __init__(self, method: Method, cfg: Config, bcfg: BaselineConfig, data: DomainData, ctx: Context,
                 stage: Stage, net: nn.Module, seed: int = 0, progress: bool = True, desc: str | None = None,
                 probe: Any = None):
        if method not in METHODS:
            raise DaaaError(f"unknown baseline {method!r} (choose {', '.join(METHODS)})")
        if data.target is None:
            raise DaaaError(f"baseline {method}: needs the unlabelled target domain (--target)")
        if data.source.labels is None:
            raise DaaaError(f"source domain {data.source.name} has no labels")
        self.method, self.cfg, self.bcfg, self.data, self.ctx, self.stage = method, cfg, bcfg, data, ctx, stage
        self.spec, self.data_cfg = cfg.adapt, cfg.data
        self.seed, self.progress, self.desc, self.probe = seed, progress, desc or method, probe
        self.net = net.to(ctx.device)
        adversary: nn.Module | None = None
        if method in ("dann", "jan-a"):
            torch.manual_seed(seed)  # the adversary's initial weights depend on the seed only
            dim = feature_dim(self.net, cfg.data.channels, cfg.data.image_size)
            if method == "dann":
                adversary = DomainAdversarialLoss(DomainDiscriminator(dim, bcfg.discriminator_hidden,
                                                                      bcfg.discriminator_dropout))
            else:
                adversary = JointAdversarialLayers([dim, data.num_classes])
            adversary = adversary.to(ctx.device)
        self.module = BaselineNet(self.net, adversary)
        if ctx.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.model = ctx.wrap(self.module)
        self.optimizer = build_optimizer(self.module, self.spec.optim)
        self.scaler = ctx.grad_scaler()
        self.sampler = MixedBatchSampler(len(data.source), len(data.target), self.spec.batch_size, bcfg.proportions,
                                         "S+T", seed, ctx.rank, ctx.world_size)
        # streamed data sets: the coming steps' rows are decoded ahead by DataLoader workers, as in DAAATrainer
        self.sampler = prefetching(self.sampler, data, self.spec.steps, cfg.data.num_workers, None)
        self.init_average()

    def step(self, step: int) -> dict[str, Any]:
        ctx, spec, b = self.ctx, self.spec, self.bcfg
        lr = set_lr(self.optimizer, spec.optim, step)  # the schedule of the whole run: no M_post, no restart
        batch = self.sampler.batch(step)
        n_s = len(batch.source_idx)
        images = torch.cat([self.data.source.images[batch.source_idx], self.data.target.images[batch.target_idx]])
        crops = train_crops(images, self.cfg.data, self.seed, step)
        x = prepare(images, self.cfg.data, train=True, crops=crops, device=ctx.device, channels_last=ctx.channels_last)
        coeff = dann_coefficient(step / max(spec.steps, 1), b.grl_alpha) if self.method == "dann" else 0.0

        self.model.train()
        with ctx.autocast():
            f, logits, domain_loss = self.model(x, n_s, coeff)
        logits = logits.float()
        labels = self.data.source.labels[batch.source_idx].to(ctx.device)
        loss_ce = F.cross_entropy(logits[:n_s], labels)
        if self.method == "dann":
            transfer = domain_loss
        elif self.method == "dan":
            transfer = mmd(f[:n_s], f[n_s:], b.kernel_mults, b.linear_mmd)
        else:  # jan, jan-a
            layers = [f.flatten(1), F.softmax(logits, dim=1)]
            if self.method == "jan-a":  # theta maximises the JMMD that the network minimises
                layers = self.module.adversary(layers)
            transfer = jmmd([x[:n_s] for x in layers], [x[n_s:] for x in layers],
                            [b.kernel_mults, b.softmax_kernel_mults], b.linear_mmd)
        loss = loss_ce + b.tradeoff * transfer
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # queued before the read-back, as in DAAATrainer.step
        sums = ctx.all_reduce_sum(torch.stack([loss_ce.detach(), transfer.detach()]).float()) / ctx.world_size
        ce, transfer_sum = sums.tolist()  # the step's one read-back; a NaN stops every rank before the update
        guard_finite(step, {"L_CE": ce, "L_transfer": transfer_sum}, self.stage)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_average()
        out = {"loss": ce + b.tradeoff * transfer_sum, "L_CE": ce, "L_transfer": transfer_sum, "lr": lr}
        if self.method == "dann":
            out["grl_coeff"] = coeff
            out["domain_accuracy"] = self.module.adversary.domain_accuracy
        return out

    def state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def fit(self) -> dict[str, Any]:
        return {**super().fit(), "method": self.method}
