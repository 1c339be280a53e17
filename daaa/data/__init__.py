"""Image domains: folders, MNIST, MNIST-M, Office-31 and the embedded demo pair."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..config import DataConfig
from ..errors import DataError
from .demo import demo_pair, demo_split, export_domain, sklearn_digits
from .domain import Domain, DomainData, ImageTensors, check_same_classes, load_tensors, to_pil_mode
from .folders import IMAGE_EXTENSIONS, flat_folder, image_folder, labelled_folder
from .mnist import (DIGIT_CLASSES, MNIST_FILES, array_domain, blend_mnistm, folder_backgrounds, make_mnistm,
                    make_mnistm_from_mnist, mnist, mnistm, packaged_backgrounds)
from .office31 import OFFICE31_CLASSES, OFFICE31_DOMAINS, office31

Role = Literal["source", "target", "target_test"]
ROLES = ("source", "target", "target_test")
# the command-line option each role comes from, for error messages
OPTIONS = {"source": "--source", "target": "--target", "target_test": "--target-test"}
BUILTINS = "demo, mnist[:train|:test], mnistm[:train|:test], office31:amazon|dslr|webcam, sklearn-digits"

__all__ = [
    "BUILTINS", "DIGIT_CLASSES", "IMAGE_EXTENSIONS", "MNIST_FILES", "OFFICE31_CLASSES", "OFFICE31_DOMAINS", "ROLES",
    "Domain", "DomainData", "ImageTensors", "Role", "array_domain", "blend_mnistm", "check_same_classes", "demo_pair",
    "demo_split", "export_domain", "flat_folder", "folder_backgrounds", "image_folder", "labelled_folder",
    "load_domain_tensors", "load_tensors", "make_mnistm", "make_mnistm_from_mnist", "mnist", "mnistm", "office31",
    "packaged_backgrounds", "resolve_domain", "sklearn_digits", "to_pil_mode",
]


def _builtin(spec: str, role: Role, cfg: DataConfig) -> Domain | None:
    """The built-in domain ``spec`` names, or None when it names none."""
    name, _, arg = spec.partition(":")
    root = Path(cfg.data_root).expanduser()
    if name == "demo" and not arg:
        return demo_pair(cfg)[role]
    if name == "sklearn-digits" and not arg:
        return sklearn_digits()
    if name in ("mnist", "mnistm"):
        # The target's unlabelled training images come from the training split, its evaluation from the test split.
        split = arg or ("test" if role == "target_test" else "train")
        if split not in ("train", "test"):
            raise DataError(f"{OPTIONS[role]} {spec}: unknown split {split!r} (use {name}:train or {name}:test)")
        if name == "mnist":
            return mnist(root, split == "train", cfg.download)
        return mnistm(root, split == "train")
    if name == "office31":
        if arg not in OFFICE31_DOMAINS:
            raise DataError(f"{OPTIONS[role]} {spec}: name an Office-31 domain: office31:amazon, office31:dslr or office31:webcam")
        return office31(root, arg)
    return None


def resolve_domain(spec: str, role: Role, cfg: DataConfig) -> Domain:
    """The domain named by a command-line ``spec``: a built-in name, or a folder of images.

    Built-in names win over a folder of the same name in the working directory; write ``./demo`` for the folder.
    Target training data is always unlabelled: labels a folder or built-in carries are dropped for it.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    domain = _builtin(spec, role, cfg)
    if domain is None:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"{OPTIONS[role]} {spec}: no such folder and not a built-in domain (built-ins: {BUILTINS})")
        domain = image_folder(path)
    if role == "target":
        if domain.labels is None:
            return domain
        hidden = domain.unlabelled()
        hidden.info["hidden_labels"] = list(domain.labels)  # for diagnostics only, as the demo does
        return hidden
    if domain.labels is None:
        raise DataError(f"{OPTIONS[role]} {spec}: {role.replace('_', '-')} data needs labels; use a labelled folder "
                        "ROOT/<class>/<image>")
    return domain


def load_domain_tensors(spec: str, role: Role, cfg: DataConfig, progress: bool = False) -> ImageTensors:
    """:func:`resolve_domain`, then decode every image once at ``cfg.load_size`` with ``cfg.channels``."""
    return load_tensors(resolve_domain(spec, role, cfg), cfg.load_size, cfg.channels, cfg.skip_corrupt, progress)
