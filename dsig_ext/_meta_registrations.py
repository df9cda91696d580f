"""Fake (meta) kernels: output shapes and dtypes only, for torch.compile and FakeTensor."""
import torch


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dsig::assign_fpn_levels")
def _(boxes, min_level, max_level, canonical_box_size=224.0, canonical_level=4):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "boxes must be [K, 4]")
    return boxes.new_empty((boxes.shape[0],), dtype=torch.int64)


@torch.library.register_fake("dsig::multilevel_roi_align")
def _(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio,
      aligned, deterministic=False):
    torch._check(len(features) >= 1, lambda: "need at least one feature level")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "rois must be [K, 5]")
    torch._check(levels.dim() == 1 and levels.shape[0] == rois.shape[0],
                 lambda: "levels must be [K]")
    f0 = features[0]
    for f in features:
        torch._check(f.dtype == f0.dtype, lambda: "all feature levels must share a dtype")
        torch._check(f.shape[1] == f0.shape[1], lambda: "all feature levels must share C")
    return f0.new_empty((rois.shape[0], f0.shape[1], pooled_height, pooled_width))


@torch.library.register_fake("dsig::_multilevel_roi_align_backward")
def _(grad, rois, levels, spatial_scales, batch_size, channels, heights, widths, sampling_ratio,
      aligned, deterministic):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


@torch.library.register_fake("dsig::cosine_edges")
def _(x, offsets, eps=1e-12, zero_dead_rows=False):
    torch._check(x.dim() == 2, lambda: "x must be [N, D]")
    return x.new_empty((x.shape[0], x.shape[0]))


@torch.library.register_fake("dsig::_cosine_edges_backward")
def _(grad, x, edges, offsets, eps, zero_dead_rows):
    return x.new_empty(x.shape)


@torch.library.register_fake("dsig::_edge_mse_loss_forward")
def _(student, teacher, offsets, eps, zero_dead_rows, student_grad, teacher_grad):
    torch._check(student.dim() == 2 and student.shape == teacher.shape,
                 lambda: "student and teacher must be [N, D] of the same shape")
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    acc = _acc_dtype(dtype)
    n = student.shape[0]
    loss = student.new_empty((), dtype=dtype)
    if not (student_grad or teacher_grad):
        size = 0
    elif offsets.device.type == "cpu":
        # packed factors: sum of the graphs' squared sizes, known only from the offsets' values
        size = torch.library.get_ctx().new_dynamic_size()
    else:
        size = n * n  # device offsets: [N, N] buffers, flattened
    f_s = student.new_empty((size if student_grad else 0,), dtype=acc)
    f_t = student.new_empty((size if teacher_grad else 0,), dtype=acc)
    return loss, f_s, f_t


@torch.library.register_fake("dsig::_edge_factor_matmul")
def _(grad, factor, x, offsets):
    return x.new_empty(x.shape)
