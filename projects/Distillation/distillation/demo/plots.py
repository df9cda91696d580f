"""The report's figures: ap.png (COCO metrics per run, each seed a dot) and loss.png (total
training loss per run and seed)."""
import os
from typing import Dict

from .presets import TASKS
from .stats import METRICS


def write_plots(output: str, report: Dict, results: Dict[int, Dict[str, Dict]]) -> None:
    """ap.png and loss.png in `output` from the report (summarize) and the runs' loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(x: float) -> float:
        return 0.0 if x != x else x  # NaN (no object of a size) -> 0

    names = list(report["mean"])
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    tasks = report["tasks"]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 3.5 * len(tasks)), squeeze=False)
    width = 0.8 / len(names)
    for ax, t in zip(axes[:, 0], tasks):
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(METRICS))]
            ax.bar(xs, [finite(report["mean"][name][t][k]) for k in METRICS], width,
                   label=name, color=colors[name])
            if len(results) > 1:  # each seed as a dot on its bar
                for r in report["per_seed"].values():
                    ax.plot(xs, [finite(r["results"][name][t].get(k, float("nan")))
                                 for k in METRICS], "k.", markersize=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))], METRICS)
        ax.set_ylabel(f"COCO {TASKS[t]} AP (%)"
                      + (", mean over seeds" if len(results) > 1 else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "ap.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (seed, runs) in enumerate(results.items()):
        for name, v in runs.items():
            curve = v.get("loss_curve") or []
            if curve:
                ax.plot([c["iteration"] for c in curve], [c["total_loss"] for c in curve],
                        color=colors[name], linestyle=["-", "--", ":", "-."][k % 4],
                        linewidth=1, label=name if len(results) == 1 else f"{name} (seed {seed})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss.png"), dpi=100)
    plt.close(fig)
