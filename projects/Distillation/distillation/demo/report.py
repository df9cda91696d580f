"""The demo's report: report.json (settings, machine, the statistics of stats.summarize) and
report.md (tables per task, the gap recovered, comparisons, graph sizes, the figures)."""
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from .data import UserData
from .plots import ap_figure, save_figure, write_plots
from .presets import PIPELINE_CHECKS, TASKS, Preset
from .runs import WARMUP_STEPS
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


# Fewer steady steps than this (a tiny run) give no s/iter worth printing.
MIN_TIMED_STEPS = 10


def timing_note(report: Dict) -> str:
    """What the s/iter column measures (runs that predate the step count: what they logged)."""
    if any(v.get("timed_iters") is None for v in report["mean"].values()):
        return ("- s/iter: detectron2's logged training-step time (the mean of its 20-iteration "
                "medians, the first 2 steps excluded)")
    return (f"- s/iter: median wall-clock time of a training step (forward, backward, update; "
            f"a distilled student's includes the teacher's forward) after the first "
            f"{WARMUP_STEPS}, which set up kernels and memory; evaluation and checkpoints "
            f"excluded. It measures this machine under its load at the time. –: fewer "
            f"than {MIN_TIMED_STEPS} steps after those, too few to time")


def _seconds_per_iter(run: Dict) -> str:
    """The s/iter cell of one run (its mean over the seeds)."""
    timed = run.get("timed_iters")
    if timed is not None and timed < MIN_TIMED_STEPS:
        return "–"
    return f"{run['seconds_per_iter']:.3f}"


def pipeline_check_lines(preset_name: str, preset: Preset) -> List[str]:
    """The warning a pipeline-check preset's report opens with: its numbers mean nothing."""
    if preset_name not in PIPELINE_CHECKS:
        return []
    return [f"**The {preset_name} preset is a pipeline check only**: every stage ran, but "
            f"{preset.teacher_iters} / {preset.student_iters} iterations from scratch on "
            f"{preset.train_images} images train nothing, so the AP, the gap recovered, the "
            f"comparisons and s/iter below mean nothing. For results run `--preset quick` "
            f"(or `full`).", ""]


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
    write_markdown(output, report)
    write_plots(output, report, results)
    return report


def _per_seed_results(report: Dict) -> Dict[int, Dict[str, Dict]]:
    """The runs' results per seed as the report keeps them ({seed: {run name: result}})."""
    if "per_seed" not in report:  # the first layout: one seed, its runs under "results"
        return {report["seed"]: report["results"]}
    return {int(seed): r["results"] for seed, r in report["per_seed"].items()}


def rewrite_report(output: str) -> Dict:
    """report.json (in the current layout), report.md and ap.png of a finished demo rewritten
    from its report.json, without training: the measured numbers, machine and settings are
    kept. loss.png stays as it is (report.json holds no loss curves)."""
    with open(os.path.join(output, "report.json")) as f:
        old = json.load(f)
    results = _per_seed_results(old)
    report = {"preset": old["preset"], "task": old.get("task", "bbox"), "seeds": list(results),
              "preset_settings": old["preset_settings"],
              "data": old.get("data", "generated shapes"), "machine": old["machine"],
              "torch": old["torch"], **summarize(results)}
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_markdown(output, report)
    save_figure(ap_figure(report), os.path.join(output, "ap.png"))
    return report


def write_markdown(output: str, report: Dict) -> None:
    """report.md in `output` from the report (write_report's): settings, a table per task,
    the gap recovered, the comparisons, graph sizes and the figures."""
    preset_name, task, seeds = report["preset"], report["task"], report["seeds"]
    preset = Preset(**report["preset_settings"])
    data = report["data"]
    user_data = None if isinstance(data, str) else UserData(
        tuple(data["train"]), tuple(data["val"]), data["num_classes"], tuple(data["image_size"]))
    seed_text = ", ".join(map(str, seeds))
    arch = "Mask R-CNN " if task == "segm" else ""
    threads = sorted(set().union(*(_run_threads(report, name) for name in report["mean"])))
    lines = [f"# DSIG demo report ({preset_name} preset{', Mask R-CNN' if arch else ''}, "
             f"seed{'s' if len(seeds) > 1 else ''} {seed_text})", "",
             *pipeline_check_lines(preset_name, preset),
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
             f"{preset.student_iters}, batch {preset.batch}", timing_note(report), ""]
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
            s_iter = _seconds_per_iter(v)
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
    lines += graph_lines(_per_seed_results(report))
    lines += ["![AP](ap.png)", "", "![training loss](loss.png)", ""]
    if os.path.isfile(os.path.join(output, "graph.png")):
        lines += [f"Instance graph of the DSIG student (seed {seeds[0]}) on a validation image "
                  "(nodes; teacher and student edge matrices; their difference):", "",
                  "![instance graph](graph.png)", ""]
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("\n".join(lines))


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
