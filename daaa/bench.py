"""`daaa bench`: throughput and peak memory of every stage, on synthetic data of a preset's shape.

Measured, each with the real code path of a run:

* ``source_only``: one :class:`~daaa.trainers.adapt.DAAATrainer` step with the source spec
  (:func:`daaa.pipeline.source_spec`), on a batch of ``adapt.batch_size`` images -- the same size as the mixed batch;
* ``daaa``: one DAAA step (Eq. 12: L_CE + L_EM + beta * L_AT) on a mixed S | T_f | T | S_f batch, after an M_post
  sync so that EM is active;
* ``cyclegan``: one CycleGAN training step (``cyclegan.batch_size`` source + as many target images);
* ``translate``: G_ST over one batch of ``cyclegan.translate_batch_size`` images, no gradients;
* ``evaluate``: :func:`daaa.evaluate.evaluate` over a test set of ``data.demo_target_test`` images;
* ``data_loading``: the streaming loader (:func:`daaa.data.streaming.scan` of a
  :class:`~daaa.data.streaming.LazyImages`, ``data.num_workers`` DataLoader workers, batches of ``adapt.batch_size``,
  worker start-up included) over a folder of ``data.demo_target_test`` JPEG files of ``data.load_size`` px that the
  bench writes to a temporary folder: compare its images/s with the ``daaa`` stage's to see whether the loader keeps
  up with the trainer on streamed data.

Data are random uint8 images (no loading, but for ``data_loading``), networks start from random weights. After warm-up, the stages are
timed in interleaved blocks (stage 1, 2, ..., 6, then again), so that a slow spell of a shared machine hits every
stage alike; the reported rate is the median block's. ``ratios.daaa_over_source_only`` is the median over repeats
of (seconds per image of the DAAA step) / (seconds per image of the source-only step) from the same repeat.

Peak memory is the growth of the process's resident set during a stage's blocks (Linux: the high-water mark is
reset before each block through /proc/self/clear_refs; elsewhere ru_maxrss growth, a lower bound) on CPU, and
``torch.cuda.max_memory_allocated`` above the allocation at the block's start on CUDA.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Config
from .data.domain import DomainData, ImageTensors
from .data.streaming import release_freed_memory
from .distributed import Context, native_bf16_cpu
from .runs import Stage, atomic_write_json
from .trainers.adapt import DAAATrainer

STAGES = ("source_only", "daaa", "cyclegan", "translate", "evaluate", "data_loading")
NEVER = 10 ** 9  # eval / checkpoint interval beyond any bench


# ---------------------------------------------------------------------------------------------- set-up
def synthetic_data(cfg: Config, seed: int = 0) -> DomainData:
    """Random uint8 images of the preset's stored shape, sizes of its demo pair: S (labelled), T, T_f, S_f and a
    labelled target test set."""
    g = torch.Generator().manual_seed(seed)
    c, s, d = cfg.data.channels, cfg.data.load_size, cfg.data
    k = 10
    classes = [str(i) for i in range(k)]

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)

    def domain(name: str, n: int, labelled: bool) -> ImageTensors:
        labels = torch.randint(0, k, (n,), generator=g) if labelled else None
        return ImageTensors(name, images(n), labels, [f"{name}[{i}]" for i in range(n)], classes)

    source = domain("bench-source", d.demo_source, True)
    target = domain("bench-target", d.demo_target_train, False)
    test = domain("bench-target-test", d.demo_target_test, True)
    return DomainData(source, target, images(len(source)), images(len(target)), test)


def _bench_model(cfg: Config, data: DomainData) -> torch.nn.Module:
    from .models import build_model

    torch.manual_seed(cfg.runtime.seed)
    return build_model(cfg.model, data.num_classes, cfg.data.channels, cfg.data.image_size)


def daaa_trainer(cfg: Config, data: DomainData, ctx: Context, folder: Path, name: str = "bench-daaa",
                 source_only: bool = False) -> DAAATrainer:
    """A real DAAATrainer on a Stage in ``folder``: Eq. 12 with ``cfg.adapt`` (target net initialised from the frozen
    source net, as in the pipeline) or, with ``source_only``, the source spec on a batch of ``adapt.batch_size``."""
    from .pipeline import source_spec

    if source_only:
        spec = dataclasses.replace(source_spec(cfg), batch_size=cfg.adapt.batch_size)
    else:
        spec = cfg.adapt
    spec = dataclasses.replace(spec, steps=NEVER, eval_interval=NEVER, checkpoint_interval=NEVER)
    stage = Stage(folder, name, {})
    net = _bench_model(cfg, data)
    if source_only:
        return DAAATrainer(spec, cfg.data, DomainData(data.source, target_test=data.target_test), ctx, stage, net,
                           None, cfg.runtime.seed, progress=False, desc=name)
    guide = copy.deepcopy(net)
    return DAAATrainer(spec, cfg.data, data, ctx, stage, net, guide, cfg.runtime.seed, progress=False, desc=name)


# ---------------------------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory growth (bytes) over a block of work: CUDA allocator peak, or the resident set's high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM reset via /proc/self/clear_refs"
        except OSError:
            return "ru_maxrss growth (lower bound)"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            gc.collect()
            release_freed_memory()  # freed heap pages back to the system: the block's allocations show again
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = self._status("VmRSS")
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.method.startswith("VmHWM"):
            return max(0, self._status("VmHWM") - self._base)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return max(0, peak - self._base)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu_model": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "cpu_bf16": native_bf16_cpu()}  # bf16 in hardware: runtime.precision=bf16 pays
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclasses.dataclass
class _Bench:
    name: str
    run: Callable[[], int]  # one unit of work; returns the images it processed
    units: int  # units per timed block


def _stages(cfg: Config, ctx: Context, folder: Path, stages: tuple[str, ...]) -> list[_Bench]:
    from .style_gst import build_cyclegan
    from .evaluate import evaluate
    from .translate import batch_indices, step_generator, to_model_range, translate_batch

    data = synthetic_data(cfg, cfg.runtime.seed)
    out: list[_Bench] = []

    def trainer_bench(name: str, trainer: DAAATrainer, fn: Callable[[DAAATrainer, int], Any], first: int) -> _Bench:
        counter = [first]

        def run() -> int:
            fn(trainer, counter[0])
            counter[0] += 1
            return trainer.global_batch
        return _Bench(name, run, 1)

    # the DAAA steps start at the first M_post sync: EM is active (p_t < 1) in every timed step
    first_sync = cfg.adapt.sync_interval
    if "source_only" in stages:
        out.append(trainer_bench("source_only", daaa_trainer(cfg, data, ctx, folder, "bench-source", True),
                                 DAAATrainer.step, 0))
    if "daaa" in stages:
        out.append(trainer_bench("daaa", daaa_trainer(cfg, data, ctx, folder), DAAATrainer.step, first_sync))
    cg = None
    if "cyclegan" in stages or "translate" in stages:
        cg = build_cyclegan(cfg.cyclegan, cfg.data.channels, cfg.runtime.seed).to(ctx.device)
    if "cyclegan" in stages:
        c, count = cfg.cyclegan, [0]

        def cyclegan_step() -> int:
            gen = step_generator(cfg.runtime.seed, count[0])
            i_s = batch_indices(len(data.source), c.batch_size, gen)
            i_t = batch_indices(len(data.target), c.batch_size, gen)
            cg.training_step(to_model_range(data.source.images[i_s], c.image_size, ctx.device),
                             to_model_range(data.target.images[i_t], c.image_size, ctx.device))
            count[0] += 1
            return 2 * c.batch_size
        out.append(_Bench("cyclegan", cyclegan_step, 1))
    if "translate" in stages:
        batch = data.source.images[: cfg.cyclegan.translate_batch_size]
        donor_idx = cg.translation_donors(len(batch), len(data.target), cfg.runtime.seed)
        donors = None if donor_idx is None else data.target.images[donor_idx]

        def translate() -> int:
            translate_batch(cg.translate_st, batch, cfg.cyclegan.image_size, ctx.device, donors)
            return len(batch)
        out.append(_Bench("translate", translate, 1))
    if "evaluate" in stages:
        net = _bench_model(cfg, data).to(ctx.device)
        if ctx.channels_last:
            net = net.to(memory_format=torch.channels_last)

        def evaluation() -> int:
            evaluate(net, data.target_test, cfg.data, ctx)
            return len(data.target_test)
        out.append(_Bench("evaluate", evaluation, 1))
    if "data_loading" in stages:
        out.append(_loader_bench(cfg, folder / "images"))
    return out


def image_folder_of(cfg: Config, folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG files of ``data.load_size`` px and ``data.channels`` in ``folder`` (smooth random colours: files
    of a photo's size, not of incompressible noise)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    c, size = cfg.data.channels, cfg.data.load_size
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, c), dtype=np.uint8)
        img = Image.fromarray(small[:, :, 0] if c == 1 else small).resize((size, size), Image.BILINEAR)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def _loader_bench(cfg: Config, folder: Path) -> _Bench:
    """One unit: a whole scan of a folder of ``data.demo_target_test`` images by the streaming loader."""
    from .data.folders import flat_folder
    from .data.streaming import LazyImages, scan

    images = LazyImages(flat_folder(image_folder_of(cfg, folder, cfg.data.demo_target_test)), cfg.data.load_size,
                        cfg.data.channels, cfg.data.num_workers)

    def load() -> int:
        for _ in scan(images, cfg.adapt.batch_size):
            pass
        return len(images)
    return _Bench("data_loading", load, 1)


def run_bench(cfg: Config, ctx: Context, steps: int = 10, repeats: int = 5, warmup: int = 3,
              stages: tuple[str, ...] = STAGES, progress: bool = True) -> dict[str, Any]:
    """Time ``stages`` in ``repeats`` interleaved rounds of ``steps`` units each (after ``warmup`` units)."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown bench stage(s) {sorted(unknown)} (known: {', '.join(STAGES)})")
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
    mem = PeakMemory(ctx.device)
    with tempfile.TemporaryDirectory(prefix="daaa-bench-") as tmp:
        benches = _stages(cfg, ctx, Path(tmp), stages)
        for b in benches:
            for _ in range(warmup):
                b.run()
        sync()
        per_image: dict[str, list[float]] = {b.name: [] for b in benches}
        peak: dict[str, int] = {b.name: 0 for b in benches}
        for r in range(repeats):
            for b in benches:
                mem.start()
                n_img = 0
                t0 = time.perf_counter()
                for _ in range(steps * b.units):
                    n_img += b.run()
                sync()
                dt = time.perf_counter() - t0
                peak[b.name] = max(peak[b.name], mem.stop())
                per_image[b.name].append(dt / n_img)
            if progress:
                print(f"bench: round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    ips = {k: 1.0 / statistics.median(v) for k, v in per_image.items()}
    ratios = {}
    for num, den in (("daaa", "source_only"),):
        if num in per_image and den in per_image:
            ratios[f"{num}_over_{den}"] = statistics.median(a / b for a, b in zip(per_image[num], per_image[den]))
    return {
        "preset": cfg.preset,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(ctx.device),
        "settings": {"steps": steps, "repeats": repeats, "warmup": warmup, "adapt_batch_size": cfg.adapt.batch_size,
                     "cyclegan_batch_size": cfg.cyclegan.batch_size,
                     "translate_batch_size": cfg.cyclegan.translate_batch_size,
                     "evaluate_images": cfg.data.demo_target_test, "model": dataclasses.asdict(cfg.model),
                     "num_workers": cfg.data.num_workers, "load_size": cfg.data.load_size,
                     "image_size": cfg.data.image_size, "channels_last": ctx.channels_last,
                     "precision": cfg.runtime.precision},
        "images_per_second": ips,
        "seconds_per_image_all": per_image,
        "peak_memory_mib": {k: v / 2 ** 20 for k, v in peak.items()},
        "memory_method": mem.method,
        "ratios": ratios,
    }


UNITS = {"source_only": "S images, source-only step", "daaa": "mixed-batch images, DAAA step (Eq. 12)",
"cyclegan": "S+T images, CycleGAN step",
         "translate": "images through G_ST, no grad", "evaluate": "test images, evaluate()",
         "data_loading": "image files decoded by the streaming loader (data.num_workers workers)"}


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"daaa bench: preset {result['preset']}, {m['device']}, {m['cpu_model']} ({m['cpu_cores']} cores, "
             f"{m['torch_threads']} threads{', bf16 in hardware' if m.get('cpu_bf16') else ''}), "
             f"torch {m['torch_version']}, {result['date']}",
             f"{'stage':<12} {'images/s':>10} {'ms/image':>9} {'peak MiB':>9}  what"]
    for k, v in result["images_per_second"].items():
        lines.append(f"{k:<12} {v:>10.1f} {1000 / v:>9.3f} {result['peak_memory_mib'][k]:>9.1f}  {UNITS[k]}")
    for k, v in result["ratios"].items():
        lines.append(f"ratio {k} (cost per image): {v:.3f}")
    return "\n".join(lines)


def main(cfg: Config, ctx: Context, steps: int, repeats: int, warmup: int, json_path: str | None,
         stages: tuple[str, ...] = STAGES, progress: bool = True) -> dict[str, Any]:
    result = run_bench(cfg, ctx, steps, repeats, warmup, stages, progress)
    print(format_table(result))
    if json_path:
        atomic_write_json(json_path, result)
    return result
