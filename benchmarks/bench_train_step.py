#!/usr/bin/env python
"""Training-step cost of DSIG for the eight configs.

For each config, seconds per training iteration (forward + backward + SGD step) of
  (a) the student alone (a stock detectron2 model),
  (b) the student plus the teacher's forward,
  (c) DSIG with dsig_ext's reference backend (detectron2 ROIPooler, per-graph edge loss),
  (d) DSIG with the fused backend,
  (e) on a GPU (or with --amp), (d) under float16 autocast with a gradient scaler,
and the DSIG overhead (d)/(b), the whole distillation cost (d)/(a) and the speed-up (c)/(d).
The variants of one config run in one process, their steps interleaved round by round, so each
ratio compares steps taken under the same conditions (peak memory per variant: GPU only). On a
CPU the input is reduced (--size, default 320x480) and the batch is 2 images; on a GPU full size
800x1333. Random weights with FrozenBN statistics calibrated on the batch (so activations stay
finite); random images with a few boxes.

Writes bench_train_step_<device>.{json,md,png} to --out (_<H>x<W> added for a --size other
than the device's default; default output/benchmarks/, --out benchmarks/results rewrites the
committed results).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_out_argument, at_least, machine_name, write_results  # noqa: E402

PROJECT = os.path.join(ROOT, "projects", "Distillation")
CONFIGS = [
    "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml",
    "Distillation-FasterRCNN-R50-R101-dsig-1x.yaml",
    "Distillation-FasterRCNN-R101-R152-dsig-1x.yaml",
    "Distillation-FasterRCNN-MNV2-R50-dsig-1x.yaml",
    "Distillation-FasterRCNN-EB0-R101-dsig-1x.yaml",
    "Distillation-RetinaNet-R18-R50-dsig-1x.yaml",
    "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml",
    "Distillation-RetinaNet-EB0-R101-dsig-1x.yaml",
]
VARIANTS = ["student", "student+teacher", "dsig-reference", "dsig-fused"]
AMP_VARIANT = "dsig-fused-amp"  # (e) float16 autocast + gradient scaler, GPU runs only


def _calibrate_frozen_bn(model, batch_images):
    """Set every FrozenBatchNorm2d to normalise what it sees on this batch (weights are random)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    hooks = []

    def pre_hook(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + module.eps)
        module.weight.fill_(1.0)
        module.bias.zero_()

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            hooks.append(m.register_forward_pre_hook(pre_hook))
    with torch.no_grad():
        model.backbone(batch_images)
    for h in hooks:
        h.remove()


def _batch(cfg, batch_size, size, seed=0):
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(batch_size):
        n = 6
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35]) + 16
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, 80, (n,), generator=g)
        img = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8).float()
        batch.append({"image": img, "instances": inst, "height": h, "width": w})
    return batch


def prepare_variant(config, variant, device, size, batch_size, extra_opts=()):
    """The model of one variant, built and calibrated, and a function running one training
    step of it on a fixed batch."""
    sys.path.insert(0, PROJECT)
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from distillation.teacher import teacher_images
    from distillation.training import load_config

    torch.manual_seed(0)
    opts = ["MODEL.WEIGHTS", "", "DISTILL.TEACHER.WEIGHTS", "",
            "DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True", "MODEL.DEVICE", device]
    if variant == "dsig-reference":
        opts += ["DISTILL.BACKEND", "reference"]
    cfg = load_config(os.path.join(PROJECT, "configs", config), opts + list(extra_opts))
    cfg.freeze()
    model = build_model(cfg)
    batch = _batch(cfg, batch_size, size)
    student, teacher = model.student, model.teacher
    with torch.no_grad():
        _calibrate_frozen_bn(student, student.preprocess_image(batch).tensor)
        _calibrate_frozen_bn(teacher, teacher_images(teacher, batch, model.flip_teacher_input,
                                                     model.device).tensor)
    model.train()
    net = student if variant in ("student", "student+teacher") else model
    params = [p for p in net.parameters() if p.requires_grad]
    # lr 0: the same work per step, and random-weight networks cannot diverge mid-benchmark
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)

    amp = variant == AMP_VARIANT
    scaler = torch.amp.GradScaler(device) if amp else None

    def step():
        """One training step; returns the scalars the model logged (name -> value)."""
        with EventStorage() as storage, torch.autocast(device, dtype=torch.float16,
                                                       enabled=amp):
            losses = net(batch)
        if variant == "student+teacher":
            with torch.no_grad():
                t_img = teacher_images(teacher, batch, model.flip_teacher_input, model.device)
                teacher.backbone(t_img.tensor)
        loss = sum(losses.values())
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return {k: v for k, (v, _) in storage.latest().items()}

    return cfg, model, step


def run_config(config, variants, device, size, batch_size, iters, warmup):
    """All variants of one config in this process, their steps interleaved round by round so
    that every ratio compares steps taken under the same machine conditions."""
    import torch

    steps, stock = {}, None
    for variant in variants:
        cfg, _, steps[variant] = prepare_variant(config, variant, device, size, batch_size)
        stock = "RetinaNet" if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE else "GeneralizedRCNN"
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {v: [] for v in variants}
    graphs = {}
    peak = {v: 0.0 for v in variants}
    for _ in range(iters):
        for variant, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            logged = step()
            if device == "cuda":
                torch.cuda.synchronize()
                peak[variant] = max(peak[variant], torch.cuda.max_memory_allocated() / 2**20)
            times[variant].append(time.perf_counter() - t0)
            graphs[variant] = {k: v for k, v in logged.items() if k.startswith("dsig/")}
    return {v: {"config": config, "variant": v, "stock": stock,
                "seconds_per_iter": statistics.median(times[v]),
                "peak_memory_mib": peak[v] if device == "cuda" else None,
                "graph": graphs.get(v) or None} for v in variants}


def markdown(result):
    lines = [f"# DSIG training-step benchmark ({result['device']})", "",
             f"- machine: {result['machine']}",
             f"- torch {result['torch']}, input {result['size'][0]}x{result['size'][1]}, "
             f"{result['batch']} images/iteration, median of {result['iters']} iterations, the "
             "variants of a config interleaved in one process (peak memory: GPU runs only)",
             ""]
    amp = any(AMP_VARIANT in r["variants"] for r in result["rows"])
    head = ("| config | (a) student s/it | (b) +teacher fwd | (c) DSIG reference | "
            "(d) DSIG fused | overhead (d)/(b) | cost (d)/(a) | speed-up (c)/(d) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if amp:
        head += " (e) DSIG fused, fp16 AMP | (d)/(e) |"
        rule += "---:|---:|"
    lines += [head + " peak MiB a/b/c/d | graph nodes/img, mined bg |", rule + "---|---|"]
    for r in result["rows"]:
        v = r["variants"]
        s = [v[k]["seconds_per_iter"] for k in VARIANTS]
        mem = "/".join("-" if v[k]["peak_memory_mib"] is None else
                       f"{v[k]['peak_memory_mib']:.0f}" for k in VARIANTS)
        line = (f"| {r['config'].replace('-dsig-1x.yaml', '')} | {s[0]:.3f} | {s[1]:.3f} | "
                f"{s[2]:.3f} | {s[3]:.3f} | {r['overhead']:.2f} | {s[3] / s[0]:.2f} | "
                f"{r['speedup']:.2f}x |")
        if amp:
            e = v[AMP_VARIANT]["seconds_per_iter"]
            line += f" {e:.3f} | {s[3] / e:.2f}x |"
        lines.append(line + f" {mem} | {_graph_cell(v['dsig-fused'].get('graph'))} |")
    lines += ["", "Graph sizes of the last (d) step: random-weight teachers find every sampled bg "
              "RoI confusing, so Faster R-CNN graphs hold every bg RoI (a trained teacher mines "
              "a fraction)."]
    return "\n".join(lines) + "\n"


def _graph_cell(graph):
    if not graph or "dsig/graph_nodes" not in graph:
        return "-"
    cell = f"{graph['dsig/graph_nodes']:.0f}"
    if "dsig/mined_bg_fraction" in graph:
        cell += f", {100 * graph['dsig/mined_bg_fraction']:.0f} %"
    return cell


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, k in enumerate(VARIANTS):
        ax.bar(x + (i - 1.5) * 0.2, [r["variants"][k]["seconds_per_iter"] for r in rows], 0.2,
               label=k)
    ax.set_xticks(x, [r["config"].replace("Distillation-", "").replace("-dsig-1x.yaml", "")
                      for r in rows], rotation=20, fontsize=8)
    ax.set_ylabel("seconds / iteration")
    ax.legend(fontsize=8)
    ax.set_title(f"DSIG training step, {result['machine']}, torch {result['torch']}, "
                 f"{result['size'][0]}x{result['size'][1]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=at_least(1), nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--batch", type=at_least(1), default=2)
    p.add_argument("--iters", type=at_least(1), default=None,
                   help="timed steps per variant (default 5 on the CPU, 20 on a GPU)")
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--configs", nargs="*", default=CONFIGS)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="also time (e), float16 autocast (default: on CUDA only)")
    add_out_argument(p)
    p.add_argument("--one", metavar="CONFIG", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    import torch

    a = parse_args(argv)
    default_size = [800, 1333] if a.device == "cuda" else [320, 480]
    size = a.size or default_size
    iters = a.iters if a.iters is not None else (20 if a.device == "cuda" else 5)
    variants = VARIANTS + ([AMP_VARIANT] if (a.device == "cuda" if a.amp is None else a.amp)
                           else [])
    if a.one:  # child process: one config's measurements as JSON on the last line
        print(json.dumps(run_config(a.one, variants, a.device, size, a.batch, iters, a.warmup)))
        return
    rows = []
    for config in a.configs:  # one process per config: a fresh allocator and thread pool
        print(f"[bench] {config}: {', '.join(variants)}", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--one", config, "--device", a.device,
               "--size", str(size[0]), str(size[1]), "--batch", str(a.batch), "--iters",
               str(iters), "--warmup", str(a.warmup), "--amp" if AMP_VARIANT in variants
               else "--no-amp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        s = {k: measured[k]["seconds_per_iter"] for k in VARIANTS}
        rows.append({"config": config, "variants": measured,
                     "overhead": s["dsig-fused"] / s["student+teacher"],
                     "speedup": s["dsig-reference"] / s["dsig-fused"]})
    result = {"device": a.device, "machine": machine_name(a.device), "torch": torch.__version__,
              "size": size, "batch": a.batch, "iters": iters, "rows": rows}
    # another input size gets its own files, beside the default-size results
    name = f"bench_train_step_{a.device}" + ("" if size == default_size
                                             else f"_{size[0]}x{size[1]}")
    base = write_results(a.out, name, result, markdown(result))
    plot(result, base + ".png")


if __name__ == "__main__":
    main()
