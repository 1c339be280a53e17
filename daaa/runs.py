"""Run folders: resolved config, logs, metrics, atomic checkpoints, stage reuse.

Layout of a run folder ``RUN``::

    RUN/config.yaml          resolved configuration of the last command run in it
    RUN/log.txt              human-readable log (appended)
    RUN/metrics.json         merged metrics of all stages, written atomically
    RUN/<stage>/             one folder per stage (translate, source, adapt, ...)
        checkpoint.pt        latest training state, written atomically every N steps
        stage.json           {"config": <sections that decide the result>, "result": {...}} -- written last;
                             its presence means the stage is complete and can be reused
        history.jsonl        per-step log of the stage
        tb/                  TensorBoard event files

Only rank 0 writes (see :mod:`daaa.distributed`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import DaaaError

LOG = logging.getLogger("daaa")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_torch_file(path: str | Path, remedy: str = "") -> Any:
    """``torch.load`` of a file daaa wrote (tensors, plain containers and numbers only: ``weights_only``, so a
    crafted file cannot run code); one line naming the file when it cannot be read, then ``remedy``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects that weights_only refuses
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DaaaError(f"{path}: cannot be read ({type(e).__name__}: {first}){remedy}") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DaaaError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_json_or(path: str | Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable: for reports and figures of run folders
    that may be unfinished or made by an older version (a missing figure must not stop a report)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def prepare_run_dir(path: str | Path) -> Path:
    """Create the run folder or fail with one line if it cannot be written."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DaaaError(f"output folder {path}: not writable ({e.strerror or e})") from None
    return path


def setup_logging(run_dir: Path | None, verbose: bool = True) -> None:
    """Log to stderr and, when a run folder is given, to RUN/log.txt (appended)."""
    LOG.setLevel(logging.INFO)
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    sh = _StderrHandler()
    sh.setFormatter(fmt)
    sh.setLevel(logging.INFO if verbose else logging.WARNING)
    LOG.addHandler(sh)
    if run_dir is not None:
        fh = logging.FileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(fmt)
        LOG.addHandler(fh)
    # propagation stays on: the root logger has no handler of ours (no duplicate lines), and tools that listen on
    # the root (pytest's caplog, an embedding application) still see daaa's records


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted: pytest, tqdm and notebooks swap it, and a
    handler bound to an old, closed stream would fail on the next run in the same process."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def save_config(run_dir: Path, cfg_dict: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))


def update_metrics(run_dir: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` (one level deep) into RUN/metrics.json, atomically."""
    path = Path(run_dir) / "metrics.json"
    metrics = read_json(path) if path.exists() else {}
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(metrics.get(k), dict):
            metrics[k].update(v)
        else:
            metrics[k] = v
    atomic_write_json(path, metrics)
    return metrics


class Stage:
    """One stage of a run (translate, source, adapt, ...): its folder, checkpoint and completion record.

    ``key`` is the part of the configuration (plus input identities) that decides the stage's result: a completed
    stage with the same key is reused; with a different key the stage is refused (the folder was made by an
    incompatible config) unless ``overwrite`` is set.
    """

    def __init__(self, run_dir: Path, name: str, key: dict[str, Any]):
        self.dir = Path(run_dir) / name
        self.name = name
        self.key = json.loads(json.dumps(key, default=_json_default))  # normalised for comparison

    @property
    def record_path(self) -> Path:
        return self.dir / "stage.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def check_compatible(self) -> None:
        """Refuse a folder whose stage was made by another configuration (done or in progress)."""
        for path in (self.record_path, self.dir / "key.json"):
            if path.exists():
                old = read_json(path)
                old_key = old.get("key", old) if path == self.record_path else old
                if old_key != self.key:
                    diff = _first_difference(old_key, self.key)
                    raise DaaaError(
                        f"run folder {self.dir} was made by an incompatible config ({diff}); "
                        "use another --out folder or pass --overwrite")

    def begin(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "key.json", self.key)

    def done(self) -> dict[str, Any] | None:
        if not self.record_path.exists():
            return None
        rec = read_json(self.record_path)
        return rec.get("result") if rec.get("key") == self.key else None

    def finish(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.record_path, {"key": self.key, "result": result})

    def load_checkpoint(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)
        except Exception as e:  # a checkpoint is replaced atomically, so this means outside damage
            raise DaaaError(f"checkpoint {self.checkpoint_path} cannot be read ({e}); delete it to restart the stage") from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.checkpoint_path)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'value'}: {a!r} before, {b!r} now"
