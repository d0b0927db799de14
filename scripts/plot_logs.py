#!/usr/bin/env python3
"""Plot dllogger logs (``DLLL {json}`` lines) as training curves, and summarise them as a table.

    python scripts/plot_logs.py results/dllogger.json -o curves.png
    python scripts/plot_logs.py fp32/dllogger.json bf16/dllogger.json --label fp32 --label bf16 -o fp32_vs_bf16.png
    python scripts/plot_logs.py results/cpu_demo -o results/cpu_demo/loss.png --summary

Each input is a dllogger file or a folder searched for them (every ``*.json`` whose first line is a ``DLLL``
record). A pre-training log gives four panels against the global step: loss, learning rate, throughput
(sequences/s) and MFU. Phase 2 appended to phase 1's file (as ``scripts/run_pretraining.sh`` does) continues the
curve after phase 1's last step, with the boundary marked; a resumed run continues its phase. A fine-tuning log
(``run_squad.py``, ``run_glue.py``, ...) gives its training loss, with the epochs marked, and its evaluation
metrics per epoch. Several inputs are overlaid, one colour and legend entry each. ``--summary`` prints one row
per stage (a phase or a fine-tuning run): what ran, the loss first -> last, the metric and the time.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DPI = 100
WIDTH_IN = 12.0
ROW_HEIGHT_IN = 3.6
TITLE_HEIGHT_IN = 0.7

# Evaluation metrics of the final (step []) records, by name, with how they are labelled.
EVAL_METRICS = {"exact_match": "exact match", "F1": "F1", "mcc": "MCC", "acc_and_f1": "acc+F1", "pearson": "Pearson",
                "spearmanr": "Spearman", "corr": "corr"}
# The four pre-training panels: record key, panel title, y-axis label, scale applied to the logged value.
PRETRAIN_PANELS = (("average_loss", "Training loss", "loss (MLM + NSP cross-entropy, nats)", 1.0),
                   ("learning_rate", "Learning rate", "learning rate", 1.0),
                   ("sequences_per_second", "Throughput", "sequences/s (all ranks)", 1.0),
                   ("mfu", "Model FLOPs utilisation", "MFU (% of peak)", 100.0))


class LogError(ValueError):
    """A file that is not a usable dllogger log; the message names the file (and the line)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading logs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One phase of a pre-training run, or one fine-tuning run: its records with steps on the plotted axis."""

    name: str  # "phase 1", "phase 2", "SQuAD v2.0", "GLUE SST-2", ...
    kind: str  # "pretraining" or "finetuning"
    config: dict[str, Any]
    offset: int = 0  # added to the logged step to get the global step (phase 2 continues after phase 1)
    records: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # logged step -> (epoch, data)
    evals: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (epochs done, metrics)
    seconds: float = 0.0  # wall time of the processes that wrote it

    def steps(self) -> list[int]:
        return sorted(self.records)

    def series(self, key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        """Global steps and values of ``key`` (records without a number for it are left out)."""
        xs, ys = [], []
        for step in self.steps():
            value = self.records[step][1].get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(step + self.offset)
                ys.append(value * scale)
        return xs, ys

    def epochs_done(self) -> float:
        """Passes over the data finished by the last record (epochs count finished passes; +1 for the current)."""
        return self.records[self.steps()[-1]][0] + 1.0 if self.records else 0.0


@dataclass
class RunLog:
    """One input file: its label (legend entry) and stages."""

    path: Path
    label: str
    stages: list[Stage]

    @property
    def kind(self) -> str:
        return "pretraining" if any(s.kind == "pretraining" for s in self.stages) else "finetuning"


def _segments(path: Path) -> list[list[dict[str, Any]]]:
    """The records of ``path``, split where a new process started appending (``run_start`` or a new Config)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"{path}: cannot read it as a dllogger log ({exc})") from None
    lines = text.splitlines()
    segments: list[list[dict[str, Any]]] = [[]]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = None
        if line.startswith("DLLL "):
            try:
                record = json.loads(line[5:])
            except json.JSONDecodeError:
                record = None
        if not isinstance(record, dict) or "type" not in record:
            if number == len(lines) and not text.endswith("\n") and any(segments):
                print(f"plot_logs.py: warning: {path}, line {number}: incomplete last record ignored "
                      "(the run was killed while writing it?)", file=sys.stderr)
                break
            raise LogError(f"{path}, line {number}: not a dllogger record (expected 'DLLL {{json}}'): "
                           f"{line[:80]!r}")
        starts = record["type"] == "METADATA" and record.get("metric") == "run_start"
        config = record.get("step") == "PARAMETER" and "Config" in record.get("data", {})
        if (starts or (config and any(_config(r) for r in segments[-1]))) and segments[-1]:
            segments.append([])
        segments[-1].append(record)
    if not any(segments):
        raise LogError(f"{path}: empty log: no dllogger records")
    return [s for s in segments if s]


def _config(record: dict[str, Any]) -> dict[str, Any] | None:
    """The run's flags from its ``PARAMETER`` ``Config`` record (a JSON string in a list), else None."""
    if record.get("step") != "PARAMETER" or "Config" not in record.get("data", {}):
        return None
    value = record["data"]["Config"]
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, str) and value.startswith("Namespace("):  # the reference logs str(args)
        config = {}
        for key, text in re.findall(r"(\w+)=('[^']*'|\"[^\"]*\"|[^,()]*)", value):
            try:
                config[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                config[key] = text
        return config
    try:
        config = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _stage_name(config: dict[str, Any]) -> tuple[str, str]:
    """(name, kind) of a process's run, from its flags."""
    if "phase2" in config or "max_predictions_per_seq" in config:
        return ("phase 2" if config.get("phase2") else "phase 1"), "pretraining"
    if config.get("task_name"):
        return f"GLUE {str(config['task_name']).upper()}", "finetuning"
    if "train_file" in config or "predict_file" in config:
        return ("SQuAD v2.0" if config.get("version_2_with_negative") else "SQuAD v1.1"), "finetuning"
    if config:
        return "fine-tuning", "finetuning"
    return "training", "pretraining"  # no flags recorded: the four training panels suit any log


def read_log(path: Path, label: str | None = None) -> RunLog:
    """Parse one dllogger file into stages; raises ``LogError`` naming the file when it holds nothing to plot."""
    path = Path(path)
    stages: dict[str, Stage] = {}
    order: list[Stage] = []
    for segment in _segments(path):
        config = next((c for c in map(_config, segment) if c is not None), {})
        name, kind = _stage_name(config)
        train = [r for r in segment if r.get("type") == "LOG" and isinstance(r.get("step"), list)
                 and len(r["step"]) == 2 and all(isinstance(x, int) for x in r["step"])
                 and isinstance(r.get("data"), dict)]
        finals = [r["data"] for r in segment if r.get("type") == "LOG" and r.get("step") == []
                  and isinstance(r.get("data"), dict)]
        metrics = [{k: float(v) for k, v in d.items() if k in EVAL_METRICS and isinstance(v, (int, float))}
                   for d in finals]
        metrics = [m for m in metrics if m]
        if not train and not metrics:
            continue  # a run that stopped before training (or only wrote its config)
        # A resumed run continues its phase; a new fine-tuning run (another process) is a stage of its own,
        # except an evaluation-only run, whose metrics belong to the training before it.
        stage = stages.get(name) if kind == "pretraining" else (order[-1] if order and not train else None)
        if stage is None:
            stage = Stage(name, kind, config)
            stages[name] = stage
            order.append(stage)
        for record in train:
            epoch, step = record["step"]
            stage.records[int(step)] = (int(epoch), record["data"])  # a re-run step keeps its latest record
        for m in metrics:
            stage.evals.append((stage.epochs_done(), m))
        try:
            stage.seconds += max(float(r.get("elapsedtime", 0.0)) for r in segment)
        except ValueError:
            pass
    if not order:
        raise LogError(f"{path}: no training records (LOG records with a step [epoch, step]) and no evaluation "
                       f"metrics ({', '.join(EVAL_METRICS)}) to plot")
    phase1, phase2 = stages.get("phase 1"), stages.get("phase 2")
    if phase2 is not None:
        # Phase-2 steps restart at 1: put them after phase 1's last step (else after --phase1_end_step).
        phase2.offset = phase1.steps()[-1] if phase1 is not None and phase1.records else \
            int(phase2.config.get("phase1_end_step", 0) or 0)
    return RunLog(path, label or default_label(path), order)


def default_label(path: Path) -> str:
    """A legend entry for a file: its folder's name for a generic file name (dllogger.json), else its stem."""
    return (path.parent.name or path.stem) if path.stem.startswith("dllogger") else path.stem


def find_logs(inputs: list[str]) -> list[Path]:
    """The files named, and the dllogger files found under the folders named (sorted, each once)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            # in the order the runs started (pre-training before the fine-tuning that used its checkpoint)
            logs = sorted((p for p in item.rglob("*.json") if p.is_file() and _is_dllogger(p)),
                          key=lambda p: (_first_timestamp(p), str(p)))
            if not logs:
                raise LogError(f"{item}: no dllogger logs found in this folder (*.json files of 'DLLL ' lines)")
            found += logs
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def _first_timestamp(path: Path) -> float:
    try:
        with open(path, encoding="utf-8") as handle:
            return float(json.loads(handle.readline()[5:]).get("timestamp", math.inf))
    except (OSError, ValueError, AttributeError, TypeError):
        return math.inf


def _is_dllogger(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith("DLLL ")
    except (OSError, UnicodeDecodeError):
        return False


def read_logs(inputs: list[str], labels: list[str] | None = None) -> list[RunLog]:
    """Every log the inputs name, with distinct labels (``labels`` in order when given)."""
    paths = find_logs(inputs)
    labels = list(labels or [])
    if labels and len(labels) != len(paths):
        raise LogError(f"{len(labels)} --label given for {len(paths)} logs ({', '.join(map(str, paths))})")
    runs = [read_log(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for run in runs:  # two folders both called "results" would share a legend entry
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({seen[run.label]})"
    return runs


# ----------------------------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------------------------


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LogError("plotting needs matplotlib, which is not installed: pip install matplotlib "
                       "(or pip install -r requirements-dev.txt)") from None
    return Figure, FigureCanvasAgg


def figure_size(runs: list[RunLog]) -> tuple[int, int]:
    """The PNG's (width, height) in pixels: two rows for pre-training, one for fine-tuning, plus the title."""
    rows = 2 * any(r.kind == "pretraining" for r in runs) + any(
        s.kind == "finetuning" for r in runs for s in r.stages)
    return round(WIDTH_IN * DPI), round((ROW_HEIGHT_IN * rows + TITLE_HEIGHT_IN) * DPI)


def make_figure(runs: list[RunLog], title: str | None = None) -> Any:
    """The figure of ``runs``. Each plotted line's gid is ``<label>|<key>`` (fine-tuning: ``<label>|<stage>|<key>``)
    so that its data can be found again; its legend label is the run's label."""
    Figure, _ = _matplotlib()
    width, height = figure_size(runs)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    pre = [r for r in runs if r.kind == "pretraining"]
    fine = [(r, s) for r in runs for s in r.stages if s.kind == "finetuning"]
    rows = 2 * bool(pre) + bool(fine)
    grid = fig.add_gridspec(rows, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    color_of = {id(r): colors[i] for i, r in enumerate(runs)}
    if pre:
        axes = [fig.add_subplot(grid[0, 0])]
        axes += [fig.add_subplot(grid[i // 2, i % 2], sharex=axes[0]) for i in range(1, 4)]
        _pretraining(axes, pre, color_of)
    if fine:
        _finetuning(fig.add_subplot(grid[rows - 1, 0]), fig.add_subplot(grid[rows - 1, 1]), fine, color_of,
                    len(runs) > 1 or len(fine) > 1)
    what = " and ".join(w for w, present in (("pre-training", pre), ("fine-tuning", fine)) if present)
    fig.suptitle(title or f"BERT {what}: {', '.join(r.label for r in runs)}", fontsize=13)
    return fig


def stage_label(run: RunLog, stage: Stage) -> str:
    """``<run label>: <stage>``, or the longer of the two when one holds the other ("SST-2", "GLUE SST-2")."""
    if stage.name in run.label or run.label in stage.name:
        return max(run.label, stage.name, key=len)
    return f"{run.label}: {stage.name}"


def _pretraining(axes: list[Any], runs: list[RunLog], color_of: dict[int, str]) -> None:
    from matplotlib.ticker import MaxNLocator

    boundaries: set[int] = set()
    for ax, (key, title, ylabel, scale) in zip(axes, PRETRAIN_PANELS):
        plotted = False
        for run in runs:
            xs, ys = [], []
            for stage in run.stages:
                sx, sy = stage.series(key, scale)
                xs += sx
                ys += sy
                if stage.name == "phase 2":
                    boundaries.add(stage.offset)
            if xs:
                ax.plot(xs, ys, color=color_of[id(run)], label=run.label, gid=f"{run.label}|{key}",
                        linewidth=1.4, marker="." if len(xs) < 40 else None)
                plotted = True
        ax.set_title(title)
        ax.set_xlabel("global step (optimizer steps)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if not plotted:
            why = "MFU not logged as a number:\n\"n/a\" = no known peak FLOPs for\nthis device (e.g. a CPU)" \
                if key == "mfu" else f"{key} not logged"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_yticks([])
    for ax in axes:
        for i, x in enumerate(sorted(boundaries)):
            ax.axvline(x, color="0.3", linestyle="--", linewidth=1.0, gid=f"phase boundary|{x}",
                       label="phase 1 | phase 2" if ax is axes[0] and i == 0 else None)
    if len(runs) > 1 or boundaries:
        axes[0].legend(loc="upper right", fontsize=9)


def _finetuning(loss_ax: Any, metric_ax: Any, stages: list[tuple[RunLog, Stage]], color_of: dict[int, str],
                legend: bool) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    markers = "osD^v<>"
    metric_names: set[str] = set()
    for i, (run, stage) in enumerate(stages):
        color = color_of[id(run)] if len({id(r) for r, _ in stages}) == len(stages) else f"C{i % 10}"
        label = stage_label(run, stage)
        xs, ys = stage.series("average_loss")
        if xs:
            loss_ax.plot(xs, ys, color=color, label=label, gid=f"{run.label}|{stage.name}|average_loss",
                         linewidth=1.4, marker="." if len(xs) < 40 else None)
            epochs = [stage.records[s][0] for s in stage.steps()]
            for before, after, step in zip(epochs, epochs[1:], stage.steps()[1:]):
                if after != before:
                    loss_ax.axvline(step - 0.5, color=color, linestyle=":", linewidth=0.8, alpha=0.7)
        glue = stage.name.startswith("GLUE")
        for j, key in enumerate(k for k in EVAL_METRICS if any(k in m for _, m in stage.evals)):
            points = [(epoch, m[key] * (100.0 if glue else 1.0)) for epoch, m in stage.evals if key in m]
            name = "accuracy" if glue and key == "exact_match" else EVAL_METRICS[key]
            metric_names.add(name)
            px, py = zip(*points)
            metric_ax.plot(px, py, color=color, marker=markers[j % len(markers)], linestyle="-", markersize=7,
                           label=f"{label} {name}", gid=f"{run.label}|{stage.name}|{key}")
            for x, y in points:
                # EM and F1 are often close: the first metric's label goes below, the next above
                metric_ax.annotate(f"{y:.1f}", xy=(x, y), xytext=(7, -5 if j % 2 == 0 else 5),
                                   textcoords="offset points", va="center",
                                   fontsize=9, color=color)
    loss_ax.set_title("Fine-tuning: training loss (dotted: epoch ends)")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss (cross-entropy, nats)")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    metric_ax.set_title("Fine-tuning: evaluation " + (", ".join(sorted(metric_names)) or "metric"))
    metric_ax.set_xlabel("epochs trained")
    metric_ax.set_ylabel("score (%)")
    metric_ax.grid(True, alpha=0.3)
    losses = [y for ln in loss_ax.get_lines() for y in ln.get_ydata() if ln.get_gid()]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 5:  # e.g. SQuAD's ~5 beside SST-2's ~0.7
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        loss_ax.yaxis.set_minor_formatter(NullFormatter())
        loss_ax.set_ylabel("loss (cross-entropy, nats; log scale)")
    if metric_names:
        low, high = metric_ax.get_xlim()
        metric_ax.set_xlim(min(0.0, low), high + 0.25 * max(high - low, 1.0))  # room for the value labels
        scores = [y for ln in metric_ax.get_lines() for y in ln.get_ydata()]
        if 0 <= min(scores) and max(scores) <= 100:
            metric_ax.set_ylim(0, 105)
        metric_ax.legend(loc="best", fontsize=9)
    else:
        metric_ax.text(0.5, 0.5, "no evaluation metrics logged", transform=metric_ax.transAxes, ha="center",
                       va="center", color="0.4")
    if legend:
        loss_ax.legend(loc="upper right", fontsize=9)


def save_png(fig: Any, output: Path) -> Path:
    _, FigureCanvasAgg = _matplotlib()
    output.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(output))
    return output


def plot(inputs: list[str], output: Path, labels: list[str] | None = None, title: str | None = None) -> Path:
    """Read the logs and write the PNG; returns its path."""
    return save_png(make_figure(read_logs(inputs, labels), title), Path(output))


# ----------------------------------------------------------------------------------------------------------------
# The summary table
# ----------------------------------------------------------------------------------------------------------------


def _what_ran(stage: Stage) -> str:
    c, steps = stage.config, len(stage.records)
    last = stage.steps()[-1] if stage.records else 0
    if stage.kind == "pretraining":
        model = Path(str(c.get("config_file", "") or "")).stem or "BERT"
        return (f"pre-training {stage.name}, {model} config, seq {c.get('max_seq_length', '?')}, "
                f"batch {c.get('train_batch_size', '?')}, steps {stage.steps()[0] + stage.offset}-"
                f"{last + stage.offset}")
    init = "/".join(Path(str(c.get("init_checkpoint", "") or "")).parts[-2:]) or "?"  # ".../minilm/model"
    done = f"{last} steps, {stage.epochs_done():g} epochs" if steps else "evaluation only"
    return f"{stage.name} fine-tuning from {init}: {done}"


def _metric_text(stage: Stage) -> str:
    if not stage.evals:
        return "-"
    _, metrics = stage.evals[-1]
    glue = stage.name.startswith("GLUE")
    parts = []
    for key, value in metrics.items():
        name = "accuracy" if glue and key == "exact_match" else EVAL_METRICS[key]
        parts.append(f"{name} {value * (100.0 if glue else 1.0):.1f}%" if key != "mcc" else f"{name} {value:.3f}")
    return ", ".join(parts)


def summary_rows(runs: list[RunLog]) -> list[tuple[str, ...]]:
    rows = []
    for run in runs:
        for stage in run.stages:
            xs, losses = stage.series("average_loss")
            loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if len(losses) > 1 else \
                f"{losses[0]:.3f} (one record)" if losses else "-"
            rows.append((stage_label(run, stage),
                         _what_ran(stage), loss, _metric_text(stage), f"{stage.seconds:.0f} s"))
    return rows


def summary_table(runs: list[RunLog]) -> str:
    """A Markdown table, one row per stage."""
    header = ("stage", "what ran", "loss first -> last", "metric", "time")
    rows = [header] + summary_rows(runs)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("inputs", nargs="+", help="dllogger JSON files, or folders searched for them")
    parser.add_argument("-o", "--output", default=None,
                        help="PNG to write (default: curves.png beside the first input; with --summary alone, none)")
    parser.add_argument("--label", action="append", default=None,
                        help="Legend entry of each log, in order (repeat it; default: the log's folder name)")
    parser.add_argument("--title", default=None, help="Figure title (default: what was run and the labels)")
    parser.add_argument("--summary", action="store_true",
                        help="Print a table, one row per stage: what ran, loss first -> last, metric, time")
    args = parser.parse_args(argv)
    try:
        runs = read_logs(args.inputs, args.label)
        if args.summary:
            print(summary_table(runs))
        if args.output is not None or not args.summary:
            first = Path(args.inputs[0])
            output = Path(args.output) if args.output else (first if first.is_dir() else first.parent) / "curves.png"
            save_png(make_figure(runs, args.title), output)
            print(f"plot_logs.py: wrote {output}", file=sys.stderr)
    except LogError as exc:
        print(f"plot_logs.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
