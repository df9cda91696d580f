#!/usr/bin/env python
"""Small calls of every dsig CUDA kernel, for compute-sanitizer (memcheck, racecheck).

Forward, atomic and deterministic backward of multilevel_roi_align (fp32, bf16, fp64; boxes
outside the image, degenerate and unchecked-invalid ones), and the edge ops (host and device
offsets, empty and one-node graphs, a zero row, bf16). Run by gpu_check.py:
    compute-sanitizer --tool memcheck python benchmarks/sanitizer_cases.py
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dsig_ext  # noqa: E402

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def roi_align_cases():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        feats = [torch.randn(2, 5, 48 // s, 64 // s, generator=g).to("cuda", dtype)
                 .requires_grad_() for s in (1, 2, 4, 8)]
        boxes = torch.tensor([[0, 3.0, 4.0, 40.0, 30.0], [1, -20.0, -10.0, 300.0, 200.0],
                              [0, 10.0, 10.0, 10.0, 10.0], [1, 60.0, 40.0, 90.0, 80.0],
                              [0, 1.0, 2.0, 220.0, 3.0]], dtype=torch.float64)
        levels = dsig_ext.assign_fpn_levels(boxes[:, 1:], 2, 5).cuda()
        rois = boxes.to("cuda", dtype)
        grad = torch.randn(len(boxes), 5, 7, 7, generator=g).to("cuda", dtype)
        for deterministic in (False, True):
            for sampling_ratio, aligned in ((0, True), (2, False)):
                out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7,
                                                    sampling_ratio, aligned,
                                                    deterministic=deterministic)
                torch.autograd.grad(out, feats, grad)
        # unchecked invalid batch indices and levels: must not read or write out of bounds
        bad = rois.clone()
        bad[0, 0] = 7
        out = dsig_ext.multilevel_roi_align(feats, bad, levels + 3, SCALES, 7, check_inputs=False)
        for deterministic in (False, True):
            torch.ops.dsig._multilevel_roi_align_backward(
                grad, bad, levels + 3, SCALES, 2, 5, [f.shape[2] for f in feats],
                [f.shape[3] for f in feats], 0, True, deterministic)


def edge_cases():
    g = torch.Generator().manual_seed(1)
    sizes = [70, 0, 1, 130, 5]
    offsets = dsig_ext.offsets_from_counts(sizes)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xs = torch.randn(sum(sizes), 100, generator=g).to("cuda", dtype).requires_grad_()
        xt = torch.randn(sum(sizes), 100, generator=g).to("cuda", dtype).requires_grad_()
        with torch.no_grad():
            xs[3] = 0
        for offs in (offsets, offsets.cuda()):
            loss = dsig_ext.edge_mse_loss(xs, xt, offs)
            torch.autograd.grad(loss, (xs, xt))
            e = dsig_ext.cosine_edges(xs, offs, zero_dead_rows=True)
            torch.autograd.grad(e.sum(), xs)
    # unchecked malformed device offsets: garbage, never out of bounds
    xs = torch.randn(9, 7, device="cuda")
    dsig_ext.edge_mse_loss(xs, xs, torch.tensor([0, 12, 3, 5], device="cuda"),
                           check_inputs=False)
    # more graphs than one launch carries
    many = dsig_ext.offsets_from_counts([1, 2, 0, 3] * 100)
    xs = torch.randn(int(many[-1]), 16, device="cuda", requires_grad=True)
    torch.autograd.grad(dsig_ext.edge_mse_loss(xs, xs.detach() * 2, many), xs)


if __name__ == "__main__":
    roi_align_cases()
    edge_cases()
    torch.cuda.synchronize()
    print("sanitizer cases: done")
