"""Public functional API of dsig_ext: each function runs the fused op or its reference twin,
as selected by ``set_backend`` or its ``backend=`` argument."""
import operator
from typing import List, Sequence, Union

import torch

from . import reference
from ._extension import require_extension
from .backend import resolve

BoxList = Sequence[torch.Tensor]


def _pair(size):
    return reference._pair(size)


def _boxes_tensor(b) -> torch.Tensor:
    return b.tensor if hasattr(b, "tensor") else b  # detectron2 Boxes or a plain tensor


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_nodes(op: str, name: str, t) -> None:
    """Node features [N, D], checked here so that both backends say what the op says."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor [N, D], got {_shape(t)}")
    if t.dim() != 2:
        raise RuntimeError(f"{op}: {name} must be [N, D], got {_shape(t)}")


def _as_offsets(op: str, offsets) -> torch.Tensor:
    """A tensor as it is (the op checks it); a list / tuple of ints becomes a CPU int64 tensor,
    the place the op checks for free and reads without a sync."""
    if isinstance(offsets, torch.Tensor):
        return offsets
    if isinstance(offsets, (list, tuple)):
        values = []
        for g, v in enumerate(offsets):
            try:
                if isinstance(v, bool):
                    raise TypeError
                values.append(operator.index(v))
            except TypeError:
                raise TypeError(f"{op}: offsets[{g}] must be an int, got {v!r}") from None
        return torch.tensor(values, dtype=torch.int64)
    raise TypeError(f"{op}: offsets must be an int64 tensor [G + 1] or a list of ints "
                    f"[0, ..., N] (graph g = rows offsets[g]:offsets[g+1]; one graph of all N "
                    f"rows: [0, N]; offsets_from_counts makes them from node counts), got "
                    f"{type(offsets).__name__}")


def convert_boxes_to_rois(box_lists: BoxList) -> torch.Tensor:
    """List of per-image boxes ([n_i, 4] tensors or detectron2 ``Boxes``) -> rois [K, 5] with
    the image index in column 0."""
    tensors = [_boxes_tensor(b) for b in box_lists]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"boxes of image {i} must be an [n, 4] tensor, got {shape}")
    if not tensors:
        return torch.zeros((0, 5))
    boxes = torch.cat(tensors, dim=0)
    index = torch.cat([torch.full((t.shape[0], 1), i, dtype=boxes.dtype, device=boxes.device)
                       for i, t in enumerate(tensors)], dim=0)
    return torch.cat([index, boxes], dim=1)


def assign_fpn_levels(boxes: torch.Tensor, min_level: int, max_level: int,
                      canonical_box_size: float = 224.0, canonical_level: int = 4, *,
                      backend=None) -> torch.Tensor:
    """0-based FPN level of each box [K, 4] (x1, y1, x2, y2), bitwise equal to detectron2's
    ``assign_boxes_to_levels``:
    ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)),
    min_level, max_level) - min_level`` -> int64 [K], evaluated in float32 (detectron2's
    ``Boxes`` hold float32)."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a [K, 4] tensor, got {getattr(boxes, 'shape', boxes)}")
    if resolve(backend) == "reference":
        return reference.assign_fpn_levels(boxes, min_level, max_level, canonical_box_size,
                                           canonical_level)
    require_extension()
    return torch.ops.dsig.assign_fpn_levels(boxes, int(min_level), int(max_level),
                                            float(canonical_box_size), int(canonical_level))


def _check_same_device(features: Sequence[torch.Tensor], rois: torch.Tensor,
                       levels: torch.Tensor) -> None:
    """Device checks first: the value checks below must not mix devices themselves."""
    device = features[0].device
    for name, t in (("rois", rois), ("levels", levels)):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise RuntimeError(f"multilevel_roi_align: {name} are on {t.device} but the features "
                               f"are on {device}")


def _checks_allowed(device: torch.device) -> bool:
    """Value checks read data on the host; never while tracing or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_roi_values(rois: torch.Tensor, levels: torch.Tensor, num_images: int,
                      num_levels: int) -> None:
    """Value checks the CUDA kernels cannot raise themselves (one host sync)."""
    if rois.shape[0] == 0:
        return
    coords_ok = torch.isfinite(rois[:, 1:]).all()
    b = rois[:, 0]
    batch_ok = ((b >= 0) & (b < num_images) & (b == torch.floor(b))).all()
    levels_ok = ((levels >= 0) & (levels < num_levels)).all()
    coords_ok, batch_ok, levels_ok = torch.stack([coords_ok, batch_ok, levels_ok]).tolist()
    if not coords_ok:
        raise ValueError("multilevel_roi_align: a box has a NaN or infinite coordinate")
    if not batch_ok:
        raise ValueError(f"multilevel_roi_align: batch indices must be integers in "
                         f"[0, {num_images})")
    if not levels_ok:
        raise ValueError(f"multilevel_roi_align: levels must be in [0, {num_levels})")


def _check_offsets_values(op: str, offsets: torch.Tensor, num_rows: int) -> None:
    """Offsets on a GPU, read back once (one host sync); host offsets are checked in C++ for
    free. Same messages as the C++ checks."""
    if offsets.dim() != 1 or offsets.shape[0] < 1 or offsets.device.type == "cpu":
        return  # shapes are the op's to reject; host values are checked there
    o = offsets.tolist()
    if o[0] != 0:
        raise RuntimeError(f"{op}: offsets must start at 0, got {o[0]}")
    for g in range(1, len(o)):
        if o[g] < o[g - 1]:
            raise RuntimeError(f"{op}: offsets must be non-decreasing, but offsets[{g}] = "
                               f"{o[g]} < offsets[{g - 1}] = {o[g - 1]}")
    if o[-1] != num_rows:
        raise RuntimeError(f"{op}: offsets must end at N = {num_rows}, got {o[-1]}")


def multilevel_roi_align(features: Sequence[torch.Tensor],
                         rois: Union[torch.Tensor, BoxList], levels: torch.Tensor,
                         spatial_scales: Sequence[float], output_size, sampling_ratio: int = 0,
                         aligned: bool = True, *, deterministic=None, check_inputs: bool = True,
                         backend=None) -> torch.Tensor:
    """RoIAlign of every RoI on its own pyramid level, all levels in one launch.

    Args:
        features: L tensors [B, C, H_l, W_l], one dtype and device.
        rois: [K, 5] (batch_index, x1, y1, x2, y2) in image coordinates, or a list of B
            per-image [n_i, 4] boxes.
        levels: [K] int64/int32, index into ``features`` of each RoI.
        spatial_scales: L floats, level size / image size (1/4, 1/8, ...).
        output_size: int or (oh, ow).
        sampling_ratio: samples per bin axis; 0 = adaptive ceil(roi_size / output_size).
        aligned: half-pixel offset (detectron2 "ROIAlignV2"); False = legacy "ROIAlign".
        deterministic: bitwise reproducible backward; default
            ``torch.are_deterministic_algorithms_enabled()``. On CUDA it replaces the atomic
            scatter by an owner-computes gather; on the CPU (reproducible either way) the
            forward and backward follow torchvision's summation order, bitwise equal to
            detectron2's ROIPooler (by default the CPU forward sums separably where cheaper:
            equal up to rounding).
        check_inputs: verify finite boxes and index ranges (one host sync on a GPU; skipped
            while a CUDA graph is captured or torch.compile traces). With ``False`` the op never
            syncs and is CUDA-graph capturable; unchecked bad values never read out of bounds
            (such RoIs pool to zeros).
    Returns:
        [K, C, oh, ow]: ``torchvision.ops.roi_align`` of each RoI on its level.
    """
    if isinstance(features, torch.Tensor):  # list() would split it into its images
        raise TypeError(f"multilevel_roi_align: features must be a list of L tensors "
                        f"[B, C, H, W], got one tensor {_shape(features)}; for one level pass "
                        f"[features]")
    features = list(features)
    if not features:
        raise ValueError("multilevel_roi_align: features must hold at least one level")
    for i, f in enumerate(features):  # before the boxes: their checks read the batch size
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"multilevel_roi_align: features[{i}] must be a tensor "
                            f"[B, C, H, W], got {_shape(f)}")
        if f.dim() != 4:
            raise RuntimeError(f"multilevel_roi_align: features[{i}] must be [B, C, H, W], "
                               f"got {_shape(f)}")
    if isinstance(rois, (list, tuple)):
        rois = convert_boxes_to_rois(rois)
    oh, ow = _pair(output_size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if resolve(backend) == "reference":
        return reference.multilevel_roi_align(features, rois, levels, spatial_scales, (oh, ow),
                                              sampling_ratio, aligned)
    require_extension()
    scales = [float(s) for s in spatial_scales]
    device = features[0].device
    _check_same_device(features, rois, levels)
    if (check_inputs and device.type != "cpu"  # the CPU kernel checks itself
            and _checks_allowed(device) and rois.dim() == 2 and levels.dim() == 1):
        _check_roi_values(rois, levels, features[0].shape[0], len(features))
    return torch.ops.dsig.multilevel_roi_align(features, rois, levels, scales, oh, ow,
                                               int(sampling_ratio), bool(aligned),
                                               bool(deterministic))


def cosine_edges(x: torch.Tensor, offsets: torch.Tensor, eps: float = 1e-12, *,
                 zero_dead_rows: bool = False, check_inputs: bool = True,
                 backend=None) -> torch.Tensor:
    """Cosine-similarity edge matrices of the graphs of ``x`` [N, D]; graph g is rows
    ``offsets[g]:offsets[g+1]`` (int64 [G+1], 0 ... N).

    Returns a block-diagonal [N, N] tensor: block g is ``E_g = normalize(X_g) normalize(X_g)^T``
    (``F.normalize`` semantics, ``max(||x||, eps)``), zero between graphs; ``graph_blocks``
    splits it. With ``zero_dead_rows`` rows of norm < eps get no gradient. ``offsets`` may live
    on the CPU (checked for free, never copied) or on the features' GPU (``check_inputs`` then
    reads them back once; see ``edge_mse_loss``); a list or tuple of ints is taken as CPU
    offsets.
    """
    _check_nodes("cosine_edges", "x", x)
    offsets = _as_offsets("cosine_edges", offsets)
    if resolve(backend) == "reference":
        return reference.cosine_edges(x, offsets, eps, zero_dead_rows)
    require_extension()
    if check_inputs and _checks_allowed(x.device):
        _check_offsets_values("cosine_edges", offsets, x.shape[0])
    return torch.ops.dsig.cosine_edges(x, offsets, float(eps), bool(zero_dead_rows))


def edge_mse_loss(student: torch.Tensor, teacher: torch.Tensor, offsets: torch.Tensor,
                  eps: float = 1e-12, *, zero_dead_rows: bool = False,
                  check_inputs: bool = True, backend=None) -> torch.Tensor:
    """DSIG edge loss ``sum_g 1/2 mean((E_t,g - E_s,g)^2)`` over all graphs in one call.

    ``student`` and ``teacher`` are [N, D] node features, graph g the rows
    ``offsets[g]:offsets[g+1]``; graphs of 0 or 1 nodes are valid. The backward is one product
    ``dX = M X`` over all graphs, with M formed in the forward. ``offsets``: an int64 (int32)
    tensor [G + 1] or a list / tuple of ints (taken as CPU offsets).

    ``student`` and ``teacher`` must share one dtype: a mix is refused (``TypeError``) rather
    than computed in the wider dtype, which would silently decide the loss's precision and dtype
    (a mix usually means one network ran in another precision than meant). The raw op
    ``torch.ops.dsig.edge_mse_loss`` does promote to the wider dtype.

    On a GPU neither direction waits for the host when ``offsets`` is a CPU tensor (as DSIG
    has it: the node counts are known on the host; they reach the kernels as launch arguments)
    or when ``check_inputs=False``; the op is then CUDA-graph capturable (the captured graph keeps
    the offsets it was captured with). Offsets on the GPU with ``check_inputs=True`` cost one
    read-back to validate them. The products accumulate in fp32 (fp64 for float64) without
    cuBLAS: ``allow_tf32`` does not change them, and they are bitwise reproducible. float16 and
    bfloat16 features (autocast training) run on tensor cores: the Grams exactly (16-bit
    products are exact in fp32), the backward's ``M X`` with M rounded to TF32 (10 mantissa
    bits, finer than the 16-bit gradient it yields); float32 stays exact.

    Memory: the factors M saved for the backward are packed per graph, ``Sum_g n_g^2`` entries
    each (16 graphs of 300 nodes: 5.8 MB in fp32, not the 92 MB of a [4800, 4800] matrix), when
    ``offsets`` is on the CPU; offsets on the GPU keep [N, N] buffers (packing them would need
    the sizes on the host). Under ``torch.compile`` call this function: the raw composite op
    ``torch.ops.dsig.edge_mse_loss`` hides the factors' data-dependent size from dynamo.
    """
    _check_nodes("edge_mse_loss", "student", student)
    _check_nodes("edge_mse_loss", "teacher", teacher)
    if student.dtype != teacher.dtype:
        raise TypeError(f"edge_mse_loss: student is {student.dtype} but teacher is "
                        f"{teacher.dtype}; cast one to the other (e.g. "
                        f"teacher.to(student.dtype)) so that the loss is computed in the "
                        f"precision you chose")
    offsets = _as_offsets("edge_mse_loss", offsets)
    if resolve(backend) == "reference":
        return reference.edge_mse_loss(student, teacher, offsets, eps, zero_dead_rows)
    require_extension()
    if check_inputs and _checks_allowed(student.device):
        _check_offsets_values("edge_mse_loss", offsets, student.shape[0])
    # the factored forward itself (what the composite op dsig::edge_mse_loss calls), so that
    # torch.compile sees the packed factors' data-dependent size among the op's outputs
    grad_mode = torch.is_grad_enabled()
    loss, _, _ = torch.ops.dsig._edge_mse_loss_forward(
        student, teacher, offsets, float(eps), bool(zero_dead_rows),
        grad_mode and student.requires_grad, grad_mode and teacher.requires_grad)
    return loss


def graph_blocks(matrix: torch.Tensor, offsets: torch.Tensor) -> List[torch.Tensor]:
    """The per-graph diagonal blocks of a block-diagonal [N, N] matrix (views)."""
    o = _as_offsets("graph_blocks", offsets).tolist()
    return [matrix[a:b, a:b] for a, b in zip(o[:-1], o[1:])]


def offsets_from_counts(counts: Sequence[int], device=None) -> torch.Tensor:
    """[n_0, n_1, ...] (ints >= 0: nodes per graph) -> int64 offsets [0, n_0, n_0 + n_1, ...]."""
    if isinstance(counts, torch.Tensor) and counts.dim() != 1:
        raise ValueError(f"offsets_from_counts: counts must be 1-D, got {_shape(counts)}")
    values = []
    for g, n in enumerate(counts):
        try:
            if isinstance(n, bool):
                raise TypeError
            n = operator.index(n)
        except TypeError:
            raise TypeError(f"offsets_from_counts: counts[{g}] must be an int, got {n!r}") \
                from None
        if n < 0:
            raise ValueError(f"offsets_from_counts: counts[{g}] = {n}: a graph cannot have a "
                             f"negative number of nodes")
        values.append(n)
    out = torch.zeros(len(values) + 1, dtype=torch.int64, device=device)
    if values:
        out[1:] = torch.cumsum(torch.tensor(values, dtype=torch.int64), 0).to(out.device)
    return out
