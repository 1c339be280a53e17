"""Use a trained network on new, unlabelled images: ``daaa predict`` and ``daaa.predict(...)``.

A run folder's network is rebuilt from its model file alone (:func:`load_trained`; :mod:`daaa.models` describes
the file): ``--stage adapt`` (the adapted target network, the default), ``source`` (the source network), a table
row (``rows/ours``) or ``selected`` (the snapshot that label-free model selection picked, ``adapt/model-selected.pt``).
Images are shaped as training shaped them (decoded at ``load_size``, centre-cropped to ``image_size``, normalised)
and predicted in batches; the result is one row per image: path, predicted class name, its probability and, with
``top_k > 1``, the next classes.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from .config import Config, config_from_dict
from .data.domain import Domain, load_tensors
from .data.folders import image_folder, is_image_file, path_reader
from .data.imagelist import image_list
from .distributed import Context
from .errors import DaaaError
from .models import SELECTED_FILE, data_config, model_info, network_from_info, read_model_file
from .runs import atomic_write_text, read_json_or

LOG = logging.getLogger("daaa")


def model_path(run: str | Path, stage: str = "adapt") -> Path:
    """The model file of ``stage`` in run folder ``run`` (``selected``: adapt's selected snapshot); one line when
    it is missing."""
    run = Path(run).expanduser()
    if stage == "selected":
        path = run / "adapt" / SELECTED_FILE
        if not path.is_file():
            raise DaaaError(f"--run {run}: {path} does not exist (label-free selection keeps a snapshot only when "
                            "data.source_val_fraction > 0 and the adapt stage has run)")
        return path
    path = run / stage / "model.pt"
    if not path.is_file():
        finished = [s for s in ("adapt", "source") if (run / s / "model.pt").is_file()]
        hint = f" This run has: {', '.join('--stage ' + s for s in finished)}" if finished else ""
        raise DaaaError(f"--run {run}: {path} does not exist (is the {stage} stage finished?{hint})")
    return path


def run_config(run: str | Path) -> Config | None:
    """The resolved configuration a run folder records (RUN/config.yaml), or None when there is none."""
    path = Path(run).expanduser() / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DaaaError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise DaaaError(f"{path}: expected a mapping of config sections")
    return config_from_dict({k: v for k, v in saved.items() if k != "preset"})


def _bare_file_info(run: Path, path: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The description of a bare state dict (daaa 0.1's model.pt) from the run's config.yaml: the class count from
    the classifier's weights, the names (when a translation recorded them) from RUN/translate/manifest.json."""
    cfg = run_config(run)
    if cfg is None:
        raise DaaaError(f"{path}: a bare state dict (daaa 0.1) and no {run / 'config.yaml'} to describe its network")
    head = [v for k, v in state.items() if k in ("fc.weight", "conv4.weight")]
    if not head:
        raise DaaaError(f"{path}: a bare state dict without a classifier daaa knows (fc or conv4)")
    classes = (read_json_or(run / "translate" / "manifest.json", {}) or {}).get("classes")
    return model_info(cfg, classes if classes and len(classes) == head[0].shape[0] else None, head[0].shape[0])


def load_trained(run: str | Path, stage: str = "adapt") -> tuple[nn.Module, dict[str, Any]]:
    """The network of ``stage`` in run folder ``run`` (eval mode, CPU) and its description (:func:`model_info`:
    classes, input size, normalisation); nothing but the run folder is needed."""
    path = model_path(run, stage)
    state, info, _ = read_model_file(path)
    info = info or _bare_file_info(Path(run).expanduser(), path, state)
    return network_from_info(info, state, path), info


def image_domain(spec: str | Path) -> Domain:
    """The images ``spec`` names: a folder (flat, or by class), an ImageList text file (``path [label]`` lines;
    labels are ignored) or one image file."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DaaaError(f"--images {spec}: no such folder or file")
    if path.is_dir():
        return image_folder(path)
    if is_image_file(path):
        return Domain(str(path), [str(path)], path_reader([str(path)]))
    return image_list(path)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DaaaError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _rows(ids: list[str], probs: torch.Tensor, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    p, k = probs.topk(top_k, dim=1)
    rows = []
    for i, image_id in enumerate(ids):
        row: dict[str, Any] = {"path": image_id, "class": classes[int(k[i, 0])], "probability": float(p[i, 0])}
        for r in range(1, top_k):
            row[f"class_{r + 1}"], row[f"probability_{r + 1}"] = classes[int(k[i, r])], float(p[i, r])
        rows.append(row)
    return rows


@torch.no_grad()
def predict(run: str | Path, images: str | Path, stage: str = "adapt", top_k: int = 1, out: str | Path | None = None,
            batch_size: int = 64, device: str = "auto", progress: bool = True) -> list[dict[str, Any]]:
    """Class predictions of the network of ``stage`` in run folder ``run`` for ``images`` (a folder, an ImageList
    file or one image): one dict per image with ``path``, ``class`` (the name), ``probability`` and, for
    ``top_k > 1``, ``class_2``, ``probability_2``, ...; written as CSV to ``out`` when given. A file that does not
    decode is a one-line error naming it."""
    from .evaluate import predict as logits_of

    for option, value in (("--top-k", top_k), ("--batch-size", batch_size)):
        if value < 1:
            raise DaaaError(f"{option} {value}: must be at least 1")
    net, info = load_trained(run, stage)
    classes = info.get("classes") or [str(k) for k in range(info["num_classes"])]
    top_k = min(top_k, len(classes))
    domain, cfg = image_domain(images), data_config(info)
    ctx = Context(0, 1, _device(device), None, False)
    net = net.to(ctx.device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(domain), desc="predict", unit="img", dynamic_ncols=True, mininterval=1.0)
    rows: list[dict[str, Any]] = []
    for a in range(0, len(domain), batch_size):
        part = domain.subset(range(a, min(a + batch_size, len(domain))))
        batch = load_tensors(part, cfg.load_size, cfg.channels)
        probs = logits_of(net, batch.images, cfg, ctx, batch_size).softmax(dim=1)
        rows += _rows(batch.ids, probs, classes, top_k)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    LOG.info("predict: %d images of %s by %s (%s)", len(rows), domain.name, run, stage)
    if out is not None:
        write_csv(rows, out)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """``rows`` (of :func:`predict`) as a CSV file with a header line, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path", "class", "probability"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
