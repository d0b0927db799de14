#!/usr/bin/env python3
"""Bar charts of the ours / transformers ratios in benchmarks/results/*.json, one panel per workload.

    python benchmarks/plot_results.py                       # writes benchmarks/ratios.png
    python benchmarks/plot_results.py --results DIR -o out.png

A ratio above 1 means ours is faster (throughput) or scores higher (accuracy, F1). Results files without a
transformers comparison (data preparation, the SST-2 accuracy run) are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DPI = 100
WIDTH_IN = 10.0
BAR_HEIGHT_IN = 0.42
PANEL_EXTRA_IN = 1.0  # title, axis label and margins of each panel


def _load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON results file ({exc})") from None


IMPL_LABELS = {"ours": "utils.train_loop", "ours-bare": "bare forward/backward/step"}


def _pretrain_ratios(data: dict) -> list[tuple[str, str, float]]:
    """(workload label, impl, impl / transformers) for each non-transformers row of a pretrain_throughput result."""
    rows = {(r["config"], r["precision"], r["batch_size"], r["impl"]): r["sequences_per_second"]
            for r in data["results"]}
    found = []
    for (config, precision, batch, impl), value in rows.items():
        theirs = rows.get((config, precision, batch, "transformers"))
        if impl != "transformers" and theirs:
            found.append((f"{config} {precision}, batch {batch}", impl, value / theirs))
    return found


def ratios(results: Path) -> list[tuple[str, list[tuple[str, float]]]]:
    """(workload title, [(bar label, ours / transformers)]) for each workload found in ``results``."""
    workloads = []
    pretrain = []
    for name in ("pretrain_bs8.json", "pretrain_bs32.json"):
        data = _load(results / name)
        if data is not None:
            pretrain += [(label, ratio) for label, impl, ratio in _pretrain_ratios(data) if impl == "ours"]
    if pretrain:
        workloads.append(("Pre-training step throughput, sequences/s (pretrain_throughput.py)", pretrain))
    loop = _load(results / "pretrain_bs32_train_loop.json")
    if loop is not None:
        workloads.append(("Shared training loop and bare step, sequences/s (pretrain_throughput.py)",
                          [(f"{label}, {IMPL_LABELS.get(impl, impl)}", ratio)
                           for label, impl, ratio in _pretrain_ratios(loop)]))
    squad = _load(results / "squad.json")
    if squad is not None:
        workloads.append(("SQuAD prediction throughput, sequences/s (squad_inference_throughput.py)", [
            ("vs transformers, padded to 384", squad["speedup_vs_hf_padded"]),
            ("vs transformers, same trimmed batches", squad["speedup_vs_hf_same_batches"])]))
    glue = _load(results / "glue_mrpc.json")
    if glue is not None:
        mrpc = glue["mrpc"]
        workloads.append((f"GLUE MRPC fine-tuning, mean of {len(mrpc['seeds'])} seeds (glue_accuracy.py)", [
            ("dev accuracy", mrpc["ours_mean_acc"] / mrpc["transformers_mean_acc"]),
            ("dev F1", mrpc["ours_mean_f1"] / mrpc["transformers_mean_f1"]),
            ("training speed", mrpc["speedup_vs_transformers"])]))
    squad_acc = _load(results / "squad_accuracy.json")
    if squad_acc is not None:
        ours, theirs = squad_acc["ours"], squad_acc["transformers"]
        workloads.append((f"SQuAD v2.0 fine-tuning, mean of {len(squad_acc['seeds'])} seeds (squad_accuracy.py)", [
                              ("F1", ours["f1"]["mean"] / theirs["f1"]["mean"]),
                              ("exact match", ours["exact"]["mean"] / theirs["exact"]["mean"]),
                              ("training speed", ours["train_sequences_per_second"]["mean"]
                               / theirs["train_sequences_per_second"]["mean"]),
                              ("peak RSS (transformers / ours)", theirs["peak_rss_gib"]["mean"]
                               / ours["peak_rss_gib"]["mean"])]))
    if not workloads:
        raise ValueError(f"{results}: no benchmark results with a transformers comparison "
                         "(pretrain_bs*.json, squad.json, glue_mrpc.json, squad_accuracy.json)")
    return workloads


def figure_size(workloads: list[tuple[str, list[tuple[str, float]]]]) -> tuple[int, int]:
    """The PNG's (width, height) in pixels: each panel as tall as its bars."""
    height = sum(len(bars) * BAR_HEIGHT_IN + PANEL_EXTRA_IN for _, bars in workloads) + 0.6
    return round(WIDTH_IN * DPI), round(height * DPI)


def make_figure(workloads: list[tuple[str, list[tuple[str, float]]]]):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from None
    width, height = figure_size(workloads)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(workloads), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [len(b) * BAR_HEIGHT_IN + PANEL_EXTRA_IN for _, b in workloads]})
    top = max(value for _, bars in workloads for _, value in bars)
    for ax, (title, bars) in zip(axes[:, 0], workloads):
        labels, values = zip(*bars)
        colors = ["C2" if round(v, 2) >= 1.0 else "C3" for v in values]
        ax.barh(range(len(values)), values, color=colors, height=0.6)
        ax.set_yticks(range(len(values)), labels=labels)
        ax.invert_yaxis()
        ax.axvline(1.0, color="0.2", linestyle="--", linewidth=1.0)
        for y, value in enumerate(values):
            ax.annotate(f"{value:.2f}x", xy=(value, y), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=9)
        ax.set_xlim(0, top * 1.15)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("ours / transformers (dashed line: parity; higher is better)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Ours vs transformers on the project's 2-core CPU (benchmarks/RESULTS.md)", fontsize=12)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(HERE / "results"), help="Folder of the benchmarks' JSON results")
    parser.add_argument("-o", "--output", default=str(HERE / "ratios.png"), help="PNG to write")
    args = parser.parse_args(argv)
    try:
        fig = make_figure(ratios(Path(args.results)))
    except (ValueError, KeyError) as exc:
        print(f"plot_results.py: error: {exc}", file=sys.stderr)
        return 1
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(args.output)
    print(f"plot_results.py: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
