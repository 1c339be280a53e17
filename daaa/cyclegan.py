"""CycleGAN for adversarial data pairing (paper Sec. 3.1, Eq. 1-3), following the reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix): ResNet generators, PatchGAN discriminators, LSGAN or log loss, image
history pools, Adam with a constant-then-linear learning-rate schedule.

Images fed to the networks are float tensors in [-1, 1] of shape (N, C, H, W); generators output [-1, 1] (tanh).
Naming follows the paper: ``G_ST`` maps source S to target T and is judged by ``D_T``; ``G_TS`` maps back and is
judged by ``D_S``.

Besides the paper's Eq. 3, :meth:`CycleGAN.semantic_loss` is CyCADA's semantic-consistency term (Hoffman et al.,
ICML 2018), added with weight ``cyclegan.lambda_semantic`` (0 = off, the paper's CycleGAN) when a frozen source
classifier is given (:meth:`CycleGAN.set_semantic_guide`).

This module is the paper's CycleGAN only. The style-conditioned G_ST (``cyclegan.style_grid > 0``, an extension not
in the paper) is :class:`daaa.style_gst.StyleCycleGAN`, a subclass overriding the G_ST hooks of :class:`CycleGAN`
(:meth:`CycleGAN.g_st`, :meth:`CycleGAN.step_donors`, :meth:`CycleGAN.translation_donors`);
:func:`daaa.style_gst.build_cyclegan` picks the class from the config.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import CycleGANConfig
from .distributed import autocast
from .errors import ConfigError, NonFiniteLossError


Norm = Callable[[int], nn.Module]  # channels -> a norm layer; the style extension passes a modulated one


def instance_norm(ch: int) -> nn.Module:
    """The reference's "instance" norm: no affine parameters, no running statistics."""
    return nn.InstanceNorm2d(ch, affine=False, track_running_stats=False)


def init_weights(net: nn.Module, gen: torch.Generator, gain: float = 0.02) -> None:
    """The reference's "normal" init: conv weights ~ N(0, 0.02), biases 0, drawn from ``gen`` for determinism."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResnetBlock(nn.Module):
    """Residual block of the generators of Eq. 1-3: x + (pad, conv 3x3, norm, ReLU, pad, conv 3x3, norm)(x)."""

    def __init__(self, ch: int, norm: Norm = instance_norm):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=True), norm(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=True), norm(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def resnet_layers(in_ch: int, out_ch: int, ngf: int, n_blocks: int, n_downsampling: int,
                  norm: Norm = instance_norm, block: type[ResnetBlock] = ResnetBlock) -> nn.Sequential:
    """The reference's ResNet generator body: 7x7 stem, ``n_downsampling`` stride-2 convs, ``n_blocks`` residual
    blocks, as many transposed-conv upsamplings, 7x7 output conv + tanh. ``norm`` and ``block`` let the style
    extension (:mod:`daaa.style_gst`) swap in modulated norms without another copy of this layout."""
    # bias=True everywhere: instance norm has no affine shift, so the reference keeps conv biases
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), norm(ngf), nn.ReLU(True)]
    for i in range(n_downsampling):
        c = ngf * 2 ** i
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), norm(2 * c), nn.ReLU(True)]
    c = ngf * 2 ** n_downsampling
    layers += [block(c, norm) for _ in range(n_blocks)]
    for i in range(n_downsampling):
        c = ngf * 2 ** (n_downsampling - i)
        layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                   norm(c // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
    return nn.Sequential(*layers)


class ResnetGenerator(nn.Module):
    """G_ST or G_TS of Eq. 1-3 (:func:`resnet_layers`); output in [-1, 1]. The input side must be a multiple of
    ``2 ** n_downsampling`` (see :func:`check_image_size`)."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, n_blocks: int = 9, n_downsampling: int = 2):
        super().__init__()
        self.model = resnet_layers(in_ch, out_ch, ngf, n_blocks, n_downsampling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """D_T or D_S of Eq. 1: the reference's N-layer PatchGAN. Returns a map of logits (one per image patch)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1), instance_norm(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1), instance_norm(ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def check_image_size(size: int, n_downsampling: int, n_layers_d: int) -> None:
    """Raise ConfigError when ``size`` does not fit the networks (odd strides, too-small maps for reflection
    padding or instance norm)."""
    f = 2 ** n_downsampling
    if size % f or size // f < 2:
        raise ConfigError(f"option cyclegan.image_size: {size} must be a multiple of {f} and at least {2 * f} "
                          f"(cyclegan.n_downsampling={n_downsampling})")
    if n_layers_d < 1:
        raise ConfigError(f"option cyclegan.n_layers_d: {n_layers_d} must be at least 1")
    s = size
    for _ in range(n_layers_d):
        s = (s - 2) // 2 + 1
    if s < 3:  # the two stride-1 4x4 convs shrink by 1 each; instance norm needs more than one pixel
        raise ConfigError(f"option cyclegan.image_size: {size} is too small for cyclegan.n_layers_d={n_layers_d}")


class GANLoss(nn.Module):
    """Adversarial loss on a discriminator's logit map.

    ``"log"`` is the paper's Eq. 1 (binary cross-entropy on logits; a generator minimises -log D(G(x)), the
    non-saturating form); ``"lsgan"`` (default, as in the reference CycleGAN) replaces it by the least-squares loss
    (D(x) - 1)^2 for real and D(G(x))^2 for fake.
    """

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        if mode not in ("lsgan", "log"):
            raise ConfigError(f"option cyclegan.gan_mode: {mode!r} is not one of lsgan, log")
        self.mode = mode

    def forward(self, pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
        if self.mode == "lsgan":
            return F.mse_loss(pred, target)
        return F.binary_cross_entropy_with_logits(pred, target)


class ImagePool:
    """History of generated images (Shrivastava et al.; reference semantics): while not full, every image is stored
    and returned; afterwards each image is, with probability 1/2, swapped for a random stored one (which is returned)
    or returned as is. Randomness comes from a private ``torch.Generator`` so runs and resumes are reproducible.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.gen).item() > 0.5:
                i = int(torch.randint(self.size, (), generator=self.gen))
                out.append(self.images[i])
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        imgs = torch.stack(self.images).cpu() if self.images else None
        return {"size": self.size, "images": imgs, "rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.size = state["size"]
        self.images = [] if state["images"] is None else [x.to(device) for x in state["images"]]
        self.gen.set_state(state["rng"])


def linear_decay(steps: int, decay_start: int):
    """LR factor of step t: 1 until ``decay_start``, then linearly down to 0 at ``steps``."""
    span = max(1, steps - decay_start)
    return lambda t: 1.0 if t < decay_start else max(0.0, (steps - t) / span)


class CycleGAN(nn.Module):
    """The full objective of Eq. 3: L_GAN(G_ST, D_T) + L_GAN(G_TS, D_S) + lambda * L_cyc(G_ST, G_TS)
    (Eq. 1 adversarial terms, Eq. 2 cycle term), plus the reference's optional identity term
    ``lambda_identity * lambda * (|G_ST(t) - t|_1 + |G_TS(s) - s|_1)``.

    Call :meth:`to` to move it. :meth:`state_dict` is the plain module state (the four networks, as the reference's
    ``save_networks``); :meth:`training_state` adds optimisers, schedulers, pools, the fp16 loss scaler and the step
    count, so :meth:`load_training_state` continues a run exactly.

    ``amp_dtype`` (``torch.bfloat16``/``torch.float16``; None = fp32) runs the forward passes under autocast, with
    loss scaling for fp16; ``channels_last`` stores weights and inputs in NHWC (faster convs on CUDA).

    Hooks for the style extension (:class:`daaa.style_gst.StyleCycleGAN`): :meth:`make_g_st`, :meth:`g_st`,
    :meth:`step_donors`, :meth:`translation_donors`. Here they are the paper's G_ST, which sees only its input.
    """

    def __init__(self, cfg: CycleGANConfig, channels: int, seed: int = 0, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.cfg = cfg
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        gen = torch.Generator().manual_seed(seed)
        # fork the global RNG: module constructors draw from it before we overwrite every weight from `gen`
        with torch.random.fork_rng(devices=[]):
            self.G_ST = self.make_g_st(channels)
            self.G_TS = ResnetGenerator(channels, channels, cfg.ngf, cfg.n_blocks, cfg.n_downsampling)
            self.D_T = PatchDiscriminator(channels, cfg.ndf, cfg.n_layers_d)
            self.D_S = PatchDiscriminator(channels, cfg.ndf, cfg.n_layers_d)
        for net in (self.G_ST, self.G_TS, self.D_T, self.D_S):
            init_weights(net, gen)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.gan_loss = GANLoss(cfg.gan_mode)
        betas = (cfg.beta1, 0.999)
        self.opt_g = torch.optim.Adam(itertools.chain(self.G_ST.parameters(), self.G_TS.parameters()), cfg.lr, betas)
        self.opt_d = torch.optim.Adam(itertools.chain(self.D_T.parameters(), self.D_S.parameters()), cfg.lr, betas)
        rule = linear_decay(cfg.steps, cfg.decay_start)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, rule)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, rule)
        self.pool_t = ImagePool(cfg.pool_size, seed + 1)  # fake target images for D_T
        self.pool_s = ImagePool(cfg.pool_size, seed + 2)  # fake source images for D_S
        # one scaler for both optimisers (update() once per step), made at the first step for the inputs' device:
        # the module is moved only after __init__
        self.scaler: torch.amp.GradScaler | None = None
        self._scaler_state: dict[str, Any] = {}
        self.step = 0
        self._semantic_guide: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ---- hooks: the paper's G_ST (Eq. 1-2); daaa.style_gst.StyleCycleGAN overrides them -------------------------

    def make_g_st(self, channels: int) -> nn.Module:
        """The network G_ST: the paper's ResNet generator."""
        c = self.cfg
        return ResnetGenerator(channels, channels, c.ngf, c.n_blocks, c.n_downsampling)

    def g_st(self, x: torch.Tensor, donors: torch.Tensor | None) -> torch.Tensor:
        """G_ST on a batch ``x`` in [-1, 1]. ``donors`` (real target images aligned with ``x``, or None) are what a
        conditioned G_ST may read; the paper's G_ST maps ``x`` alone and ignores them."""
        return self.G_ST(x)

    def step_donors(self, real_t: torch.Tensor) -> torch.Tensor | None:
        """The donors handed to G_ST with the source batch in a training step (the cycle T -> S_f -> T and the
        identity term hand it ``real_t`` itself): none for the paper's G_ST."""
        return None

    def translation_donors(self, n_source: int, n_target: int, seed: int) -> torch.Tensor | None:
        """For translating every source image: the index of the real target image handed to G_ST with each one.
        None: the paper's T_f[i] = G_ST(S[i]) depends on S[i] alone."""
        return None

    # ---- CyCADA's semantic consistency (cyclegan.lambda_semantic > 0; not in the paper) ----------------------

    def set_semantic_guide(self, classify: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """The frozen source classifier f of :meth:`semantic_loss`: images in [-1, 1] -> logits (see
        :func:`daaa.pairing_quality.model_range_classifier`), on the model's device."""
        # set past nn.Module's registration: f's weights belong to the source stage, not to this state_dict
        object.__setattr__(self, "_semantic_guide", classify)

    def semantic_loss(self, real_s: torch.Tensor, real_t: torch.Tensor, fake_t: torch.Tensor,
                      fake_s: torch.Tensor) -> torch.Tensor:
        """CyCADA's L_sem: CE(f(G_ST(x^S)), argmax f(x^S)) + CE(f(G_TS(x^T)), argmax f(x^T)), f frozen: each
        translation must keep the label f gives the real image (f's own labels, as in CyCADA, also for x^S)."""
        f = self._semantic_guide
        if f is None:
            raise ConfigError("option cyclegan.lambda_semantic: > 0 needs the frozen source network "
                              "(CycleGAN.set_semantic_guide; `daaa run` trains it before the CycleGAN)")
        with torch.no_grad():
            label_s, label_t = f(real_s).argmax(1), f(real_t).argmax(1)
        return F.cross_entropy(f(fake_t).float(), label_s) + F.cross_entropy(f(fake_s).float(), label_t)

    # ---- training -------------------------------------------------------------------------------------------

    def _autocast(self, x: torch.Tensor):
        return autocast(x.device, self.amp_dtype)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The loss scaler: a pass-through unless fp16; made on first use for ``device``'s type."""
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
            if self._scaler_state:
                self.scaler.load_state_dict(self._scaler_state)
        return self.scaler

    def _set_d_grad(self, flag: bool) -> None:
        for p in itertools.chain(self.D_T.parameters(), self.D_S.parameters()):
            p.requires_grad_(flag)

    def _generator_losses(self, real_s: torch.Tensor, real_t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 3 + identity (+ ``lambda_semantic`` * :meth:`semantic_loss` when on) for one batch, with the fakes
        (``fake_t``, ``fake_s``) the discriminators then see."""
        c = self.cfg
        with self._autocast(real_s):
            fake_t = self.g_st(real_s, self.step_donors(real_t))
            fake_s = self.G_TS(real_t)
            rec_s = self.G_TS(fake_t)
            # the cycle T -> S_f -> T: a conditioned G_ST gets the very image it must reconstruct
            rec_t = self.g_st(fake_s, real_t)
            g_st = self.gan_loss(self.D_T(fake_t).float(), True)
            g_ts = self.gan_loss(self.D_S(fake_s).float(), True)
            cycle_s = F.l1_loss(rec_s.float(), real_s)
            cycle_t = F.l1_loss(rec_t.float(), real_t)
            total = g_st + g_ts + c.lambda_cycle * (cycle_s + cycle_t)
            identity = torch.zeros((), device=real_s.device)
            if c.lambda_identity > 0:
                # G_ST should leave a real target image unchanged and G_TS a real source image (reference code)
                identity = (F.l1_loss(self.g_st(real_t, real_t).float(), real_t)
                            + F.l1_loss(self.G_TS(real_s).float(), real_s))
                total = total + c.lambda_identity * c.lambda_cycle * identity
            out = {"g_st": g_st, "g_ts": g_ts, "cycle_s": cycle_s, "cycle_t": cycle_t, "identity": identity}
            if c.lambda_semantic > 0:  # the key only when on: histories of the paper's CycleGAN stay as they were
                out["semantic"] = self.semantic_loss(real_s, real_t, fake_t, fake_s)
                total = total + c.lambda_semantic * out["semantic"]
        return {**out, "g_total": total, "fake_t": fake_t, "fake_s": fake_s}

    def _discriminator_losses(self, real_s: torch.Tensor, real_t: torch.Tensor, fake_t: torch.Tensor,
                              fake_s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 1 for D_T and D_S on real vs. pooled fake images, halved to slow D relative to G (reference)."""
        pooled_t = self.pool_t.query(fake_t)
        pooled_s = self.pool_s.query(fake_s)
        with self._autocast(real_s):
            d_t = 0.5 * (self.gan_loss(self.D_T(real_t).float(), True)
                         + self.gan_loss(self.D_T(pooled_t).float(), False))
            d_s = 0.5 * (self.gan_loss(self.D_S(real_s).float(), True)
                         + self.gan_loss(self.D_S(pooled_s).float(), False))
            d = d_t + d_s
        return {"d_t": d_t, "d_s": d_s, "d": d}

    def training_step(self, real_s: torch.Tensor, real_t: torch.Tensor) -> dict[str, float]:
        """One generator update (Eq. 3 + identity) then one discriminator update (Eq. 1 for D_T and D_S, halved,
        on real images and pooled fakes); then one LR-scheduler step. Inputs in [-1, 1] on the model's device.

        Returns unweighted loss terms: ``g_st``/``g_ts`` (adversarial, Eq. 1), ``cycle_s``/``cycle_t`` (the two L1
        terms of Eq. 2) and their sum ``cycle``, ``identity``, ``semantic`` (only when ``lambda_semantic > 0``),
        ``g_total`` (the minimised weighted sum),
        ``d_t``/``d_s`` and their sum ``d``, and the ``lr`` used.
        """
        self.train()
        lr = self.opt_g.param_groups[0]["lr"]
        scaler = self._grad_scaler(real_s.device)
        real_s, real_t = self._input(real_s), self._input(real_t)
        # generators: D frozen so its gradients are not accumulated by the generator loss
        self._set_d_grad(False)
        self.opt_g.zero_grad(set_to_none=True)
        g = self._generator_losses(real_s, real_t)
        scaler.scale(g["g_total"]).backward()
        scaler.step(self.opt_g)
        self._set_d_grad(True)
        self.opt_d.zero_grad(set_to_none=True)
        d = self._discriminator_losses(real_s, real_t, g.pop("fake_t"), g.pop("fake_s"))
        scaler.scale(d["d"]).backward()
        scaler.step(self.opt_d)
        scaler.update()
        out = self._finite_values(g, d)
        self.sched_g.step()
        self.sched_d.step()
        self.step += 1
        out["lr"] = lr
        return out

    def _finite_values(self, g: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's loss terms as floats in the order of :meth:`training_step`'s doc, with one device sync; a
        non-finite one stops here, before any checkpoint can store the broken weights."""
        vals = {"g_st": g["g_st"], "g_ts": g["g_ts"], "cycle_s": g["cycle_s"], "cycle_t": g["cycle_t"],
                "cycle": g["cycle_s"] + g["cycle_t"], "identity": g["identity"],
                **({"semantic": g["semantic"]} if "semantic" in g else {}), "g_total": g["g_total"], **d}
        out = dict(zip(vals, torch.stack([v.detach().float() for v in vals.values()]).tolist()))
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"cyclegan step {self.step + 1}: loss term {bad[0]} is {out[bad[0]]}"
                                     f"{' (also ' + ', '.join(bad[1:]) + ')' if bad[1:] else ''}; "
                                     "the last checkpoint is kept (try a lower cyclegan.lr)")
        return out

    # ---- translation ----------------------------------------------------------------------------------------

    def _translate(self, fn: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        f = 2 ** self.cfg.n_downsampling
        if x.shape[-1] % f or x.shape[-2] % f:  # the transposed convs would return another size: no pair
            raise ValueError(f"CycleGAN translation: images {tuple(x.shape[-2:])} must have sides divisible by {f} "
                             f"(2 ** n_downsampling; resize them to cyclegan.image_size)")
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), self._autocast(x):
                return fn(self._input(x)).float()
        finally:
            net.train(was_training)

    def translate_st(self, x: torch.Tensor, donors: torch.Tensor | None = None) -> torch.Tensor:
        """G_ST(x): source images in [-1, 1] -> synthetic target images in [-1, 1] (no gradients). ``donors``: see
        :meth:`g_st` (a style-conditioned G_ST needs one real target image in [-1, 1] per input image)."""
        return self._translate(lambda v: self.g_st(v, donors), self.G_ST, x)

    def translate_ts(self, x: torch.Tensor) -> torch.Tensor:
        """G_TS(x): target images in [-1, 1] -> synthetic source images in [-1, 1] (no gradients)."""
        return self._translate(self.G_TS, self.G_TS, x)

    # ---- checkpoints: networks (state_dict) apart from the training state -----------------------------------

    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: ``nets`` (:meth:`state_dict`), optimisers, schedulers,
        image pools, the loss scaler and the step count. Tensors are shared with the live model, not copied."""
        scaler = self.scaler.state_dict() if self.scaler is not None else self._scaler_state
        return {"nets": self.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "pool_t": self.pool_t.state_dict(), "pool_s": self.pool_s.state_dict(), "step": self.step,
                "scaler": scaler}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`training_state` (as stored in a translate checkpoint), after :meth:`to`."""
        self.load_state_dict(state["nets"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        for sched in (self.sched_g, self.sched_d):  # the decay of this config's cyclegan.steps: an extended run's
            for group, base, rule in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * rule(sched.last_epoch)
        device = next(self.parameters()).device
        self.pool_t.load_state_dict(state["pool_t"], device)
        self.pool_s.load_state_dict(state["pool_s"], device)
        self.step = int(state["step"])
        # applied when the scaler is made (first step), for the device the inputs are on
        self.scaler, self._scaler_state = None, state.get("scaler") or {}
