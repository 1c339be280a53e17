"""Images at any size: a memory budget, lazily decoded image sets, and DataLoader workers that decode ahead.

``data.cache_bytes`` (per process) bounds what is held decoded. A domain whose decoded size (N x C x H x W bytes)
fits what is left of it is decoded once into one uint8 tensor, as daaa always did (:func:`load_images`); a larger
one becomes a :class:`LazyImages`, which decodes the rows it is indexed with -- with the very rules of
:func:`daaa.data.domain.decode_resized` -- and holds none. The translated sets, the frozen source network's attention
maps and M_post's posteriors are weighed against the same budget (:func:`cache_room`).

Decoding goes through ``torch.utils.data.DataLoader`` with ``data.num_workers`` worker processes
(:func:`ordered_map`): whole scans (evaluation, embeddings, posteriors, translation) with :func:`scan`, and the
training steps with :class:`StepPrefetch`, which decodes the images of the coming steps ahead of the trainer. The
mixed batches stay a pure function of (seed, step) (:class:`daaa.batches.MixedBatchSampler`): workers compute the
rows of a step themselves, a resumed run prefetches from the step it resumes at, and each DDP rank decodes only its
own rows. Random access (``images[idx]`` of a few rows) decodes in the calling process.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..errors import DataError
from .domain import Domain, DomainData, Images, ImageTensors, UnreadableImage, decode_resized, load_tensors

LOG = logging.getLogger("daaa")

STREAMS = ("source", "synthetic_target", "target", "synthetic_source")  # the sets a training step reads


def decoded_bytes(n: int, channels: int, size: int) -> int:
    """Bytes of ``n`` decoded uint8 images of ``channels`` x ``size`` x ``size``."""
    return n * channels * size * size


# ---------------------------------------------------------------------------------------------- lazy image sets
class LazyImages:
    """uint8 (N, C, ``size``, ``size``) images of a :class:`~daaa.data.domain.Domain`, decoded when indexed.

    ``images[rows]`` (an int, a slice, a list or an index tensor) returns a uint8 tensor, decoded in this process,
    except for the rows a :class:`StepPrefetch` has staged for the current step (:meth:`stage`); :func:`scan`
    decodes whole sets in DataLoader workers. ``rows`` makes a view: row k is image ``rows[k]`` of the domain.
    """

    dtype = torch.uint8

    def __init__(self, domain: Domain, size: int, channels: int, num_workers: int = 0,
                 rows: torch.Tensor | None = None):
        self.domain, self.size, self.channels, self.num_workers = domain, size, channels, num_workers
        self.rows = rows
        self._staged: dict[int, torch.Tensor] = {}
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.domain) if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return f"LazyImages({self.domain.name!r}, {tuple(self.shape)})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, self.size, self.size))

    @property
    def nbytes(self) -> int:
        return decoded_bytes(len(self), self.channels, self.size)

    def index_rows(self, index: Any) -> torch.Tensor:
        """``index`` (slice, int, list, bool mask or index tensor) as int64 row numbers of this set."""
        n = len(self)
        if isinstance(index, slice):
            return torch.arange(n)[index]
        rows = torch.as_tensor(index)
        if rows.dtype == torch.bool:
            return rows.nonzero().flatten()
        rows = rows.long().flatten()
        rows = torch.where(rows < 0, rows + n, rows)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise IndexError(f"{self.domain.name}: index out of range for {n} images")
        return rows

    def __getitem__(self, index: Any) -> torch.Tensor:
        if not isinstance(index, slice) and torch.as_tensor(index).dim() == 0:  # one image: (C, H, W)
            return self.decode(self.index_rows([int(index)]))[0]
        return self.decode(self.index_rows(index))

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of ``rows`` (int64 row numbers), decoded in this process; staged rows are taken as staged."""
        out = torch.empty((len(rows), self.channels, self.size, self.size), dtype=torch.uint8)
        where = rows.tolist() if self.rows is None else self.rows[rows].tolist()
        for k, (row, i) in enumerate(zip(rows.tolist(), where)):
            staged = self._staged.get(row)
            out[k] = staged if staged is not None else decode_resized(self.domain, i, self.size, self.channels)
        return out

    def view(self, rows: torch.Tensor) -> "LazyImages":
        """The rows ``rows`` of this set as a set of its own, still undecoded."""
        rows = self.index_rows(rows)
        return LazyImages(self.domain, self.size, self.channels, self.num_workers,
                          rows if self.rows is None else self.rows[rows])

    def stage(self, rows: torch.Tensor, pixels: torch.Tensor) -> None:
        """Hold the decoded ``pixels`` of ``rows`` (the current training step's, from a :class:`StepPrefetch`) until
        the next call: indexing them then costs no decoding."""
        self._staged = dict(zip(rows.tolist(), pixels))

    def identity(self) -> str:
        """What :func:`~daaa.data.domain.fingerprint` hashes: the set's shape and, per image, its file's path, size
        and modification time; the pixels (one decoding pass) when an image is not a file (array data sets)."""
        if self._identity is None:
            h = hashlib.sha256(f"lazy{tuple(self.shape)}".encode())
            ids = self.domain.ids
            try:
                for i in (range(len(ids)) if self.rows is None else self.rows.tolist()):
                    st = os.stat(ids[i])
                    h.update(f"{ids[i]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h = hashlib.sha256(f"lazy-pixels{tuple(self.shape)}".encode())
                for _, pixels in scan(self, 256):
                    h.update(pixels.numpy())
            self._identity = h.hexdigest()
        return self._identity


def take(images: Images, rows: torch.Tensor) -> Images:
    """``images[rows]`` without decoding a streamed set: a tensor's rows, or a :meth:`LazyImages.view`."""
    return images.view(rows) if isinstance(images, LazyImages) else images[rows]


# ---------------------------------------------------------------------------------------------- DataLoader workers
@dataclass
class _Failure:
    """A data error in a worker, carried back as a value: the main process raises it as the one line it is, not as
    DataLoader's multi-line "Caught ... in DataLoader worker process" traceback."""

    kind: type
    message: str


class _Calls(Dataset):
    """Item k = ``fn(keys[k])``: a DataLoader over it runs ``fn`` in worker processes, results in order."""

    def __init__(self, fn: Callable[[Any], Any], keys: Sequence[Any]):
        self.fn, self.keys = fn, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> Any:
        try:
            return self.fn(self.keys[k])
        except DataError as e:
            return _Failure(type(e), str(e))
        finally:
            release_freed_memory()  # a long-lived worker's heap would otherwise grow with every image it decodes


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group: the main process checkpoints and stops the workers; a worker that died
    # on it first would turn that into "DataLoader worker exited unexpectedly". (SIGTERM stays: DataLoader's own
    # shutdown terminates a worker that does not end in time.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context() -> Any:
    # fork: workers inherit the data sets (domains read through closures, which cannot be pickled) without a copy
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _libc() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Hand the heap pages that freed tensors and decoded images left behind back to the system (glibc's
    ``malloc_trim``, about 0.1 ms; a no-op elsewhere). Without it the heap of a process that decodes and computes
    batch after batch keeps growing with the number of batches (fragmentation), so with the data set's size; and a
    forked worker maps all of its parent's anonymous memory."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _cores() -> int:
    """CPU cores this process may run on: more workers than that only wait (and DataLoader warns in many lines)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(fn: Callable[[Any], Any], keys: Sequence[Any], workers: int) -> Iterator[Any]:
    """``fn(key)`` for each of ``keys``, in order, computed ahead by ``workers`` DataLoader worker processes (0: in
    this process; at most one per CPU core). A :class:`~daaa.errors.DataError` in ``fn`` is raised here, as itself."""
    context = _context()
    if workers <= 0 or len(keys) <= 1 or context is None:
        yield from map(fn, keys)
        return
    release_freed_memory()
    # a private generator: a DataLoader iterator otherwise draws its workers' base seed from the global RNG, and a
    # streamed run's dropout (DANN's discriminator) would then differ from the in-memory run's
    loader = DataLoader(_Calls(fn, keys), batch_size=None, num_workers=min(workers, len(keys), _cores()),
                        multiprocessing_context=context, worker_init_fn=_worker_init, generator=torch.Generator())
    it, finished, owner = iter(loader), False, os.getpid()
    try:
        for out in it:
            if isinstance(out, _Failure):
                raise out.kind(out.message)
            yield out
        finished = True  # DataLoader has ended its workers
    finally:
        # stopped early (an error, a jump of the prefetch, a trainer dropped): end them now -- but only in this
        # process: a forked worker that inherits this generator and collects it would SIGTERM its siblings
        if not finished and os.getpid() == owner:
            _stop_workers(it)
        it = None


def _stop_workers(it: Any) -> None:
    """End the worker processes of a DataLoader iterator that is left before its end. They only decode, so they
    are terminated (SIGTERM) first: DataLoader's own shutdown, when it runs inside the garbage collector (a trainer
    dropped in a reference cycle), sends its stop message through queues the collector has already closed, and
    then waits five seconds per worker."""
    # first out of DataLoader's SIGCHLD watch: a worker that dies of this SIGTERM while still registered makes the
    # handler raise "worker killed by signal" in whatever this process runs next (another loader's read, when the
    # garbage collector closes an abandoned prefetch)
    if getattr(it, "_worker_pids_set", False):
        try:  # torch's private API: if a release moves it, the workers still end below (the watch may then report)
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        except (ImportError, AttributeError):
            pass
    for w in getattr(it, "_workers", ()):
        w.terminate()
    getattr(it, "_shutdown_workers", lambda: None)()  # joins them, closes the queues


def chunked(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[a:a + size] for a in range(0, len(rows), size)]


def scan(images: Images, batch_size: int, rows: torch.Tensor | None = None, progress: bool = False,
         desc: str = "decode") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(row numbers, uint8 images) of ``rows`` (default: all) in consecutive batches of ``batch_size``: slices of a
    tensor, or decoded ahead by the set's DataLoader workers (``data.num_workers``) for a :class:`LazyImages`."""
    n = len(images)
    whole = rows is None
    rows = torch.arange(n) if whole else rows
    return scan_chunks(images, chunked(rows, batch_size), progress, desc, contiguous=whole)


def scan_chunks(images: Images, chunks: list[torch.Tensor], progress: bool = False, desc: str = "decode",
                contiguous: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(chunk, uint8 images of the chunk's rows) for each of ``chunks``, as :func:`scan` does."""
    from tqdm import tqdm

    lazy = isinstance(images, LazyImages)
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, disable=not (progress and lazy), leave=False,
               dynamic_ncols=True, mininterval=1.0)
    try:
        if not lazy:
            for c in chunks:  # a slice of consecutive rows is a view, an index a copy
                yield c, (images[int(c[0]):int(c[-1]) + 1] if contiguous and len(c) else images[c])
            return
        for c, pixels in zip(chunks, ordered_map(images.decode, chunks, images.num_workers)):
            bar.update(len(c))
            yield c, pixels
            release_freed_memory()  # what the caller made of the last batch is freed: a scan holds one batch
    finally:
        bar.close()


def materialize(images: Images, progress: bool = False, desc: str = "decode") -> torch.Tensor:
    """The whole set as one uint8 tensor (decoded by the workers when streamed)."""
    if isinstance(images, torch.Tensor):
        return images
    out = torch.empty(tuple(images.shape), dtype=torch.uint8)
    for rows, pixels in scan(images, 256, progress=progress, desc=desc):
        out[rows] = pixels
    return out


# ---------------------------------------------------------------------------------------------- the budget
def load_images(domain: Domain, cfg: DataConfig, room: int, progress: bool = False) -> ImageTensors:
    """``domain`` decoded into memory (:func:`~daaa.data.domain.load_tensors`) when its decoded size fits ``room``
    bytes (what is left of ``data.cache_bytes``), else as a :class:`LazyImages` streamed from disk. A streamed
    domain meets a corrupt image when it first reads it (one line naming it); with ``data.skip_corrupt`` it is
    scanned once first (by the workers) and its unreadable images are left out and counted."""
    need = decoded_bytes(len(domain), cfg.channels, cfg.load_size)
    if need <= room or len(domain) == 0:
        return load_tensors(domain, cfg.load_size, cfg.channels, cfg.skip_corrupt, progress)
    if cfg.skip_corrupt:
        domain = readable_part(domain, cfg, progress)
    LOG.info("data: %s is streamed from disk (%d images, %.0f MiB decoded; %.0f MiB left of data.cache_bytes), "
             "decoded by %d DataLoader worker(s) (data.num_workers)", domain.name, len(domain), need / 2 ** 20,
             max(room, 0) / 2 ** 20, cfg.num_workers)
    labels = None if domain.labels is None else torch.tensor(domain.labels, dtype=torch.long)
    return ImageTensors(domain.name, LazyImages(domain, cfg.load_size, cfg.channels, cfg.num_workers), labels,
                        list(domain.ids), domain.classes)


def load_domains(domains: dict[str, Domain], cfg: DataConfig, progress: bool = False) -> dict[str, ImageTensors]:
    """:func:`load_images` of each domain, in order, each weighed against what the ones before it left of
    ``data.cache_bytes``."""
    room, out = cfg.cache_bytes, {}
    for role, domain in domains.items():
        out[role] = load_images(domain, cfg, room, progress)
        room -= resident(out[role].images)
    return out


def readable_part(domain: Domain, cfg: DataConfig, progress: bool = False) -> Domain:
    """``domain`` without its images that cannot be decoded (``data.skip_corrupt`` on a streamed domain), found by
    one decoding pass in the workers; logged as :func:`~daaa.data.domain.load_tensors` logs them."""
    from tqdm import tqdm

    def unreadable(rows: torch.Tensor) -> list[int]:
        bad = []
        for i in rows.tolist():
            try:
                decode_resized(domain, i, cfg.load_size, cfg.channels)
            except UnreadableImage:
                bad.append(i)
        return bad

    chunks = chunked(torch.arange(len(domain)), 256)
    bad = [i for found in tqdm(ordered_map(unreadable, chunks, cfg.num_workers), total=len(chunks),
                               desc=f"check {domain.name}", disable=not progress, leave=False) for i in found]
    if not bad:
        return domain
    LOG.warning("domain %s: skipped %d corrupt image(s), first: %s", domain.name, len(bad), domain.ids[bad[0]])
    if len(bad) == len(domain):
        raise DataError(f"domain {domain.name}: no readable images")
    drop = set(bad)
    return domain.subset([i for i in range(len(domain)) if i not in drop])


def resident(images: Images | None) -> int:
    """Bytes of ``images`` held in memory: a tensor's, none for a streamed set."""
    return images.nbytes if isinstance(images, torch.Tensor) else 0


def cache_room(cfg: DataConfig, data: DomainData, synthetic: bool = True) -> int:
    """What is left of ``data.cache_bytes`` beside the decoded sets of ``data`` (without T_f and S_f when
    ``synthetic`` is False: the room they may take)."""
    sets = [d.images for d in (data.source, data.target, data.target_test, data.source_val) if d is not None]
    if synthetic:
        sets += [data.synthetic_target, data.synthetic_source]
    return cfg.cache_bytes - sum(resident(s) for s in sets)


def is_streamed(*sets: Images | None) -> bool:
    return any(isinstance(s, LazyImages) for s in sets)


# ---------------------------------------------------------------------------------------------- training steps
class StepPrefetch:
    """The images that steps ``start .. end - 1`` read, decoded ahead of the trainer by DataLoader workers.

    ``plan(step)`` gives, for each of ``sets``, the rows step ``step`` reads; it must be a pure function of the
    step (daaa's batches are functions of (seed, step)), so that the workers can run ahead and a resumed run
    prefetches from its first step. :meth:`get` returns ``[(rows, uint8 images)]`` per set; in-memory sets are
    indexed in this process, only streamed ones are decoded by the workers. Asked for another step than the next
    one, it starts over from there.
    """

    def __init__(self, sets: Sequence[Images], plan: Callable[[int], list[torch.Tensor]], end: int, workers: int):
        self.sets, self.plan, self.end, self.workers = list(sets), plan, end, workers
        self._lazy = [k for k, s in enumerate(self.sets) if isinstance(s, LazyImages)]
        self._iter: Iterator[Any] | None = None
        self._next = -1

    def _load(self, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rows = self.plan(step)
        return rows, [self.sets[k].decode(rows[k]) for k in self._lazy]

    def get(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self._lazy or step >= self.end:
            rows, decoded = self._load(step)
        else:
            if self._iter is None or step != self._next:
                self.close()
                self._iter = ordered_map(self._load, range(step, self.end), self.workers)
            rows, decoded = next(self._iter)
            self._next = step + 1
            if self._next >= self.end:
                self.close()  # the workers end with the last step
        pixels = dict(zip(self._lazy, decoded))
        return [(r, pixels[k] if k in pixels else self.sets[k][r]) for k, r in enumerate(rows)]

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()  # the DataLoader iterator goes, and its workers with it
            self._iter = None


def step_rows(batch: Any, anchors: str | None) -> dict[str, torch.Tensor]:
    """The rows of each of :data:`STREAMS` that a training step on ``batch`` (a :class:`daaa.batches.MixedBatch`)
    reads: its S | T_f | T | S_f rows, the T rows' S_f (EM-A's posterior reads T), and with L_AT (``anchors`` =
    ``adapt.target_anchors``) the anchors of Eq. 5 (:meth:`~daaa.batches.MixedBatch.anchor_rows`)."""
    parts = {"source": [batch.source_idx, batch.tf_idx], "synthetic_target": [batch.tf_idx],
             "target": [batch.target_idx, batch.sf_idx], "synthetic_source": [batch.sf_idx]}
    if anchors is not None:
        found = batch.anchor_rows(anchors)
        parts["source"].append(found[1])
        parts["synthetic_source"].append(found[2])
    return {k: torch.unique(torch.cat(v)) for k, v in parts.items()}


class PrefetchingSampler:
    """A :class:`daaa.batches.MixedBatchSampler` whose ``batch(step)`` first stages the step's images of the
    streamed sets, decoded ahead by a :class:`StepPrefetch` (the trainer's ``data.source.images[rows]`` then costs no
    decoding). The batches are the sampler's own: the same with and without prefetching.

    ``anchor_steps(step)`` says whether step ``step`` reads the anchors of Eq. 5 (None: every step): a beta = 0 row
    computes L_AT only on its logging steps (:meth:`daaa.trainers.adapt.DAAATrainer.computes_attention`)."""

    def __init__(self, sampler: Any, data: DomainData, end: int, workers: int, anchors: str | None,
                 anchor_steps: Callable[[int], bool] | None = None):
        self.sampler, self.anchors, self.anchor_steps = sampler, anchors, anchor_steps
        found = {"source": data.source.images, "synthetic_target": data.synthetic_target,
                 "target": data.target.images if data.target is not None else None,
                 "synthetic_source": data.synthetic_source}
        self.names = [k for k in STREAMS if isinstance(found[k], LazyImages)]
        self.sets = [found[k] for k in self.names]
        self.prefetch = StepPrefetch(self.sets, self._plan, end, workers)

    def _plan(self, step: int) -> list[torch.Tensor]:
        reads_anchors = self.anchor_steps is None or self.anchor_steps(step)
        rows = step_rows(self.sampler.batch(step), self.anchors if reads_anchors else None)
        return [rows[k] for k in self.names]

    def batch(self, step: int) -> Any:
        for images, (rows, pixels) in zip(self.sets, self.prefetch.get(step)):
            images.stage(rows, pixels)
        return self.sampler.batch(step)

    def __getattr__(self, name: str) -> Any:  # counts, rank, world_size, ...
        if name == "sampler":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


def prefetching(sampler: Any, data: DomainData, end: int, workers: int, anchors: str | None,
                anchor_steps: Callable[[int], bool] | None = None) -> Any:
    """``sampler`` itself when every set a step reads is in memory, else a :class:`PrefetchingSampler`."""
    sets = (data.source.images, data.target.images if data.target is not None else None, data.synthetic_target,
            data.synthetic_source)
    return PrefetchingSampler(sampler, data, end, workers, anchors, anchor_steps) if is_streamed(*sets) else sampler
