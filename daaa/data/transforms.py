"""Batched tensor transforms on decoded uint8 images: normalisation, random crop + flip, centre crop.

Images are decoded once (see :func:`daaa.data.domain.load_tensors`); augmentation is done here, on whole batches,
with a generator seeded per step so that a resumed run draws the same crops as an uninterrupted one.
"""

from __future__ import annotations

import torch

from ..config import DataConfig


def normalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, (x / 255 - mean) / std per channel."""
    c = images.shape[1]
    mean = torch.tensor(cfg.mean[:c], device=images.device).view(1, c, 1, 1)
    std = torch.tensor(cfg.std[:c], device=images.device).view(1, c, 1, 1)
    return (images.float() / 255.0 - mean) / std


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def crop_params(n: int, load_size: int, size: int, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """(n, 3) rows of (top, left, flip) for :func:`random_crop_flip`; drawn once per batch so that the two images
    of an attention pair can be cropped alike. ``flip=False`` never flips (digits: a mirrored 2 is no 2)."""
    tops = torch.randint(0, load_size - size + 1, (n,), generator=generator)
    lefts = torch.randint(0, load_size - size + 1, (n,), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5).long() * int(flip)
    return torch.stack([tops, lefts, flips], dim=1)


def train_crops(images: torch.Tensor, cfg: DataConfig, seed: int, step: int) -> torch.Tensor | None:
    """The crop (and flip) rows of training step ``step`` for the batch ``images`` when ``cfg.augment`` is on,
    else None; seeded by (seed, step) so that a resumed run draws the same crops."""
    if not cfg.augment:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return crop_params(images.shape[0], images.shape[-1], cfg.image_size, g, cfg.flip)


def random_crop_flip(images: torch.Tensor, size: int, params: torch.Tensor) -> torch.Tensor:
    """Per-sample ``size`` crop and horizontal flip (the usual Office-31 training augmentation)."""
    n, c, h, w = images.shape
    params = params.to(images.device)
    tops, lefts, flips = params.unbind(1)
    offsets = torch.arange(size, device=images.device)
    rows = tops[:, None] + offsets
    cols = torch.where(flips[:, None].bool(), lefts[:, None] + offsets.flip(0), lefts[:, None] + offsets)
    # one gather for the whole batch; the index is shared by the channels (an expanded view, not a copy)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, size * size).expand(n, c, size * size)
    return images.reshape(n, c, h * w).gather(2, flat).view(n, c, size, size)


def prepare(images: torch.Tensor, cfg: DataConfig, train: bool = False, crops: torch.Tensor | None = None,
            device: torch.device | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch -> normalised float batch on ``device`` at ``cfg.image_size``.

    Training batches with ``cfg.augment`` are cropped and flipped by ``crops`` (from :func:`train_crops`);
    everything else is centre-cropped.
    """
    if train and cfg.augment and crops is not None:
        images = random_crop_flip(images, cfg.image_size, crops)
    elif images.shape[-1] != cfg.image_size:
        images = center_crop(images, cfg.image_size)
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = normalize(images, cfg)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
