"""Statistics over the seeds: per-seed and mean metrics, the teacher-baseline gap each
distilled student recovers, the seed spread, and sentences that compare runs against it."""
from typing import Dict, List, Optional

from .presets import TASKS

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]

ONE_SEED = "One seed: no spread estimate, so no difference below is claimed as real."


def mean(values: List[float]) -> float:
    """Mean of the finite values (NaN: no object of that size in a split); NaN if none."""
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def gap_recovered(teacher_ap: float, baseline_ap: float, dsig_ap: float) -> Optional[float]:
    """Fraction of the teacher-baseline AP gap the DSIG student recovers."""
    gap = teacher_ap - baseline_ap
    return None if abs(gap) < 1e-9 else (dsig_ap - baseline_ap) / gap


def timed_iters(runs: List[Dict]) -> Optional[int]:
    """The fewest training steps any of these runs (one run over the seeds) timed; None when a
    run predates the count (its s/iter was detectron2's logged step time)."""
    counts = [run.get("timed_iters") for run in runs]
    return None if None in counts else min(counts)


def tasks_of(results: Dict[int, Dict[str, Dict]]) -> List[str]:
    """The evaluation tasks present in the results (bbox always; segm for Mask R-CNN)."""
    runs = [run for r in results.values() for run in r.values()]
    return [t for t in TASKS if t == "bbox" or any(t in run for run in runs)]


def suffix(task: str) -> str:
    """Report keys: the box keys keep their plain names, mask ones end in _segm."""
    return "" if task == "bbox" else f"_{task}"


def summarize(results: Dict[int, Dict[str, Dict]]) -> Dict:
    """Per-seed and seed-averaged metrics, and the gap each DSIG variant recovers, per task
    (box AP under the plain keys, mask AP under keys ending in _segm)."""
    names = list(next(iter(results.values())))
    tasks = tasks_of(results)
    nan = float("nan")

    def metric(run: Dict, task: str, k: str) -> float:
        return run.get(task, {}).get(k, nan)  # no detections: no segm block

    means = {name: {**{t: {k: mean([metric(r[name], t, k) for r in results.values()])
                           for k in METRICS} for t in tasks},
                    "seconds_per_iter": mean([r[name]["seconds_per_iter"]
                                              for r in results.values()]),
                    "timed_iters": timed_iters([r[name] for r in results.values()])}
             for name in names}
    variants = [n for n in names if n not in ("teacher", "baseline")]

    def gaps(ap: Dict[str, float]) -> Dict[str, Optional[float]]:
        return {n: gap_recovered(ap["teacher"], ap["baseline"], ap[n]) for n in variants}

    summary = {
        "tasks": tasks,
        "per_seed": {str(seed): {
            "results": {n: {**{t: v.get(t, {}) for t in tasks},
                            "seconds_per_iter": v["seconds_per_iter"],
                            "timed_iters": v.get("timed_iters"),
                            "threads": v.get("threads"),
                            **({"graph": v["graph"]} if v.get("graph") else {})}
                        for n, v in r.items()},
            **{"gap_recovered" + suffix(t): gaps({n: metric(v, t, "AP") for n, v in r.items()})
               for t in tasks}}
            for seed, r in results.items()},
        "mean": means}
    for t in tasks:
        # from the seed-averaged APs: a per-seed ratio of small gaps is noisy
        summary["gap_recovered" + suffix(t)] = gaps({n: v[t]["AP"] for n, v in means.items()})
        # max - min AP over the seeds (0 with one seed)
        summary["spread" + suffix(t)] = {
            n: max(metric(r[n], t, "AP") for r in results.values())
            - min(metric(r[n], t, "AP") for r in results.values()) for n in names}
    return summary


def compare_runs(report: Dict, name: str, reference: str, task: str = "bbox") -> str:
    """One sentence: the mean AP of run `name` against run `reference`'s, and whether the
    difference exceeds the seed spread (max - min over the seeds of either run)."""
    ap = report["mean"][name][task]["AP"]
    ref = report["mean"][reference][task]["AP"]
    spread = max(report["spread" + suffix(task)][name],
                 report["spread" + suffix(task)][reference])
    label = "the baseline" if reference == "baseline" else reference
    if ap != ap or ref != ref:  # NaN: a run without detections to evaluate
        verdict = "no AP to compare"
    elif abs(ap - ref) <= spread:
        verdict = f"within the seed spread: not distinguishable from {label}"
    else:
        verdict = f"{'above' if ap > ref else 'below'} {label} by more than the seed spread"
    return (f"- {name}: {ap:.2f} vs {reference} {ref:.2f} (difference {ap - ref:+.2f}, "
            f"seed spread {spread:.2f}): {verdict}.")


def versus_baseline(report: Dict, task: str = "bbox") -> List[str]:
    """One sentence per distilled student against the baseline (compare_runs)."""
    if len(report["seeds"]) < 2:
        return [ONE_SEED]
    return [compare_runs(report, name, "baseline", task)
            for name in report["gap_recovered" + suffix(task)]]


def dsig_versus_others(report: Dict, task: str = "bbox") -> List[str]:
    """DSIG against each other distilled student (KD baselines, ablations), a compare_runs
    sentence each; empty when DSIG or the others were not trained, or with one seed."""
    others = [n for n in report["gap_recovered" + suffix(task)] if n != "dsig"]
    if "dsig" not in report["mean"] or not others or len(report["seeds"]) < 2:
        return []
    return [compare_runs(report, "dsig", other, task) for other in others]
