"""The data-pairing stage (paper Sec. 3.1): train a CycleGAN (Eq. 1-3) on unpaired S and T, then pair every real
image with its translation -- T_f[i] = G_ST(S[i]) carries source label i, S_f[j] = G_TS(T[j]).

Files in ``RUN/translate/`` (see :mod:`daaa.runs` for key.json, checkpoint.pt, stage.json)::

    synthetic_target/000017.png   T_f[17] = G_ST(S[17]), at the source images' stored size
    synthetic_source/000004.png   S_f[4]  = G_TS(T[4]),  at the target images' stored size
    manifest.json                 per synthetic image: file, real counterpart's id and index, (T_f) label and,
                                  with a style-conditioned G_ST, the id of the target image whose layout it took
    translated.pt                 {"synthetic_target": uint8 (N,C,H,W), "synthetic_source": uint8 (M,C,H,W)}
    pairs.png, losses.png         Fig. 3-style pairs; loss curves
    history.jsonl, tb/            losses every ``cyclegan.log_interval`` steps (averaged over the interval)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import Config
from .cyclegan import CycleGAN, check_image_size
from .data.domain import ImageTensors, check_image_size as check_decoded_size, fingerprint, to_pil_mode
from .distributed import amp_dtype
from .errors import DaaaError, DataError
from .figures import plot_curves, plot_pairs
from .runs import Stage, atomic_write_text, load_torch_file, read_json
from .style_gst import build_cyclegan
from .trainers.loop import guard_finite_state

LOG = logging.getLogger("daaa")

MANIFEST_FORMAT = "daaa-translation/1"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# written into a temporary folder, then renamed into the stage folder; stage.json (written after) marks completion
OUTPUTS = ("synthetic_target", "synthetic_source", "manifest.json", "translated.pt", "pairs.png", "losses.png")
# cyclegan options that do not change the result: changing them must not invalidate a run folder
BOOKKEEPING = ("translate_batch_size", "checkpoint_interval", "log_interval")
LOSS_KEYS = ("g_st", "g_ts", "d_t", "d_s", "cycle", "identity")


@dataclass
class Translation:
    """Synthetic images aligned index-by-index with the real ones, uint8 (N, C, H, W) like ``ImageTensors.images``.

    ``synthetic_target[i] = G_ST(source.images[i])`` (label ``source.labels[i]``);
    ``synthetic_source[j] = G_TS(target.images[j])``. ``stage_dir`` is None for user-provided folders.
    """

    synthetic_target: torch.Tensor
    synthetic_source: torch.Tensor
    seconds: dict = field(default_factory=dict)
    stage_dir: Path | None = None


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


def stage_key(cfg: Config, source: ImageTensors, target: ImageTensors) -> dict[str, Any]:
    """What decides the translation: CycleGAN options, image shaping, seed and the exact input images (+ labels)."""
    cg = {k: v for k, v in asdict(cfg.cyclegan).items() if k not in BOOKKEEPING}
    return {
        "cyclegan": cg,
        "data": {"channels": cfg.data.channels, "load_size": cfg.data.load_size},
        "seed": cfg.runtime.seed,
        "inputs": {"source": fingerprint(source.images, source.labels), "target": fingerprint(target.images),
                   "n_source": len(source), "n_target": len(target), "classes": source.classes},
    }


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
    size, seed = c.image_size, cfg.runtime.seed
    t0 = time.perf_counter()
    try:
        with hist_path.open("a") as hf:
            while model.step < c.steps:
                gen = step_generator(seed, model.step)
                i_s = batch_indices(len(source), c.batch_size, gen)
                i_t = batch_indices(len(target), c.batch_size, gen)
                losses = model.training_step(to_model_range(source.images[i_s], size, device),
                                             to_model_range(target.images[i_t], size, device))
                bar.update(1)
                for k, v in losses.items():
                    acc[k] = acc.get(k, 0.0) + v
                acc_n += 1
                step = model.step
                if (c.log_interval > 0 and step % c.log_interval == 0) or step == c.steps:
                    entry = {"step": step, **{k: v / acc_n for k, v in acc.items()}}
                    history.append(entry)
                    hf.write(json.dumps(entry) + "\n")
                    hf.flush()
                    if writer is not None:
                        for k, v in entry.items():
                            if k != "step":
                                writer.add_scalar(f"cyclegan/{k}", v, step)
                    bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("g_total", "d", "cycle")}, refresh=False)
                    acc, acc_n = {}, 0
                if (c.checkpoint_interval > 0 and step % c.checkpoint_interval == 0) or step == c.steps:
                    state = model.training_state()
                    guard_finite_state(step, {"cyclegan": state["nets"]}, stage)
                    stage.save_checkpoint({"model": state, "history": history, "acc": acc,
                                           "acc_n": acc_n, "seconds": prior_seconds + time.perf_counter() - t0})
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return history, prior_seconds + time.perf_counter() - t0


def translate_all(fn: Any, images: torch.Tensor, size: int, batch_size: int,
                  device: torch.device, donors: torch.Tensor | None = None) -> torch.Tensor:
    """``fn`` over uint8 ``images`` in batches, back to uint8 at their stored size; ``donors`` (uint8 real target
    images aligned with ``images``, for a style-conditioned G_ST, see :mod:`daaa.style_gst`) go along as its
    second argument when given."""
    out = torch.empty_like(images)
    for a in range(0, len(images), batch_size):
        x = to_model_range(images[a:a + batch_size], size, device)
        y = fn(x) if donors is None else fn(x, to_model_range(donors[a:a + batch_size], size, device))
        out[a:a + batch_size] = to_uint8(y, tuple(images.shape[-2:]))
    return out


def _save_png(img: torch.Tensor, path: Path) -> None:
    arr = img.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path, compress_level=1)


def _write_outputs(out_dir: Path, source: ImageTensors, target: ImageTensors, fake_t: torch.Tensor,
                   fake_s: torch.Tensor, history: list[dict], style_idx: torch.Tensor | None = None) -> None:
    """Everything of OUTPUTS into ``out_dir`` (a temporary folder)."""
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "source": source.name, "target": target.name,
                                "classes": source.classes, "synthetic_target": [], "synthetic_source": []}
    for kind, fakes, real in (("synthetic_target", fake_t, source), ("synthetic_source", fake_s, target)):
        (out_dir / kind).mkdir()
        for i in range(len(fakes)):
            name = f"{kind}/{i:06d}.png"
            _save_png(fakes[i], out_dir / name)
            entry: dict[str, Any] = {"file": name, "real_id": real.ids[i], "real_index": i}
            if kind == "synthetic_target" and style_idx is not None:  # whose colour layout G_ST was given
                entry["style_target_id"] = target.ids[int(style_idx[i])]
            if kind == "synthetic_target" and source.labels is not None:
                label = int(source.labels[i])
                entry["label"] = label
                entry["class"] = source.classes[label] if source.classes else str(label)
            manifest[kind].append(entry)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    torch.save({"synthetic_target": fake_t, "synthetic_source": fake_s}, out_dir / "translated.pt")
    # Fig. 3: eight examples spread over each domain
    i_s = torch.linspace(0, len(source) - 1, min(8, len(source))).round().long().unique()
    i_t = torch.linspace(0, len(target) - 1, min(8, len(target))).round().long().unique()
    plot_pairs(source.images[i_s], fake_t[i_s], target.images[i_t], fake_s[i_t], out_dir / "pairs.png")
    plot_curves(history, LOSS_KEYS, out_dir / "losses.png", "CycleGAN losses (Eq. 1-3)")


def _move_into_place(tmp: Path, stage_dir: Path) -> None:
    for name in OUTPUTS:
        dest = stage_dir / name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(tmp / name, dest)


def run_translation(run_dir: Path, cfg: Config, source: ImageTensors, target: ImageTensors,
                    device: torch.device, progress: bool = True) -> Translation:
    """Stage 1 (Sec. 3.1): train the CycleGAN of Eq. 3 on unpaired S/T and translate every image both ways.

    A completed stage with the same key (options, seed, input fingerprint) is reused without training; a stage
    folder made with another key raises DaaaError (the caller clears ``RUN/translate`` to overwrite); an
    interrupted run resumes from ``RUN/translate/checkpoint.pt``.
    """
    c = cfg.cyclegan
    check_image_size(c.image_size, c.n_downsampling, c.n_layers_d)
    if source.images.dtype != torch.uint8 or target.images.dtype != torch.uint8:
        raise DataError("translate: expected uint8 images")
    channels = source.images.shape[1]
    if target.images.shape[1] != channels:
        raise DataError(f"translate: {source.name} has {channels} channel(s) but {target.name} has "
                        f"{target.images.shape[1]}")
    stage = Stage(run_dir, "translate", stage_key(cfg, source, target))
    stage.check_compatible()
    if stage.done() is not None and (stage.dir / "translated.pt").exists():
        LOG.info("translate: reusing the completed stage in %s", stage.dir)
        return load_translation(stage.dir)
    stage.begin()
    for stale in stage.dir.glob(".output-*"):  # left by a run killed while writing outputs
        shutil.rmtree(stale, ignore_errors=True)

    # runtime.precision / runtime.channels_last as for the classifier (fp16 is refused off CUDA)
    model = build_cyclegan(c, channels, cfg.runtime.seed, amp_dtype(cfg.runtime.precision, torch.device(device)),
                           cfg.runtime.channels_last).to(device)
    history, train_seconds = _train(stage, cfg, model, source, target, device, progress)

    t0 = time.perf_counter()
    # None for the paper's G_ST; for the style extension, whose colour layout each translation takes
    style_idx = model.translation_donors(len(source), len(target), cfg.runtime.seed)
    fake_t = translate_all(model.translate_st, source.images, c.image_size, c.translate_batch_size, device,
                           None if style_idx is None else target.images[style_idx])
    fake_s = translate_all(model.translate_ts, target.images, c.image_size, c.translate_batch_size, device)
    tmp = Path(tempfile.mkdtemp(dir=stage.dir, prefix=".output-"))
    try:
        _write_outputs(tmp, source, target, fake_t, fake_s, history, style_idx)
        _move_into_place(tmp, stage.dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = {"train": train_seconds, "translate": time.perf_counter() - t0}
    final = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    stage.finish({"n_synthetic_target": len(fake_t), "n_synthetic_source": len(fake_s), "steps": c.steps,
                  "seconds": seconds, "final_losses": final})
    LOG.info("translate: %d + %d images translated in %.1f s (training %.1f s)", len(fake_t), len(fake_s),
             seconds["translate"], seconds["train"])
    return Translation(fake_t, fake_s, seconds, stage.dir)


def load_translation(stage_dir: Path) -> Translation:
    """The result of a completed translate stage (``RUN/translate``), from translated.pt."""
    stage_dir = Path(stage_dir)
    path = stage_dir / "translated.pt"
    if not path.is_file():
        raise DaaaError(f"{path} does not exist; run the translate stage first")
    d = load_torch_file(path, f"; delete {stage_dir} to redo the translation")
    rec = stage_dir / "stage.json"
    seconds = read_json(rec).get("result", {}).get("seconds", {}) if rec.is_file() else {}
    return Translation(d["synthetic_target"], d["synthetic_source"], seconds, stage_dir)


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


def _read_image(path: Path, size: int, channels: int) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            img.load()
            img = to_pil_mode(img, channels)
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__})") from None
    check_decoded_size(img, size, str(path))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.reshape(size, size, channels).copy()).permute(2, 0, 1)


def load_translation_folders(tf_dir: str | Path, sf_dir: str | Path, source: ImageTensors, target: ImageTensors,
                             size: int, channels: int) -> Translation:
    """Translations made elsewhere: ``tf_dir`` holds one synthetic-target image per source image, ``sf_dir`` one
    synthetic-source image per target image. Files are matched by a ``manifest.json`` in our format (in the folder
    or its parent) or else by file stem == the real image's file stem (ids are paths for folder domains). Images
    are converted to ``channels`` and resized to ``size`` x ``size`` like the real ones.
    """
    out = []
    for folder, real, kind in ((Path(tf_dir), source, "synthetic_target"), (Path(sf_dir), target, "synthetic_source")):
        files = _match_folder(folder, real, kind)
        imgs = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
        for i, p in enumerate(files):
            imgs[i] = _read_image(p, size, channels)
        out.append(imgs)
    return Translation(out[0], out[1], {}, None)
