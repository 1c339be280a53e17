"""VisDA-2017 classification (Peng et al., 2017): ``train`` (synthetic renderings, the source) and ``validation``
(real photos, the target), 12 classes.

Each split unpacks to ``<split>/<class>/<image>`` plus ``<split>/image_list.txt`` (``<class>/<file> <label>``
lines): the list is read when present (it is the official set of images), else the class folders are walked.
No download is offered: the archives are large and published without checksums.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .domain import Domain
from .folders import benchmark_folder, check_class_count, class_folders, first_folder
from .imagelist import named_image_list

VISDA_SPLITS = ("train", "validation")
NUM_CLASSES = 12
VISDA_PAGE = "http://ai.bu.edu/visda-2017/"
BASES = ("visda2017", "visda-2017", "VisDA2017", "VisDA-2017", "visda")
LIST_NAME = "image_list.txt"


def visda2017(root: str | Path, split: str) -> Domain:
    """The ``train`` or ``validation`` split from ``<root>/visda2017/<split>/`` (or ``<root>/visda-2017/...``,
    ``<root>/<split>``); classes are the 12 class folder names, sorted."""
    if split not in VISDA_SPLITS:
        raise DataError(f"visda2017:{split}: unknown VisDA-2017 split (choose {', '.join(VISDA_SPLITS)})")
    root = Path(root).expanduser()
    candidates = [*(root / b / split for b in BASES), root / split]
    spec = f"visda2017:{split}"
    missing = (f"VisDA-2017 {split} not found: expected {root / 'visda2017' / split}/<class>/<image> with the "
               f"{NUM_CLASSES} class folders and {split}/{LIST_NAME}; get {split}.tar (classification track) from "
               f"{VISDA_PAGE} and unpack it into {root / 'visda2017'}/")
    folder = first_folder(candidates)
    if folder is None or not (folder / LIST_NAME).is_file():
        return benchmark_folder(spec, candidates, NUM_CLASSES, missing)
    classes = class_folders(folder)
    check_class_count(classes, NUM_CLASSES, spec, folder)
    return named_image_list(folder / LIST_NAME, [], classes, spec)
