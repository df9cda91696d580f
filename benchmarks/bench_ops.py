#!/usr/bin/env python
"""Fused dsig_ext ops vs the paths they replace, on the DSIG workload.

RoIAlign: B images of 800x1333 (FPN P2-P5, 256 channels), 512 RoIs/image (the box head) and
~140 RoIs/image (DSIG node pooling), 7x7, sampling 0, ROIAlignV2; detectron2's ROIPooler (or,
without detectron2, the same per-level torchvision roi_align loop) vs
dsig_ext.MultiLevelRoIAlign (default and deterministic backward). 16-bit features go to the
baseline up-cast to fp32, as autocast does (torchvision's CUDA roi_align has no bf16 kernel).
Edge loss: graphs of N ~ 140 and 300 nodes, D = 12544, one graph per image; the original DSIG
per-graph loop vs dsig_ext.edge_mse_loss.
On CUDA it also times each kernel alone (forward, atomic and deterministic backward, edge loss
forward + backward) next to its H100 roofline floor (benchmarks/roofline.py).

Writes bench_ops_<tag>.{json,md,png} (machine and versions stamped) to --out (default
output/benchmarks/; --out benchmarks/results rewrites the committed results).
Usage: python benchmarks/bench_ops.py [--device cpu|cuda] [--batches B ...]
       [--dtypes float32 bfloat16] [--repeat R] [--warmup W] [--out DIR]
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dsig_ext  # noqa: E402
import roofline  # noqa: E402
from common import (add_out_argument, at_least, machine_name, versions,  # noqa: E402
                    write_results)

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
IMAGE_HW = (800, 1333)
CHANNELS = 256


def timeit(fns, device, warmup, repeat):
    """Median seconds per call of each function in `fns` (name -> callable), the functions
    called in turn round by round so that all see the same machine state: CUDA events around
    each call on a GPU, wall clock on the CPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    if device == "cuda":
        torch.cuda.synchronize()
        events = {name: [] for name in fns}
        for _ in range(repeat):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
        return {name: statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs)
                for name, pairs in events.items()}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


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
        return "per-level torchvision roi_align", dsig_ext.MultiLevelRoIAlign(
            7, SCALES, 0, backend="reference")


def upcast(pooler):
    """The baseline on 16-bit features: levels up-cast to fp32 (autocast's behaviour)."""
    def run(feats, boxes):
        return pooler([f.float() for f in feats], boxes).to(feats[0].dtype)
    return run


def roi_workload(device, batch, rois_per_image, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    feats = [torch.randn(batch, CHANNELS, math.ceil(h / s), math.ceil(w / s), generator=g)
             .to(device=device, dtype=dtype).requires_grad_() for s in (4, 8, 16, 32)]
    boxes = [make_boxes(rois_per_image, g).to(device) for _ in range(batch)]
    grad = torch.randn(batch * rois_per_image, CHANNELS, 7, 7, generator=g).to(device, dtype)
    return feats, boxes, grad


def bench_roi_align(device, batch, rois_per_image, warmup, repeat, dtype=torch.float32):
    feats, boxes, grad = roi_workload(device, batch, rois_per_image, dtype)
    try:
        from detectron2.structures import Boxes
        box_arg = [Boxes(b) for b in boxes]
    except ImportError:
        box_arg = boxes
    ref_name, ref = reference_pooler()
    if dtype != torch.float32:
        ref_name, ref = ref_name + " (fp32 up-cast)", upcast(ref)
    poolers = {ref_name: ref,
               "dsig_ext fused": dsig_ext.MultiLevelRoIAlign(7, SCALES, 0),
               "dsig_ext fused (deterministic)": dsig_ext.MultiLevelRoIAlign(7, SCALES, 0,
                                                                            deterministic=True)}

    def fwd(pooler):
        def run():
            with torch.no_grad():
                pooler(feats, box_arg)
        return run

    def fwd_bwd(pooler):
        def run():
            out = pooler(feats, box_arg)
            torch.autograd.grad(out, feats, grad)
        return run

    t_fwd = timeit({n: fwd(p) for n, p in poolers.items()}, device, warmup, repeat)
    t_all = timeit({n: fwd_bwd(p) for n, p in poolers.items()}, device, warmup, repeat)
    return [{"op": "multilevel_roi_align", "impl": name, "batch": batch,
             "rois_per_image": rois_per_image, "dtype": str(dtype).split(".")[-1],
             "forward_ms": 1e3 * t_fwd[name], "forward_backward_ms": 1e3 * t_all[name]}
            for name in poolers]


def edge_workload(device, batch, nodes, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    dim = CHANNELS * 7 * 7
    xs = torch.randn(batch * nodes, dim, generator=g).abs().to(device, dtype).requires_grad_()
    xt = torch.randn(batch * nodes, dim, generator=g).abs().to(device, dtype)
    return xs, xt, dsig_ext.offsets_from_counts([nodes] * batch)  # host offsets, as DSIG


def bench_edge_loss(device, batch, nodes, warmup, repeat, dtype=torch.float32):
    xs, xt, offsets = edge_workload(device, batch, nodes, dtype)
    impls = {"per-graph loop (original DSIG)": "reference", "dsig_ext fused": "fused"}

    def fwd(backend):
        def run():
            with torch.no_grad():
                dsig_ext.edge_mse_loss(xs, xt, offsets, backend=backend)
        return run

    def fwd_bwd(backend):
        def run():
            loss = dsig_ext.edge_mse_loss(xs, xt, offsets, backend=backend)
            torch.autograd.grad(loss, xs)
        return run

    t_fwd = timeit({n: fwd(b) for n, b in impls.items()}, device, warmup, repeat)
    t_all = timeit({n: fwd_bwd(b) for n, b in impls.items()}, device, warmup, repeat)
    return [{"op": "edge_mse_loss", "impl": name, "batch": batch, "nodes": nodes,
             "dim": xs.shape[1], "dtype": str(dtype).split(".")[-1],
             "forward_ms": 1e3 * t_fwd[name], "forward_backward_ms": 1e3 * t_all[name]}
            for name in impls]


def bench_kernels(device, batch, rois_per_image, nodes, warmup, repeat, dtype):
    """Each fused kernel alone (the op called directly, inputs prepared), next to its floor."""
    elem = torch.tensor([], dtype=dtype).element_size()
    feats, boxes, grad = roi_workload(device, batch, rois_per_image, dtype)
    feats = [f.detach() for f in feats]
    rois = dsig_ext.convert_boxes_to_rois(boxes).to(dtype)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:].float(), 2, 5)
    heights, widths = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    ops = torch.ops.dsig
    kernels = [
        ("roi_align forward", roofline.roi_align_forward_floor_us(batch, rois_per_image, elem),
         lambda: ops.multilevel_roi_align(feats, rois, levels, list(SCALES), 7, 7, 0, True,
                                          False)),
        ("roi_align backward, atomic",
         roofline.roi_align_backward_atomic_floor_us(batch, rois_per_image, elem),
         lambda: ops._multilevel_roi_align_backward(grad, rois, levels, list(SCALES), batch,
                                                    CHANNELS, heights, widths, 0, True, False)),
        ("roi_align backward, deterministic",
         roofline.roi_align_backward_owner_floor_us(batch, rois_per_image, elem),
         lambda: ops._multilevel_roi_align_backward(grad, rois, levels, list(SCALES), batch,
                                                    CHANNELS, heights, widths, 0, True, True)),
    ]
    xs, xt, offsets = edge_workload(device, batch, nodes, dtype)
    xs = xs.detach()

    def edge_fwd_bwd():
        loss, factor, _ = ops._edge_mse_loss_forward(xs, xt, offsets, 1e-12, False, True, False)
        ops._edge_factor_matmul(torch.ones((), device=device), factor, xs, offsets)

    kernels.append(("edge loss forward + backward",
                    roofline.edge_loss_floor_us(batch, nodes, xs.shape[1], elem), edge_fwd_bwd))
    rows = []
    times = timeit({name: fn for name, _, fn in kernels}, device, warmup, repeat)
    for name, floor_us, fn in kernels:
        t_us = 1e6 * times[name]
        rows.append({"kernel": name, "batch": batch, "dtype": str(dtype).split(".")[-1],
                     "rois_per_image": rois_per_image if "roi" in name else None,
                     "nodes": nodes if "edge" in name else None, "time_us": t_us,
                     "floor_us": floor_us, "ratio_to_floor": t_us / floor_us})
    return rows


def speedups(rows, key):
    """Each fused row's speed-up over the first (reference) row of its group."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["batch"], r["dtype"], r.get("rois_per_image"),
                           r.get("nodes")), []).append(r)
    for group in groups.values():
        base = group[0]
        for r in group:
            r[f"speedup_{key}"] = base[f"{key}_ms"] / r[f"{key}_ms"]


def workload(r):
    if r["op"] == "multilevel_roi_align":
        return f"B={r['batch']}, {r['rois_per_image']} RoIs/img, 256ch 7x7, {r['dtype']}"
    return f"{r['batch']} graphs x N={r['nodes']}, D={r['dim']}, {r['dtype']}"


def markdown(result):
    lines = [f"# dsig_ext op benchmark ({result['device']})", "",
             f"- machine: {result['machine']}", f"- torch {result['torch']}, "
             f"dsig_ext {result['dsig_ext']}, threads {result['threads']}"]
    if result.get("versions"):
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()
                                      if k != "torch"))
    lines += [f"- median of {result['repeat']} runs after {result['warmup']} warm-up runs", "",
              "| op | workload | implementation | forward ms | fwd+bwd ms | fwd speed-up "
              "| fwd+bwd speed-up |", "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {workload(r)} | {r['impl']} | {r['forward_ms']:.3f} | "
                     f"{r['forward_backward_ms']:.3f} | {r['speedup_forward']:.2f}x | "
                     f"{r['speedup_forward_backward']:.2f}x |")
    if result.get("kernels"):
        lines += ["", "Kernels alone, against their H100 SXM roofline floors "
                  "(benchmarks/roofline.py):", "",
                  "| kernel | B | RoIs/img or N | dtype | time us | floor us | time / floor |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        for k in result["kernels"]:
            size = k["rois_per_image"] if k["rois_per_image"] is not None else k["nodes"]
            lines.append(f"| {k['kernel']} | {k['batch']} | {size} | {k['dtype']} | "
                         f"{k['time_us']:.1f} | {k['floor_us']:.1f} | "
                         f"{k['ratio_to_floor']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Bar chart of forward+backward time per workload and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in result["rows"]:
        key = (f"RoIAlign B={r['batch']} {r['rois_per_image']} RoIs/img {r['dtype']}"
               if r["op"] == "multilevel_roi_align"
               else f"edge loss B={r['batch']} N={r['nodes']} {r['dtype']}")
        groups.setdefault(key, []).append(r)
    cols = min(4, len(groups))
    nrows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 4 * nrows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=at_least(1), nargs="+", default=None,
                        help="images per batch (default 2 on the CPU, 2 and 8 on a GPU)")
    parser.add_argument("--batch", type=at_least(1), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="feature dtypes (default float32 on the CPU, float32 and bfloat16 "
                             "on a GPU)")
    parser.add_argument("--repeat", type=at_least(1), default=None,
                        help="timed runs per row, median reported (default 5 on the CPU, 30 on "
                             "a GPU)")
    parser.add_argument("--warmup", type=at_least(0), default=None,
                        help="untimed runs first (default 1 on the CPU, 5 on a GPU; 0 allowed)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="skip the per-kernel roofline table (timed on CUDA only)")
    add_out_argument(parser)
    parser.add_argument("--tag", default=None, help="file name suffix (default: the device)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    # defaults only where no value was given: an explicit 0 warm-up runs stays 0
    if args.batches is None:
        args.batches = [args.batch] if args.batch is not None else ([2, 8] if gpu else [2])
    if args.dtypes is None:
        args.dtypes = ["float32", "bfloat16"] if gpu else ["float32"]
    if args.repeat is None:
        args.repeat = 30 if gpu else 5
    if args.warmup is None:
        args.warmup = 5 if gpu else 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ops: --device cuda, but no CUDA device is visible")
    rows, kernels = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for batch in args.batches:
            for rois in (512, 140):
                print(f"[bench] multilevel_roi_align B={batch} {rois} RoIs/img {dtype_name}",
                      flush=True)
                rows += bench_roi_align(device, batch, rois, args.warmup, args.repeat, dtype)
            for nodes in (140, 300):
                print(f"[bench] edge_mse_loss {batch} graphs x {nodes} nodes {dtype_name}",
                      flush=True)
                rows += bench_edge_loss(device, batch, nodes, args.warmup, args.repeat, dtype)
            if device == "cuda" and not args.no_kernels:
                for rois, nodes in ((512, 300), (140, 140)):
                    kernels += bench_kernels(device, batch, rois, nodes, args.warmup,
                                             args.repeat, dtype)
    speedups(rows, "forward")
    speedups(rows, "forward_backward")
    result = {"device": device, "machine": machine_name(device), "torch": torch.__version__,
              "dsig_ext": dsig_ext.__version__, "threads": torch.get_num_threads(),
              "versions": versions(device), "repeat": args.repeat, "warmup": args.warmup,
              "rows": rows, "kernels": kernels}
    base = write_results(args.out, f"bench_ops_{args.tag or device}", result, markdown(result))
    plot(result, base + ".png")
    return result


if __name__ == "__main__":
    main()
