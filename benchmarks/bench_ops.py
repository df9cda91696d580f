#!/usr/bin/env python
"""Fused dsig_ext ops vs the paths they replace, on the DSIG workload.

RoIAlign: B images of 800x1333 (FPN P2-P5, 256 channels), 512 RoIs/image (the box head) and
~140 RoIs/image (DSIG node pooling), 7x7, sampling 0, ROIAlignV2; detectron2's ROIPooler vs
dsig_ext.MultiLevelRoIAlign (default and deterministic backward).
Edge loss: graphs of N ~ 140 and 300 nodes, D = 12544, one graph per image; the original DSIG
per-graph loop vs dsig_ext.edge_mse_loss.

Writes bench_ops_<device>.{json,md,png} (machine and versions stamped) to --out.
Usage: python benchmarks/bench_ops.py [--device cpu|cuda] [--batch B] [--repeat R] [--out DIR]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dsig_ext  # noqa: E402
from common import machine_name  # noqa: E402

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
IMAGE_HW = (800, 1333)
CHANNELS = 256


def timeit(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_boxes(n, generator):
    """Proposal-like boxes: log-uniform sizes 16-600 px, aspect 1/3-3, inside the image."""
    h, w = IMAGE_HW
    size = torch.exp(torch.empty(n).uniform_(math.log(16), math.log(600), generator=generator))
    aspect = torch.exp(torch.empty(n).uniform_(math.log(1 / 3), math.log(3), generator=generator))
    bw, bh = size * aspect.sqrt(), size / aspect.sqrt()
    x1 = torch.rand(n, generator=generator) * (w - bw).clamp(min=1)
    y1 = torch.rand(n, generator=generator) * (h - bh).clamp(min=1)
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)


def reference_pooler():
    try:
        from detectron2.modeling.poolers import ROIPooler
        return "detectron2 ROIPooler", ROIPooler(7, SCALES, 0, "ROIAlignV2")
    except ImportError:  # the same per-level algorithm, without detectron2
        return "per-level reference", dsig_ext.MultiLevelRoIAlign(7, SCALES, 0,
                                                                  backend="reference")


def bench_roi_align(device, batch, rois_per_image, warmup, repeat):
    g = torch.Generator().manual_seed(0)
    h, w = IMAGE_HW
    feats = [torch.randn(batch, CHANNELS, math.ceil(h / s), math.ceil(w / s), generator=g)
             .to(device).requires_grad_() for s in (4, 8, 16, 32)]
    boxes = [make_boxes(rois_per_image, g).to(device) for _ in range(batch)]
    try:
        from detectron2.structures import Boxes
        box_arg = [Boxes(b) for b in boxes]
    except ImportError:
        box_arg = boxes
    ref_name, ref = reference_pooler()
    poolers = {ref_name: ref,
               "dsig_ext fused": dsig_ext.MultiLevelRoIAlign(7, SCALES, 0),
               "dsig_ext fused (deterministic)": dsig_ext.MultiLevelRoIAlign(7, SCALES, 0,
                                                                            deterministic=True)}
    grad = torch.randn(batch * rois_per_image, CHANNELS, 7, 7, generator=g).to(device)
    rows = []
    for name, pooler in poolers.items():
        def fwd():
            with torch.no_grad():
                pooler(feats, box_arg)

        def fwd_bwd():
            out = pooler(feats, box_arg)
            torch.autograd.grad(out, feats, grad)

        rows.append({"op": "multilevel_roi_align", "impl": name, "batch": batch,
                     "rois_per_image": rois_per_image,
                     "forward_ms": 1e3 * timeit(fwd, device, warmup, repeat),
                     "forward_backward_ms": 1e3 * timeit(fwd_bwd, device, warmup, repeat)})
    return rows


def bench_edge_loss(device, batch, nodes, warmup, repeat):
    g = torch.Generator().manual_seed(1)
    dim = CHANNELS * 7 * 7
    xs = torch.randn(batch * nodes, dim, generator=g).abs().to(device).requires_grad_()
    xt = torch.randn(batch * nodes, dim, generator=g).abs().to(device)
    offsets = dsig_ext.offsets_from_counts([nodes] * batch)
    rows = []
    for name, backend in (("per-graph loop (original DSIG)", "reference"),
                          ("dsig_ext fused", "fused")):
        def fwd():
            with torch.no_grad():
                dsig_ext.edge_mse_loss(xs, xt, offsets, backend=backend)

        def fwd_bwd():
            loss = dsig_ext.edge_mse_loss(xs, xt, offsets, backend=backend)
            torch.autograd.grad(loss, xs)

        rows.append({"op": "edge_mse_loss", "impl": name, "batch": batch, "nodes": nodes,
                     "dim": dim, "forward_ms": 1e3 * timeit(fwd, device, warmup, repeat),
                     "forward_backward_ms": 1e3 * timeit(fwd_bwd, device, warmup, repeat)})
    return rows


def speedups(rows, key):
    """Each fused row's speed-up over the first (reference) row of its group."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r.get("rois_per_image"), r.get("nodes")), []).append(r)
    for group in groups.values():
        base = group[0]
        for r in group:
            r[f"speedup_{key}"] = base[f"{key}_ms"] / r[f"{key}_ms"]


def markdown(result):
    lines = [f"# dsig_ext op benchmark ({result['device']})", "",
             f"- machine: {result['machine']}", f"- torch {result['torch']}, "
             f"dsig_ext {result['dsig_ext']}, threads {result['threads']}",
             f"- median of {result['repeat']} runs after {result['warmup']} warm-up runs", "",
             "| op | workload | implementation | forward ms | fwd+bwd ms | fwd speed-up "
             "| fwd+bwd speed-up |", "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["op"] == "multilevel_roi_align":
            work = f"B={r['batch']}, {r['rois_per_image']} RoIs/img, 256ch 7x7"
        else:
            work = f"{r['batch']} graphs x N={r['nodes']}, D={r['dim']}"
        lines.append(f"| {r['op']} | {work} | {r['impl']} | {r['forward_ms']:.2f} | "
                     f"{r['forward_backward_ms']:.2f} | {r['speedup_forward']:.2f}x | "
                     f"{r['speedup_forward_backward']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Bar chart of forward+backward time per workload and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in result["rows"]:
        key = (f"RoIAlign {r['rois_per_image']} RoIs/img" if r["op"] == "multilevel_roi_align"
               else f"edge loss N={r['nodes']}")
        groups.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4))
    for ax, (title, rows) in zip(axes, groups.items()):
        names = [r["impl"].replace(" (", "\n(") for r in rows]
        values = [r["forward_backward_ms"] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["#999999"] + ["#1f77b4"] * (len(rows) - 1))
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r['speedup_forward_backward']:.1f}x",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=15)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("forward+backward ms")
    fig.suptitle(f"dsig_ext ops, {result['machine']}, torch {result['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images (default 2 CPU, 8 GPU)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--tag", default=None, help="file name suffix (default: the device)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    batch = args.batch or (8 if device == "cuda" else 2)
    repeat = args.repeat or (50 if device == "cuda" else 5)
    warmup = args.warmup or (10 if device == "cuda" else 1)
    rows = []
    for rois in (512, 140):
        print(f"[bench] multilevel_roi_align B={batch} {rois} RoIs/img", flush=True)
        rows += bench_roi_align(device, batch, rois, warmup, repeat)
    for nodes in (140, 300):
        print(f"[bench] edge_mse_loss {batch} graphs x {nodes} nodes", flush=True)
        rows += bench_edge_loss(device, batch, nodes, warmup, repeat)
    speedups(rows, "forward")
    speedups(rows, "forward_backward")
    result = {"device": device, "machine": machine_name(device), "torch": torch.__version__,
              "dsig_ext": dsig_ext.__version__, "threads": torch.get_num_threads(),
              "repeat": repeat, "warmup": warmup, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or device
    with open(os.path.join(args.out, f"bench_ops_{tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.join(args.out, f"bench_ops_{tag}.md"), "w") as f:
        f.write(md)
    plot(result, os.path.join(args.out, f"bench_ops_{tag}.png"))
    print(md)


if __name__ == "__main__":
    main()
