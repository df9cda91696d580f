#!/usr/bin/env python
"""Tiny op calls while other processes keep the cores busy (as data-loader workers or a second
job do), against the torch/torchvision code they replace.

A parallel region opened for tiny work waits for a descheduled thread: on a loaded machine that
turns a sub-millisecond call into tens of milliseconds. Each op is timed forward and backward on
tiny inputs (3 RoIs on one 4x16x16 level; 2 graphs of 5 nodes with 16 features), also forward
and backward in one call as training makes them (the public op, its autograd, the backward),
interleaved with its baseline, while --load busy processes spin (--load-kind python: pure-Python
workers, as data-loader workers are; torch: a second 2-thread torch job); median and 90th
percentile per call.

Usage: python benchmarks/bench_small_under_load.py [--threads 2] [--load 2] [--calls 300]
Writes bench_small_under_load_<tag>.{json,md} to --out (default output/benchmarks/;
--out benchmarks/results rewrites the committed results).
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsig_ext  # noqa: E402
from common import add_out_argument, at_least, machine_name, write_results  # noqa: E402


def spin(stop, kind):
    """A busy process until told to stop: pure-Python arithmetic ("python", as a data-loader
    worker decoding images) or 2-thread torch matrix products ("torch", as a second job)."""
    if kind == "torch":
        torch.set_num_threads(2)
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a)
        return
    x = 0
    while not stop.is_set():
        for i in range(10000):
            x += i * i


def cases():
    """name -> (ours, baseline), each a callable doing one call."""
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 4, 16, 16, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 40.0], [0, 8.0, 8.0, 50.0, 33.0],
                         [0, 0.0, 0.0, 63.0, 63.0]])
    levels = torch.zeros(3, dtype=torch.long)
    grad = torch.randn(3, 4, 7, 7, generator=g)
    out = dsig_ext.multilevel_roi_align([feat], rois, levels, [0.25], 7)
    ref_out = roi_align(feat, rois, 7, 0.25, 0, True)
    ops = torch.ops.dsig
    xs = torch.randn(10, 16, generator=g).abs().requires_grad_()
    xt = torch.randn(10, 16, generator=g).abs()
    offsets = torch.tensor([0, 5, 10])
    loss = dsig_ext.edge_mse_loss(xs, xt, offsets)
    ref_loss = dsig_ext.reference.edge_mse_loss(xs, xt, offsets)
    edges = dsig_ext.cosine_edges(xs, offsets)
    ref_edges = dsig_ext.reference.cosine_edges(xs, offsets)
    boxes = rois[:, 1:]
    return {
        "multilevel_roi_align forward": (
            lambda: ops.multilevel_roi_align([feat.detach()], rois, levels, [0.25], 7, 7, 0, True,
                                             False),
            lambda: roi_align(feat.detach(), rois, 7, 0.25, 0, True)),
        "multilevel_roi_align backward": (
            lambda: torch.autograd.grad(out, feat, grad, retain_graph=True),
            lambda: torch.autograd.grad(ref_out, feat, grad, retain_graph=True)),
        "multilevel_roi_align forward + backward": (
            lambda: torch.autograd.grad(
                dsig_ext.multilevel_roi_align([feat], rois, levels, [0.25], 7), feat, grad),
            lambda: torch.autograd.grad(roi_align(feat, rois, 7, 0.25, 0, True), feat, grad)),
        "multilevel_roi_align backward (deterministic)": (
            lambda: ops._multilevel_roi_align_backward(grad, rois, levels, [0.25], 1, 4, [16],
                                                       [16], 0, True, True),
            lambda: torch.autograd.grad(ref_out, feat, grad, retain_graph=True)),
        "assign_fpn_levels": (
            lambda: dsig_ext.assign_fpn_levels(boxes, 2, 5),
            lambda: dsig_ext.reference.assign_fpn_levels(boxes, 2, 5)),
        "edge_mse_loss forward": (
            lambda: dsig_ext.edge_mse_loss(xs.detach(), xt, offsets),
            lambda: dsig_ext.reference.edge_mse_loss(xs.detach(), xt, offsets)),
        "edge_mse_loss forward + backward": (
            lambda: torch.autograd.grad(dsig_ext.edge_mse_loss(xs, xt, offsets), xs),
            lambda: torch.autograd.grad(dsig_ext.reference.edge_mse_loss(xs, xt, offsets), xs)),
        "edge_mse_loss backward": (
            lambda: torch.autograd.grad(loss, xs, retain_graph=True),
            lambda: torch.autograd.grad(ref_loss, xs, retain_graph=True)),
        "cosine_edges forward": (
            lambda: dsig_ext.cosine_edges(xs.detach(), offsets),
            lambda: dsig_ext.reference.cosine_edges(xs.detach(), offsets)),
        "cosine_edges backward": (
            lambda: torch.autograd.grad(edges.sum(), xs, retain_graph=True),
            lambda: torch.autograd.grad(ref_edges.sum(), xs, retain_graph=True)),
    }


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(calls):
    rows = []
    for name, (ours, base) in cases().items():
        t_ours, t_base = [], []
        for fn in (ours, base):
            fn()
        for _ in range(calls):  # interleaved: both see the same load
            for fn, times in ((ours, t_ours), (base, t_base)):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        rows.append({"op": name, "median_ms": statistics.median(t_ours),
                     "p90_ms": percentile(t_ours, 0.9),
                     "baseline_median_ms": statistics.median(t_base),
                     "baseline_p90_ms": percentile(t_base, 0.9)})
    return rows


def markdown(result):
    lines = ["# Tiny op calls under load (cpu)", "",
             f"- machine: {result['machine']}; torch {result['torch']}, "
             f"{result['threads']} torch threads, {result['load']} busy processes "
             f"({result['load_kind']}), "
             f"{result['calls']} interleaved calls per op", "",
             "| op | ours median ms | ours p90 ms | baseline median ms | baseline p90 ms "
             "| median ratio | p90 ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['baseline_median_ms']:.3f} | {r['baseline_p90_ms']:.3f} | "
                     f"{r['median_ms'] / r['baseline_median_ms']:.2f} | "
                     f"{r['p90_ms'] / r['baseline_p90_ms']:.2f} |")
    lines += ["", "Baselines: torchvision roi_align (forward, autograd backward) for the RoIAlign "
              "rows; dsig_ext.reference (the per-graph torch loop / detectron2's level rule) for "
              "the others."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=at_least(1), default=2)
    p.add_argument("--load", type=at_least(0), default=2, help="busy processes during the timing")
    p.add_argument("--load-kind", default="torch", choices=["torch", "python"])
    p.add_argument("--calls", type=at_least(1), default=300)
    add_out_argument(p)
    p.add_argument("--tag", default="cpu")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    stop = mp.Event()
    workers = [mp.Process(target=spin, args=(stop, a.load_kind), daemon=True)
               for _ in range(a.load)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        rows = measure(a.calls)
    finally:
        stop.set()
        for w in workers:
            w.join(5)
    result = {"machine": machine_name("cpu"), "torch": torch.__version__, "threads": a.threads,
              "load": a.load, "load_kind": a.load_kind, "calls": a.calls, "rows": rows}
    write_results(a.out, f"bench_small_under_load_{a.tag}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
