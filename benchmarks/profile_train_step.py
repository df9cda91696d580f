#!/usr/bin/env python
"""Where a DSIG training step spends its time: torch.profiler over a few steps of a config.

Per config it reports (1) the forward regions the meta-architectures name with
``record_function`` (student backbone / RPN / box branch, teacher backbone, teacher RoI work,
graph assembly, node, edge and feature losses), inclusive time per step; (2) the costliest
backward functions; (3) the marginal cost of each DSIG term, measured as the step time with the
term switched off, interleaved with the full step in one process. Same models, batch and
calibration as bench_train_step.py (random weights, lr 0).

Usage: python benchmarks/profile_train_step.py [--configs C ...] [--steps N] [--out DIR]
Writes profile_train_step_<device>.{json,md} to --out (default output/benchmarks/;
--out benchmarks/results rewrites the committed results).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import PROJECT, prepare_variant  # noqa: E402
from common import add_out_argument, at_least, machine_name, write_results  # noqa: E402

sys.path.insert(0, PROJECT)  # the distillation package

DEFAULT_CONFIGS = ["Distillation-FasterRCNN-R18-R50-dsig-1x.yaml",
                   "Distillation-RetinaNet-R18-R50-dsig-1x.yaml"]
# term -> config options that switch it off (the rest of the step unchanged)
ABLATIONS = {
    "edge loss": ["DISTILL.EDGE_LOSS_ON", "False"],
    "bg mining (teacher box head on bg RoIs)": ["DISTILL.BG_MINING_ON", "False"],
    "fg node loss": ["DISTILL.FG_NODE_LOSS_ON", "False"],
    "bg node loss": ["DISTILL.BG_NODE_LOSS_ON", "False"],
    "logit KD (teacher head on the RoIs / anchors)": ["DISTILL.ROI_CLS_KD_ON", "False",
                                                      "DISTILL.ROI_REG_KD_ON", "False"],
    "feature imitation": ["DISTILL.FEATURE_LOSS_ON", "False"],
}


def step_times(step, device, steps):
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def profile_regions(step, device, steps):
    """Inclusive ms per step of the named regions, and the top backward functions."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    regions, backward = {}, {}
    for evt in prof.key_averages():
        ms = evt.cpu_time_total / 1e3 / steps
        if evt.key.startswith(("student.", "dsig.")):
            regions[evt.key] = ms
        elif evt.key.startswith("autograd::engine::evaluate_function: "):
            backward[evt.key.split(": ", 1)[1]] = ms
    top = dict(sorted(backward.items(), key=lambda kv: -kv[1])[:12])
    return regions, top


def marginal_costs(config, device, size, batch, steps, applicable):
    """Seconds per step of the full DSIG step and of each ablation, rounds interleaved."""
    variants = {"full": prepare_variant(config, "dsig-fused", device, size, batch)[2]}
    for name, opts in ABLATIONS.items():
        if name in applicable:
            variants[name] = prepare_variant(config, "dsig-fused", device, size, batch, opts)[2]
    times = {name: [] for name in variants}
    for step in variants.values():
        step()  # warm-up
    for _ in range(steps):
        for name, step in variants.items():
            times[name] += step_times(step, device, 1)
    full = statistics.median(times["full"])
    return {name: {"seconds_per_step": statistics.median(t),
                   "marginal_seconds": full - statistics.median(t) if name != "full" else 0.0}
            for name, t in times.items()}


def floor_work(cfg, model, logged, device, size, batch):
    """The work a DSIG step must do beyond the student step and the teacher's backbone forward,
    each piece as a function run alone on inputs of this step's shapes: the teacher's box head on
    the RoIs it classifies (mining, RoI KD), the teacher's dense head (RetinaNet logit KD) and the
    edge loss forward + backward on graphs of the logged size (dsig_ext's fused op)."""
    import dsig_ext

    d, teacher = cfg.DISTILL, model.teacher
    gen = torch.Generator().manual_seed(0)
    work = {}
    retina = "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
    roi_kd = d.ROI_CLS_KD_ON or d.ROI_REG_KD_ON
    if not retina and (roi_kd or (d.EDGE_LOSS_ON and d.BG_MINING_ON)):
        per_image = logged["roi_head/num_bg_samples"] + (
            logged["roi_head/num_fg_samples"] if roi_kd else 0)
        head = teacher.roi_heads
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        x = torch.randn(round(per_image * batch), cfg.MODEL.FPN.OUT_CHANNELS, res, res,
                        generator=gen).to(device)

        def box_head():
            with torch.no_grad():
                head.box_predictor(head.box_head(x))
        work[f"teacher box head on {x.shape[0]} RoIs"] = box_head
    if retina and roi_kd:
        from bench_train_step import _batch
        from distillation.teacher import teacher_images

        with torch.no_grad():
            images = teacher_images(teacher, _batch(cfg, batch, size), model.flip_teacher_input,
                                    model.device)
            t_dict = teacher.backbone(images.tensor)
            t_features = [t_dict[f] for f in teacher.head_in_features]

        def dense_head():
            with torch.no_grad():
                teacher.head(t_features)
        work["teacher dense head"] = dense_head
    if d.EDGE_LOSS_ON and "dsig/graph_nodes" in logged:
        n = max(1, round(logged["dsig/graph_nodes"]))
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION if not retina else d.NODE_POOLER_RESOLUTION
        dim = cfg.MODEL.FPN.OUT_CHANNELS * res * res
        s_nodes = torch.randn(n * batch, dim, generator=gen).to(device).requires_grad_()
        t_nodes = torch.randn(n * batch, dim, generator=gen).to(device)
        offsets = dsig_ext.offsets_from_counts([n] * batch)

        def edge_loss():
            dsig_ext.edge_mse_loss(s_nodes, t_nodes, offsets).backward()
        work[f"edge loss fwd+bwd, {batch} graphs of {n} nodes"] = edge_loss
    return work


def floor_costs(config, cfg, model, full, logged, device, size, batch, steps):
    """(b) the student step plus the teacher's backbone forward, (d) the DSIG step `full` of
    `model` (whose warm-up logged this batch's RoI counts and graph sizes) and the pieces of
    floor_work, all interleaved round by round: the floor (b + pieces) / (b) is what an
    implementation doing nothing else would reach; (d) / (b) is what this one reaches."""
    _, _, base = prepare_variant(config, "student+teacher", device, size, batch)
    calls = {"(b) student + teacher backbone": base, "(d) DSIG step": full,
             **floor_work(cfg, model, logged, device, size, batch)}
    for f in calls.values():
        f()  # warm-up
    times = {name: [] for name in calls}
    for _ in range(steps):
        for name, f in calls.items():
            times[name] += step_times(f, device, 1)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    b, dsig = seconds.pop("(b) student + teacher backbone"), seconds.pop("(d) DSIG step")
    return {"b_seconds": b, "d_seconds": dsig, "pieces": seconds,
            "floor_ratio": (b + sum(seconds.values())) / b, "measured_ratio": dsig / b}


def graph_sentence(row):
    g = row.get("graph") or {}
    if "dsig/graph_nodes" not in g:
        return ""
    from distillation.meta_arch import describe_graph_sizes

    sizes = describe_graph_sizes(g["dsig/graph_nodes"], g.get("dsig/mined_bg_fraction"))
    return f"Graphs: {sizes}."


def markdown(result):
    lines = [f"# DSIG training-step profile ({result['device']})", "",
             f"- machine: {result['machine']}", f"- torch {result['torch']}, input "
             f"{result['size'][0]}x{result['size'][1]}, {result['batch']} images/step, "
             f"{result.get('threads', '?')} torch thread(s), "
             f"{result['steps']} profiled steps (random weights, lr 0)", ""]
    for row in result["rows"]:
        total = row["step_seconds"] * 1e3
        lines += [f"## {row['config']}", "",
                  f"Step: {total:.0f} ms (median, not profiled). {graph_sentence(row)}", "",
                  "| forward region | ms/step | % of step |", "|---|---:|---:|"]
        for name, ms in sorted(row["regions"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {ms:.1f} | {100 * ms / total:.1f} |")
        lines += ["", "| backward function (top 12) | ms/step | % of step |", "|---|---:|---:|"]
        for name, ms in row["backward"].items():
            lines.append(f"| {name} | {ms:.1f} | {100 * ms / total:.1f} |")
        lines += ["", "| DSIG term switched off | s/step | marginal cost of the term, ms "
                  "| % of the full step |", "|---|---:|---:|---:|"]
        full = row["marginal"]["full"]["seconds_per_step"]
        for name, m in row["marginal"].items():
            cost = m["marginal_seconds"] * 1e3
            lines.append(f"| {name} | {m['seconds_per_step']:.3f} | "
                         f"{'' if name == 'full' else f'{cost:.0f}'} | "
                         f"{'' if name == 'full' else f'{100 * cost / (full * 1e3):.1f}'} |")
        floor = row.get("floor")
        if floor:
            lines += ["", "| work beyond (b), timed alone | ms |", "|---|---:|"]
            lines += [f"| {name} | {1e3 * sec:.0f} |" for name, sec in floor["pieces"].items()]
            lines += ["", f"(b) student + teacher backbone {1e3 * floor['b_seconds']:.0f} ms, "
                      f"(d) DSIG {1e3 * floor['d_seconds']:.0f} ms: measured (d)/(b) "
                      f"**{floor['measured_ratio']:.2f}**; floor (b + the work above)/(b) "
                      f"**{floor['floor_ratio']:.2f}** (rounds interleaved, medians)."]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--size", type=at_least(1), nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch", type=at_least(1), default=2)
    p.add_argument("--steps", type=at_least(1), default=3)
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch threads (default: torch's choice); stamped in the results")
    add_out_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    size = a.size or ([800, 1333] if a.device == "cuda" else [320, 480])
    rows = []
    for config in a.configs:
        print(f"[profile] {config}", flush=True)
        cfg, model, step = prepare_variant(config, "dsig-fused", a.device, size, a.batch)
        logged = step()  # warm-up; this batch's RoI counts and graph sizes
        graph = {k: v for k, v in logged.items() if k.startswith("dsig/")}
        step_seconds = statistics.median(step_times(step, a.device, a.steps))
        regions, backward = profile_regions(step, a.device, a.steps)
        d = cfg.DISTILL
        on = {"edge loss": d.EDGE_LOSS_ON,
              "bg mining (teacher box head on bg RoIs)": d.EDGE_LOSS_ON and d.BG_MINING_ON,
              "fg node loss": d.FG_NODE_LOSS_ON, "bg node loss": d.BG_NODE_LOSS_ON,
              "logit KD (teacher head on the RoIs / anchors)": d.ROI_CLS_KD_ON or d.ROI_REG_KD_ON,
              "feature imitation": d.FEATURE_LOSS_ON}
        applicable = [k for k, v in on.items()
                      if v and not (k.startswith("bg") and "RetinaNet" in config)]
        marginal = marginal_costs(config, a.device, size, a.batch, a.steps, applicable)
        floor = floor_costs(config, cfg, model, step, logged, a.device, size, a.batch,
                            max(a.steps, 5))
        rows.append({"config": config, "step_seconds": step_seconds, "regions": regions,
                     "backward": backward, "marginal": marginal, "graph": graph,
                     "floor": floor})
    result = {"device": a.device, "machine": machine_name(a.device), "torch": torch.__version__,
              "size": size, "batch": a.batch, "steps": a.steps,
              "threads": torch.get_num_threads(), "rows": rows}
    write_results(a.out, f"profile_train_step_{a.device}", result, markdown(result))


if __name__ == "__main__":
    main()
