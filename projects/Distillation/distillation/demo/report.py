"""The demo's report: report.json (settings, machine, the statistics of stats.summarize) and
report.md (tables per task, the gap recovered, comparisons, graph sizes, the figures)."""
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from .data import UserData
from .plots import write_plots
from .presets import TASKS, Preset
from .stats import (METRICS, dsig_versus_others, mean, suffix, summarize,
                    versus_baseline)


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _run_threads(report: Dict, name: str) -> List[int]:
    """The torch thread counts run `name` trained with, over the seeds."""
    return sorted({r["results"][name]["threads"] for r in report["per_seed"].values()
                   if r["results"][name].get("threads")})


def write_report(output: str, preset_name: str, preset: Preset,
                 results: Dict[int, Dict[str, Dict]],
                 user_data: Optional[UserData] = None, task: str = "bbox") -> Dict:
    """report.json, report.md, ap.png and loss.png in `output` from the runs' results
    ({seed: {run name: result}}); returns the report."""
    import torch

    seeds = list(results)
    report = {"preset": preset_name, "task": task, "seeds": seeds,
              "preset_settings": asdict(preset),
              "data": asdict(user_data) if user_data else "generated shapes",
              "machine": _machine(), "torch": torch.__version__, **summarize(results)}
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    seed_text = ", ".join(map(str, seeds))
    arch = "Mask R-CNN " if task == "segm" else ""
    threads = sorted(set().union(*(_run_threads(report, name) for name in report["mean"])))
    lines = [f"# DSIG demo report ({preset_name} preset{', Mask R-CNN' if arch else ''}, "
             f"seed{'s' if len(seeds) > 1 else ''} {seed_text})", "",
             f"- machine: {report['machine']}, torch {report['torch']}"
             + (f"; training ran with {'/'.join(map(str, threads))} torch thread(s) per run"
                if threads else "")
             + ("; s/iter marks each run's, compare it only between runs with the same"
                if len(threads) > 1 else ""),
             (f"- data per seed: {preset.train_images} train / {preset.val_images} val generated "
              f"images of {preset.image_size[0]}x{preset.image_size[1]}" if user_data is None
              else f"- data: {user_data.train[0]} ({user_data.train[1]}) / {user_data.val[0]} "
                   f"({user_data.val[1]}), {user_data.num_classes} classes, inputs "
                   f"{user_data.image_size[0]} / {user_data.image_size[1]} px"),
             f"- teacher {arch}R50-FPN {preset.teacher_iters} iterations, students {arch}R18-FPN "
             f"{preset.student_iters}, batch {preset.batch}", ""]
    if len(seeds) > 1:
        lines += [f"Mean over seeds {seed_text}; the last column lists AP per seed.", ""]

    def fmt(g: Optional[float]) -> str:
        return "n/a (no gap)" if g is None else f"{g:.2f}"

    for t in report["tasks"]:
        if len(report["tasks"]) > 1:
            lines += [f"## {TASKS[t].capitalize()} AP", ""]
        lines += ["| model | " + " | ".join(METRICS) + " | s/iter |"
                  + (" AP per seed |" if len(seeds) > 1 else ""),
                  "|---|" + "---:|" * (len(METRICS) + 1) + ("---|" if len(seeds) > 1 else "")]
        for name, v in report["mean"].items():
            row = " | ".join(f"{v[t][k]:.2f}" for k in METRICS)
            per_seed = " / ".join(f"{r['results'][name][t].get('AP', float('nan')):.2f}"
                                  for r in report["per_seed"].values())
            s_iter = f"{v['seconds_per_iter']:.3f}"
            if len(threads) > 1:  # runs trained with different thread counts
                s_iter += f" ({'/'.join(map(str, _run_threads(report, name)))} thr)"
            lines.append(f"| {name} | {row} | {s_iter} |"
                         + (f" {per_seed} |" if len(seeds) > 1 else ""))
        key = "gap_recovered" + suffix(t)
        lines += ["", f"Fraction of the teacher-baseline {TASKS[t]} AP gap recovered"
                  + (" (from the seed-averaged AP; per seed in brackets):" if len(seeds) > 1
                     else ":"), ""]
        for name, g in report[key].items():
            per_seed = ", ".join(fmt(r[key][name]) for r in report["per_seed"].values())
            lines.append(f"- {name}: **{fmt(g)}**" + (f" ({per_seed})" if len(seeds) > 1 else ""))
        lines += ["", f"Against the baseline ({TASKS[t]} AP):", ""] + versus_baseline(report, t)
        against_others = dsig_versus_others(report, t)
        if against_others:
            lines += ["", f"DSIG against the other distilled students ({TASKS[t]} AP):", ""]
            lines += against_others
        lines += [""]
    lines += graph_lines(results)
    lines += ["![AP](ap.png)", "", "![training loss](loss.png)", ""]
    if os.path.isfile(os.path.join(output, "graph.png")):
        lines += [f"Instance graph of the DSIG student (seed {seeds[0]}) on a validation image "
                  "(nodes; teacher and student edge matrices; their difference):", "",
                  "![instance graph](graph.png)", ""]
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("\n".join(lines))
    write_plots(output, report, results)
    return report


def graph_lines(results: Dict[int, Dict[str, Dict]]) -> List[str]:
    """How large the instance graphs were during training, per distilled student (mean over
    iterations and seeds); nothing for runs that logged none (no edge loss, older runs)."""
    from ..meta_arch import describe_graph_sizes

    names = list(next(iter(results.values())))
    lines = []
    for name in names:
        graphs = [r[name]["graph"] for r in results.values() if r[name].get("graph")]
        if not graphs:
            continue
        mined = [g["mined_bg_fraction"] for g in graphs if "mined_bg_fraction" in g]
        lines.append(f"- {name}: " + describe_graph_sizes(
            mean([g["graph_nodes"] for g in graphs]), mean(mined) if mined else None))
    return (["Instance graphs during training (mean over iterations and seeds):", ""] + lines
            + [""]) if lines else []
