#!/usr/bin/env python
"""Instance-graph sizes with a trained teacher, from a finished demo run.

The training-step benchmarks use random weights, with which the teacher finds every sampled bg
RoI confusing (graphs of every RoI). This measures what a trained teacher mines: DSIG forward
passes in training mode (no backward) on the demo's training data, with the demo's trained
teacher, once with the student as built (the start of training) and once with the DSIG
student's final weights; it reports the `dsig/graph_nodes` and `dsig/mined_bg_fraction` that
training logs.

Usage: python benchmarks/graph_sizes_demo.py --demo OUTPUT [--preset quick] [--seed 0]
(OUTPUT: a folder where `run_demo.py --output OUTPUT` finished its teacher and DSIG student).
Writes graph_sizes_demo.{json,md} to --out (default output/benchmarks/; --out benchmarks/results
rewrites the committed results).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import PROJECT  # noqa: E402
from common import add_out_argument, at_least, machine_name, write_results  # noqa: E402


def measure(cfg, weights, iters):
    """Per-iteration graph metrics of `iters` training-mode forward passes."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from distillation.checkpoint import DistillationCheckpointer

    torch.manual_seed(0)
    model = build_model(cfg)
    if weights:
        DistillationCheckpointer(model).load(weights)
    model.train()
    batches = iter(build_detection_train_loader(cfg))
    rows = []
    with torch.no_grad():
        for _ in range(iters):
            with EventStorage() as storage:
                model(next(batches))
                latest = {k: v for k, (v, _) in storage.latest().items()}
            rows.append({"nodes": latest["dsig/graph_nodes"],
                         "mined": latest["dsig/mined_bg_fraction"],
                         "fg": latest["roi_head/num_fg_samples"]})
    return {k: statistics.median(r[k] for r in rows) for k in ("nodes", "mined", "fg")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="output folder of a finished demo run")
    p.add_argument("--preset", default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=at_least(1), default=20)
    add_out_argument(p)
    return p, p.parse_args(argv)


def main(argv=None):
    p, a = parse_args(argv)
    sys.path.insert(0, PROJECT)
    from distillation import demo
    from distillation.training import load_config, register_datasets

    if a.preset not in demo.PRESETS:
        p.error(f"--preset: choose from {sorted(demo.PRESETS)}")
    tag = demo.run_tag(a.preset)
    for name in ("teacher", "dsig"):  # checked first: planning would generate missing data
        path = os.path.join(demo.run_dir(a.demo, name, tag, a.seed), "model_final.pth")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: run the demo with --output {a.demo} first")
    job = next(j for j in demo.plan_seed(a.demo, a.preset, a.seed) if j.name == "dsig")
    final = os.path.join(job.output_dir, "model_final.pth")
    register_datasets(job.datasets)
    cfg = load_config(job.config, list(job.opts) + ["DATALOADER.NUM_WORKERS", "0"])
    cfg.freeze()
    result = {"machine": machine_name("cpu"), "preset": a.preset, "seed": a.seed,
              "iters": a.iters, "sampled_per_image": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
              "mining_threshold": cfg.DISTILL.BG_MINING_THRESHOLD,
              "student as built": measure(cfg, None, a.iters),
              "DSIG student, final": measure(cfg, final, a.iters)}
    lines = ["# Instance-graph sizes with the demo's trained teacher", "",
             f"- demo {a.preset} preset, seed {a.seed}: {result['sampled_per_image']} sampled "
             f"RoIs per image, mining threshold {result['mining_threshold']}; medians over "
             f"{a.iters} training-mode forward passes", "",
             "| student | graph nodes per image | bg RoIs mined | fg RoIs sampled per image |",
             "|---|---:|---:|---:|"]
    for name in ("student as built", "DSIG student, final"):
        r = result[name]
        lines.append(f"| {name} | {r['nodes']:.1f} | {100 * r['mined']:.1f} % | {r['fg']:.1f} |")
    write_results(a.out, "graph_sizes_demo", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
