"""Image folders: ``ROOT/<class>/<image>`` (labelled) and ``ROOT/<image>`` (unlabelled)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import DataError
from .domain import Domain

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Litter that file managers and archivers leave behind; nobody means it as data.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _reader(paths: list[str]) -> Callable[[int], Image.Image]:
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


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files and subfolders of ``folder`` (sorted); any other file is an error naming it."""
    images: list[Path] = []
    dirs: list[Path] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _ignored(entry.name):
            continue
        path = folder / entry.name
        if entry.is_dir():
            dirs.append(path)
        elif is_image_file(entry.name):
            images.append(path)
        else:
            raise DataError(f"{path}: not an image file (expected one of {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "remove it from the data folder")
    return images, dirs


def labelled_folder(root: str | Path, name: str | None = None) -> Domain:
    """``ROOT/<class>/<image>``: classes are the sorted subfolder names, ids the image paths."""
    root = _check_dir(root)
    root_images, class_dirs = _entries(root)
    if root_images:
        raise DataError(f"{root}: images directly in a labelled folder ({root_images[0].name}); "
                        "put every image in a ROOT/<class>/ subfolder")
    if not class_dirs:
        raise DataError(f"folder {root} is empty: expected ROOT/<class>/<image> or ROOT/<image>")
    paths: list[str] = []
    labels: list[int] = []
    for k, class_dir in enumerate(class_dirs):
        images, subdirs = _entries(class_dir)
        if subdirs:
            raise DataError(f"{subdirs[0]}: unexpected folder inside class folder {class_dir.name} "
                            "(layout is ROOT/<class>/<image>)")
        if not images:
            raise DataError(f"class folder {class_dir} has no images")
        paths.extend(str(p) for p in images)
        labels.extend([k] * len(images))
    return Domain(name or str(root), paths, _reader(paths), labels, [d.name for d in class_dirs],
                  {"root": str(root), "layout": "labelled"})


def flat_folder(root: str | Path, name: str | None = None) -> Domain:
    """``ROOT/<image>``: unlabelled images, ids the image paths."""
    root = _check_dir(root)
    images, dirs = _entries(root)
    if dirs:
        raise DataError(f"{dirs[0]}: unexpected subfolder in a flat image folder {root}")
    if not images:
        raise DataError(f"folder {root} has no images")
    paths = [str(p) for p in images]
    return Domain(name or str(root), paths, _reader(paths), None, None, {"root": str(root), "layout": "flat"})


def image_folder(root: str | Path, name: str | None = None) -> Domain:
    """A labelled or flat folder, told apart by whether images sit in subfolders or directly in ``root``."""
    root = _check_dir(root)
    images, dirs = _entries(root)
    if images and dirs:
        raise DataError(f"folder {root} has both images ({images[0].name}) and subfolders ({dirs[0].name}): "
                        "use ROOT/<class>/<image> (labelled) or ROOT/<image> (unlabelled), not both")
    if dirs:
        return labelled_folder(root, name)
    if images:
        return flat_folder(root, name)
    raise DataError(f"folder {root} is empty: expected ROOT/<class>/<image> or ROOT/<image>")
