"""Image folders: ``ROOT/<class>/<image>`` (labelled) and ``ROOT/<image>`` (unlabelled); the official benchmarks'
labelled folders (:func:`benchmark_folder`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from ..errors import DataError
from .domain import Domain

LOG = logging.getLogger("daaa")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Litter that file managers and archivers leave behind; nobody means it as data.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def path_reader(paths: list[str]) -> Callable[[int], Image.Image]:
    """``read(i)``: the image file ``paths[i]``, loaded."""
    def read(i: int) -> Image.Image:
        # Load inside the `with` so the file handle closes at once (multi-frame GIF/TIFF would keep it open).
        with Image.open(paths[i]) as img:
            img.load()
            return img
    return read


def _check_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"path {root} is not a folder")
    return root


def _entries(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Image files, subfolders and stray files (notes, ``.DS_Store``, ``Thumbs.db``, any other extension) of
    ``folder``, each sorted. Hidden and litter folders are left out; hidden files (``._x.jpg``: macOS resource
    forks) are strays whatever their extension."""
    images: list[Path] = []
    dirs: list[Path] = []
    strays: list[Path] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = folder / entry.name
        if entry.is_dir():
            if not _ignored(entry.name):
                dirs.append(path)
        elif is_image_file(entry.name) and not _ignored(entry.name):
            images.append(path)
        else:
            strays.append(path)
    return images, dirs, strays


def log_strays(name: str, strays: list[Path]) -> None:
    """The one line that says how many non-image files of a domain were skipped (a data folder's litter is not
    worth stopping a run for; a file that looks like an image but does not decode still is)."""
    if strays:
        kinds = sorted({p.suffix.lower() or p.name for p in strays})
        LOG.warning("domain %s: skipped %d non-image file(s) (%s; first: %s)", name, len(strays), ", ".join(kinds[:6]),
                    strays[0])


def labelled_folder(root: str | Path, name: str | None = None) -> Domain:
    """``ROOT/<class>/<image>``: classes are the sorted subfolder names, ids the image paths."""
    root = _check_dir(root)
    root_images, class_dirs, strays = _entries(root)
    if root_images:
        raise DataError(f"{root}: images directly in a labelled folder ({root_images[0].name}); "
                        "put every image in a ROOT/<class>/ subfolder")
    if not class_dirs:
        raise DataError(f"folder {root} is empty: expected ROOT/<class>/<image> or ROOT/<image>")
    paths: list[str] = []
    labels: list[int] = []
    for k, class_dir in enumerate(class_dirs):
        images, subdirs, more = _entries(class_dir)
        strays += more
        if subdirs:
            raise DataError(f"{subdirs[0]}: unexpected folder inside class folder {class_dir.name} "
                            "(layout is ROOT/<class>/<image>)")
        if not images:
            raise DataError(f"class folder {class_dir} has no images")
        paths.extend(str(p) for p in images)
        labels.extend([k] * len(images))
    log_strays(name or str(root), strays)
    return Domain(name or str(root), paths, path_reader(paths), labels, [d.name for d in class_dirs],
                  {"root": str(root), "layout": "labelled"})


def flat_folder(root: str | Path, name: str | None = None) -> Domain:
    """``ROOT/<image>``: unlabelled images, ids the image paths."""
    root = _check_dir(root)
    images, dirs, strays = _entries(root)
    if dirs:
        raise DataError(f"{dirs[0]}: unexpected subfolder in a flat image folder {root}")
    if not images:
        raise DataError(f"folder {root} has no images")
    paths = [str(p) for p in images]
    log_strays(name or str(root), strays)
    return Domain(name or str(root), paths, path_reader(paths), None, None, {"root": str(root), "layout": "flat"})


def image_folder(root: str | Path, name: str | None = None) -> Domain:
    """A labelled or flat folder, told apart by whether images sit in subfolders or directly in ``root``."""
    root = _check_dir(root)
    images, dirs, _ = _entries(root)  # strays are counted by the folder kind's own reader
    if images and dirs:
        raise DataError(f"folder {root} has both images ({images[0].name}) and subfolders ({dirs[0].name}): "
                        "use ROOT/<class>/<image> (labelled) or ROOT/<image> (unlabelled), not both")
    if dirs:
        return labelled_folder(root, name)
    if images:
        return flat_folder(root, name)
    raise DataError(f"folder {root} is empty: expected ROOT/<class>/<image> or ROOT/<image>")


def class_folders(folder: Path) -> list[str]:
    """The sorted names of the class subfolders of ``folder`` (what a benchmark's class list is derived from)."""
    return [d.name for d in _entries(_check_dir(folder))[1]]


def check_class_count(classes: list[str], expected: int, dataset: str, folder: Path) -> None:
    """The official benchmarks have a fixed number of classes: a different count means a partly unpacked or
    foreign folder, which would silently change what label k means."""
    if len(classes) != expected:
        raise DataError(f"{folder}: {len(classes)} class folders, but {dataset} has {expected} classes; "
                        "is the archive fully unpacked, and is this the right folder?")


def first_folder(candidates: Iterable[Path]) -> Path | None:
    return next((p for p in candidates if p.is_dir()), None)


def benchmark_folder(spec: str, candidates: Iterable[Path], num_classes: int, missing: str) -> Domain:
    """One domain of an official benchmark laid out as ``<domain>/<class>/<image>``: the first existing folder
    of ``candidates`` (the layouts its archive unpacks to), with exactly ``num_classes`` class folders.

    Classes are the sorted class folder names, so label k names the same class in every domain of the benchmark
    (:func:`daaa.data.check_same_classes` then compares them by name). ``missing`` is the error when no candidate
    exists: it says where to put the data set.
    """
    folder = first_folder(candidates)
    if folder is None:
        raise DataError(missing)
    found = labelled_folder(folder, name=spec)
    check_class_count(found.classes or [], num_classes, spec, folder)
    return found
