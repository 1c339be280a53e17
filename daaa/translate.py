"""The data-pairing stage (paper Sec. 3.1): train a CycleGAN (Eq. 1-3) on unpaired S and T, then pair every real
image with its translation -- T_f[i] = G_ST(S[i]) carries source label i, S_f[j] = G_TS(T[j]).

Files in ``RUN/translate/`` (see :mod:`daaa.runs` for key.json, checkpoint.pt, stage.json)::

    synthetic_target/000017.png   T_f[17] = G_ST(S[17]), at the source images' stored size (PNG: lossless)
    synthetic_source/000004.png   S_f[4]  = G_TS(T[4]),  at the target images' stored size
    round_trip_source/000017.png  G_TS(T_f[17]); round_trip_target/000004.png: G_ST(S_f[4]) (pairing quality;
                                  files only when the sets do not fit data.cache_bytes, else in translated.pt)
    shards/source-00000.json      done-marker of images 0..999 of the source side (T_f and its round trip), written
                                  after their files; a re-run after a crash redoes only the unmarked shards (sets
                                  that fit data.cache_bytes are made anew in memory: no markers)
    manifest.json                 per synthetic image: file, real counterpart's id and index, (T_f) label and,
                                  with a style-conditioned G_ST, the id of the target image whose layout it took
    translated.pt                 only when the four sets together fit ``data.cache_bytes`` (small data sets, and
                                  every stage made before daaa streamed): {"synthetic_target": uint8 (N,C,H,W),
                                  "synthetic_source": uint8 (M,C,H,W), "round_trip_source": G_TS(T_f) (N,C,H,W),
                                  "round_trip_target": G_ST(S_f) (M,...)}; otherwise the PNG files are the data,
                                  read back as streamed sets (:class:`daaa.data.streaming.LazyImages`)
    quality.json                  the label-free pairing-quality figures (daaa.pairing_quality; written by the
                                  pipeline, not part of the stage's outputs)
    pairs.png, losses.png         Fig. 3-style pairs; loss curves
    history.jsonl, tb/            losses every ``cyclegan.log_interval`` steps (averaged over the interval)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import Config, DataConfig
from .cyclegan import CycleGAN, check_image_size
from .data.domain import Domain, Images, ImageTensors, fingerprint, load_tensors
from .data.folders import path_reader
from .data.streaming import LazyImages, StepPrefetch, chunked, decoded_bytes, materialize, scan_chunks
from .distributed import Context, amp_dtype, main_first
from .errors import ConfigError, DaaaError, DataError, PeerError
from .figures import plot_curves, plot_pairs
from .pairing_quality import model_range_classifier, weights_fingerprint
from .runs import Stage, atomic_torch_save, atomic_write_json, atomic_write_text, load_torch_file, read_json, read_json_or
from .style_gst import build_cyclegan
from .trainers.loop import StopSignals, guard_finite_state

LOG = logging.getLogger("daaa")

MANIFEST_FORMAT = "daaa-translation/1"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# the sets each side of the translation writes: a source image's T_f and round trip, a target image's S_f and its
SETS = {"source": ("synthetic_target", "round_trip_source"), "target": ("synthetic_source", "round_trip_target")}
# images per shard: written, marked done (RUN/translate/shards/) and, after a crash, redone as one
# cyclegan options that do not change the result: changing them must not invalidate a run folder
BOOKKEEPING = ("translate_batch_size", "checkpoint_interval", "log_interval", "quality", "shard_size")
LOSS_KEYS = ("g_st", "g_ts", "d_t", "d_s", "cycle", "identity", "semantic")


@dataclass
class Translation:
    """Synthetic images aligned index-by-index with the real ones, uint8 (N, C, H, W) like ``ImageTensors.images``.

    ``synthetic_target[i] = G_ST(source.images[i])`` (label ``source.labels[i]``);
    ``synthetic_source[j] = G_TS(target.images[j])``. ``stage_dir`` is None for user-provided folders. The round
    trips ``round_trip_source[i] = G_TS(synthetic_target[i])`` and ``round_trip_target[j] =
    G_ST(synthetic_source[j])`` (the pairing-quality report's) are None for user folders and older stages.
    """

    synthetic_target: Images
    synthetic_source: Images
    seconds: dict = field(default_factory=dict)
    stage_dir: Path | None = None
    round_trip_source: Images | None = None
    round_trip_target: Images | None = None


def to_model_range(images: torch.Tensor, size: int, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] on ``device``, resized to ``size`` x ``size`` if needed."""
    x = images.to(device).float().div_(127.5).sub_(1.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def to_uint8(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (N, C, H, W) at ``hw`` (the stored size), on the CPU."""
    x = x.float()
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).cpu()


def stage_key(cfg: Config, source: ImageTensors, target: ImageTensors,
              guide: torch.nn.Module | None = None) -> dict[str, Any]:
    """What decides the translation: CycleGAN options, image shaping, seed and the exact input images (+ labels);
    with ``cyclegan.lambda_semantic > 0`` also the weights of the frozen source network ``guide``."""
    cg = {k: v for k, v in asdict(cfg.cyclegan).items() if k not in BOOKKEEPING}
    key: dict[str, Any] = {
        "cyclegan": cg,
        "data": {"channels": cfg.data.channels, "load_size": cfg.data.load_size},
        "seed": cfg.runtime.seed,
        "inputs": {"source": fingerprint(source.images, source.labels), "target": fingerprint(target.images),
                   "n_source": len(source), "n_target": len(target), "classes": source.classes},
    }
    if not cg["lambda_semantic"]:  # absent = off: run folders made before the option existed stay valid
        del cg["lambda_semantic"]
    else:  # the semantic term's classifier decides the translation too; its image shaping with it
        key["source_network"] = weights_fingerprint(guide) if guide is not None else None
        key["data"].update(image_size=cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std)
    return key


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator drawing step ``step``'s batches: a function of (seed, step) only, so a resumed run draws the
    same batches as an uninterrupted one."""
    s = np.random.SeedSequence([seed % 2 ** 32, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def batch_indices(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``batch_size`` indices into a domain of ``n`` images, drawn from ``gen``."""
    if n >= batch_size:
        return torch.randperm(n, generator=gen)[:batch_size]
    return torch.randint(n, (batch_size,), generator=gen)  # tiny domain: sample with replacement


def cyclegan_rows(n_source: int, n_target: int, batch_size: int, seed: int, step: int) -> list[torch.Tensor]:
    """The S and T rows of CycleGAN step ``step`` (a function of (seed, step) only)."""
    gen = step_generator(seed, step)
    i_s = batch_indices(n_source, batch_size, gen)
    return [i_s, batch_indices(n_target, batch_size, gen)]


def _tb_writer(log_dir: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard missing or broken: the history file still has everything
        LOG.warning("translate: TensorBoard logging disabled (%s)", e)
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step or None)


def _train(stage: Stage, cfg: Config, model: CycleGAN, source: ImageTensors, target: ImageTensors,
           device: torch.device, progress: bool) -> tuple[list[dict], float]:
    """Train (or resume) to ``cyclegan.steps``; return the loss history and total training seconds."""
    from tqdm import tqdm

    c = cfg.cyclegan
    history: list[dict] = []
    acc: dict[str, float] = {}
    acc_n, prior_seconds = 0, 0.0
    state = stage.load_checkpoint("cpu")
    if state is not None:
        model.load_training_state(state["model"])
        history, acc, acc_n, prior_seconds = state["history"], state["acc"], state["acc_n"], state["seconds"]
        LOG.info("translate: resuming from step %d of %d (%s)", model.step, c.steps, stage.checkpoint_path)
    # the history file restarts from the checkpoint's history: entries logged after it are replayed identically
    hist_path = stage.dir / "history.jsonl"
    atomic_write_text(hist_path, "".join(json.dumps(h) + "\n" for h in history))
    if model.step >= c.steps:
        return history, prior_seconds
    writer = _tb_writer(stage.dir / "tb", model.step)
    bar = tqdm(total=c.steps, initial=model.step, desc="cyclegan", disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=1.0)
    size = c.image_size
    # streamed S or T: the workers decode the batches of the coming steps (drawn from (seed, step) alone)
    batches = StepPrefetch([source.images, target.images], partial(cyclegan_rows, len(source), len(target),
                                                                   c.batch_size, cfg.runtime.seed),
                           c.steps, cfg.data.num_workers)
    t0 = time.perf_counter()
    try:
        with hist_path.open("a") as hf, StopSignals() as stop:  # the CycleGAN trains on rank 0 alone
            while model.step < c.steps:
                (_, x_s), (_, x_t) = batches.get(model.step)
                losses = model.training_step(to_model_range(x_s, size, device), to_model_range(x_t, size, device))
                bar.update(1)
                for k, v in losses.items():
                    acc[k] = acc.get(k, 0.0) + v
                acc_n += 1
                step = model.step
                if (c.log_interval > 0 and step % c.log_interval == 0) or step == c.steps:
                    history.append(_log_entry(step, acc, acc_n, hf, writer, bar))
                    acc, acc_n = {}, 0
                signum = stop.requested()  # Ctrl-C / SIGTERM: checkpoint this step, then stop
                if (c.checkpoint_interval > 0 and step % c.checkpoint_interval == 0) or step == c.steps or signum:
                    state = model.training_state()
                    guard_finite_state(step, {"cyclegan": state["nets"]}, stage)
                    stage.save_checkpoint({"model": state, "history": history, "acc": acc,
                                           "acc_n": acc_n, "seconds": prior_seconds + time.perf_counter() - t0})
                if signum:
                    raise stop.stop(signum, step, stage)
    finally:
        batches.close()
        bar.close()
        if writer is not None:
            writer.close()
    return history, prior_seconds + time.perf_counter() - t0


def _log_entry(step: int, acc: dict[str, float], acc_n: int, hf: Any, writer: Any, bar: Any) -> dict[str, float]:
    """The mean losses since the last entry: to history.jsonl, TensorBoard and the progress bar."""
    entry = {"step": step, **{k: v / acc_n for k, v in acc.items()}}
    hf.write(json.dumps(entry) + "\n")
    hf.flush()
    if writer is not None:
        for k, v in entry.items():
            if k != "step":
                writer.add_scalar(f"cyclegan/{k}", v, step)
    bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("g_total", "d", "cycle")}, refresh=False)
    return entry


def translate_batch(fn: Any, images: torch.Tensor, size: int, device: torch.device,
                    donors: torch.Tensor | None = None) -> torch.Tensor:
    """``fn`` (G_ST or G_TS) on a batch of uint8 ``images``, back to uint8 at their stored size; ``donors`` (uint8
    real target images aligned with ``images``, for a style-conditioned G_ST, see :mod:`daaa.style_gst`) go along
    as its second argument when given."""
    x = to_model_range(images, size, device)
    y = fn(x) if donors is None else fn(x, to_model_range(donors, size, device))
    return to_uint8(y, tuple(images.shape[-2:]))


def _save_png(img: torch.Tensor, path: Path) -> None:
    arr = img.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path, compress_level=1)


@dataclass
class _Writer:
    """What every shard of :func:`_translate_into` shares."""

    stage_dir: Path
    model: CycleGAN
    cfg: Config
    device: torch.device
    target: ImageTensors
    style_idx: torch.Tensor | None  # the target image lending its layout to each T_f (style-conditioned G_ST)
    kept: dict[str, torch.Tensor] | None  # the four sets in memory, when they fit the budget
    bar: Any
    pool: ThreadPoolExecutor  # PNG encoding (zlib lets go of the GIL) overlaps the generators' next batch
    pending: deque = field(default_factory=deque)

    def save(self, folder: str, rows: torch.Tensor, images: torch.Tensor) -> None:
        """Queue the PNG files of ``images`` (rows ``rows``); at most two batches of files are in flight."""
        while len(self.pending) >= 2:
            for f in self.pending.popleft():
                f.result()
        self.pending.append([self.pool.submit(_save_png, img, self.stage_dir / folder / f"{i:06d}.png")
                             for i, img in zip(rows.tolist(), images)])

    def flush(self) -> None:
        """Wait for every queued file (and raise a failed write's error, e.g. a full disk)."""
        while self.pending:
            for f in self.pending.popleft():
                f.result()


def _translate_shard(w: _Writer, side: str, real: ImageTensors, rows: torch.Tensor) -> None:
    """The images ``rows`` of one side, both ways: T_f = G_ST(x^S) and G_TS(T_f) (side "source"), or
    S_f = G_TS(x^T) and G_ST(S_f), G_ST taking x^T's own layout as in the cycle T -> S_f -> T (side "target")."""
    c = w.cfg.cyclegan
    chunks = chunked(rows, c.translate_batch_size)
    forward, backward = ((w.model.translate_st, w.model.translate_ts) if side == "source"
                         else (w.model.translate_ts, w.model.translate_st))
    donors: Any = [(None, None)] * len(chunks)
    if side == "source" and w.style_idx is not None:
        donors = scan_chunks(w.target.images, [w.style_idx[ch] for ch in chunks])
    for (chunk, images), (_, donor) in zip(scan_chunks(real.images, chunks), donors):
        fake = translate_batch(forward, images, c.image_size, w.device, donor)
        back = translate_batch(backward, fake, c.image_size, w.device,
                               images if side == "target" and w.style_idx is not None else None)
        for k, (name, out) in enumerate(zip(SETS[side], (fake, back))):
            if w.kept is not None:
                w.kept[name][chunk] = out
            if k == 0 or w.kept is None:  # kept sets: the round trips only go to translated.pt
                w.save(name, chunk, out)
        w.bar.update(len(chunk))


def _shard_done(marker: Path, steps: int, rows: torch.Tensor) -> bool:
    """Whether ``marker`` says these rows were written by a CycleGAN of ``steps`` steps (not by one extended since)."""
    if not marker.is_file():
        return False
    m = read_json_or(marker, {})
    return isinstance(m, dict) and m == {"steps": steps, "first": int(rows[0]), "count": len(rows)}


def _translate_into(stage_dir: Path, model: CycleGAN, cfg: Config, source: ImageTensors, target: ImageTensors,
                    device: torch.device, keep: bool, progress: bool,
                    share: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor] | None:
    """Every image of both sides translated both ways into PNG files in ``stage_dir``, shard by shard
    (``cyclegan.shard_size`` images, each marked done in ``shards/`` once its files are written, so a re-run after a
    crash redoes only the unmarked shards); with ``keep`` the four sets are returned as tensors instead (made anew,
    they are small; of the files only T_f and S_f are written, for inspection). ``share`` = (rank, world size): this
    rank translates shard k of each side when k mod world size = rank."""
    from tqdm import tqdm

    rank, world = share
    size = cfg.cyclegan.shard_size
    if rank == 0:
        (stage_dir / "translated.pt").unlink(missing_ok=True)  # the sets of a translation this one replaces
    sides = (("source", source), ("target", target))
    kept = {name: torch.empty(tuple(real.images.shape), dtype=torch.uint8)
            for side, real in sides for name in SETS[side]} if keep else None
    mine = sum(len(range(first, min(first + size, len(real))))
               for _, real in sides for first in range(0, len(real), size) if (first // size) % world == rank)
    bar = tqdm(total=mine, desc="translate", disable=not progress, leave=False, dynamic_ncols=True, mininterval=1.0)
    w = _Writer(stage_dir, model, cfg, device, target,
                model.translation_donors(len(source), len(target), cfg.runtime.seed), kept, bar,
                ThreadPoolExecutor(max(1, cfg.data.num_workers)))
    try:
        for side, real in sides:
            for name in SETS[side][:1] if keep else SETS[side]:
                (stage_dir / name).mkdir(exist_ok=True)
            for first in range(0, len(real), size):
                if (first // size) % world != rank:
                    continue
                rows = torch.arange(first, min(first + size, len(real)))
                marker = stage_dir / "shards" / f"{side}-{first // size:05d}.json"
                if not keep and _shard_done(marker, model.step, rows):
                    bar.update(len(rows))
                    continue
                _translate_shard(w, side, real, rows)
                # the files are written before the marker, and before the next shard's loader forks its workers
                w.flush()
                if not keep:  # small sets are made anew, in memory: no markers
                    atomic_write_json(marker, {"steps": model.step, "first": first, "count": len(rows)})
    finally:
        w.pool.shutdown(wait=True)
        bar.close()
    return kept


def _manifest_entry(kind: str, i: int, real: ImageTensors, target: ImageTensors,
                    style_idx: torch.Tensor | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": f"{kind}/{i:06d}.png", "real_id": real.ids[i], "real_index": i}
    if kind == "synthetic_target" and style_idx is not None:  # whose colour layout G_ST was given
        entry["style_target_id"] = target.ids[int(style_idx[i])]
    if kind == "synthetic_target" and real.labels is not None:
        label = int(real.labels[i])
        entry["label"] = label
        entry["class"] = real.classes[label] if real.classes else str(label)
    return entry


def _write_manifest(path: Path, source: ImageTensors, target: ImageTensors, style_idx: torch.Tensor | None) -> None:
    """manifest.json, one entry per synthetic image, written entry by entry (no list of them in memory) into a
    temporary file renamed into place."""
    header = {"format": MANIFEST_FORMAT, "source": source.name, "target": target.name, "classes": source.classes}
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(header)[:-1])  # the object stays open for the two lists
        for kind, real in (("synthetic_target", source), ("synthetic_source", target)):
            f.write(f', "{kind}": [')
            for i in range(len(real)):
                f.write(("\n" if i == 0 else ",\n") + json.dumps(_manifest_entry(kind, i, real, target, style_idx)))
            f.write("\n]")
        f.write("}\n")
    os.replace(tmp, path)


def _write_outputs(stage_dir: Path, source: ImageTensors, target: ImageTensors, tr: Translation, history: list[dict],
                   style_idx: torch.Tensor | None, kept: bool) -> None:
    """manifest.json, translated.pt (``kept``: the sets fit the budget), Fig. 3's pairs and the loss curves."""
    _write_manifest(stage_dir / "manifest.json", source, target, style_idx)
    if kept:  # a full disk: one line naming the file, not torch's RuntimeError
        atomic_torch_save({"synthetic_target": tr.synthetic_target, "synthetic_source": tr.synthetic_source,
                           "round_trip_source": tr.round_trip_source, "round_trip_target": tr.round_trip_target},
                          stage_dir / "translated.pt")
    # Fig. 3: eight examples spread over each domain
    i_s = torch.linspace(0, len(source) - 1, min(8, len(source))).round().long().unique()
    i_t = torch.linspace(0, len(target) - 1, min(8, len(target))).round().long().unique()
    plot_pairs(source.images[i_s], tr.synthetic_target[i_s], target.images[i_t], tr.synthetic_source[i_t],
               stage_dir / "pairs.png")
    plot_curves(history, LOSS_KEYS, stage_dir / "losses.png", "CycleGAN losses (Eq. 1-3)")


def _check_inputs(cfg: Config, source: ImageTensors, target: ImageTensors, guide: torch.nn.Module | None) -> int:
    """One-line errors for what the CycleGAN cannot take; returns the channel count."""
    c = cfg.cyclegan
    check_image_size(c.image_size, c.n_downsampling, c.n_layers_d)
    if source.images.dtype != torch.uint8 or target.images.dtype != torch.uint8:
        raise DataError("translate: expected uint8 images")
    channels = source.images.shape[1]
    if target.images.shape[1] != channels:
        raise DataError(f"translate: {source.name} has {channels} channel(s) but {target.name} has "
                        f"{target.images.shape[1]}")
    if c.lambda_semantic > 0 and guide is None:
        raise ConfigError("option cyclegan.lambda_semantic: > 0 needs the source network before the CycleGAN "
                          "(`daaa run` and `daaa translate` train it first)")
    return channels


def run_translation(run_dir: Path, cfg: Config, source: ImageTensors, target: ImageTensors,
                    device: torch.device, progress: bool = True, guide: torch.nn.Module | None = None,
                    room: int | None = None, ctx: Context | None = None) -> Translation:
    """Stage 1 (Sec. 3.1): train the CycleGAN of Eq. 3 on unpaired S/T and translate every image both ways.

    A completed stage with the same key (options, seed, input fingerprint) is reused without training; a stage
    folder made with another key raises DaaaError (the caller clears ``RUN/translate`` to overwrite); an
    interrupted run resumes from ``RUN/translate/checkpoint.pt`` and, once trained, from its last translated shard.
    ``guide`` is the frozen source network of CyCADA's semantic term, needed (and part of the key) when
    ``cyclegan.lambda_semantic > 0``, ignored otherwise. The sets are returned in memory (and kept in translated.pt)
    when the four of them fit ``room`` bytes (default ``data.cache_bytes``), else streamed from their PNG files.

    Under torchrun (``ctx``, called on every rank) rank 0 trains the CycleGAN alone (its batch is small); sets that
    go to disk are then translated by every rank, shard k on rank k mod world size (small sets: rank 0 alone), and
    rank 0 writes the manifest and finishes the stage while the others wait.
    """
    c = cfg.cyclegan
    ctx = ctx or Context(0, 1, torch.device(device), None, False)
    channels = _check_inputs(cfg, source, target, guide)
    semantic = c.lambda_semantic > 0
    room = cfg.data.cache_bytes if room is None else room
    # cyclegan.steps compared apart: raising it on a finished translation extends it from its checkpoint
    key = stage_key(cfg, source, target, guide if semantic else None) if ctx.is_main else None
    if ctx.distributed:  # one scan of the input files (streamed sets), not one per rank
        key = ctx.broadcast_object(key)
    stage = Stage(run_dir, "translate", key, "cyclegan.steps")
    keep = 2 * (source.images.nbytes + target.images.nbytes) <= room  # T_f and G_TS(T_f) as S; S_f and G_ST(S_f)
    model, trained, plan = None, None, None
    with main_first(ctx):
        if ctx.is_main:
            stage.check_compatible()
            if stage.done() is not None and _finished_outputs(stage.dir):
                plan = "reuse"
            else:
                model = _cyclegan(cfg, channels, device, guide if semantic else None)
                trained = _train_stage(stage, cfg, model, source, target, device, progress)
    if ctx.distributed:
        plan = ctx.broadcast_object(plan)
    if plan == "reuse":
        LOG.info("translate: reusing the completed stage in %s", stage.dir)
        return load_translation(stage.dir, cfg.data, room, progress and ctx.is_main)
    t0 = time.perf_counter()
    if ctx.distributed and not keep:  # every rank translates its shards with rank 0's trained CycleGAN
        model = model or _trained_cyclegan(stage, cfg, channels, device)
        _translate_shares(stage, model, cfg, source, target, device, progress, ctx)
    with main_first(ctx):
        if ctx.is_main:  # the shards left (all of them with one process; none when the ranks shared them out)
            kept = _translate_into(stage.dir, model, cfg, source, target, device, keep, progress)
            _finish_stage(stage, source, target, kept, model, cfg, *trained, time.perf_counter() - t0)
    if keep and ctx.is_main:
        tr = _translation_of(stage.dir, kept)
        tr.seconds = _stage_result(stage.dir).get("seconds", {})
        return tr
    return load_translation(stage.dir, cfg.data, room, progress and ctx.is_main)


def _trained_cyclegan(stage: Stage, cfg: Config, channels: int, device: torch.device) -> CycleGAN:
    """Rank 0's trained CycleGAN read back from the stage's checkpoint (translation only: no semantic guide)."""
    model = _cyclegan(cfg, channels, device, None)
    model.load_training_state(stage.load_checkpoint("cpu")["model"])
    return model


def _translate_shares(stage: Stage, model: CycleGAN, cfg: Config, source: ImageTensors, target: ImageTensors,
                      device: torch.device, progress: bool, ctx: Context) -> None:
    """This rank's shards (:func:`_translate_into`); a rank that fails is told to every rank, so none waits for a
    peer that is gone."""
    failure = None
    try:
        _translate_into(stage.dir, model, cfg, source, target, device, False, progress and ctx.is_main,
                        (ctx.rank, ctx.world_size))
    except Exception as e:
        failure = f"rank {ctx.rank}: {type(e).__name__}: {e}"
        raise
    finally:
        failures = [f for f in ctx.all_gather_object(failure) if f is not None]
    if failures:
        raise PeerError(f"translate: {failures[0]}")


def _cyclegan(cfg: Config, channels: int, device: torch.device, guide: torch.nn.Module | None) -> CycleGAN:
    """The CycleGAN of ``cfg.cyclegan`` on ``device``, at runtime.precision / runtime.channels_last as for the
    classifier (fp16 is refused off CUDA); with ``guide`` (the frozen source net) CyCADA's semantic term is on."""
    model = build_cyclegan(cfg.cyclegan, channels, cfg.runtime.seed,
                           amp_dtype(cfg.runtime.precision, torch.device(device)), cfg.runtime.channels_last).to(device)
    if guide is not None:
        model.set_semantic_guide(model_range_classifier(guide, cfg.data, device))
    return model


def _train_stage(stage: Stage, cfg: Config, model: CycleGAN, source: ImageTensors, target: ImageTensors,
                 device: torch.device, progress: bool) -> tuple[list[dict], float]:
    """Begin the stage (stale output folders of a killed run cleared) and train or resume the CycleGAN."""
    stage.begin()
    for stale in stage.dir.glob(".output-*"):  # left by an earlier daaa killed while writing outputs
        shutil.rmtree(stale, ignore_errors=True)
    return _train(stage, cfg, model, source, target, device, progress)


def _translation_of(stage_dir: Path, kept: dict[str, torch.Tensor]) -> Translation:
    return Translation(kept["synthetic_target"], kept["synthetic_source"], {}, stage_dir, kept["round_trip_source"],
                       kept["round_trip_target"])


def _finish_stage(stage: Stage, source: ImageTensors, target: ImageTensors, kept: dict[str, torch.Tensor] | None,
                  model: CycleGAN, cfg: Config, history: list[dict], train_seconds: float,
                  translate_seconds: float) -> None:
    """The stage's outputs (:func:`_write_outputs`) and its record in stage.json."""
    keep = kept is not None
    tr = (_translation_of(stage.dir, kept) if keep
          else _png_translation(stage.dir, len(source), len(target), source.images.shape[1:],
                                target.images.shape[1:], cfg.data.num_workers))
    _write_outputs(stage.dir, source, target, tr, history,
                   model.translation_donors(len(source), len(target), cfg.runtime.seed), keep)
    seconds = {"train": train_seconds, "translate": translate_seconds}
    final = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    stage.finish({"n_synthetic_target": len(source), "n_synthetic_source": len(target), "steps": cfg.cyclegan.steps,
                  "seconds": seconds, "final_losses": final, "storage": "pt" if keep else "png",
                  "shapes": {"source": list(source.images.shape[1:]), "target": list(target.images.shape[1:])}})
    LOG.info("translate: %d + %d images translated in %.1f s (training %.1f s)", len(source), len(target),
             translate_seconds, train_seconds)


def _finished_outputs(stage_dir: Path) -> bool:
    """Whether a finished stage's sets are there: translated.pt, or (large sets) its PNG files."""
    return (stage_dir / "translated.pt").is_file() or (_stage_result(stage_dir).get("storage") == "png"
                                                       and (stage_dir / "manifest.json").is_file())


def _stage_result(stage_dir: Path) -> dict[str, Any]:
    rec = stage_dir / "stage.json"
    return read_json(rec).get("result", {}) if rec.is_file() else {}


def _png_set(folder: Path, n: int, shape: Sequence[int], workers: int) -> LazyImages:
    """The ``n`` images ``folder``/000000.png ... as a streamed set of uint8 ``shape`` (C, H, W) images."""
    paths = [str(folder / f"{i:06d}.png") for i in range(n)]
    return LazyImages(Domain(str(folder), paths, path_reader(paths)), int(shape[-1]), int(shape[0]), workers)


def _png_translation(stage_dir: Path, n_source: int, n_target: int, source_shape: Sequence[int],
                     target_shape: Sequence[int], workers: int) -> Translation:
    sets = {name: _png_set(stage_dir / name, n, shape, workers)
            for side, n, shape in (("source", n_source, source_shape), ("target", n_target, target_shape))
            for name in SETS[side]}
    return Translation(sets["synthetic_target"], sets["synthetic_source"], {}, stage_dir, sets["round_trip_source"],
                       sets["round_trip_target"])


def load_translation(stage_dir: Path, data_cfg: DataConfig | None = None, room: int | None = None,
                     progress: bool = False) -> Translation:
    """The result of a completed translate stage (``RUN/translate``): from translated.pt (small sets, and stages made
    before daaa streamed), else from its PNG files -- T_f and S_f decoded into memory when they fit ``room`` bytes
    (None: always), streamed otherwise; the round trips (read once, by the pairing-quality report) always streamed."""
    stage_dir = Path(stage_dir)
    path = stage_dir / "translated.pt"
    result = _stage_result(stage_dir)
    seconds = result.get("seconds", {})
    if path.is_file():
        d = load_torch_file(path, f"; delete {stage_dir} to redo the translation")
        return Translation(d["synthetic_target"], d["synthetic_source"], seconds, stage_dir,
                           d.get("round_trip_source"), d.get("round_trip_target"))
    if result.get("storage") != "png":
        raise DaaaError(f"{path} does not exist; run the translate stage first")
    tr = _png_translation(stage_dir, result["n_synthetic_target"], result["n_synthetic_source"],
                          result["shapes"]["source"], result["shapes"]["target"],
                          data_cfg.num_workers if data_cfg is not None else 0)
    tr.seconds = seconds
    if room is None or tr.synthetic_target.nbytes + tr.synthetic_source.nbytes <= room:
        tr.synthetic_target = materialize(tr.synthetic_target, progress, "decode T_f")
        tr.synthetic_source = materialize(tr.synthetic_source, progress, "decode S_f")
    return tr


# ---- user-provided translations (e.g. from PixelDA or another CycleGAN) --------------------------------------------

def _tail(p: PurePath, depth: int) -> str:
    """The last ``depth`` path components, the file's without its extension: 'cls/img' for depth 2."""
    parts = p.parts[:-1] + (p.stem,) if p.parts else ()
    return "/".join(parts[-depth:])


def _first(items: list[Any], n: int = 3) -> str:
    return ", ".join(str(x) for x in items[:n]) + (", ..." if len(items) > n else "")


def _manifest_entries(folder: Path, kind: str) -> tuple[Path, list[dict]] | None:
    """Entries of a manifest in our format, in ``folder`` or (our layout) its parent, with files inside ``folder``."""
    for cand in (folder / "manifest.json", folder.parent / "manifest.json"):
        if not cand.is_file():
            continue
        m = read_json(cand)
        entries = m.get(kind) if isinstance(m, dict) else None
        if isinstance(entries, list) and all(isinstance(e, dict) and "file" in e and "real_id" in e for e in entries):
            root = folder.resolve()
            inside = [e for e in entries if root in (cand.parent / e["file"]).resolve().parents]
            if inside:
                return cand.parent, inside
    return None


def _match_folder(folder: Path, real: ImageTensors, kind: str) -> list[Path]:
    """files[i] = the translated image of real image i; one-line DataError if the folder does not match one-to-one."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of {kind.replace('_', ' ')} images does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    mapping: dict[int, Path] = {}
    extra: list[str] = []
    problems: list[str] = []
    found = _manifest_entries(folder, kind)
    if found is not None:
        base, entries = found
        by_id = {rid: i for i, rid in enumerate(real.ids)}
        unknown = [e["real_id"] for e in entries if e["real_id"] not in by_id]
        for e in entries:
            if e["real_id"] in by_id:
                mapping[by_id[e["real_id"]]] = (base / e["file"]).resolve()
        listed = set(mapping.values())
        absent = [str(p) for p in listed if not p.is_file()]
        extra = [str(p.relative_to(folder)) for p in files if p.resolve() not in listed]
        how = "manifest.json"
        if unknown:
            problems.append(f"{len(unknown)} manifest ids are not {real.name} images (first: {_first(unknown)})")
        if absent:
            problems.append(f"{len(absent)} listed files are absent (first: {_first(sorted(absent))})")
    else:
        # match file stem to the real image's stem, adding parent folders until the real names are unique
        paths = [PurePath(r) for r in real.ids]
        max_depth = max(len(p.parts) for p in paths)
        depth = next((d for d in range(1, max_depth + 1) if len({_tail(p, d) for p in paths}) == len(paths)), None)
        if depth is None:
            raise DataError(f"{real.name}: image ids are not unique, so {folder} needs a manifest.json")
        key_to_real = {_tail(p, depth): i for i, p in enumerate(paths)}
        dup: list[str] = []
        for p in files:
            i = key_to_real.get(_tail(p.relative_to(folder), depth))
            if i is None:
                extra.append(str(p.relative_to(folder)))
            elif i in mapping:
                dup.append(str(p.relative_to(folder)))
            else:
                mapping[i] = p
        how = "file name" if depth == 1 else f"last {depth} path components"
        if dup:
            problems.append(f"{len(dup)} files duplicate another's name (first: {_first(dup)})")
    missing = [real.ids[i] for i in range(len(real)) if i not in mapping]
    if missing:
        problems.insert(0, f"{len(missing)} {real.name} images have no translated file (first: {_first(missing)})")
    if extra:
        problems.append(f"{len(extra)} files match no {real.name} image (first: {_first(extra)})")
    if problems:
        raise DataError(f"{folder}: {len(files)} files for {len(real)} {real.name} images, matched by {how}: "
                        + "; ".join(problems))
    return [mapping[i] for i in range(len(real))]


def load_translation_folders(tf_dir: str | Path, sf_dir: str | Path, source: ImageTensors, target: ImageTensors,
                             size: int, channels: int, data_cfg: DataConfig | None = None,
                             room: int | None = None) -> Translation:
    """Translations made elsewhere: ``tf_dir`` holds one synthetic-target image per source image, ``sf_dir`` one
    synthetic-source image per target image. Files are matched by a ``manifest.json`` in our format (in the folder
    or its parent) or else by file stem == the real image's file stem (ids are paths for folder domains). Images
    are converted to ``channels`` and resized to ``size`` x ``size`` like the real ones: decoded into memory when
    both sets fit ``room`` bytes (None: always), else streamed by ``data_cfg.num_workers`` workers.
    """
    domains = []
    for folder, real, kind in ((Path(tf_dir), source, "synthetic_target"), (Path(sf_dir), target, "synthetic_source")):
        paths = [str(p) for p in _match_folder(folder, real, kind)]
        domains.append(Domain(str(folder), paths, path_reader(paths)))
    if room is None or decoded_bytes(len(source) + len(target), channels, size) <= room:
        out: list[Images] = [load_tensors(d, size, channels).images for d in domains]
    else:
        out = [LazyImages(d, size, channels, data_cfg.num_workers if data_cfg is not None else 0) for d in domains]
    return Translation(out[0], out[1], {}, None)
