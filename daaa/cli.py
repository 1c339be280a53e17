"""The `daaa` command line. The commands that train or measure take --preset NAME and --set key=value overrides of the
typed config; those that read a run folder (evaluate, predict, export, report) use the config it holds.

Errors in input (paths, data, options) end with exit status 2 and one line on stderr; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import DaaaError, Interrupted, NonFiniteLossError, PeerError

LOG = logging.getLogger("daaa")


def _common(p: argparse.ArgumentParser, preset: str = "digits") -> None:
    # None when not given: `_start` warns when a CPU run falls back to the GPU-sized default
    p.add_argument("--preset", help=f"configuration preset name or YAML file (default: {preset})")
    p.set_defaults(default_preset=preset)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set adapt.beta=0.5 (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _domains(p: argparse.ArgumentParser, target: bool = True) -> None:
    p.add_argument("--source", required=True, help="labelled source: folder ROOT/<class>/<image>, an image list "
                   "('<path> <label>' lines) or a built-in (demo, mnist, mnistm, office31:amazon, officehome:Art, "
                   "visda2017:train, domainnet:clipart[:train], sklearn-digits)")
    if target:
        p.add_argument("--target", required=True, help="unlabelled target training images: folder (flat or by class; "
                       "labels are ignored), image list or a built-in (e.g. visda2017:validation)")
    p.add_argument("--target-test", help="labelled target test set for evaluation (folder, image list or built-in, "
                   "e.g. domainnet:sketch:test)")


def _out(p: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    p.add_argument("--out", required=required, default=default, help="run folder (created; re-running resumes)")
    p.add_argument("--overwrite", action="store_true", help="discard stages made by another config in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daaa", description="Deep Adversarial Attention Alignment for UDA "
                                     "(Kang et al., ECCV 2018)")
    parser.add_argument("--version", action="version", version=f"daaa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_pipeline_commands, _inspection_commands, _reproduce_command, _tool_commands):
        add(sub)
    return parser


def _pipeline_commands(sub) -> None:
    """The stages of a run and their compositions: train-source, translate, adapt, run, demo."""
    p = sub.add_parser("train-source", help="train the source network (source-only baseline)")
    _domains(p, target=False)
    _out(p)
    _common(p)

    p = sub.add_parser("translate", help="train CycleGAN and write T_f = G_ST(S), S_f = G_TS(T) (Sec. 3.1)")
    _domains(p)
    _out(p)
    _common(p)

    for name, text in (("adapt", "only the adapt stage (Eq. 12), on the translation and source network already in --out"),
                       ("run", "the whole pipeline: translate, source network, adapt, evaluate")):
        p = sub.add_parser(name, help=text)
        _domains(p)
        _out(p)
        p.add_argument("--synthetic-target", help="folder of your own translated source images (T_f) instead of CycleGAN")
        p.add_argument("--synthetic-source", help="folder of your own translated target images (S_f)")
        _common(p)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded demo pair (no download, no argument)")
    _out(p, required=False, default="runs/demo")
    _common(p, preset="digits-cpu")


def _inspection_commands(sub) -> None:
    """Looking at and using finished runs: evaluate, predict, export, report."""
    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a trained network")
    p.add_argument("--run", required=True, help="run folder")
    _stage_option(p)
    p.add_argument("--target-test", required=True, help="labelled test set (folder, image list or built-in)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="class predictions of a trained network for new (unlabelled) images, as CSV")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--images", required=True, help="a folder of images (flat or by class), an image list "
                   "('<path> [label]' lines) or one image file")
    _stage_option(p)
    p.add_argument("--top-k", type=int, default=1, help="also the next K-1 classes and probabilities (default 1)")
    p.add_argument("--out", required=True, help="CSV file: path, class, probability[, class_2, probability_2, ...]")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("export", help="a trained network with its preprocessing as TorchScript or ONNX (uint8 images "
                       "in, class probabilities out), checked against PyTorch after writing")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--format", required=True, choices=["torchscript", "onnx"], help="onnx needs daaa[onnx]")
    p.add_argument("--out", required=True, help="file to write (e.g. model.pt or model.onnx)")
    _stage_option(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("report", help="one Markdown or HTML report of run folders: config, accuracies, seconds, "
                       "figures, reproduce tables")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (of daaa run / demo / reproduce)")
    p.add_argument("--out", help="FILE.md (relative image links) or FILE.html (self-contained); default: "
                   "RUN/report.md for one run, ./report.md for several")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _stage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", default="adapt", help="which network: adapt (default), source, selected (the snapshot "
                   "label-free selection picked in adapt), or a table row folder such as rows/ours")


def _tool_commands(sub) -> None:
    """Data utilities and the benchmark."""
    p = sub.add_parser("data", help="data utilities: build MNIST-M, export the demo pair as folders")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("make-mnistm", help="build MNIST-M (public layout) from MNIST and a folder of photos")
    q.add_argument("--out", required=True, help="data root; MNIST-M is written to OUT/mnist_m")
    q.add_argument("--backgrounds", help="folder of photos (e.g. BSDS500); default: photos shipped by installed packages")
    q.add_argument("--mnist-root", help="where MNIST's IDX files are (default: the data root)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--debug", action="store_true")
    q = dsub.add_parser("export-demo", help="write the embedded demo pair as image folders")
    q.add_argument("--out", required=True)
    q.add_argument("--debug", action="store_true")

    p = sub.add_parser("bench", help="images/s and peak memory of every stage on synthetic data of a preset's shape")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's runtime.device")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--steps", type=int, default=10, help="timed steps (units) per stage in each round (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (default 5); medians are reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per stage first (default 3)")
    p.add_argument("--stages", help="comma-separated subset of source_only,daaa,cyclegan,translate,evaluate,data_loading")
    _common(p, preset="digits-cpu")


def _reproduce_command(sub) -> None:
    p = sub.add_parser("reproduce", help="every row of one of the paper's tables (or Fig. A1's sweeps) over seeds, "
                       "baselines and label-free model selection included; writes OUT/results.{md,csv,json}")
    p.add_argument("experiment", choices=["table1", "table2", "table3", "table4", "tableA1", "figA1"],
                   help="table1: MNIST->MNIST-M; table2: Office-31 six tasks; table3: EM variants; table4: attention "
                   "discrepancies; tableA1: attention kinds; figA1: p_t and beta sweeps on D->A")
    p.add_argument("--out", required=True, help="where results.md, results.csv, results.json and log.txt go")
    p.add_argument("--seeds", type=int, default=1, help="runs per row with seeds runtime.seed + 0..K-1 (default 1)")
    p.add_argument("--tasks", help="comma-separated subset or other tasks, e.g. A-W,D-A (default: the paper's)")
    p.add_argument("--rows", help="comma-separated row keys (default: every row of the table; DAN can be added)")
    p.add_argument("--runs", help="folder of the per-task run folders (default: --out); give several experiments "
                   "the same one to share translations, source networks and identical rows")
    p.add_argument("--digits-data", choices=["auto", "mnist", "demo"], default="auto",
                   help="MNIST->MNIST-M data: built-in MNIST/MNIST-M when present under data.data_root (auto, no "
                   "download), else the embedded demo pair")
    p.add_argument("--pt-values", help="figA1: comma-separated p_t values (default 0.5,0.7,0.8,0.9,0.95,0.99)")
    p.add_argument("--beta-values", help="figA1: comma-separated beta values (default 0,0.1,0.3,1,3,10)")
    p.add_argument("--beta-grid", help="comma-separated betas: each L_AT row's beta is chosen per task and seed by the "
                   "primary label-free criterion (default 0.3,1,3 for table2/3/4/tableA1, whose beta the paper chose "
                   "by validation; none for table1); --set adapt.beta=X fixes beta instead")
    p.add_argument("--overwrite", action="store_true", help="discard stages made by another config")
    p.add_argument("--preset", help="configuration preset or YAML file (default: digits for table1, office31 "
                   "otherwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable); data.source_val_fraction is 0.1 unless set")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace):
    from .config import load_config
    from .models import check_arch

    cfg = load_config(args.preset or args.default_preset, args.overrides)
    check_arch(cfg.model.arch)  # an unknown network is refused before any data is read
    if getattr(args, "quiet", False):
        cfg.runtime.progress = False
    return cfg


def _start(args: argparse.Namespace, cfg) -> tuple[Path, Any]:
    """Set up the process (torchrun-aware), the run folder, its log and resolved config."""
    from . import distributed
    from .runs import prepare_run_dir, save_config, setup_logging

    ctx = distributed.setup(cfg.runtime)
    run_dir = Path(args.out).expanduser()
    with distributed.main_first(ctx):  # only rank 0 writes; if it cannot, the others stop too
        if ctx.is_main:
            run_dir = prepare_run_dir(run_dir)
            _hold_lock(args, run_dir)
            save_config(run_dir, cfg.to_dict())
    if not ctx.is_main:
        _check_shared(run_dir / "config.yaml")
    setup_logging(run_dir if ctx.is_main else None, verbose=ctx.is_main)
    if ctx.is_main:
        LOG.info("daaa %s: %s in %s (preset %s, seed %d, %s, world size %d)", __version__, args.command, run_dir,
                 cfg.preset, cfg.runtime.seed, ctx.device, ctx.world_size)
        if ctx.device.type == "cpu" and getattr(args, "preset", None) is None and cfg.preset == "digits":
            LOG.warning("no --preset: the digits preset's budgets are GPU-sized (hours on a CPU); "
                        "--preset digits-cpu is sized for a CPU")
    return run_dir, ctx


def _hold_lock(args: argparse.Namespace, run_dir: Path) -> None:
    """One writer per run folder: the lock (:func:`daaa.runs.run_lock`) is held until :func:`main` returns."""
    from .runs import run_lock

    stack = getattr(args, "resources", None)
    if stack is None:  # a command function called without main(): held until the process ends
        stack = args.resources = contextlib.ExitStack()
    stack.enter_context(run_lock(run_dir, "daaa " + shlex.join(getattr(args, "argv", [args.command]))))


def _check_shared(path: Path, wait_s: float = 30.0) -> None:
    """Ranks other than 0 read what rank 0 writes (translation, checkpoints): on several nodes --out must be on a
    shared file system. Network file systems may show a new file late, hence the wait."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DaaaError(f"--out {path.parent}: rank 0 wrote {path.name} there but this node does not see it; "
                            "with torchrun on several nodes the run folder must be on a shared file system")
        time.sleep(0.5)


def _runner(args: argparse.Namespace):
    """The process, the run folder with its log and resolved config, and the runner of its stages."""
    from .stages import StageRunner

    cfg = _config(args)
    run_dir, ctx = _start(args, cfg)
    return cfg, StageRunner(run_dir, ctx, args.overwrite)


def cmd_train_source(args: argparse.Namespace) -> int:
    from . import pipeline

    cfg, runner = _runner(args)
    data = pipeline.load_data(cfg, args.source, None, args.target_test, runner.ctx)
    _, result = pipeline.train_source(runner, cfg, data)
    if runner.ctx.is_main and "target_test_accuracy" in result:
        print(f"source-only target-test accuracy: {result['target_test_accuracy'] * 100:.2f}%  "
              f"(run folder: {runner.run_dir})")
    elif runner.ctx.is_main:
        print(f"source network trained: {runner.run_dir / 'source' / 'model.pt'} (no --target-test: no accuracy)")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from . import pipeline

    cfg, runner = _runner(args)
    data = pipeline.load_data(cfg, args.source, args.target, args.target_test, runner.ctx)
    pipeline.translate(runner, cfg, data)
    if runner.ctx.is_main:
        print(f"translated {len(data.source)} source and {len(data.target)} target images: "
              f"{runner.run_dir / 'translate'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    cfg, runner = _runner(args)
    metrics, _, _ = run_pipeline(runner, cfg, args.source, args.target, args.target_test, args.synthetic_target,
                                 args.synthetic_source, only_adapt=args.command == "adapt")
    if runner.ctx.is_main:
        _print_summary(metrics, runner.run_dir)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import run_demo

    args.command = "demo"
    cfg, runner = _runner(args)
    table = run_demo(runner, cfg)
    if runner.ctx.is_main:
        print(table)
        print(f"run folder: {runner.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from . import distributed
    from .config import RuntimeConfig
    from .data import load_domain_tensors
    from .data.domain import check_same_classes
    from .evaluate import evaluate, format_report
    from .models import data_config
    from .predict import load_trained, run_config
    from .runs import atomic_write_json, setup_logging

    setup_logging(None, verbose=not args.quiet)
    net, info = load_trained(args.run, args.stage)  # the model file describes its network and its input
    cfg = run_config(args.run)  # where built-in data sets live, the device
    data_cfg = data_config(info, cfg.data if cfg else None)
    ctx = distributed.setup(cfg.runtime if cfg else RuntimeConfig())
    test = load_domain_tensors(args.target_test, "target_test", data_cfg)
    if test.labels is None:
        raise DaaaError(f"--target-test {args.target_test}: needs labels (layout ROOT/<class>/<image>)")
    if info.get("classes"):  # a score over other classes would mean nothing
        check_same_classes(SimpleNamespace(classes=info["classes"], name=f"the network of {args.run}/{args.stage}"),
                           test)
    elif info["num_classes"] != test.num_classes:
        raise DaaaError(f"--target-test {args.target_test}: {test.num_classes} classes, but the network of "
                        f"{args.run}/{args.stage} has {info['num_classes']}: is it the data set it was trained on?")
    metrics = evaluate(net.to(ctx.device), test, data_cfg, ctx)
    print(format_report(metrics, title=f"{args.run}/{args.stage} on {test.name}: "))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import model_path, predict
    from .runs import setup_logging

    setup_logging(None, verbose=not args.quiet)
    rows = predict(args.run, args.images, args.stage, args.top_k, args.out, args.batch_size, args.device,
                   progress=not args.quiet)
    print(f"{len(rows)} predictions of {model_path(args.run, args.stage)} written to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run
    from .predict import model_path
    from .runs import setup_logging

    setup_logging(None, verbose=not args.quiet)
    worst = export_run(args.run, args.format, args.out, args.stage)
    print(f"{args.format} model of {model_path(args.run, args.stage)} written to {args.out}: uint8 (N, C, H, W) "
          f"images in, class probabilities out; largest difference from PyTorch on the check images {worst:.1e}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .runs import setup_logging

    setup_logging(None)
    if args.data_command == "make-mnistm":
        from .data.mnist import folder_backgrounds, make_mnistm_from_mnist

        bgs = folder_backgrounds(args.backgrounds) if args.backgrounds else None
        out = make_mnistm_from_mnist(args.out, backgrounds=bgs, seed=args.seed, mnist_root=args.mnist_root)
        print(f"MNIST-M written to {out}")
    else:
        from .config import DataConfig
        from .data.demo import demo_pair, export_domain

        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise DaaaError(f"--out {args.out}: is a file, not a folder")
        parts = demo_pair(DataConfig())
        for name, dom in (("source", parts["source"]), ("target", parts["target"]), ("target_test", parts["target_test"])):
            export_domain(dom, Path(args.out) / name)
        print(f"demo pair written to {args.out}/{{source,target,target_test}}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(f"report written to {write_report(args.runs, args.out)}")
    return 0


def _floats(text: str | None, option: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DaaaError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def _overridden(overrides: list[str], key: str) -> bool:
    return any(o.partition("=")[0].strip() == key for o in overrides)


def _beta_grid(args: argparse.Namespace, by_validation: bool) -> list[float] | None:
    """The betas `daaa reproduce` chooses among: --beta-grid, else 0.3,1,3 where the paper chose beta by validation
    (Supp. Sec. 1); none when --set adapt.beta=X fixes beta."""
    from .reproduce import DEFAULT_BETA_GRID

    grid = _floats(args.beta_grid, "--beta-grid")
    if _overridden(args.overrides, "adapt.beta"):
        if grid:
            raise DaaaError("--beta-grid and --set adapt.beta=X exclude each other (X fixes beta)")
        return None
    return grid or (list(DEFAULT_BETA_GRID) if by_validation else None)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from . import distributed
    from .config import load_config
    from .models import check_arch
    from .reproduce import EXPERIMENTS, parse_tasks, reproduce
    from .runs import prepare_run_dir, setup_logging

    exp = EXPERIMENTS[args.experiment]
    overrides = list(args.overrides)
    if not _overridden(overrides, "data.source_val_fraction"):
        overrides.insert(0, "data.source_val_fraction=0.1")  # the held-out split of label-free selection
    cfg = load_config(args.preset or exp.default_preset, overrides)
    check_arch(cfg.model.arch)
    grid = _beta_grid(args, exp.beta_by_validation)
    if args.quiet:
        cfg.runtime.progress = False
    ctx = distributed.setup(cfg.runtime)
    out = Path(args.out)
    with distributed.main_first(ctx):  # if rank 0 cannot have --out (unwritable, in use), the others stop too
        if ctx.is_main:
            out = prepare_run_dir(args.out)
            _hold_lock(args, out)
    setup_logging(out if ctx.is_main else None, verbose=ctx.is_main)
    res = reproduce(args.experiment, cfg, ctx, out, args.seeds, parse_tasks(args.tasks) if args.tasks else None,
                    [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None, args.runs,
                    args.digits_data, _floats(args.pt_values, "--pt-values"), _floats(args.beta_values, "--beta-values"),
                    args.overwrite, overrides, grid)
    if ctx.is_main:
        c = res["primary_criterion"]
        print(f"{res['title']}: accuracy (%) of the snapshot selected by {c} / final / oracle, mean over seeds")
        for row in res["rows"]:
            cells = []
            for t in res["tasks"]:
                cell = row["results"].get(t) or {}
                vals = [(cell.get("selected", {}).get(c) or {}).get("mean"), (cell.get("final") or {}).get("mean"),
                        (cell.get("oracle") or {}).get("mean")]
                cells.append(f"{t} " + "/".join("-" if v is None else f"{v * 100:.1f}" for v in vals))
            print(f"  {row['label'][:28]:<28s} {'  '.join(cells)}")
        print(f"results: {out / 'results.md'} (.csv, .json); {res['seconds']['wall']:.0f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, distributed
    from .runs import setup_logging

    cfg = _config(args)
    if args.device:
        cfg.runtime.device = args.device
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            raise DaaaError(f"--{name}: {getattr(args, name)} must be at least 1")
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else bench.STAGES
    unknown = sorted(set(stages) - set(bench.STAGES))
    if unknown:
        raise DaaaError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(bench.STAGES)})")
    setup_logging(None, verbose=not args.quiet)
    ctx = distributed.setup(cfg.runtime)
    bench.main(cfg, ctx, args.steps, args.repeats, max(0, args.warmup), args.json, stages, progress=not args.quiet)
    return 0


def _print_summary(metrics: dict, run_dir: Path) -> None:
    rows = [("source only", metrics.get("source_only", {}).get("target_test_accuracy")),
            ("DAAA", metrics.get("daaa", {}).get("target_test_accuracy"))]
    for name, acc in rows:
        if acc is not None:
            print(f"{name:>12s}: {acc * 100:.2f}% target-test accuracy")
    print(f"run folder: {run_dir}")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train-source": cmd_train_source, "translate": cmd_translate, "adapt": cmd_run, "run": cmd_run,
    "demo": cmd_demo, "evaluate": cmd_evaluate, "data": cmd_data, "reproduce": cmd_reproduce,
    "report": cmd_report, "bench": cmd_bench, "predict": cmd_predict, "export": cmd_export,
}


def _one_line(e: Exception, out: str | None = None) -> str:
    """The error as one line; an OSError that names no file (a full disk seen by a PNG or event-file writer) is
    put on ``out``, the folder the command writes."""
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else out
        text = f"{where}: {e.strerror}" if where is not None and e.strerror else f"{type(e).__name__}: {e}"
    else:
        text = str(e)
    return " ".join(text.splitlines())


def _lost_peer(e: RuntimeError) -> bool:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(e).lower()
    return isinstance(e, dist.DistError) or "closed by peer" in text or "connection reset" in text


@contextlib.contextmanager
def _sigterm_interrupts() -> Any:
    """SIGTERM (a scheduler's pre-emption) ends the command like Ctrl-C, through ``finally`` blocks, with exit
    status 143; inside a step loop, :class:`daaa.trainers.loop.StopSignals` first writes a checkpoint."""
    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted("interrupted (SIGTERM); run the same command to resume from the last checkpoint", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the run folder's lock: who holds it
    with contextlib.ExitStack() as args.resources, _sigterm_interrupts():  # the lock is released last
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    """The command, its errors as one line and an exit status: 2 for errors, 130 / 143 for Ctrl-C / SIGTERM."""
    t0 = time.perf_counter()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # stdout went to a pipe whose reader stopped (`daaa evaluate ... | head`): quiet, as other tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"daaa: {e.message}", file=sys.stderr)
        return 128 + e.signum
    except (DaaaError, OSError) as e:
        # OSError: an unwritable or vanished file or folder, a full disk -- named by the error itself
        if getattr(args, "debug", False):
            raise
        rank = os.environ.get("RANK", "0")  # under torchrun each rank reports its own error, prefixed
        if rank != "0" and isinstance(e, (PeerError, NonFiniteLossError)):
            return 2  # rank 0 reports it (a non-finite loss is detected on the all-reduced terms: on every rank)
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"daaa: error{where}: {_one_line(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # under torchrun: a rank waiting in a collective whose peer has died gets gloo's/NCCL's RuntimeError;
        # the rank that died reports why
        if getattr(args, "debug", False) or not _lost_peer(e):
            raise
        print(f"daaa: error (rank {os.environ.get('RANK', '0')}): lost contact with the other processes "
              f"({_one_line(e)[:160]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daaa: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        from .distributed import cleanup
        cleanup()
        LOG.debug("command took %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
