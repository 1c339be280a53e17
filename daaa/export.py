"""Ship a trained network with its preprocessing: ``daaa export --format torchscript|onnx``.

The exported module takes a **uint8** batch ``(N, C, H, W)`` of any height and width (values 0-255, ``C`` the
network's channels, RGB order) and returns the class **probabilities** ``(N, K)``; the class names travel with the
file (TorchScript: the extra file ``daaa_model.json``; ONNX: the metadata entry ``daaa_model``). Inside it, as in
training: bilinear resize to ``load_size`` x ``load_size``, centre crop to ``image_size``, ``(x / 255 - mean) / std``.
An image already at ``load_size`` (what daaa decodes to) gives exactly the network's input in training; a larger one
is resized without antialiasing (ONNX's exporters have none), so for photos far larger than ``load_size`` resize
them first (PIL bilinear) to match ``daaa predict`` exactly.

After writing, the file is loaded back and run on a few images (random ones at ``load_size`` and at another size,
plus any given): the largest difference from the PyTorch module's probabilities must be at most ``1e-4``, or the
export is an error and no file is left.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DaaaError
from .runs import current_umask

FORMATS = ("torchscript", "onnx")
#: the largest allowed difference between the exported file's and the PyTorch module's probabilities
TOLERANCE = 1e-4
INFO_NAME = "daaa_model"


class Deployable(nn.Module):
    """``net`` with training's preprocessing in front and a softmax behind: uint8 ``(N, C, H, W)`` -> ``(N, K)``."""

    def __init__(self, net: nn.Module, info: dict[str, Any]):
        super().__init__()
        self.net = net.eval()
        self.load_size, self.image_size = int(info["load_size"]), int(info["image_size"])
        c = int(info["channels"])
        self.register_buffer("mean", torch.tensor(info["mean"][:c], dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(info["std"][:c], dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(self.load_size, self.load_size), mode="bilinear", align_corners=False)
        top = (self.load_size - self.image_size) // 2  # the centre crop of daaa.data.transforms.center_crop
        x = x[:, :, top:top + self.image_size, top:top + self.image_size]
        return torch.softmax(self.net((x - self.mean) / self.std), dim=1)


def check_images(info: dict[str, Any], extra: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The batches an export is checked on: random uint8 images at ``load_size`` and at an odd other size (fixed
    seed), and ``extra`` (uint8, e.g. real images) when given."""
    g = torch.Generator().manual_seed(0)
    c, s = int(info["channels"]), int(info["load_size"])
    batches = [torch.randint(0, 256, (3, c, s, s), generator=g, dtype=torch.uint8),
               torch.randint(0, 256, (2, c, s + 13, s + 7), generator=g, dtype=torch.uint8)]
    return batches + ([extra] if extra is not None else [])


def _write_torchscript(module: Deployable, example: torch.Tensor, path: Path, info: dict[str, Any]) -> None:
    # tracer warnings about shapes read in Python (the check after writing is the test), and torch >= 2.10's
    # deprecation notice of TorchScript (still what C++/mobile runtimes load)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{INFO_NAME}.json": json.dumps(info)})


def _torchscript_runner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise DaaaError("--format onnx needs the onnx and onnxruntime packages (pip install 'daaa[onnx]')") from None
    return onnx, onnxruntime


def _write_onnx(module: Deployable, example: torch.Tensor, path: Path, info: dict[str, Any]) -> None:
    onnx, _ = _onnx_modules()
    # the TorchScript-based exporter: the torch.export-based one (the default from torch 2.9) needs onnxscript
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), **legacy, input_names=["images"],
                          output_names=["probabilities"], opset_version=17,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "probabilities": {0: "batch"}})
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = INFO_NAME, json.dumps(info)
    onnx.save(model, str(path))


def _onnx_runner(path: Path):
    _, ort = _onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def verify(module: Deployable, run_exported, batches: list[torch.Tensor], out: str | Path) -> float:
    """The largest difference between the exported file's and ``module``'s outputs on ``batches``; an error when
    it exceeds :data:`TOLERANCE`."""
    worst = 0.0
    with torch.no_grad():
        for x in batches:
            worst = max(worst, float((run_exported(x).float() - module(x)).abs().max()))
    if not worst <= TOLERANCE:  # also catches NaN
        raise DaaaError(f"--out {out}: the exported network differs from PyTorch's by {worst:.3g} (more than "
                        f"{TOLERANCE:g}) on the check images; nothing was written")
    return worst


def export(net: nn.Module, info: dict[str, Any], fmt: str, out: str | Path,
           images: torch.Tensor | None = None) -> float:
    """Write ``net`` with its preprocessing (:class:`Deployable`) to ``out`` as ``fmt`` (``torchscript`` or
    ``onnx``), check it on a few images (and ``images``, uint8) and return the largest difference from PyTorch."""
    if fmt not in FORMATS:
        raise DaaaError(f"--format {fmt}: choose {' or '.join(FORMATS)}")
    if fmt == "onnx":
        _onnx_modules()  # before any work: one line when the extra is missing
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    module = Deployable(net.cpu(), info).eval()
    batches = check_images(info, images)
    write, runner = (_write_torchscript, _torchscript_runner) if fmt == "torchscript" else (_write_onnx, _onnx_runner)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(module, batches[0], Path(tmp), info)
        worst = verify(module, runner(Path(tmp)), batches, out)
        os.chmod(tmp, 0o666 & ~current_umask())  # a plain file's permissions, not mkstemp's 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return worst


def export_run(run: str | Path, fmt: str, out: str | Path, stage: str = "adapt") -> float:
    """:func:`export` of the network of ``stage`` in run folder ``run`` (``selected``: label-free selection's)."""
    from .predict import load_trained

    net, info = load_trained(run, stage)
    return export(net, info, fmt, out)
