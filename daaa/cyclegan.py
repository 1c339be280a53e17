"""CycleGAN for adversarial data pairing (paper Sec. 3.1, Eq. 1-3), following the reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix): ResNet generators, PatchGAN discriminators, LSGAN or log loss, image
history pools, Adam with a constant-then-linear learning-rate schedule.

Images fed to the networks are float tensors in [-1, 1] of shape (N, C, H, W); generators output [-1, 1] (tanh).
Naming follows the paper: ``G_ST`` maps source S to target T and is judged by ``D_T``; ``G_TS`` maps back and is
judged by ``D_S``.

Style-conditioned G_ST (``cyclegan.style_grid = k > 0``; an extension, off in the paper's presets). A deterministic
G_ST gives each source image exactly one translation, and a small one, trained briefly, settles on a few backgrounds:
on the demo pair 0.65% of its T_f have a digit darker than its background against 32% of real MNIST-M-like images,
so the target network never sees that part of the target (BENCHMARKS.md). With ``k > 0`` G_ST also receives
:func:`style_field` of a real target image -- its k x k block means: the colour layout without the content -- which
sets the scale and shift of each of G_ST's instance norms (:class:`StyleModulation`; as an extra input channel it
would be erased by the first instance norm). In the cycle T -> S_f -> T the field is that of the image being
reconstructed, exactly the information G_TS's source-style output lacks, so G_ST learns to use it; translating x^S
then takes the field of a randomly drawn real target image, so T_f follows the target's distribution of backgrounds.
G_TS, D_T, D_S and every loss term are unchanged.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import CycleGANConfig, check_style_grid
from .distributed import autocast
from .errors import ConfigError, NonFiniteLossError


def _norm(ch: int) -> nn.Module:
    # the reference's "instance" norm: no affine parameters, no running statistics
    return nn.InstanceNorm2d(ch, affine=False, track_running_stats=False)


def init_weights(net: nn.Module, gen: torch.Generator, gain: float = 0.02) -> None:
    """The reference's "normal" init: conv weights ~ N(0, 0.02), biases 0, drawn from ``gen`` for determinism."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class StyleModulation(nn.Module):
    """Instance norm whose scale and shift come from a style embedding, per pixel (SPADE, Park et al. 2019):
    ``IN(x) * (1 + gamma(h)) + beta(h)``. A plain instance norm would subtract a uniform background colour fed as
    input, which is exactly what the style field carries; modulating after the norm keeps it. gamma and beta start
    near 0 (the reference init), so an untrained layer is a plain instance norm.

    ``h`` is the embedding of the k x k layout: gamma and beta are computed at that coarse size and upsampled
    bilinearly to ``x``, which costs almost nothing (computing them at full size cost more than G_ST itself)."""

    def __init__(self, ch: int, style_hidden: int):
        super().__init__()
        self.norm = _norm(ch)
        self.gamma_beta = nn.Conv2d(style_hidden, 2 * ch, 3, padding=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma_beta = self.gamma_beta(style)
        if gamma_beta.shape[-2:] != x.shape[-2:]:
            gamma_beta = F.interpolate(gamma_beta, size=x.shape[-2:], mode="bilinear", align_corners=False)
        gamma, beta = gamma_beta.chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


def _run(layers: nn.Sequential, x: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
    """``layers`` in order, handing the style embedding to the layers that take one."""
    for layer in layers:
        x = layer(x, style) if isinstance(layer, (StyleModulation, ResnetBlock)) else layer(x)
    return x


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, norm: Any = None):
        super().__init__()
        norm = norm or _norm
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=True), norm(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=True), norm(ch))

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        return x + _run(self.block, x, style)


class ResnetGenerator(nn.Module):
    """G_ST or G_TS of Eq. 1-3: 7x7 stem, ``n_downsampling`` stride-2 convs, ``n_blocks`` residual blocks,
    as many transposed-conv upsamplings, 7x7 output conv + tanh (output in [-1, 1]).

    ``style_ch > 0`` makes it style-conditioned: ``forward(x, style)`` takes a (N, style_ch, k, k) layout
    (:func:`style_field`), embeds it with a 3x3 conv + ReLU (``style_hidden`` channels) and every instance norm
    becomes a :class:`StyleModulation` driven by that embedding. The input side must be a multiple of
    ``2 ** n_downsampling`` (see :func:`check_image_size`).
    """

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, n_blocks: int = 9, n_downsampling: int = 2,
                 style_ch: int = 0, style_hidden: int = 32):
        super().__init__()
        self.style_embed = (nn.Sequential(nn.Conv2d(style_ch, style_hidden, 3, padding=1), nn.ReLU(True))
                            if style_ch else None)

        def norm(ch: int) -> nn.Module:
            return StyleModulation(ch, style_hidden) if style_ch else _norm(ch)

        # bias=True everywhere: instance norm has no affine shift, so the reference keeps conv biases
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), norm(ngf), nn.ReLU(True)]
        for i in range(n_downsampling):
            c = ngf * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), norm(2 * c), nn.ReLU(True)]
        c = ngf * 2 ** n_downsampling
        layers += [ResnetBlock(c, norm) for _ in range(n_blocks)]
        for i in range(n_downsampling):
            c = ngf * 2 ** (n_downsampling - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                       norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        if self.style_embed is None:
            return self.model(x)
        if style is None:
            raise ValueError("this generator is style-conditioned: pass a style field")
        return _run(self.model, x, self.style_embed(style))


class PatchDiscriminator(nn.Module):
    """D_T or D_S of Eq. 1: the reference's N-layer PatchGAN. Returns a map of logits (one per image patch)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1), _norm(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1), _norm(ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def style_field(images: torch.Tensor, grid: int) -> torch.Tensor:
    """The ``grid`` x ``grid`` colour layout of ``images`` (N, C, H, W): block means (adaptive average pooling),
    shape (N, C, grid, grid). Coarse enough to carry a background's colours but not a digit."""
    return F.adaptive_avg_pool2d(images, grid)


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

    Call :meth:`to` to move it; :meth:`state_dict` (no arguments) covers networks, optimisers, schedulers, pools,
    the fp16 loss scaler and the step count, so :meth:`load_state_dict` continues a run exactly.

    ``amp_dtype`` (``torch.bfloat16``/``torch.float16``; None = fp32) runs the forward passes under autocast, with
    loss scaling for fp16; ``channels_last`` stores weights and inputs in NHWC (faster convs on CUDA).
    """

    def __init__(self, cfg: CycleGANConfig, channels: int, seed: int = 0, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.cfg = cfg
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        gen = torch.Generator().manual_seed(seed)
        check_style_grid(cfg)  # also for a CycleGANConfig built in code, which validate() never sees
        # fork the global RNG: module constructors draw from it before we overwrite every weight from `gen`
        with torch.random.fork_rng(devices=[]):
            self.G_ST = ResnetGenerator(channels, channels, cfg.ngf, cfg.n_blocks, cfg.n_downsampling,
                                        style_ch=channels if cfg.style_grid else 0)
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
        # one scaler for both optimisers (update() once per step); a pass-through unless fp16
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
        self.step = 0

    def _autocast(self, x: torch.Tensor):
        return autocast(x.device, self.amp_dtype)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def uses_style(self) -> bool:
        return self.cfg.style_grid > 0

    def _g_st(self, x: torch.Tensor, style_images: torch.Tensor | None) -> torch.Tensor:
        """G_ST(x), or G_ST(x, style_field(style_images)) when style-conditioned."""
        if not self.uses_style:
            return self.G_ST(x)
        if style_images is None or style_images.shape[0] != x.shape[0]:
            raise ValueError("G_ST is style-conditioned (cyclegan.style_grid > 0): pass one real target image per "
                             "input image as style_images")
        return self.G_ST(x, self._input(style_field(style_images, self.cfg.style_grid)))

    def _set_d_grad(self, flag: bool) -> None:
        for p in itertools.chain(self.D_T.parameters(), self.D_S.parameters()):
            p.requires_grad_(flag)

    def training_step(self, real_s: torch.Tensor, real_t: torch.Tensor) -> dict[str, float]:
        """One generator update (Eq. 3 + identity) then one discriminator update (Eq. 1 for D_T and D_S, halved,
        on real images and pooled fakes); then one LR-scheduler step. Inputs in [-1, 1] on the model's device.

        Returns unweighted loss terms: ``g_st``/``g_ts`` (adversarial, Eq. 1), ``cycle_s``/``cycle_t`` (the two L1
        terms of Eq. 2) and their sum ``cycle``, ``identity``, ``g_total`` (the minimised weighted sum),
        ``d_t``/``d_s`` and their sum ``d``, and the ``lr`` used.
        """
        c = self.cfg
        self.train()
        lr = self.opt_g.param_groups[0]["lr"]
        real_s, real_t = self._input(real_s), self._input(real_t)
        # generators: D frozen so its gradients are not accumulated by the generator loss
        self._set_d_grad(False)
        self.opt_g.zero_grad(set_to_none=True)
        # style-conditioned: x^S is drawn in the layout of another real target image of the batch, and the cycle
        # T -> S_f -> T gets the layout of the very image it must reconstruct
        other_t = torch.roll(real_t, 1, 0) if self.uses_style else None
        with self._autocast(real_s):
            fake_t = self._g_st(real_s, other_t)
            fake_s = self.G_TS(real_t)
            rec_s = self.G_TS(fake_t)
            rec_t = self._g_st(fake_s, real_t)
            g_st = self.gan_loss(self.D_T(fake_t).float(), True)
            g_ts = self.gan_loss(self.D_S(fake_s).float(), True)
            cycle_s = F.l1_loss(rec_s.float(), real_s)
            cycle_t = F.l1_loss(rec_t.float(), real_t)
            total = g_st + g_ts + c.lambda_cycle * (cycle_s + cycle_t)
            identity = torch.zeros((), device=real_s.device)
            if c.lambda_identity > 0:
                # G_ST should leave a real target image unchanged and G_TS a real source image (reference code)
                identity = (F.l1_loss(self._g_st(real_t, real_t).float(), real_t)
                            + F.l1_loss(self.G_TS(real_s).float(), real_s))
                total = total + c.lambda_identity * c.lambda_cycle * identity
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt_g)
        # discriminators: Eq. 1 on real vs. pooled fake images, halved to slow D relative to G (reference)
        self._set_d_grad(True)
        self.opt_d.zero_grad(set_to_none=True)
        pooled_t = self.pool_t.query(fake_t)
        pooled_s = self.pool_s.query(fake_s)
        with self._autocast(real_s):
            d_t = 0.5 * (self.gan_loss(self.D_T(real_t).float(), True) + self.gan_loss(self.D_T(pooled_t).float(), False))
            d_s = 0.5 * (self.gan_loss(self.D_S(real_s).float(), True) + self.gan_loss(self.D_S(pooled_s).float(), False))
            d = d_t + d_s
        self.scaler.scale(d).backward()
        self.scaler.step(self.opt_d)
        self.scaler.update()
        vals = {"g_st": g_st, "g_ts": g_ts, "cycle_s": cycle_s, "cycle_t": cycle_t, "cycle": cycle_s + cycle_t,
                "identity": identity, "g_total": total, "d_t": d_t, "d_s": d_s, "d": d}
        # one device sync per step; a non-finite loss stops here, before any checkpoint can store the broken weights
        out = dict(zip(vals, torch.stack([v.detach().float() for v in vals.values()]).tolist()))
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"cyclegan step {self.step + 1}: loss term {bad[0]} is {out[bad[0]]}"
                                     f"{' (also ' + ', '.join(bad[1:]) + ')' if bad[1:] else ''}; "
                                     "the last checkpoint is kept (try a lower cyclegan.lr)")
        self.sched_g.step()
        self.sched_d.step()
        self.step += 1
        out["lr"] = lr
        return out

    def _translate(self, fn: Any, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), self._autocast(x):
                return fn(self._input(x)).float()
        finally:
            net.train(was_training)

    def translate_st(self, x: torch.Tensor, style_images: torch.Tensor | None = None) -> torch.Tensor:
        """G_ST(x): source images in [-1, 1] -> synthetic target images in [-1, 1] (no gradients). A
        style-conditioned model (``cyclegan.style_grid > 0``) also needs ``style_images``: one real target image in
        [-1, 1] per input image, whose colour layout the translation takes."""
        return self._translate(lambda v: self._g_st(v, style_images), self.G_ST, x)

    def translate_ts(self, x: torch.Tensor) -> torch.Tensor:
        """G_TS(x): target images in [-1, 1] -> synthetic source images in [-1, 1] (no gradients)."""
        return self._translate(self.G_TS, self.G_TS, x)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue training exactly. With arguments (a parent module recursing) it behaves
        like :meth:`nn.Module.state_dict`."""
        if args or kwargs:
            return super().state_dict(*args, **kwargs)
        return {"nets": super().state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "pool_t": self.pool_t.state_dict(), "pool_s": self.pool_s.state_dict(), "step": self.step,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        if "nets" not in state:  # a plain module state dict
            return super().load_state_dict(state, strict, assign)
        result = super().load_state_dict(state["nets"], strict, assign)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        device = next(self.parameters()).device
        self.pool_t.load_state_dict(state["pool_t"], device)
        self.pool_s.load_state_dict(state["pool_s"], device)
        self.step = int(state["step"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return result
