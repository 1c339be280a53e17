"""MNIST (through torchvision), MNIST-M in its public folder layout, and Ganin's recipe to build MNIST-M.

No MNIST-M download is offered: the original archive was only ever shared through an unversioned Google-Drive
link, so there is no URL and checksum this code could vouch for. The data set is either placed by hand or
rebuilt from MNIST with :func:`make_mnistm` (``daaa data make-mnistm``), as Ganin & Lempitsky (2015) describe.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from .domain import Domain, to_pil_mode
from .folders import IMAGE_EXTENSIONS, _ignored

LOG = logging.getLogger("daaa")

DIGIT_CLASSES = [str(d) for d in range(10)]
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DIGIT_SIZE = 28


def _split(train: bool) -> str:
    return "train" if train else "test"


def array_domain(name: str, images: np.ndarray, labels: Sequence[int] | np.ndarray | None,
                 classes: list[str] | None, info: dict | None = None) -> Domain:
    """A Domain over in-memory uint8 images (N, H, W) or (N, H, W, 3); ids are ``name[i]``."""
    images = np.ascontiguousarray(images, dtype=np.uint8).view()
    images.setflags(write=False)  # a read-only view: images handed out by read() must not change behind our back
    return Domain(name, [f"{name}[{i}]" for i in range(len(images))], lambda i: Image.fromarray(images[i]),
                  None if labels is None else [int(v) for v in labels], classes, dict(info or {}))


# --------------------------------------------------------------------------------------------------- MNIST


def _gunzip_missing(raw: Path) -> None:
    """Users often place the ``.gz`` files as downloaded; torchvision only reads the uncompressed ones."""
    for name in MNIST_FILES:
        target, packed = raw / name, raw / f"{name}.gz"
        if target.is_file() or not packed.is_file():
            continue
        tmp = raw / f".{name}.tmp"
        try:
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{packed}: cannot decompress ({e})") from None
        os.replace(tmp, target)


def mnist(root: str | Path, train: bool = True, download: bool = True) -> Domain:
    """MNIST from ``<root>/MNIST/raw/`` (IDX files), downloaded by torchvision when allowed and missing."""
    root = Path(root).expanduser()
    raw = root / "MNIST" / "raw"
    if raw.is_dir():
        _gunzip_missing(raw)
    missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
    reason = "downloads are off (data.download=false)"
    if missing and download:
        try:
            from torchvision.datasets import MNIST
            MNIST(str(root), train=train, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError when offline
            # torchvision's message spans lines (one per mirror); the last line is the cause (e.g. no network)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = f"download failed ({type(e).__name__}: {lines[-1][:200] if lines else 'no detail'})"
        missing = [n for n in MNIST_FILES if not (raw / n).is_file()]
    if missing:
        raise DataError(f"MNIST not found: place the IDX files {', '.join(MNIST_FILES)} (uncompressed or .gz) in "
                        f"{raw}/ -- missing {', '.join(missing)}; {reason}")
    from torchvision.datasets import MNIST
    split = _split(train)
    try:
        ds = MNIST(str(root), train=train, download=False)
    except Exception as e:  # a truncated or foreign file fails torchvision's magic-number/size checks
        prefix = "train" if train else "t10k"
        detail = (str(e).splitlines() or ["unreadable"])[0][:200]
        raise DataError(f"{raw}/{prefix}-*-ubyte: not valid MNIST IDX files ({type(e).__name__}: {detail})") from None
    images = ds.data.numpy()
    labels = ds.targets.numpy()
    if images.ndim != 3 or len(images) != len(labels) or len(images) == 0:
        raise DataError(f"{raw}: MNIST {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                        "do not match")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{raw}: MNIST {split} labels outside 0-9")
    return array_domain(f"mnist-{split}", images, labels, list(DIGIT_CLASSES), {"root": str(root)})


# ------------------------------------------------------------------------------------------------- MNIST-M


def _mnistm_base(root: Path) -> Path:
    """``<root>/mnist_m``, or ``root`` itself when it already is that folder."""
    base = root / "mnist_m"
    if not base.is_dir() and (root / "mnist_m_train_labels.txt").is_file():
        return root
    return base


def mnistm(root: str | Path, train: bool = True) -> Domain:
    """MNIST-M in the public layout: ``<root>/mnist_m/mnist_m_{train,test}/`` + ``mnist_m_{train,test}_labels.txt``."""
    root = Path(root).expanduser()
    split = _split(train)
    base = _mnistm_base(root)
    folder = base / f"mnist_m_{split}"
    labels_file = base / f"mnist_m_{split}_labels.txt"
    if not folder.is_dir() or not labels_file.is_file():
        raise DataError(
            f"MNIST-M {split} split not found: place the folder mnist_m_{split}/ (its PNG images) and "
            f"mnist_m_{split}_labels.txt ('<file> <label>' per line) in {base}/, or build them from MNIST with "
            f"`daaa data make-mnistm` (daaa.data.make_mnistm)")
    present = {e.name for e in os.scandir(folder)}
    paths: list[str] = []
    labels: list[int] = []
    with open(labels_file, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) > 9:
                raise DataError(f"{labels_file} line {lineno}: expected '<image file> <label 0-9>', got {text[:80]!r}")
            if parts[0] not in present:
                raise DataError(f"{labels_file} line {lineno}: image {parts[0]} is not in {folder}")
            paths.append(str(folder / parts[0]))
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"{labels_file}: no labelled images listed")

    def read(i: int) -> Image.Image:
        with Image.open(paths[i]) as img:
            img.load()
            return img

    return Domain(f"mnistm-{split}", paths, read, labels, list(DIGIT_CLASSES), {"root": str(base)})


def blend_mnistm(digits: np.ndarray, backgrounds: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Ganin's MNIST-M: each binarised digit inverts a random crop of a random colour photo.

    ``digits`` uint8 (N, h, w); ``backgrounds`` uint8 (H, W, 3) photos at least h x w. Returns uint8 (N, h, w, 3)
    with ``|patch - 255 * digit|`` per channel: ``255 - patch`` on the stroke, ``patch`` elsewhere.
    """
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.dtype != np.uint8:
        raise DataError(f"blend_mnistm: digits must be uint8 (N, h, w), got {digits.dtype} {digits.shape}")
    if not backgrounds:
        raise DataError("blend_mnistm: no background photos given")
    n, h, w = digits.shape
    for k, bg in enumerate(backgrounds):
        if bg.ndim != 3 or bg.shape[2] != 3 or bg.dtype != np.uint8 or bg.shape[0] < h or bg.shape[1] < w:
            raise DataError(f"blend_mnistm: background {k} must be uint8 (H>={h}, W>={w}, 3), got {bg.dtype} {bg.shape}")
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    which = rng.integers(0, len(backgrounds), size=n)
    rows, cols = np.arange(h), np.arange(w)
    for k, bg in enumerate(backgrounds):
        idx = np.flatnonzero(which == k)
        if idx.size == 0:
            continue
        y0 = rng.integers(0, bg.shape[0] - h + 1, size=idx.size)
        x0 = rng.integers(0, bg.shape[1] - w + 1, size=idx.size)
        out[idx] = bg[y0[:, None, None] + rows[None, :, None], x0[:, None, None] + cols[None, None, :]]
    stroke = digits >= 128
    np.subtract(255, out, out=out, where=stroke[..., None])
    return out


def _sklearn_image_dir() -> Path | None:
    # Locating sklearn's bundled JPEGs without importing sklearn saves about a second of start-up.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    return folder if folder.is_dir() else None


# Natural colour photographs only: synthetic images (colorwheel, logo) give unnatural, flat patches.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@functools.lru_cache(maxsize=1)
def _packaged_backgrounds() -> tuple[np.ndarray, ...]:
    photos: list[np.ndarray] = []
    folder = _sklearn_image_dir()
    for name in _SKLEARN_PHOTOS:
        try:
            if folder is not None and (folder / name).is_file():
                with Image.open(folder / name) as img:
                    photos.append(np.asarray(img.convert("RGB")))
            else:
                from sklearn.datasets import load_sample_image
                photos.append(np.asarray(load_sample_image(name)))
        except Exception as e:  # an installation without the sample files still has the others
            LOG.debug("background %s unavailable: %s", name, e)
    try:
        import skimage.data
        for name in _SKIMAGE_PHOTOS:
            try:
                photos.append(np.asarray(getattr(skimage.data, name)())[..., :3])
            except Exception as e:  # some skimage versions fetch images with pooch; offline they fail
                LOG.debug("background %s unavailable: %s", name, e)
    except ImportError:
        pass
    if not photos:
        raise DataError("no packaged background photos found (scikit-learn / scikit-image sample images); "
                        "set data.mnistm_backgrounds to a folder of photos")
    for p in photos:
        p.setflags(write=False)
    return tuple(photos)


def packaged_backgrounds() -> list[np.ndarray]:
    """Colour photos shipped with scikit-learn and scikit-image, as read-only uint8 (H, W, 3) arrays."""
    return list(_packaged_backgrounds())


def folder_backgrounds(folder: str | Path, min_size: int = DIGIT_SIZE) -> list[np.ndarray]:
    """Every photo under ``folder`` (recursively; e.g. BSDS500's ``BSR/BSDS500/data/images``) as uint8 RGB."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"background folder {folder} does not exist (option data.mnistm_backgrounds)")
    photos: list[np.ndarray] = []
    small = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for name in sorted(filenames):
            if _ignored(name) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            try:
                with Image.open(path) as img:
                    arr = np.asarray(to_pil_mode(img, 3))
            except Exception as e:
                raise DataError(f"{path}: cannot read background photo ({type(e).__name__}: {e})") from None
            if arr.shape[0] < min_size or arr.shape[1] < min_size:
                small += 1
                continue
            photos.append(arr)
    if small:
        LOG.warning("background folder %s: skipped %d photo(s) smaller than %dx%d", folder, small, min_size, min_size)
    if not photos:
        raise DataError(f"background folder {folder} has no photos of at least {min_size}x{min_size} pixels")
    return photos


def _digit_arrays(digits: Domain | tuple[np.ndarray, Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(digits, Domain):
        if digits.labels is None:
            raise DataError(f"domain {digits.name}: MNIST-M needs labelled digits")
        images = np.empty((len(digits), DIGIT_SIZE, DIGIT_SIZE), dtype=np.uint8)
        for i in range(len(digits)):
            img = to_pil_mode(digits.read(i), 1)
            if img.size != (DIGIT_SIZE, DIGIT_SIZE):
                img = img.resize((DIGIT_SIZE, DIGIT_SIZE), Image.BILINEAR)
            images[i] = np.asarray(img)
        return images, np.asarray(digits.labels, dtype=np.int64)
    images, labels = np.asarray(digits[0]), np.asarray(digits[1], dtype=np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"make_mnistm: expected digits (N, h, w) and N labels, got {images.shape} and {labels.shape}")
    return images.astype(np.uint8, copy=False), labels


def make_mnistm(digits: Domain | tuple[np.ndarray, Sequence[int]], root: str | Path,
                backgrounds: Sequence[np.ndarray] | None = None, seed: int = 0,
                split: Literal["train", "test"] = "train", chunk: int = 4096) -> Path:
    """Write one MNIST-M split in the public layout under ``<root>/mnist_m/`` and return its image folder.

    Everything is written into a hidden temporary folder first and moved into place at the end, labels file
    last: a split counts as present only when its labels file exists, so an interrupted build never looks complete.
    """
    if split not in ("train", "test"):
        raise DataError(f"make_mnistm: split must be 'train' or 'test', got {split!r}")
    images, labels = _digit_arrays(digits)
    bgs = list(backgrounds) if backgrounds is not None else packaged_backgrounds()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    base = Path(root).expanduser() / "mnist_m"
    base.mkdir(parents=True, exist_ok=True)
    folder_name, labels_name = f"mnist_m_{split}", f"mnist_m_{split}_labels.txt"
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=base))
    try:
        (tmp / folder_name).mkdir()
        lines = []
        for start in range(0, len(images), chunk):
            block = blend_mnistm(images[start:start + chunk], bgs, rng)
            for j, arr in enumerate(block):
                name = f"{start + j:08d}.png"
                Image.fromarray(arr).save(tmp / folder_name / name)
                lines.append(f"{name} {int(labels[start + j])}\n")
        (tmp / labels_name).write_text("".join(lines))
        (base / labels_name).unlink(missing_ok=True)
        if (base / folder_name).exists():
            os.replace(base / folder_name, tmp / "old")
        os.replace(tmp / folder_name, base / folder_name)
        os.replace(tmp / labels_name, base / labels_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base / folder_name


def make_mnistm_from_mnist(root: str | Path, download: bool = True, backgrounds: Sequence[np.ndarray] | None = None,
                           seed: int = 0, mnist_root: str | Path | None = None) -> Path:
    """Build both MNIST-M splits under ``<root>/mnist_m/`` from MNIST under ``<mnist_root or root>/MNIST/raw/``."""
    source = root if mnist_root is None else mnist_root
    for train in (True, False):
        make_mnistm(mnist(source, train, download), root, backgrounds, seed, _split(train))
    return Path(root).expanduser() / "mnist_m"
