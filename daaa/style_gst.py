"""Style-conditioned G_ST (``cyclegan.style_grid = k > 0``): an extension, not in the paper, off in the paper's
presets. The paper's CycleGAN (Sec. 3.1, Eq. 1-3) is :class:`daaa.cyclegan.CycleGAN`; :class:`StyleCycleGAN`
overrides only its G_ST hooks, and G_TS, D_T, D_S and every loss term of Eq. 1-3 stay the paper's.

Why: a deterministic G_ST gives each source image exactly one translation, and a small one, trained briefly, settles
on a few backgrounds: on the demo pair 0.65% of its T_f have a digit darker than its background against 32% of real
MNIST-M-like images, so the target network never sees that part of the target (BENCHMARKS.md).

How: G_ST also receives :func:`style_field` of a real target image (a "donor") -- its k x k block means: the colour
layout without the content -- which sets the scale and shift of each of G_ST's instance norms
(:class:`StyleModulation`; as an extra input channel it would be erased by the first instance norm). In the cycle
T -> S_f -> T the field is that of the image being reconstructed, exactly the information G_TS's source-style output
lacks, so G_ST learns to use it; translating x^S then takes the field of a randomly drawn real target image, so T_f
follows the target's distribution of backgrounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CycleGANConfig, check_style_grid
from .cyclegan import CycleGAN, ResnetBlock, instance_norm, resnet_layers


def style_field(images: torch.Tensor, grid: int) -> torch.Tensor:
    """The ``grid`` x ``grid`` colour layout of ``images`` (N, C, H, W): block means (adaptive average pooling),
    shape (N, C, grid, grid). Coarse enough to carry a background's colours but not a digit."""
    return F.adaptive_avg_pool2d(images, grid)


class StyleModulation(nn.Module):
    """Instance norm whose scale and shift come from a style embedding, per pixel (SPADE, Park et al. 2019):
    ``IN(x) * (1 + gamma(h)) + beta(h)``. A plain instance norm would subtract a uniform background colour fed as
    input, which is exactly what the style field carries; modulating after the norm keeps it. gamma and beta start
    near 0 (the reference init), so an untrained layer is a plain instance norm.

    ``h`` is the embedding of the k x k layout: gamma and beta are computed at that coarse size and upsampled
    bilinearly to ``x``, which costs almost nothing (computing them at full size cost more than G_ST itself)."""

    def __init__(self, ch: int, style_hidden: int):
        super().__init__()
        self.norm = instance_norm(ch)
        self.gamma_beta = nn.Conv2d(style_hidden, 2 * ch, 3, padding=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma_beta = self.gamma_beta(style)
        if gamma_beta.shape[-2:] != x.shape[-2:]:
            gamma_beta = F.interpolate(gamma_beta, size=x.shape[-2:], mode="bilinear", align_corners=False)
        gamma, beta = gamma_beta.chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class StyleResnetBlock(ResnetBlock):
    """The paper's residual block with :class:`StyleModulation` norms, which take the style embedding."""

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # the extra argument is the point of this class: the norms inside the block need the embedding
        return x + run_styled(self.block, x, style)


def run_styled(layers: nn.Sequential, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """``layers`` in order, handing the style embedding to the layers that take one."""
    for layer in layers:
        x = layer(x, style) if isinstance(layer, (StyleModulation, StyleResnetBlock)) else layer(x)
    return x


class StyleResnetGenerator(nn.Module):
    """The paper's ResNet generator (:func:`daaa.cyclegan.resnet_layers`) conditioned on a layout:
    ``forward(x, style)`` takes a (N, style_ch, k, k) :func:`style_field`, embeds it with a 3x3 conv + ReLU
    (``style_hidden`` channels), and every instance norm is a :class:`StyleModulation` driven by that embedding."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int, n_blocks: int, n_downsampling: int, style_ch: int,
                 style_hidden: int = 32):
        super().__init__()
        # registered before `model`: init_weights draws in module order, so this order fixes the seeded weights
        self.style_embed = nn.Sequential(nn.Conv2d(style_ch, style_hidden, 3, padding=1), nn.ReLU(True))
        self.model = resnet_layers(in_ch, out_ch, ngf, n_blocks, n_downsampling,
                                   norm=lambda ch: StyleModulation(ch, style_hidden), block=StyleResnetBlock)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
        if style is None:
            raise ValueError("this generator is style-conditioned: pass a style field")
        return run_styled(self.model, x, self.style_embed(style))


class StyleCycleGAN(CycleGAN):
    """:class:`daaa.cyclegan.CycleGAN` (Eq. 1-3) with a style-conditioned G_ST (the extension of this module).

    Training: x^S is translated in the layout of another real target image of the batch (the batch rolled by one),
    and the cycle T -> S_f -> T and the identity term get the layout of the very image they reproduce.
    Translation: each source image takes the layout of a real target image drawn by :meth:`translation_donors`.
    """

    def __init__(self, cfg: CycleGANConfig, channels: int, seed: int = 0, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False):
        check_style_grid(cfg)  # also for a CycleGANConfig built in code, which validate() never sees
        if cfg.style_grid < 1:
            raise ValueError("StyleCycleGAN needs cyclegan.style_grid > 0; build_cyclegan picks the paper's CycleGAN")
        super().__init__(cfg, channels, seed, amp_dtype, channels_last)

    def make_g_st(self, channels: int) -> nn.Module:
        c = self.cfg
        return StyleResnetGenerator(channels, channels, c.ngf, c.n_blocks, c.n_downsampling, style_ch=channels)

    def g_st(self, x: torch.Tensor, donors: torch.Tensor | None) -> torch.Tensor:
        """G_ST(x, style_field(donors)): ``donors`` are one real target image per image of ``x``."""
        if donors is None or donors.shape[0] != x.shape[0]:
            raise ValueError("G_ST is style-conditioned (cyclegan.style_grid > 0): pass one real target image per "
                             "input image as donors")
        return self.G_ST(x, self._input(style_field(donors, self.cfg.style_grid)))

    def step_donors(self, real_t: torch.Tensor) -> torch.Tensor:
        # another real target image of the batch than the one whose cycle T -> S_f -> T uses this row
        return torch.roll(real_t, 1, 0)

    def translation_donors(self, n_source: int, n_target: int, seed: int) -> torch.Tensor:
        """Which real target image lends its layout to each source image's translation: uniform draws, fixed by
        the run's seed."""
        return torch.randint(n_target, (n_source,), generator=torch.Generator().manual_seed(seed + 7919))


def build_cyclegan(cfg: CycleGANConfig, channels: int, seed: int = 0, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> CycleGAN:
    """The paper's :class:`~daaa.cyclegan.CycleGAN` when ``cfg.style_grid == 0``, else :class:`StyleCycleGAN`."""
    check_style_grid(cfg)
    cls = StyleCycleGAN if cfg.style_grid > 0 else CycleGAN
    return cls(cfg, channels, seed, amp_dtype, channels_last)
