"""The report's figures: ap.png (COCO metrics per run, each seed a dot) and loss.png (total
training loss per run and seed). Both stay readable on a tiny run: AP axes span at least
MIN_AP_SPAN points from 0, and short loss series are drawn with markers."""
import os
from typing import Dict, List

from .presets import TASKS
from .stats import METRICS

# AP axes show at least 0 to this many AP points: near-zero APs (a tiny run) otherwise get
# matplotlib's +-0.05 axis, which makes noise look like a result.
MIN_AP_SPAN = 5.0
# Loss series with at most this many logged points (detectron2 logs every 20 iterations; a
# tiny run logs one) get markers: a line through one point is invisible.
MARKERS_UP_TO = 20
LINE_STYLES = ["-", "--", ":", "-."]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(x: float) -> float:
    return 0.0 if x != x else x  # NaN (no object of a size) -> 0


def ap_figure(report: Dict):
    """Bars of each run's mean COCO metrics per task (one panel per task), each seed a dot."""
    plt = _pyplot()
    names = list(report["mean"])
    seeds = list(report["per_seed"].values())
    tasks = report["tasks"]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 3.5 * len(tasks)), squeeze=False)
    width = 0.8 / len(names)
    for ax, t in zip(axes[:, 0], tasks):
        highest = 0.0
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(METRICS))]
            bars = [_finite(report["mean"][name][t][k]) for k in METRICS]
            ax.bar(xs, bars, width, label=name, color=f"C{i}")
            highest = max([highest] + bars)
            if len(seeds) > 1:  # each seed as a dot on its bar
                for r in seeds:
                    dots = [_finite(r["results"][name][t].get(k, float("nan")))
                            for k in METRICS]
                    ax.plot(xs, dots, "k.", markersize=3)
                    highest = max([highest] + dots)
        ax.set_ylim(0, max(MIN_AP_SPAN, 1.1 * highest))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))], METRICS)
        ax.set_ylabel(f"COCO {TASKS[t]} AP (%)" + (", mean over seeds" if len(seeds) > 1 else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_figure(results: Dict[int, Dict[str, Dict]], names: List[str]):
    """The total training loss of each run and seed over the iterations (the runs' logged
    loss curves), in the colours of ap_figure."""
    plt = _pyplot()
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (seed, runs) in enumerate(results.items()):
        for name, v in runs.items():
            curve = v.get("loss_curve") or []
            if curve:
                ax.plot([c["iteration"] for c in curve], [c["total_loss"] for c in curve],
                        color=colors[name], linestyle=LINE_STYLES[k % len(LINE_STYLES)],
                        marker="o" if len(curve) <= MARKERS_UP_TO else None, markersize=4,
                        linewidth=1, label=name if len(results) == 1 else f"{name} (seed {seed})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str) -> None:
    """Writes the figure as a PNG and frees it."""
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def write_plots(output: str, report: Dict, results: Dict[int, Dict[str, Dict]]) -> None:
    """ap.png and loss.png in `output` from the report (summarize) and the runs' loss curves."""
    save_figure(ap_figure(report), os.path.join(output, "ap.png"))
    save_figure(loss_figure(results, list(report["mean"])), os.path.join(output, "loss.png"))
