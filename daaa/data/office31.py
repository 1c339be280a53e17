"""Office-31 (Saenko et al., ECCV 2010): amazon, dslr and webcam, 31 office object classes.

No download is offered: the archive is distributed from the data set's page without a published checksum.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError
from .domain import Domain
from .folders import labelled_folder

LOG = logging.getLogger("daaa")

OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
OFFICE31_CLASSES = [
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
    "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray", "mobile_phone",
    "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer", "projector", "punchers", "ring_binder",
    "ruler", "scissors", "speaker", "stapler", "tape_dispenser", "trash_can",
]
OFFICE31_PAGE = "https://faculty.cc.gatech.edu/~judy/domainadapt/"


def _candidates(root: Path, domain: str) -> list[Path]:
    # The archive unpacks to domain_adaptation_images/<domain>/images/; people also drop the "images" level.
    out = []
    for parent in (root / "office31", root / "office31" / "domain_adaptation_images",
                   root / "domain_adaptation_images", root):
        out += [parent / domain / "images", parent / domain]
    return out


def office31(root: str | Path, domain: str) -> Domain:
    """One Office-31 domain from ``<root>/office31/<domain>/images/<class>/*.jpg`` (or ``<root>/<domain>/...``).

    The class list is always the full, sorted 31 names, so label k means the same object in every domain even
    when a copy lacks some class folders.
    """
    if domain not in OFFICE31_DOMAINS:
        raise DataError(f"office31:{domain}: unknown Office-31 domain (choose {', '.join(OFFICE31_DOMAINS)})")
    root = Path(root).expanduser()
    folder = next((p for p in _candidates(root, domain) if p.is_dir()), None)
    if folder is None:
        raise DataError(
            f"Office-31 {domain} not found: expected {root / 'office31' / domain / 'images'}/<class>/*.jpg with the 31 "
            f"class folders; get domain_adaptation_images.tar.gz from {OFFICE31_PAGE} and unpack it so that "
            f"{root / 'office31'}/{{amazon,dslr,webcam}}/images/ exist")
    found = labelled_folder(folder, name=f"office31:{domain}")
    unknown = [c for c in found.classes or [] if c not in OFFICE31_CLASSES]
    if unknown:
        raise DataError(f"{folder / unknown[0]}: not an Office-31 class folder (classes: {', '.join(OFFICE31_CLASSES)})")
    absent = len(OFFICE31_CLASSES) - len(found.classes or [])
    if absent:
        LOG.warning("office31:%s: %d of the 31 class folders are missing in %s", domain, absent, folder)
    remap = [OFFICE31_CLASSES.index(c) for c in found.classes or []]
    labels = [remap[k] for k in found.labels or []]
    return Domain(found.name, found.ids, found.read, labels, list(OFFICE31_CLASSES), found.info)
