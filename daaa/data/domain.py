"""A domain: images, optional labels, a class list -- and its decoded, validated, in-memory tensor form."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

if TYPE_CHECKING:
    from .streaming import LazyImages

LOG = logging.getLogger("daaa")
#: a set of uint8 (N, C, H, W) images: decoded in memory, or streamed from disk within the memory budget
Images = Union[torch.Tensor, "LazyImages"]


@dataclass
class Domain:
    """A set of images with optional labels.

    ``ids[i]`` names image i for messages and manifests (a file path, or ``"mnist[17]"`` for array data sets);
    ``read(i)`` returns it as a PIL image (any mode); ``labels`` is None for unlabelled data; ``classes`` is the
    ordered class-name list (label k means ``classes[k]``), also for unlabelled data when known.
    """

    name: str
    ids: list[str]
    read: Callable[[int], Image.Image]
    labels: list[int] | None = None
    classes: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def unlabelled(self) -> "Domain":
        """The same images with labels withheld (target training data)."""
        return Domain(self.name, self.ids, self.read, None, self.classes, dict(self.info))

    def subset(self, indices: list[int] | np.ndarray, name: str | None = None) -> "Domain":
        idx = [int(i) for i in indices]
        read = self.read
        return Domain(
            name or self.name,
            [self.ids[i] for i in idx],
            lambda j: read(idx[j]),
            None if self.labels is None else [self.labels[i] for i in idx],
            self.classes,
            dict(self.info),
        )


@dataclass
class ImageTensors:
    """A domain ready for the networks: ``images`` uint8 (N, C, H, W) -- a tensor decoded once, or, for a domain
    larger than ``data.cache_bytes``, a :class:`daaa.data.streaming.LazyImages` that decodes the rows it is indexed
    with -- and ``labels`` int64 (N,) or None."""

    name: str
    images: Images
    labels: torch.Tensor | None
    ids: list[str]
    classes: list[str] | None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Length of the class list, else one more than the largest label."""
        if self.classes:
            return len(self.classes)
        if self.labels is None or len(self.labels) == 0:
            raise ValueError(f"{self.name}: no class list and no labels: the number of classes is unknown")
        return int(self.labels.max()) + 1


@dataclass
class DomainData:
    """Everything a run trains and evaluates on, decoded.

    The four streams of Sec. 3.4: ``source`` (S, labelled), ``synthetic_target`` (T_f; ``synthetic_target[i] =
    G_ST(source[i])``), ``target`` (T, unlabelled), ``synthetic_source`` (S_f; ``synthetic_source[j] =
    G_TS(target[j])``); plus ``target_test`` (labelled, for evaluation only) and ``source_val`` (labelled source
    images held out of training for label-free model selection, ``data.source_val_fraction``).
    """

    source: ImageTensors
    target: ImageTensors | None = None
    synthetic_target: Images | None = None
    synthetic_source: Images | None = None
    target_test: ImageTensors | None = None
    source_val: ImageTensors | None = None

    @property
    def num_classes(self) -> int:
        return self.source.num_classes


def to_pil_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale, RGB, RGBA, palette and 16-bit images all become 'L' (channels=1) or 'RGB' (channels=3).

    Transparency is composited on black, as MNIST-style digits have a black background.
    """
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr / hi * 255).astype(np.uint8), "L")
    return img.convert("L" if channels == 1 else "RGB")


# Upsampling beyond this factor only invents pixels: 8x covers sklearn's 8 px digits up to 64 px and MNIST's 28 px
# up to 224 px; a 2x2 image for a 224 px ResNet is refused.
MAX_UPSCALE = 8


def check_image_size(img: Image.Image, size: int, image_id: str) -> None:
    """Refuse an image whose shorter side would be upsampled more than :data:`MAX_UPSCALE` times to reach
    ``size`` (``data.load_size``). Any other size is resized to ``size`` x ``size`` (the aspect ratio is not kept)."""
    w, h = img.size
    if min(w, h) * MAX_UPSCALE < size:
        raise DataError(f"{image_id}: image is {w}x{h} pixels, too small for data.load_size={size} (more than "
                        f"{MAX_UPSCALE}x upsampling); use larger images or a smaller data.load_size")


class UnreadableImage(DataError):
    """An image file that cannot be decoded (corrupt, truncated, or over PIL's decompression-bomb limit)."""


def decode_image(read: Callable[[], Image.Image], image_id: str, channels: int) -> Image.Image:
    """``read()``, fully decoded, in mode 'L' or 'RGB' (:func:`to_pil_mode`; an animated GIF or multi-page TIFF
    gives its first frame). An image over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about
    89 megapixels: a small file that would decode to gigabytes) is refused -- PIL only warns below twice the limit,
    in several lines -- and so is any file PIL cannot decode: :class:`UnreadableImage` naming ``image_id``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = read()
            img.load()
        return to_pil_mode(img, channels)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImage(f"{image_id}: refused: {_first_line(e)} (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:  # PIL raises many types for broken files
        raise UnreadableImage(f"{image_id}: cannot read image ({type(e).__name__}: "
                              f"{_first_line(e) or 'corrupt'})") from None


def open_image(path: str) -> Image.Image:
    """The image file ``path``, loaded, its file closed at once (a multi-frame GIF or TIFF would keep it open)."""
    with Image.open(path) as img:
        img.load()
        return img


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def decode_resized(domain: Domain, i: int, size: int, channels: int) -> torch.Tensor:
    """Image ``i`` of ``domain`` as uint8 (C, ``size``, ``size``): decoded (:func:`decode_image`), checked
    (:func:`check_image_size`) and resized. The one decoding rule of in-memory and streamed domains alike."""
    img = decode_image(lambda: domain.read(i), domain.ids[i], channels)
    check_image_size(img, size, domain.ids[i])
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.reshape(size, size, channels).copy()).permute(2, 0, 1)


def load_tensors(domain: Domain, size: int, channels: int, skip_corrupt: bool = False,
                 progress: bool = False) -> ImageTensors:
    """Decode every image of ``domain`` to a square ``size`` x ``size`` uint8 tensor, in this process (a domain
    that fits ``data.cache_bytes``; a larger one is streamed: :func:`daaa.data.streaming.load_images`).

    Decoding up front means a corrupt file stops the run with one line naming it, or -- with ``skip_corrupt`` -- is
    skipped and counted.
    """
    if len(domain) == 0:
        raise DataError(f"domain {domain.name}: no images found")
    out = torch.empty((len(domain), channels, size, size), dtype=torch.uint8)
    keep: list[int] = []
    skipped: list[str] = []
    iterator = range(len(domain))
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"decode {domain.name}", leave=False, mininterval=1.0)
    for i in iterator:
        try:
            out[len(keep)] = decode_resized(domain, i, size, channels)
        except UnreadableImage:
            if skip_corrupt:
                skipped.append(domain.ids[i])
                continue
            raise
        keep.append(i)
    if skipped:
        LOG.warning("domain %s: skipped %d corrupt image(s), first: %s", domain.name, len(skipped), skipped[0])
    if not keep:
        raise DataError(f"domain {domain.name}: no readable images")
    labels = None
    if domain.labels is not None:
        labels = torch.tensor([domain.labels[i] for i in keep], dtype=torch.long)
    return ImageTensors(domain.name, out[: len(keep)].clone() if skipped else out, labels,
                        [domain.ids[i] for i in keep], domain.classes)


def check_same_classes(source: Domain | ImageTensors, target: Domain | ImageTensors) -> None:
    """Source and target-test must name the same classes (by name, in any order is *not* accepted silently)."""
    a, b = source.classes, target.classes
    if a is None or b is None:
        return
    if a != b:
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        if not only_a and not only_b:
            raise DataError(f"class order differs between {source.name} and {target.name}")
        raise DataError(
            f"class lists differ: only in {source.name}: {only_a or 'none'}; only in {target.name}: {only_b or 'none'}")


def fingerprint(*tensors: Images | None) -> str:
    """SHA-256 of the tensors' bytes: the identity of a data set in a stage's cache key. A streamed set
    (:class:`~daaa.data.streaming.LazyImages`) enters by :meth:`~daaa.data.streaming.LazyImages.identity` -- its
    files' paths, sizes and modification times -- not by its pixels, which would cost a decoding pass."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        if not isinstance(t, torch.Tensor):
            h.update(t.identity().encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy())  # buffer protocol: no copy of large image arrays
    return h.hexdigest()[:16]
