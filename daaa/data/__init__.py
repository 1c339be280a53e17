"""Image domains: folders, ImageList files, MNIST, MNIST-M, Office-31, Office-Home, VisDA-2017, DomainNet and the
embedded demo pair."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..config import DataConfig
from ..errors import DataError
from .demo import demo_pair, demo_split, export_domain, sklearn_digits
from .domain import Domain, DomainData, ImageTensors, check_same_classes, load_tensors, to_pil_mode
from .domainnet import DOMAINNET_DOMAINS, domainnet
from .folders import IMAGE_EXTENSIONS, flat_folder, image_folder, labelled_folder
from .imagelist import image_list, read_image_list
from .mnist import (DIGIT_CLASSES, MNIST_FILES, array_domain, blend_mnistm, folder_backgrounds, make_mnistm,
                    make_mnistm_from_mnist, mnist, mnistm, packaged_backgrounds)
from .office31 import OFFICE31_CLASSES, OFFICE31_DOMAINS, office31
from .officehome import OFFICEHOME_DOMAINS, officehome, officehome_domain
from .visda import VISDA_SPLITS, visda2017

Role = Literal["source", "target", "target_test"]
ROLES = ("source", "target", "target_test")
# the command-line option each role comes from, for error messages
OPTIONS = {"source": "--source", "target": "--target", "target_test": "--target-test"}
BUILTINS = ("demo, mnist[:train|:test], mnistm[:train|:test], office31:amazon|dslr|webcam, "
            "officehome:Art|Clipart|Product|Real_World, visda2017:train|validation, "
            "domainnet:clipart|infograph|painting|quickdraw|real|sketch[:train|:test], sklearn-digits")

__all__ = [
    "BUILTINS", "DIGIT_CLASSES", "DOMAINNET_DOMAINS", "IMAGE_EXTENSIONS", "MNIST_FILES", "OFFICE31_CLASSES",
    "OFFICE31_DOMAINS", "OFFICEHOME_DOMAINS", "ROLES", "VISDA_SPLITS",
    "Domain", "DomainData", "ImageTensors", "Role", "array_domain", "blend_mnistm", "check_same_classes", "demo_pair",
    "demo_split", "domainnet", "export_domain", "flat_folder", "folder_backgrounds", "image_folder", "image_list",
    "labelled_folder", "load_domain_tensors", "load_tensors", "make_mnistm", "make_mnistm_from_mnist", "mnist",
    "mnistm", "office31", "officehome", "packaged_backgrounds", "read_image_list", "resolve_domain", "sklearn_digits",
    "to_pil_mode", "visda2017",
]


def _split(spec: str, role: Role, arg: str, splits: tuple[str, str]) -> str:
    """The split ``arg`` names; by default the target's evaluation comes from the test split, the rest from train."""
    split = arg or (splits[1] if role == "target_test" else splits[0])
    if split not in splits:
        name = spec.rpartition(":")[0] if arg else spec
        raise DataError(f"{OPTIONS[role]} {spec}: unknown split {split!r} "
                        f"(use {name}:{splits[0]} or {name}:{splits[1]})")
    return split


def _choice(spec: str, role: Role, value: str | None, choices: tuple[str, ...], what: str) -> str:
    if value is None or value not in choices:
        name = spec.partition(":")[0]
        raise DataError(f"{OPTIONS[role]} {spec}: name {what}: {', '.join(f'{name}:{c}' for c in choices)}")
    return value


def _benchmark(name: str, arg: str, spec: str, role: Role, root: Path) -> Domain | None:
    """Office-31, Office-Home, VisDA-2017 and DomainNet, as their official archives unpack under ``root``."""
    if name == "office31":
        return office31(root, _choice(spec, role, arg, OFFICE31_DOMAINS, "an Office-31 domain"))
    if name == "officehome":
        domain = _choice(spec, role, officehome_domain(arg), OFFICEHOME_DOMAINS, "an Office-Home domain")
        return officehome(root, domain)
    if name == "visda2017":
        return visda2017(root, _choice(spec, role, arg, VISDA_SPLITS, "a VisDA-2017 split"))
    if name == "domainnet":
        domain, _, split = arg.partition(":")
        domain = _choice(spec, role, domain, DOMAINNET_DOMAINS, "a DomainNet domain")
        return domainnet(root, domain, _split(spec, role, split, ("train", "test")))
    return None


def _builtin(spec: str, role: Role, cfg: DataConfig) -> Domain | None:
    """The built-in domain ``spec`` names, or None when it names none."""
    name, _, arg = spec.partition(":")
    root = Path(cfg.data_root).expanduser()
    if name == "demo" and not arg:
        return demo_pair(cfg)[role]
    if name == "sklearn-digits" and not arg:
        return sklearn_digits()
    if name in ("mnist", "mnistm"):
        train = _split(spec, role, arg, ("train", "test")) == "train"
        return mnist(root, train, cfg.download) if name == "mnist" else mnistm(root, train)
    return _benchmark(name, arg, spec, role, root)


def resolve_domain(spec: str, role: Role, cfg: DataConfig) -> Domain:
    """The domain named by a command-line ``spec``: a built-in name, a folder of images or an ImageList file
    (:func:`image_list`; relative paths against its folder, then ``cfg.data_root``).

    Built-in names win over a folder of the same name in the working directory; write ``./demo`` for the folder.
    Target training data is always unlabelled: labels a folder or built-in carries are dropped for it.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    domain = _builtin(spec, role, cfg)
    if domain is None:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"{OPTIONS[role]} {spec}: no such folder or image list, and not a built-in domain "
                            f"(built-ins: {BUILTINS})")
        domain = image_list(path, cfg.data_root) if path.is_file() else image_folder(path)
    if role == "target":
        if domain.labels is None:
            return domain
        hidden = domain.unlabelled()
        hidden.info["hidden_labels"] = list(domain.labels)  # for diagnostics only, as the demo does
        return hidden
    if domain.labels is None:
        raise DataError(f"{OPTIONS[role]} {spec}: {role.replace('_', '-')} data needs labels; use a labelled folder "
                        "ROOT/<class>/<image> or an image list of '<path> <label>' lines")
    return domain


def load_domain_tensors(spec: str, role: Role, cfg: DataConfig, progress: bool = False) -> ImageTensors:
    """:func:`resolve_domain`, then decode every image once at ``cfg.load_size`` with ``cfg.channels``."""
    return load_tensors(resolve_domain(spec, role, cfg), cfg.load_size, cfg.channels, cfg.skip_corrupt, progress)
