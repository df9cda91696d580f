"""Autograd of the dsig ops. Backward ops are ops of their own; double backward is refused."""
import torch


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"dsig::{name}: double backward is not supported")

    return backward


# --- multilevel_roi_align ---------------------------------------------------------------------

def _roi_align_setup_context(ctx, inputs, output):
    (features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio,
     aligned, deterministic) = inputs
    ctx.save_for_backward(rois, levels)
    f0 = features[0]
    ctx.shape = (f0.shape[0], f0.shape[1], [f.shape[2] for f in features],
                 [f.shape[3] for f in features])
    ctx.args = (list(spatial_scales), sampling_ratio, aligned, deterministic)
    ctx.feature_needs_grad = [f.requires_grad for f in features]


def _roi_align_backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    batch, channels, heights, widths = ctx.shape
    spatial_scales, sampling_ratio, aligned, deterministic = ctx.args
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    grads = torch.ops.dsig._multilevel_roi_align_backward(
        grad, rois, levels, spatial_scales, batch, channels, heights, widths, sampling_ratio,
        aligned, deterministic)
    feature_grads = [g if need else None for g, need in zip(grads, ctx.feature_needs_grad)]
    return feature_grads, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "dsig::multilevel_roi_align", _roi_align_backward, setup_context=_roi_align_setup_context)
torch.library.register_autograd(
    "dsig::_multilevel_roi_align_backward",
    _no_double_backward("_multilevel_roi_align_backward"))


# --- cosine_edges -----------------------------------------------------------------------------

def _edges_setup_context(ctx, inputs, output):
    x, offsets, eps, zero_dead_rows = inputs
    ctx.save_for_backward(x, output, offsets)
    ctx.args = (eps, zero_dead_rows)


def _edges_backward(ctx, grad):
    x, edges, offsets = ctx.saved_tensors
    eps, zero_dead_rows = ctx.args
    dx = torch.ops.dsig._cosine_edges_backward(grad, x, edges, offsets, eps, zero_dead_rows)
    return dx, None, None, None


torch.library.register_autograd(
    "dsig::cosine_edges", _edges_backward, setup_context=_edges_setup_context)
torch.library.register_autograd(
    "dsig::_cosine_edges_backward", _no_double_backward("_cosine_edges_backward"))


# --- edge_mse_loss (its factored forward) -----------------------------------------------------

def _loss_setup_context(ctx, inputs, output):
    student, teacher, offsets, eps, zero_dead_rows, student_grad, teacher_grad = inputs
    _, factor_s, factor_t = output
    ctx.mark_non_differentiable(factor_s, factor_t)
    ctx.save_for_backward(student, teacher, offsets, factor_s, factor_t)
    ctx.factors_built = (student_grad, teacher_grad)


def _loss_backward(ctx, grad_loss, _grad_factor_s, _grad_factor_t):
    student, teacher, offsets, factor_s, factor_t = ctx.saved_tensors
    grads = []
    for x, factor, needed, built in zip((student, teacher), (factor_s, factor_t),
                                        ctx.needs_input_grad[:2], ctx.factors_built):
        if not needed:
            grads.append(None)
            continue
        if not built:
            raise RuntimeError(
                "dsig::_edge_mse_loss_forward was called with student_grad/teacher_grad=False "
                "for an input that requires grad; use dsig::edge_mse_loss or set the flag")
        grads.append(torch.ops.dsig._edge_factor_matmul(grad_loss, factor, x, offsets))
    return grads[0], grads[1], None, None, None, None, None


torch.library.register_autograd(
    "dsig::_edge_mse_loss_forward", _loss_backward, setup_context=_loss_setup_context)
torch.library.register_autograd(
    "dsig::_edge_factor_matmul", _no_double_backward("_edge_factor_matmul"))
