"""The whole method as stages of a run folder: data -> translate (Sec. 3.1) -> source network -> adapt (Eq. 12).

Each stage records its key (the config sections and input fingerprints that decide its result); a finished stage
with the same key is reused, an unfinished one resumes from its checkpoint. Commands in :mod:`daaa.cli` and the
experiments in :mod:`daaa.experiments` are compositions of these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import AdaptConfig, Config
from .data import resolve_domain
from .data.domain import ImageTensors, check_same_classes, fingerprint, load_tensors
from .distributed import Context, main_first
from .errors import DaaaError
from .models import build_model
from .runs import Stage, atomic_torch_save, update_metrics
from .trainers.adapt import DAAATrainer, DomainData
from .validation import SelectionProbe, split_source_validation

LOG = logging.getLogger("daaa")


@dataclass
class RunData:
    source: ImageTensors
    target_test: ImageTensors | None
    target: ImageTensors | None = None
    synthetic_target: torch.Tensor | None = None
    synthetic_source: torch.Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # labelled source images held out of training for label-free model selection (data.source_val_fraction)
    source_val: ImageTensors | None = None

    def domain_data(self) -> DomainData:
        return DomainData(self.source, self.target, self.synthetic_target, self.synthetic_source, self.target_test)


def load_data(cfg: Config, source: str, target: str | None, target_test: str | None,
              ctx: Context | None = None) -> RunData:
    """Resolve and decode the domains. Under torchrun rank 0 resolves first (a built-in may be downloaded into
    ``data.data_root``), then the others; every rank decodes its own copy."""
    t0 = time.perf_counter()
    specs = {"source": source, "target_test": target_test, "target": target}
    with main_first(ctx) if ctx is not None else contextlib.nullcontext():
        domains = {role: resolve_domain(spec, role, cfg.data) for role, spec in specs.items() if spec}
    if domains["source"].labels is None:
        raise DaaaError(f"--source {source}: the source domain needs labels (layout ROOT/<class>/<image>)")
    if "target_test" in domains:
        if domains["target_test"].labels is None:
            raise DaaaError(f"--target-test {target_test}: the target test set needs labels (layout ROOT/<class>/<image>)")
        check_same_classes(domains["source"], domains["target_test"])  # before decoding: fail fast
    d = cfg.data
    loaded = {role: load_tensors(dom, d.load_size, d.channels, d.skip_corrupt) for role, dom in domains.items()}
    src, test, tgt = loaded["source"], loaded.get("target_test"), loaded.get("target")
    src, val = split_source_validation(src, cfg.data.source_val_fraction)
    data = RunData(src, test, tgt, source_val=val)
    if val is not None:
        LOG.info("data: %d source images held out for model selection (data.source_val_fraction=%g)",
                 len(val), cfg.data.source_val_fraction)
    data.seconds["load_data"] = time.perf_counter() - t0
    LOG.info("data: source %s (%d images, %d classes), target %s, target-test %s", src.name, len(src),
             len(src.classes or []), f"{tgt.name} ({len(tgt)})" if tgt else "-", f"{test.name} ({len(test)})" if test else "-")
    return data


def _num_classes(data: RunData) -> int:
    return len(data.source.classes) if data.source.classes else int(data.source.labels.max()) + 1


def new_model(cfg: Config, data: RunData) -> nn.Module:
    torch.manual_seed(cfg.runtime.seed)  # the same initial weights whatever ran before in this process
    return build_model(cfg.model, _num_classes(data), cfg.data.channels, cfg.data.image_size)


def source_spec(cfg: Config) -> AdaptConfig:
    """Source-only training as a special case of Eq. 12: the S stream alone, no EM, no L_AT."""
    s = cfg.source
    return AdaptConfig(steps=s.steps, batch_size=s.batch_size, train_data="S", beta=0.0, optim=s.optim,
                       eval_interval=s.eval_interval, checkpoint_interval=s.checkpoint_interval,
                       init_from_source=False)


def selection_probe(cfg: Config, data: RunData, ctx: Context) -> SelectionProbe | None:
    """The label-free selection criteria recorded at each evaluation (daaa.validation); None without a
    source-validation split (data.source_val_fraction = 0), so other runs keep their stage keys and costs."""
    if data.source_val is None:
        return None
    probe = SelectionProbe(data.source_val, data.target, cfg.data, ctx, cfg.selection, data.source)
    return probe if probe.active else None


def _stage(run_dir: Path, name: str, key: dict[str, Any], overwrite: bool, ctx: Context) -> Stage:
    stage = Stage(run_dir, name, key)
    if overwrite:  # rank 0 removes the old stage, the others wait before they look at the folder
        if ctx.is_main and stage.dir.exists():
            import shutil
            shutil.rmtree(stage.dir)
        ctx.barrier()
    stage.check_compatible()
    return stage


def train_source(run_dir: Path, cfg: Config, data: RunData, ctx: Context, overwrite: bool = False) -> tuple[nn.Module, dict]:
    """Train the source network on S (the "CNN, S" row; the frozen guide of L_AT). Reused when already done."""
    key = {"source": dataclasses.asdict(cfg.source), "model": dataclasses.asdict(cfg.model),
           "data": _data_key(cfg), "seed": cfg.runtime.seed,
           "inputs": [fingerprint(data.source.images, data.source.labels)]}
    probe = selection_probe(cfg, data, ctx)
    if probe is not None:  # the criteria are part of the result
        key["selection"] = dataclasses.asdict(cfg.selection)
        key["inputs"].append(fingerprint(data.source_val.images, data.target.images if data.target else None))
    stage = _stage(run_dir, "source", key, overwrite, ctx)
    model = new_model(cfg, data)
    done = stage.done()
    if done is not None:
        model.load_state_dict(torch.load(stage.dir / "model.pt", map_location="cpu", weights_only=True))
        LOG.info("source: reusing the finished stage in %s", stage.dir)
        return model, done
    if ctx.is_main:
        stage.begin()
    t0 = time.perf_counter()
    trainer = DAAATrainer(source_spec(cfg), cfg.data, DomainData(data.source, target_test=data.target_test), ctx,
                          stage, model, None, cfg.runtime.seed, cfg.runtime.progress, desc="source",
                          probe=probe)
    result = trainer.fit()
    result["seconds"] = time.perf_counter() - t0
    if ctx.is_main:
        atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, stage.dir / "model.pt")
        if "target_test_accuracy" in result:  # before stage.json: a kill in between redoes both
            update_metrics(run_dir, {"source_only": {"target_test_accuracy": result["target_test_accuracy"],
                                                     "oracle_best_accuracy": result["oracle_best_accuracy"],
                                                     "target_test": result.get("target_test")},  # confusion.png
                                     "seconds": {"source": result["seconds"]}})
        stage.finish(_strip(result))
    ctx.barrier()
    return model, result


def translate(run_dir: Path, cfg: Config, data: RunData, ctx: Context, tf_dir: str | None = None,
              sf_dir: str | None = None) -> RunData:
    """Fill in T_f = G_ST(S) and S_f = G_TS(T): CycleGAN (trained and cached in RUN/translate), or user folders."""
    from .translate import load_translation, load_translation_folders, run_translation

    if data.target is None:
        raise DaaaError("translation needs a target domain (--target)")
    if tf_dir or sf_dir:
        if not (tf_dir and sf_dir):
            raise DaaaError("--synthetic-target and --synthetic-source must be given together")
        tr = load_translation_folders(tf_dir, sf_dir, data.source, data.target, cfg.data.load_size, cfg.data.channels)
    else:
        # CycleGAN is trained once, on rank 0 (its batch is small); the other ranks read its result
        with main_first(ctx):
            if ctx.is_main:
                tr = run_translation(run_dir, cfg, data.source, data.target, ctx.device, cfg.runtime.progress)
                update_metrics(run_dir, {"seconds": {"translate": sum(tr.seconds.values())}})
            else:
                tr = load_translation(run_dir / "translate")
    data.synthetic_target, data.synthetic_source = tr.synthetic_target, tr.synthetic_source
    return data


def adapt(run_dir: Path, cfg: Config, data: RunData, ctx: Context, source_model: nn.Module,
          stage_name: str = "adapt", spec: AdaptConfig | None = None, overwrite: bool = False,
          desc: str | None = None) -> tuple[nn.Module, dict]:
    """Train the target network with Eq. 12, starting from the fine-tuned source network. Reused when done."""
    spec = spec or cfg.adapt
    key = {"adapt": dataclasses.asdict(spec), "source": dataclasses.asdict(cfg.source),
           "model": dataclasses.asdict(cfg.model), "data": _data_key(cfg), "seed": cfg.runtime.seed,
           "inputs": [fingerprint(data.source.images, data.source.labels),
                      fingerprint(data.target.images if data.target else None),
                      fingerprint(data.synthetic_target, data.synthetic_source)]}
    probe = selection_probe(cfg, data, ctx)
    if probe is not None:  # the criteria are part of the result
        key["selection"] = dataclasses.asdict(cfg.selection)
        key["inputs"].append(fingerprint(data.source_val.images))
    stage = _stage(run_dir, stage_name, key, overwrite, ctx)
    model = new_model(cfg, data)
    if spec.init_from_source:
        model.load_state_dict(source_model.state_dict())
    done = stage.done()
    if done is not None:
        model.load_state_dict(torch.load(stage.dir / "model.pt", map_location="cpu", weights_only=True))
        LOG.info("%s: reusing the finished stage in %s", stage_name, stage.dir)
        return model, done
    if ctx.is_main:
        stage.begin()
    guide = None
    if data.synthetic_target is not None and data.synthetic_source is not None:
        guide = new_model(cfg, data)
        guide.load_state_dict(source_model.state_dict())
    t0 = time.perf_counter()
    trainer = DAAATrainer(spec, cfg.data, data.domain_data(), ctx, stage, model, guide, cfg.runtime.seed,
                          cfg.runtime.progress, desc=desc or stage_name, probe=probe)
    result = trainer.fit()
    result["seconds"] = time.perf_counter() - t0
    result["train_data"], result["beta"] = spec.train_data, spec.beta
    if ctx.is_main:
        atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, stage.dir / "model.pt")
        stage.finish(_strip(result))
    ctx.barrier()
    return model, result


def _data_key(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg.data)
    for k in ("data_root", "download"):  # where data came from does not change the result; its fingerprint does
        d.pop(k)
    if not d.get("source_val_fraction"):  # absent = 0: run folders made before the option existed stay valid
        d.pop("source_val_fraction", None)
    return d


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    """Stage records keep scalars and curves; the confusion matrix lives in metrics.json only."""
    return {k: v for k, v in result.items() if k != "target_test"}
