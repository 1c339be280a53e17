"""ImageList text files, the tllib / DomainNet format: one ``path label`` per line (``path`` alone: unlabelled).

A relative ``path`` is looked up in the list file's folder first, then (as tllib joins every path to its
``root``) in ``data.data_root``. Blank lines are skipped; a path may contain spaces (the label is the last
whitespace-separated token, as tllib splits it). A list's classes are its label ids: ``"0" .. "K-1"`` with K its
largest label + 1, so label k stays output k of the network, as in tllib; the built-in benchmarks name their
classes instead (:func:`named_image_list`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

from ..errors import DataError
from .domain import Domain
from .folders import is_image_file, path_reader


class ListEntry(NamedTuple):
    line: int  # 1-based line number in the list file, for messages
    path: str  # the resolved image path
    label: int | None  # None in an unlabelled list


def _split_line(text: str) -> tuple[str, int | None]:
    """``"a/b c.jpg 3"`` -> ``("a/b c.jpg", 3)``; a line whose last token is not an integer is a bare path."""
    parts = text.rsplit(None, 1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0], int(parts[1])
    return text, None


def _locate(path: str, roots: Sequence[Path]) -> Path | None:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.is_file() else None
    return next((r / p for r in roots if (r / p).is_file()), None)


def read_image_list(list_file: str | Path, roots: Sequence[Path] = ()) -> list[ListEntry]:
    """Every entry of ``list_file``, each image checked to exist under the list's folder or one of ``roots``.

    Errors are one line naming the list and the line: a missing image, a negative label, a line without a label
    in a labelled list (or the reverse), an empty list.
    """
    list_file = Path(list_file).expanduser()
    search = [list_file.parent, *roots]
    where = " or ".join(str(r) for r in dict.fromkeys(search))
    entries: list[ListEntry] = []
    try:
        lines = list_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise DataError(f"{list_file}: cannot read the image list ({e.strerror or e})") from None
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        path, label = _split_line(text)
        if entries and (label is None) != (entries[0].label is None):
            want = "'<image path> <label>'" if entries[0].label is not None else "'<image path>' alone"
            raise DataError(f"{list_file} line {lineno}: expected {want} as on line {entries[0].line}, "
                            f"got {text[:80]!r} (labels are integers 0, 1, ..., K-1)")
        if label is not None and label < 0:
            raise DataError(f"{list_file} line {lineno}: label {label} is negative (labels are 0, 1, ..., K-1)")
        found = _locate(path, search)
        if found is None:
            raise DataError(f"{list_file} line {lineno}: image {path} not found (looked in {where})")
        entries.append(ListEntry(lineno, str(found), label))
    if not entries:
        raise DataError(f"{list_file}: no images listed (expected '<image path> <label>' per line)")
    return entries


def _domain(name: str, list_file: Path, entries: list[ListEntry], labels: list[int] | None,
            classes: list[str] | None) -> Domain:
    paths = [e.path for e in entries]
    return Domain(name, paths, path_reader(paths), labels, classes, {"list": str(list_file), "layout": "imagelist"})


def image_list(list_file: str | Path, data_root: str | Path | None = None, name: str | None = None) -> Domain:
    """The domain of an ImageList file; relative paths resolve against its folder, then ``data_root``.

    Classes are the label ids ``"0" .. "K-1"`` (K = the largest label + 1): two lists of one benchmark match
    by label, and a class with no image in this list still keeps its output.
    """
    list_file = Path(list_file).expanduser()
    if is_image_file(list_file):
        raise DataError(f"{list_file}: an image, not an image list (give a folder, or a text file of "
                        "'<image path> <label>' lines)")
    roots = [Path(data_root).expanduser()] if data_root else []
    entries = read_image_list(list_file, roots)
    if entries[0].label is None:
        return _domain(name or str(list_file), list_file, entries, None, None)
    labels = [int(e.label) for e in entries if e.label is not None]
    return _domain(name or str(list_file), list_file, entries, labels, [str(k) for k in range(max(labels) + 1)])


def named_image_list(list_file: str | Path, roots: Sequence[Path], classes: list[str], name: str) -> Domain:
    """A benchmark's list whose images sit in ``<class>/`` folders (VisDA-2017, DomainNet): an image's label is
    the index of its class folder's name in ``classes``, so labels match by name across domains whatever
    numbering a list uses; the list's own numbers are only checked to name one class folder each."""
    list_file = Path(list_file).expanduser()
    entries = read_image_list(list_file, roots)
    index = {c: k for k, c in enumerate(classes)}
    seen: dict[int, str] = {}
    labels: list[int] = []
    for e in entries:
        cls = Path(e.path).parent.name
        if cls not in index:
            raise DataError(f"{list_file} line {e.line}: {e.path} is not inside one of the {len(classes)} class "
                            f"folders of {name}")
        if e.label is not None and seen.setdefault(e.label, cls) != cls:
            raise DataError(f"{list_file} line {e.line}: label {e.label} is class {seen[e.label]} on an earlier "
                            f"line, but this image is in {cls}/")
        labels.append(index[cls])
    return _domain(name, list_file, entries, labels, list(classes))
