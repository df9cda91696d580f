"""Pure-PyTorch twins of the dsig ops, with the fused ops' signatures.

They compute what the code they replace computes: detectron2's ``ROIPooler`` (a per-level loop of
``torchvision.ops.roi_align``) and the original DSIG per-image loop for the edges. They are the
fallback when the extension is missing and the oracle the tests compare against.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F


def assign_fpn_levels(boxes: torch.Tensor, min_level: int, max_level: int,
                      canonical_box_size: float = 224.0, canonical_level: int = 4) -> torch.Tensor:
    """detectron2's ``assign_boxes_to_levels`` on concatenated boxes [K, 4]: the 0-based level
    ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)),
    min_level, max_level) - min_level``, evaluated in float32 as detectron2's ``Boxes`` are."""
    boxes = boxes.detach().to(torch.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    sizes = torch.sqrt(area)
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def multilevel_roi_align(features: Sequence[torch.Tensor], rois: torch.Tensor,
                         levels: torch.Tensor, spatial_scales: Sequence[float], output_size,
                         sampling_ratio: int = 0, aligned: bool = True, *,
                         deterministic=None) -> torch.Tensor:
    """Per-level loop, as detectron2's ROIPooler: ``roi_align`` of the RoIs of each level,
    scattered back into RoI order. ``deterministic`` is accepted for signature parity."""
    from torchvision.ops import roi_align

    oh, ow = _pair(output_size)
    f0 = features[0]
    out = f0.new_zeros((rois.shape[0], f0.shape[1], oh, ow))
    rois = rois.to(f0.dtype)
    for level, (feature, scale) in enumerate(zip(features, spatial_scales)):
        inds = torch.nonzero(levels == level, as_tuple=True)[0]
        if inds.numel() == 0:
            continue
        out.index_put_((inds,), roi_align(feature, rois[inds], (oh, ow), spatial_scale=scale,
                                          sampling_ratio=sampling_ratio, aligned=aligned))
    if rois.shape[0] == 0 and any(f.requires_grad for f in features):
        out = out + f0.flatten()[:1].sum() * 0  # K = 0: keep the graph (zero gradients)
    return out


def _graph_slices(offsets: torch.Tensor):
    o = offsets.tolist()
    return [slice(a, b) for a, b in zip(o[:-1], o[1:])]


def _normalized(x: torch.Tensor, eps: float, zero_dead_rows: bool) -> torch.Tensor:
    if zero_dead_rows:
        dead = (x.norm(dim=1, keepdim=True) < eps)
        x = torch.where(dead, x.detach(), x)
    return F.normalize(x, p=2, dim=1, eps=eps)


def cosine_edges(x: torch.Tensor, offsets: torch.Tensor, eps: float = 1e-12,
                 zero_dead_rows: bool = False) -> torch.Tensor:
    """Block-diagonal [N, N] matrix whose diagonal blocks are the graphs' cosine-similarity
    matrices ``normalize(X_g) normalize(X_g)^T`` (zero between graphs)."""
    out = x.new_zeros((x.shape[0], x.shape[0]))
    for s in _graph_slices(offsets):
        xn = _normalized(x[s], eps, zero_dead_rows)
        out[s, s] = xn @ xn.t()
    return out


def edge_mse_loss(student: torch.Tensor, teacher: torch.Tensor, offsets: torch.Tensor,
                  eps: float = 1e-12, zero_dead_rows: bool = False) -> torch.Tensor:
    """The original DSIG edge loss: ``sum_g 0.5 * mse(E_t,g, E_s,g)`` over the graphs, an empty
    graph contributing zero."""
    loss = (student.sum() + teacher.sum()) * 0.0
    for s in _graph_slices(offsets):
        if s.stop == s.start:
            continue
        xs = _normalized(student[s], eps, zero_dead_rows)
        xt = _normalized(teacher[s], eps, zero_dead_rows)
        loss = loss + 0.5 * F.mse_loss(xs @ xs.t(), xt @ xt.t())
    return loss


def _pair(size) -> List[int]:
    if isinstance(size, int):
        return [size, size]
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {size!r}")
    return [int(size[0]), int(size[1])]
