"""Office-Home (Venkateswara et al., CVPR 2017): Art, Clipart, Product and Real World, 65 everyday object classes.

No download is offered: the archive is shared through a form on the data set's page, without a checksum.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .domain import Domain
from .folders import benchmark_folder

OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
NUM_CLASSES = 65
OFFICEHOME_PAGE = "https://www.hemanthdv.org/officeHomeDataset.html"
ARCHIVE_FOLDER = "OfficeHomeDataset_10072016"  # what OfficeHomeDataset_10072016.zip unpacks to
# the names people keep the data set under (the tllib/Transfer-Learning-Library layout is "office-home")
BASES = ("officehome", "office-home", "OfficeHome", "office_home")


def officehome_domain(arg: str) -> str | None:
    """The canonical domain name of ``arg`` (case, "_", "-" and spaces ignored: ``real world`` -> Real_World)."""
    key = arg.lower().replace("_", "").replace("-", "").replace(" ", "")
    return next((d for d in OFFICEHOME_DOMAINS if d.lower().replace("_", "") == key), None)


def _candidates(root: Path, domain: str) -> list[Path]:
    # The archive names the last domain "Real World" (with a space); tllib renames it Real_World.
    names = [domain, domain.replace("_", " "), domain.replace("_", "")] if "_" in domain else [domain]
    parents = [root / ARCHIVE_FOLDER, *(p for b in BASES for p in (root / b / ARCHIVE_FOLDER, root / b)), root]
    return [parent / name for parent in parents for name in names]


def officehome(root: str | Path, domain: str) -> Domain:
    """One Office-Home domain from ``<root>/OfficeHomeDataset_10072016/<Domain>/<class>/*.jpg`` (or
    ``<root>/officehome/...``, ``<root>/office-home/...``, ``<root>/<Domain>``), with its 65 class folders."""
    canonical = officehome_domain(domain)
    if canonical is None:
        raise DataError(f"officehome:{domain}: unknown Office-Home domain (choose {', '.join(OFFICEHOME_DOMAINS)})")
    root = Path(root).expanduser()
    missing = (f"Office-Home {canonical} not found: expected {root / ARCHIVE_FOLDER / canonical}/<class>/*.jpg with "
               f"the {NUM_CLASSES} class folders (or {root / 'officehome' / canonical}/); get "
               f"{ARCHIVE_FOLDER}.zip from {OFFICEHOME_PAGE} and unpack it into {root}/")
    return benchmark_folder(f"officehome:{canonical}", _candidates(root, canonical), NUM_CLASSES, missing)
