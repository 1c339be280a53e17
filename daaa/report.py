"""`daaa report RUN [RUN ...] [--out FILE.md|FILE.html]`: one Markdown or HTML report of one or more run folders.

For every run: its configuration in brief (preset, seed, the hyper-parameters that matter), the metrics table
(source only, DAAA, every table row under RUN/rows/*, seconds per stage), its figures (RUN/figures/*.png, made by
`daaa run` / `daaa demo`; those that need no data are made when missing, beside the report -- a report never
writes into a run folder) and, for a `daaa reproduce` folder, its results table (RUN/results.md, else
RUN/results.json). Markdown links the images by relative path; HTML embeds them (base64): the file is
self-contained.

All Markdown and CSV of daaa is rendered here: also `daaa reproduce`'s results.md and results.csv
(:func:`format_markdown`, :func:`format_csv`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import DaaaError
from .figures import FIGURE_FILES
from .pairing_quality import report_blocks as pairing_blocks
from .run_figures import make_run_figures, stage_result
from .runs import atomic_write_text, read_json_or

# a block of the report: ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption)
# | ("md", markdown text: pipe tables and paragraphs)
Block = tuple


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _pct(v: Any) -> str:
    return f"{v * 100:.2f}%" if isinstance(v, (int, float)) else "-"


def _secs(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def _command_of(run: Path) -> str | None:
    """The command of the last `daaa ...` that ran in the folder, from RUN/log.txt."""
    try:
        lines = (run / "log.txt").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        m = re.search(r"daaa \S+: (\S+) in ", line)
        if m:
            return m.group(1)
    return None


def config_summary(run: Path) -> list[tuple[str, str]]:
    """(name, value) pairs of the settings that decide a run's result."""
    cfg = _load_yaml(run / "config.yaml")
    if not cfg:
        return []
    g = lambda sec, key, default="-": (cfg.get(sec) or {}).get(key, default)  # noqa: E731
    model = g("model", "arch")
    if model == "digit_cnn":
        model = f"digit_cnn (width {g('model', 'width')})"
    elif model == "resnet50":
        model = f"resnet50 (pretrained: {g('model', 'pretrained')})"
    ad_opt = g("adapt", "optim", {}) or {}
    rows = [("command", _command_of(run) or "-"), ("preset", str(cfg.get("preset", "-"))),
            ("seed", str(g("runtime", "seed"))), ("network", str(model)),
            ("image size", f"{g('data', 'image_size')} px, {g('data', 'channels')} channel(s)"),
            ("CycleGAN", f"{g('cyclegan', 'steps')} steps, batch {g('cyclegan', 'batch_size')}, "
                         f"ngf {g('cyclegan', 'ngf')}, {g('cyclegan', 'n_blocks')} blocks, "
                         f"lambda_semantic {g('cyclegan', 'lambda_semantic', 0.0)}"),
            ("source network", f"{g('source', 'steps')} steps, batch {g('source', 'batch_size')}"),
            ("adapt (Eq. 12)", f"{g('adapt', 'steps')} steps, batch {g('adapt', 'batch_size')}, "
                               f"data {g('adapt', 'train_data')}"),
            ("beta (L_AT)", str(g("adapt", "beta"))),
            ("attention / discrepancy", f"{g('adapt', 'attention')} / {g('adapt', 'discrepancy')}"),
            ("p_t (EM filter)", f"{g('adapt', 'confidence_threshold')} (before the first sync: "
                                f"{g('adapt', 'initial_confidence_threshold')})"),
            ("M_post sync interval", str(g("adapt", "sync_interval"))),
            ("optimiser", f"{ad_opt.get('optimizer', '-')}, lr {ad_opt.get('lr', '-')}, "
                          f"schedule {ad_opt.get('schedule', '-')}")]
    return rows


def _metrics_row(method: str, stage: str, result: dict, fallback: dict, seconds: Any) -> list[str]:
    def get(key: str) -> Any:
        return result.get(key, fallback.get(key))

    return [method, stage, _pct(get("target_test_accuracy")), _pct(get("target_test_mean_class_accuracy")),
            _pct(get("oracle_best_accuracy")), _secs(result.get("seconds", seconds))]


def metrics_rows(run: Path) -> list[list[str]]:
    """[method, stage folder, target-test accuracy, mean per-class accuracy (VisDA's figure), best during training
    (oracle), seconds] per trained network: the stage's record, else what RUN/metrics.json keeps."""
    metrics = read_json_or(run / "metrics.json", {})
    seconds = metrics.get("seconds", {}) if isinstance(metrics, dict) else {}
    rows = []
    for method, stage, section in (("source only (S)", "source", "source_only"), ("DAAA (ours)", "adapt", "daaa")):
        result = stage_result(run, stage)
        if result or section in metrics:
            rows.append(_metrics_row(method, stage, result, metrics.get(section, {}), seconds.get(stage)))
    for rec in sorted((run / "rows").glob("**/stage.json")):
        name = str(rec.parent.relative_to(run / "rows"))
        rows.append(_metrics_row(name, f"rows/{name}", stage_result(run, f"rows/{name}"), {}, None))
    return rows


def seconds_rows(run: Path) -> list[list[str]]:
    metrics = read_json_or(run / "metrics.json", {})
    seconds = metrics.get("seconds", {}) if isinstance(metrics, dict) else {}
    return [[k, _secs(v)] for k, v in seconds.items() if isinstance(v, (int, float))]


def _results_blocks(run: Path) -> list[Block]:
    """The table of a `daaa reproduce` folder: results.md as written, else a table from results.json."""
    md = run / "results.md"
    if md.exists():
        try:
            return [("h", 3, "reproduce results"), ("md", md.read_text())]
        except OSError:
            pass
    res = read_json_or(run / "results.json")
    if res is None:
        return []
    rows = res.get("rows") if isinstance(res, dict) else res
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        header = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
        body = [[_cell(r.get(k)) for k in header] for r in rows]
        return [("h", 3, "reproduce results (results.json)"), ("table", header, body)]
    return [("h", 3, "reproduce results (results.json)"),
            ("code", json.dumps(res, indent=1, sort_keys=True)[:20000])]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _figures(run: Path, spare: Path | None) -> list[Path]:
    """The run's figures: RUN/figures/*.png, and -- when some that need no data are missing there -- those made
    into ``spare`` (the report never writes into a run folder)."""
    fig_dir = run / "figures"
    have = {p.name: p for p in fig_dir.glob("*.png")} if fig_dir.exists() else {}
    missing = [f for f in ("fig3_pairs.png", "fig4_training.png", "confusion.png", "figA1_sweeps.png") if f not in have]
    if spare is not None and missing:  # Fig. 1 needs the data: it comes from `daaa run` / `daaa demo`
        made = make_run_figures(run, out_dir=spare, only=missing)
        for name, p in made.items():
            have.setdefault(name, p)
    found = [have[f] for f in FIGURE_FILES if f in have]
    others = sorted((p for n, p in have.items() if n not in FIGURE_FILES), key=lambda p: p.name)
    extra = [run / "translate" / "losses.png"] if (run / "translate" / "losses.png").exists() else []
    return found + others + extra


def run_blocks(run: Path, spare: Path | None = None) -> list[Block]:
    blocks: list[Block] = [("h", 2, f"run {run.name}"), ("p", f"folder: `{run}`")]
    summary = config_summary(run)
    if summary:
        blocks += [("h", 3, "configuration"), ("table", ["setting", "value"], [list(r) for r in summary])]
    rows = metrics_rows(run)
    if rows:
        blocks += [("h", 3, "target-test accuracy"),
                   ("table", ["method", "stage", "final", "final, mean per class", "best during training (oracle)",
                              "seconds"], rows)]
    blocks += pairing_blocks(run)  # RUN/translate/quality.json: do the pairs keep the content?
    secs = seconds_rows(run)
    if secs:
        blocks += [("h", 3, "seconds per stage"), ("table", ["stage", "seconds"], secs)]
    blocks += _results_blocks(run)
    figs = _figures(run, spare)
    if figs:
        blocks.append(("h", 3, "figures"))
        captions = dict(FIGURE_FILES, **{"losses.png": "CycleGAN losses (Eq. 1-3)"})
        blocks += [("img", p, captions.get(p.name, p.stem)) for p in figs]
    return blocks


def overview_rows(runs: list[Path]) -> list[list[str]]:
    out = []
    for run in runs:
        cfg = _load_yaml(run / "config.yaml")
        m = read_json_or(run / "metrics.json", {})
        src = m.get("source_only", {}).get("target_test_accuracy") if isinstance(m, dict) else None
        daaa = m.get("daaa", {}).get("target_test_accuracy") if isinstance(m, dict) else None
        out.append([run.name, str(cfg.get("preset", "-")), str((cfg.get("runtime") or {}).get("seed", "-")),
                    _pct(src), _pct(daaa)])
    return out


def build_report(runs: list[Path], spare: Path | None = None) -> list[Block]:
    """The report's blocks; figures missing from a run folder are made into ``spare``/<k>_<run name>/."""
    blocks: list[Block] = [("h", 1, "DAAA report")]
    if len(runs) > 1:
        blocks += [("h", 2, "overview"),
                   ("table", ["run", "preset", "seed", "source only", "DAAA"], overview_rows(runs))]
    for k, run in enumerate(runs):
        blocks += run_blocks(run, None if spare is None else spare / f"{k}_{run.name}")
    return blocks


# ---------------------------------------------------------------------------------------------------------- renderers

def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown pipe table as lines, then an empty line."""
    lines = ["| " + " | ".join(_md_escape(str(h)) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_md_escape(str(c)) for c in r) + " |" for r in rows] + [""]


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "table":
            lines += md_table(b[1], b[2])
        elif kind == "img":
            rel = Path(os.path.relpath(b[1].resolve(), out.parent.resolve())).as_posix()
            lines += [f"![{b[2]}]({rel})", "", f"*{b[2]}*", ""]
        elif kind == "md":  # its headings go below the run's own (### and deeper)
            lines += [re.sub(r"^(#{1,6})(?=\s)", lambda m: "#" * min(6, len(m.group(1)) + 3), line)
                      for line in b[1].rstrip().splitlines()] + [""]
        elif kind == "code":
            lines += ["```", b[1], "```", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_inline(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_to_html(text: str) -> str:
    """Enough Markdown for results.md: headings, pipe tables, paragraphs."""
    out, table = [], []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
            body = [r for r in cells[1:] if not all(re.fullmatch(r":?-{2,}:?", c) for c in r)]
            out.append(_html_table(cells[0], body))
            table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        m = re.match(r"(#{1,6})\s+(.*)", line)
        if m:
            level = min(6, len(m.group(1)) + 3)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.2em}td,th{border:1px solid #bbb;padding:3px 8px;"
        "text-align:left}th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
        "figure{margin:1em 0}figcaption{font-style:italic;color:#555}code{background:#f3f3f3}")


def render_html(blocks: list[Block]) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>DAAA report</title>",
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "table":
            parts.append(_html_table(b[1], b[2]))
        elif kind == "img":
            data = base64.b64encode(b[1].read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(b[2])}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        elif kind == "md":
            parts.append(_md_to_html(b[1]))
        elif kind == "code":
            parts.append(f"<pre>{html.escape(b[1])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


REPORT_SUFFIXES = (".md", ".markdown", ".html", ".htm")


def write_report(runs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of ``runs`` to ``out`` (HTML for .html/.htm, Markdown for .md/.markdown; any other
    extension is refused before anything is written); default: RUN/report.md for one run, ./report.md for several.
    Returns the path written."""
    paths = [Path(r).expanduser() for r in runs]
    if not paths:
        raise DaaaError("daaa report: give at least one run folder")
    if out is not None and Path(out).suffix.lower() not in REPORT_SUFFIXES:
        raise DaaaError(f"--out {out}: a report is Markdown or HTML; name it FILE.md or FILE.html "
                        f"(got {Path(out).suffix or 'no extension'})")
    for p in paths:
        if not p.is_dir():
            raise DaaaError(f"{p}: not a run folder (no such directory)")
        if not any((p / f).exists() for f in ("config.yaml", "metrics.json", "results.json", "results.md")):
            raise DaaaError(f"{p}: not a run folder (no config.yaml, metrics.json or results.json)")
    out = Path(out).expanduser() if out else (paths[0] / "report.md" if len(paths) == 1 else Path("report.md"))
    if out.suffix.lower() in (".html", ".htm"):  # images embedded: figures made here are temporary
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            text = render_html(build_report(paths, Path(tmp)))
    else:  # linked: figures made here stay beside the report, in <report name>_files/
        text = render_markdown(build_report(paths, out.parent / f"{out.stem}_files"), out)
    atomic_write_text(out, text)
    return out


# ---------------------------------------------------------------------------- `daaa reproduce`'s results.md and .csv

CRITERION_NAMES = {"iwcv": "IWCV", "dev": "DEV", "snd": "SND", "source_val": "source-val acc."}
CSV_FIELDS = ["experiment", "task", "row", "label", "train_data", "metric", "mean", "std", "n", "values", "paper",
              "paper_std"]


def _mean_pct(stat: dict[str, Any] | None, std: bool = True) -> str:
    """A {"mean", "std", "n"} of fractions as "74.3 ± 0.2" (percent; the std only over more than one run)."""
    if not stat or stat.get("mean") is None:
        return "–"
    m = stat["mean"] * 100
    if std and stat.get("n", 0) > 1:
        return f"{m:.1f} ± {stat['std'] * 100:.1f}"
    return f"{m:.1f}"


def _paper_cell(row: dict[str, Any], t: str) -> str:
    v = row["paper"].get(t)
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    s = row["paper_std"].get(t) if t != "average" else None
    return f"{v * 100:.1f}" + (f" ± {s * 100:.1f}" if s is not None else "")


def _metric(cell: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    if cell is None:
        return None
    if metric.startswith("selected:"):
        return cell["selected"].get(metric.split(":", 1)[1])
    return cell.get(metric)


def _metric_title(metric: str, primary: str) -> str:
    if metric == "final":
        return "final step"
    if metric == "oracle":
        return "target oracle: best evaluated step, chosen with the target labels"
    c = metric.split(":", 1)[1]
    primary_note = " -- primary criterion" if c == primary else ""
    return f"selected by {CRITERION_NAMES.get(c, c)} (no target labels){primary_note}"


def _results_intro(res: dict[str, Any], label: dict[str, str]) -> list[str]:
    """Title, data, settings, time and how to read the tables."""
    lines = [f"# {res['title']} -- reproduced with daaa {res['versions']['daaa']}", ""]
    if not res["complete"]:
        lines += ["**Partial results: the command is still running or was interrupted (re-run it to resume).**", ""]
    lines.append("Data:")
    for t in res["tasks"]:
        d = res["data"].get(t)
        if d:
            lines.append(f"* {label[t]}: {d['description']}; {d['n_source']} source training images"
                         f" (+{d['n_source_val']} held out for model selection), {d['n_target']} target training "
                         f"images (unlabelled), {d['n_target_test']} target-test images.")
    sec, conf = res["seconds"], res["config"]
    ov = " ".join(f"`--set {o}`" for o in res["overrides"]) or "none"
    lines += ["", f"Preset `{res['preset']}`, overrides: {ov}; seeds {', '.join(map(str, res['seeds']))} "
              f"({len(res['seeds'])} run(s) per cell, mean ± sample std); "
              f"{conf['model']}, {conf['adapt_steps']} adapt steps, batch {conf['batch_size']}.",
              f"Time: {sec['wall']:.0f} s for this invocation; {sec['compute']:.0f} s of recorded training in all "
              "stages used (reused stages included).", "",
              "Accuracy (%) on the target test set. *paper*: the number printed in the paper. *final*: the network "
              "after the last step. *oracle*: the best of the evaluated steps, i.e. chosen with the target labels "
              "(what UDA papers often report). *selected by X*: the evaluated step that the label-free criterion X "
              "ranks best (IWCV: importance-weighted source-validation risk, JAN's protocol; DEV: the same with a "
              "control variate; SND: soft neighbourhood density of target predictions; source-val acc.: held-out "
              "source accuracy).", ""]
    averaged = [f"the {what} rows ship the moving average of their weights (`{key}` = {conf[name]})"
                for what, key, name in (("adapt-budget", "adapt.optim.ema_decay", "adapt_ema_decay"),
                                        ("source-budget (S, T_f)", "source.optim.ema_decay", "source_ema_decay"))
                if conf.get(name)]
    if averaged:  # then "final" and every evaluation read the average, not the last step's weights
        lines += ["Weights: " + "; ".join(averaged) + " -- evaluated and selected as such, not the last step's "
                  "weights (not in the paper).", ""]
    return lines + ([res["note"], ""] if res.get("note") else [])


def _metric_table(res: dict[str, Any], metric: str, label: dict[str, str]) -> list[str]:
    """Every row's accuracy by ``metric`` (final, oracle, selected:<criterion>), ours beside the paper's."""
    tasks = res["tasks"]
    cols = tasks + (["average"] if len(tasks) > 1 else [])
    if len(tasks) == 1:
        header = ["method", "train data", "ours", "paper"]
    else:
        header = ["method", "train data"] + [f"{label[t]} {w}" for t in cols for w in ("ours", "paper")]
    body = []
    for row in res["rows"]:
        cells = [(_mean_pct(_metric(row["results"].get(t), metric)), _paper_cell(row, t)) for t in cols]
        body.append([row["label"], row["train_data"], *(c for pair in cells for c in pair)])
    return [f"## {_metric_title(metric, res['primary_criterion'])}", "", *md_table(header, body)]


def _sweep_lines(res: dict[str, Any], name: str, sw: dict[str, Any], label: dict[str, str]) -> list[str]:
    """A Fig. A1 sweep: accuracy per value, then the value each label-free criterion picks."""
    metrics = ["final", "oracle"] + [f"selected:{c}" for c in res["criteria"]]
    header = [name, "final", "oracle"] + [f"sel. {CRITERION_NAMES.get(c, c)}" for c in res["criteria"]]
    rows = {r["key"]: r for r in res["rows"]}
    body = [[f"{v:g}"] + [_mean_pct(_metric(rows[key]["results"].get(sw["task"]), m)) for m in metrics]
            for v, key in zip(sw["values"], sw["rows"])]
    lines = [f"## sweep of {sw['param']} on {label.get(sw['task'], sw['task'])}", "", *md_table(header, body)]
    for c, ch in (sw.get("choice") or {}).items():
        if ch["value"] is None:
            continue
        picks = ", ".join(f"seed {p['seed']}: {p['value']:g}" for p in ch["per_seed"])
        star = " (primary)" if c == res["primary_criterion"] else ""
        lines.append(f"* {CRITERION_NAMES.get(c, c)}{star} picks {name} = {ch['value']:g} ({picks}); accuracy of "
                     f"the picked final models: {_mean_pct(ch['accuracy'])}")
    return lines + [""]


def format_markdown(res: dict[str, Any]) -> str:
    """results.md of `daaa reproduce` from its results.json content (see :mod:`daaa.reproduce`)."""
    primary = res["primary_criterion"]
    metrics = [f"selected:{primary}", "final", "oracle"] + [f"selected:{c}" for c in res["criteria"] if c != primary]
    label = {**res["task_labels"], "average": "average"}
    lines = _results_intro(res, label)
    for metric in metrics:
        lines += _metric_table(res, metric, label)
    for name, sw in res.get("sweeps", {}).items():
        lines += _sweep_lines(res, name, sw, label)
    if res.get("reference"):
        lines.append("Reference lines: " + "; ".join(f"{k}: {v * 100:.1f}" for k, v in res["reference"].items()))
        lines.append("")
    lines.append(f"Run folders: `{res['runs']}/<task>/seed<k>/` (rows in `rows/<key>/`, source network in `source/`, "
                 "CycleGAN in `translate/`).")
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.6g}"


def format_csv(res: dict[str, Any]) -> str:
    """results.csv of `daaa reproduce`: one line per (row, task, metric), accuracies as fractions."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    tasks = res["tasks"] + (["average"] if len(res["tasks"]) > 1 else [])
    metrics = ["final", "oracle"] + [f"selected:{c}" for c in res["criteria"]]
    for row in res["rows"]:
        for t in tasks:
            cell = row["results"].get(t)
            paper = row["paper"].get(t)
            pstd = row["paper_std"].get(t) if t != "average" else None
            for m in metrics:
                st = _metric(cell, m) or {}
                vals = st.get("values") or []
                w.writerow([res["experiment"], t, row["key"], row["label"], row["train_data"], m,
                            _num(st.get("mean")), _num(st.get("std")), st.get("n", 0),
                            ";".join("" if v is None else f"{v:.6g}" for v in vals),
                            paper if isinstance(paper, str) else _num(paper), _num(pstd)])
    return buf.getvalue()
