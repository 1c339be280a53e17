"""Run folders: resolved config, logs, metrics, atomic checkpoints, stage reuse.

Layout of a run folder ``RUN``::

    RUN/config.yaml          resolved configuration of the last command run in it
    RUN/log.txt              human-readable log (appended)
    RUN/.daaa.lock           while a command writes the folder: its host, PID and command line (:func:`run_lock`)
    RUN/metrics.json         merged metrics of all stages, written atomically
    RUN/<stage>/             one folder per stage (translate, source, adapt, ...)
        checkpoint.pt        latest training state, written atomically every N steps
        stage.json           {"config": <sections that decide the result>, "result": {...}} -- written last;
                             its presence means the stage is complete and can be reused
        history.jsonl        per-step log of the stage
        tb/                  TensorBoard event files

Only rank 0 writes (see :mod:`daaa.distributed`), and only one command at a time (:func:`run_lock`). Every file is
written atomically (temporary file + rename) with the permissions of a plain ``open`` (umask), so a crash, a kill or
a full disk never leaves a torn file and colleagues can read run folders.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from .errors import DaaaError

LOG = logging.getLogger("daaa")


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a half-written file.

    The file gets the permissions of a plain ``open`` (0666 less the umask: 0644 by default), not mkstemp's 0600,
    so colleagues on a shared file system can read run folders. A failed write (a full disk) names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.strerror:  # ENOSPC from write() names no file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, which would race with other threads
    creating files); Linux shows it in /proc/self/status, elsewhere it is set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    """``torch.save`` atomically. The bytes are made in memory first: torch's zip writer reports a full disk as a
    RuntimeError about positions, a Python write as ``PATH: No space left on device``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer())


def load_torch_file(path: str | Path, remedy: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file daaa wrote (tensors, plain containers and numbers only: ``weights_only``, so a
    crafted file cannot run code); one line naming the file when it cannot be read, then ``remedy``."""
    try:
        with warnings.catch_warnings():  # torch warns (several lines) about unusual pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # objects other than tensors and plain types, or not a pickle at all
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        if what:  # a reference to a Python object (a function to call, a class to build): nothing of it ran
            raise DaaaError(f"{path}: refused: it would load the Python object {what.group(1)}; daaa loads only "
                            f"tensors, numbers, strings, lists and dicts, so that no file can run code{remedy}"
                            ) from None
        detail = re.search(r"(?m)^.*Unsupported.*$", str(e))
        raise DaaaError(f"{path}: cannot be read (not a tensor file"
                        f"{': ' + detail.group(0).strip()[:120] if detail else ''}){remedy}") from None
    except Exception as e:  # truncated, not a torch file
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
    if path.exists() and not path.is_dir():
        raise DaaaError(f"output folder {path}: is a file, not a folder (give --out a new or existing folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DaaaError(f"output folder {path}: not writable ({e.strerror or e})") from None
    return path


LOCK_NAME = ".daaa.lock"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[Path]:
    """Hold ``RUN/.daaa.lock`` while ``command`` writes the run folder: one writer per folder.

    The lock is an ``flock`` on the file, which the kernel drops when its holder dies, so the lock of a process
    killed with ``kill -9`` is taken over by the next command (the stale file stays, holding the dead PID). The
    file tells a refused command who holds it: host, PID, command line. Where a file system has no ``flock``, a
    holder is alive when it runs on this host under a live PID (on another host it is assumed alive)."""
    path = Path(run_dir) / LOCK_NAME
    fd = _acquire_lock(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still ours (not replaced by a taker-over)
                path.unlink()
        os.close(fd)


def _acquire_lock(path: Path) -> int:
    for _ in range(5):  # the file may be unlinked by its releasing holder between our open and our lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            held = _flock(fd)
            if held is None:  # no flock here: judge by the recorded holder
                held = _holder_alive(_read_holder(path))
            if held:
                raise DaaaError(_busy_message(path))
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise DaaaError(f"{path}: the lock file keeps changing; another daaa command is starting in this folder")


def _flock(fd: int) -> bool | None:
    """True when another process holds the lock, False when we got it, None when the file system has no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # ENOLCK, EOPNOTSUPP: some network file systems
        return None


def _read_holder(path: Path) -> dict[str, Any]:
    holder = read_json_or(path, {})
    return holder if isinstance(holder, dict) else {}


def _holder_alive(holder: dict[str, Any]) -> bool:
    if not holder.get("pid") or holder.get("pid") == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _busy_message(path: Path) -> str:
    h = _read_holder(path)
    who = (f"PID {h.get('pid')} on {h.get('host')} (`{h.get('command')}`, since {h.get('since')})" if h
           else "another daaa command")
    return (f"{path.parent}: in use by {who}; wait for it to end or use another --out "
            f"(if that process is gone, delete {path})")


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
        fh = _LogFileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(fmt)
        LOG.addHandler(fh)
    # propagation stays on: the root logger has no handler of ours (no duplicate lines), and tools that listen on
    # the root (pytest's caplog, an embedding application) still see daaa's records


class _LogFileHandler(logging.FileHandler):
    """RUN/log.txt that falls silent when it cannot be written (a full disk): logging's default prints a traceback
    per record, and the failing write that matters (a checkpoint) ends the command with one line anyway."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True


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

    ``steps_key`` (e.g. ``"adapt.steps"``) names the step count inside ``key``: it is compared apart, so that a
    finished stage asked for more steps is *extended* (not done: its trainer resumes from the last checkpoint)
    while one asked for fewer is refused. The whole key, step count included, is still what is recorded.
    """

    def __init__(self, run_dir: Path, name: str, key: dict[str, Any], steps_key: str | None = None):
        self.dir = Path(run_dir) / name
        self.name = name
        self.key = json.loads(json.dumps(key, default=_json_default))  # normalised for comparison
        self.steps_key = steps_key

    @property
    def record_path(self) -> Path:
        return self.dir / "stage.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def check_compatible(self) -> None:
        """Refuse a folder whose stage was made by another configuration (done or in progress), or finished with
        more steps than asked (a run can be extended, not shortened)."""
        new_key, steps = self.split_steps(self.key)
        for path in (self.record_path, self.dir / "key.json"):
            if path.exists():
                old = read_json(path)
                old_key, old_steps = self.split_steps(old.get("key", old) if path == self.record_path else old)
                if old_key != new_key:
                    diff = _first_difference(old_key, new_key)
                    hint = (" -- an earlier stage of this run was extended or redone, or the data changed"
                            if diff.startswith(("inputs", "source_network")) else "")
                    raise DaaaError(
                        f"run folder {self.dir} was made by an incompatible config ({diff}{hint}); "
                        "use another --out folder or pass --overwrite")
                if path == self.record_path and steps is not None and old_steps is not None and old_steps > steps:
                    raise DaaaError(
                        f"run folder {self.dir} finished {old_steps} steps ({self.steps_key}); {steps} would shorten "
                        "it (raise it to extend the run, or use another --out folder or pass --overwrite)")

    def split_steps(self, key: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """(``key`` without its step count, the step count) -- (``key``, None) without ``steps_key``."""
        if not self.steps_key or not isinstance(key, dict):
            return key, None
        section, _, field = self.steps_key.rpartition(".")
        inner = key.get(section) if section else key
        if not isinstance(inner, dict) or field not in inner:
            return key, None
        rest = {k: v for k, v in inner.items() if k != field}
        return ({**key, section: rest} if section else rest), inner[field]

    def finished_steps(self) -> int | None:
        """The step count of the finished stage in the folder (None when none is finished)."""
        if not self.record_path.exists():
            return None
        return self.split_steps(read_json(self.record_path).get("key", {}))[1]

    def begin(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "key.json", self.key)

    def done(self) -> dict[str, Any] | None:
        if not self.record_path.exists():
            return None
        rec = read_json(self.record_path)
        # with steps_key, a stage finished with fewer steps is not done: it is extended
        return rec.get("result") if self.split_steps(rec.get("key", {})) == self.split_steps(self.key) else None

    def finish(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.record_path, {"key": self.key, "result": result})

    def load_checkpoint(self, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The stage's checkpoint (tensors and plain containers only, so loading cannot run code), or None."""
        if not self.checkpoint_path.exists():
            return None
        return load_torch_file(self.checkpoint_path, "; delete it to restart the stage", map_location)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.checkpoint_path)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.') or 'value'}: {a!r} before, {b!r} now"
