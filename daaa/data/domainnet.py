"""DomainNet (Peng et al., ICCV 2019): six domains of 345 classes, each with an official train/test split.

Each domain's archive unpacks to ``<domain>/<class>/<image>``; the split lists ``<domain>_train.txt`` and
``<domain>_test.txt`` (``<domain>/<class>/<file> <label>`` lines) are downloaded beside them (tllib keeps them
in ``image_list/``). No download is offered: the archives are published without checksums.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .domain import Domain
from .folders import check_class_count, class_folders, first_folder
from .imagelist import named_image_list

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_SPLITS = ("train", "test")
NUM_CLASSES = 345
DOMAINNET_PAGE = "http://ai.bu.edu/M3SDA/"
BASES = ("domainnet", "DomainNet", "domain_net")


def domainnet(root: str | Path, domain: str, split: str) -> Domain:
    """The ``split`` of ``domain`` from ``<root>/domainnet/<domain>/<class>/*`` and
    ``<root>/domainnet/<domain>_<split>.txt`` (or ``.../image_list/<domain>_<split>.txt``); classes are the 345
    class folder names, sorted."""
    if domain not in DOMAINNET_DOMAINS:
        raise DataError(f"domainnet:{domain}: unknown DomainNet domain (choose {', '.join(DOMAINNET_DOMAINS)})")
    if split not in DOMAINNET_SPLITS:
        raise DataError(f"domainnet:{domain}:{split}: unknown split (choose train or test)")
    root = Path(root).expanduser()
    base = first_folder(b for b in (*(root / n for n in BASES), root) if (b / domain).is_dir())
    if base is None:
        raise DataError(f"DomainNet {domain} not found: expected {root / 'domainnet' / domain}/<class>/*.jpg with the "
                        f"{NUM_CLASSES} class folders; get {domain}.zip and {domain}_{{train,test}}.txt from "
                        f"{DOMAINNET_PAGE} and unpack/put them into {root / 'domainnet'}/")
    name = f"{domain}_{split}.txt"
    list_file = next((p for p in (base / name, base / "image_list" / name) if p.is_file()), None)
    if list_file is None:
        raise DataError(f"DomainNet {domain} {split} list not found: expected {base / name} (the official split "
                        f"list from {DOMAINNET_PAGE}, beside the {domain}/ folder)")
    classes = class_folders(base / domain)
    check_class_count(classes, NUM_CLASSES, f"domainnet:{domain}", base / domain)
    # the lists' paths start with "<domain>/": relative to the data set's folder, also when kept in image_list/
    return named_image_list(list_file, [base], classes, f"domainnet:{domain}:{split}")
