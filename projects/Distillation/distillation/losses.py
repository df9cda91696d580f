"""The DSIG loss terms. Each takes tensors, returns a scalar, and states its formula.

Notation: per image b, F^s_b / F^t_b are the student / teacher pooled features of its sampled
foreground RoIs (n_fg,b rows of D = 256*7*7), G^s_b / G^t_b those of its sampled background RoIs
(n_bg,b rows); c is the image reduction factor (1 for "sum", REFERENCE_IMAGES / B for "mean").
"""
import functools
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

import dsig_ext


def _to_float32(v):
    if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16):
        return v.float()
    return v


def in_float32(term):
    """Runs a loss term outside autocast, its 16-bit tensor arguments cast to float32: under
    mixed precision the DSIG terms stay float32 (MSEs of close features, cosines, softmaxes are
    precision-sensitive); the gradients flow back in the inputs' own dtype."""
    @functools.wraps(term)
    def wrapper(*args, **kwargs):
        values = list(args) + list(kwargs.values())
        first = next((v for v in values if isinstance(v, torch.Tensor)), None)
        device = first.device.type if first is not None else "cpu"
        with torch.autocast(device, enabled=False):
            return term(*map(_to_float32, args), **{k: _to_float32(v) for k, v in kwargs.items()})
    return wrapper


def image_reduction_factor(num_images: int, mode: str, reference_images: int) -> float:
    """c = 1 ("sum", the original: a sum over the images of one GPU) or
    reference_images / num_images ("mean": the same value at reference_images per GPU, and
    independent of how many images each GPU holds)."""
    if mode == "sum":
        return 1.0
    if mode == "mean":
        return float(reference_images) / max(num_images, 1)
    raise ValueError(f"DISTILL.IMAGE_REDUCTION must be 'sum' or 'mean', got {mode!r}")


class _RowMSE(torch.autograd.Function):
    """e_r = mean_d (s_rd - t_rd)^2 with t constant. One pass each way: the forward keeps
    s - t, the backward is 2 g_r (s_r - t_r) / D."""

    @staticmethod
    def forward(ctx, student, teacher):
        diff = student - teacher
        ctx.save_for_backward(diff)
        return torch.einsum("rd,rd->r", diff, diff) / max(diff.shape[1], 1)

    @staticmethod
    def backward(ctx, grad_rows):
        (diff,) = ctx.saved_tensors
        return diff * (grad_rows * (2.0 / max(diff.shape[1], 1)))[:, None], None


@in_float32
def row_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[R] vector e_r = ||S_r - T_r||^2 / D over the flattened rows (the teacher detached).
    Computed once over all pooled RoIs, the fg and bg node losses select their rows of it
    (no [R, D] gathers, whose backward would each fill a zero [R, D] gradient)."""
    return _RowMSE.apply(student.flatten(1), teacher.detach().flatten(1))


def per_image_mean(row_errors: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[B] vector: the mean of e_r over the n_b consecutive rows of each image; 0 where n_b = 0
    (still connected to the graph)."""
    counts = list(counts)
    image = torch.repeat_interleave(torch.arange(len(counts), device=row_errors.device),
                                    torch.as_tensor(counts, device=row_errors.device))
    sums = row_errors.new_zeros(len(counts)).index_add(0, image, row_errors)
    n = torch.as_tensor(counts, dtype=sums.dtype, device=sums.device).clamp(min=1)
    return sums / n


@in_float32
def fg_node_loss(row_errors: torch.Tensor, n_fg: Sequence[int], weight: float,
                 c: float) -> torch.Tensor:
    """L_fg = w_fg * c * sum_b ||F^s_b - F^t_b||^2 / (n_fg,b * D), from the fg rows' e_r
    (row_mse), image by image."""
    return weight * c * per_image_mean(row_errors, n_fg).sum()


def adaptive_bg_weights(n_fg: Sequence[int], n_bg: Sequence[int], alpha: float) -> List[float]:
    """Per image alpha * n_fg,b / n_bg,b (sampled counts, before mining); 0 without bg RoIs."""
    return [alpha * f / b if b > 0 else 0.0 for f, b in zip(n_fg, n_bg)]


@in_float32
def bg_node_loss(row_errors: torch.Tensor, n_bg: Sequence[int],
                 image_weights: Sequence[float], weight: float, c: float) -> torch.Tensor:
    """L_bg = w_bg * c * sum_b a_b * ||G^s_b - G^t_b||^2 / (n_bg,b * D), from the bg rows' e_r
    (row_mse), with a_b the adaptive weight alpha * n_fg,b / n_bg,b (or 1)."""
    per_image = per_image_mean(row_errors, n_bg)
    a = torch.as_tensor(list(image_weights), dtype=per_image.dtype, device=per_image.device)
    return weight * c * (a * per_image).sum()


def mine_background(teacher_bg_logits: torch.Tensor, background_label: int, threshold: float,
                    n_bg: Sequence[int], max_per_image: int = 0) -> torch.Tensor:
    """Bool mask over the bg RoIs: CE(teacher logits, background) >= threshold, i.e. the teacher's
    p(bg) <= exp(-threshold): the backgrounds the teacher finds confusing. With max_per_image > 0
    only the hardest that many per image are kept."""
    if teacher_bg_logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=teacher_bg_logits.device)
    labels = torch.full((teacher_bg_logits.shape[0],), background_label, dtype=torch.long,
                        device=teacher_bg_logits.device)
    ce = F.cross_entropy(teacher_bg_logits.float(), labels, reduction="none")
    mask = ce >= threshold
    if max_per_image > 0:
        start = 0
        for n in n_bg:
            seg_ce, seg_mask = ce[start:start + n], mask[start:start + n]
            if int(seg_mask.sum()) > max_per_image:
                keep = torch.topk(torch.where(seg_mask, seg_ce, seg_ce.new_tensor(-1.0)),
                                  max_per_image).indices
                seg_mask.zero_()
                seg_mask[keep] = True
            start += n
    return mask


@in_float32
def edge_loss(s_nodes: torch.Tensor, t_nodes: torch.Tensor, counts: Sequence[int], weight: float,
              c: float, backend: str = "fused", zero_dead_rows: bool = False) -> torch.Tensor:
    """L_edge = w_edge * c * sum_b 0.5 * mean((A^t_b - A^s_b)^2), A_b = cosine Gram of the
    image's nodes [fg ; mined bg] (diagonal included). One dsig_ext.edge_mse_loss call."""
    offsets = dsig_ext.offsets_from_counts(list(counts))
    loss = dsig_ext.edge_mse_loss(s_nodes, t_nodes.detach(), offsets,
                                  zero_dead_rows=zero_dead_rows, backend=backend)
    return weight * c * loss


def feature_map_loss(s_features: Dict[str, torch.Tensor], t_features: Dict[str, torch.Tensor],
                     levels: Sequence[str], weight: float) -> torch.Tensor:
    """L_feat = w_feat * sum_l mean_{n,c,h,w} (P^s_l - P^t_l)^2 over the listed FPN levels
    (in float32 outside autocast, as in_float32 does for the other terms)."""
    def level_mse(s, t):
        with torch.autocast(s.device.type, enabled=False):
            return F.mse_loss(_to_float32(s), _to_float32(t.detach()))

    return weight * sum(level_mse(s_features[l], t_features[l]) for l in levels)


@in_float32
def roi_cls_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float,
                    weight: float) -> torch.Tensor:
    """L_cls = w_cls * T^2 * (1 / (R (K+1))) * sum_r sum_k p^t_rk (log p^t_rk - log p^s_rk),
    p = softmax(z / T) over the K+1 classes of each of the R sampled RoIs (a mean over
    elements, as the original's kl_div(reduction='mean'))."""
    if s_logits.shape[0] == 0:
        return s_logits.sum() * 0.0
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    p_t = F.softmax(t_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="sum") / log_p_s.numel()  # mean over R (K+1)
    return weight * temperature ** 2 * kl


@in_float32
def roi_reg_kd_loss(s_deltas: torch.Tensor, t_deltas: torch.Tensor, gt_classes: torch.Tensor,
                    num_classes: int, weight: float) -> torch.Tensor:
    """L_reg = w_reg * (1 / R) * sum_{r in fg} sum_j |d^s_{r, c_r, j} - d^t_{r, c_r, j}| on the
    deltas of each fg RoI's GT class c_r (class-agnostic boxes: the single set of deltas)."""
    R = s_deltas.shape[0]
    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    if R == 0 or not bool(fg.any()):
        return s_deltas.sum() * 0.0
    idx = fg.nonzero(as_tuple=True)[0]
    box_dim = 4
    if s_deltas.shape[1] == box_dim:  # class-agnostic regression
        s_sel, t_sel = s_deltas[idx], t_deltas[idx]
    else:
        cols = gt_classes[idx, None] * box_dim + torch.arange(box_dim, device=s_deltas.device)
        s_sel = s_deltas[idx[:, None], cols]
        t_sel = t_deltas[idx[:, None], cols]
    return weight * (s_sel - t_sel.detach()).abs().sum() / R


@in_float32
def dense_cls_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, valid: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """L = w * (1 / (A K)) * sum_{a valid} sum_k p^t_ak (log p^t_ak - log p^s_ak), p = softmax
    over the K class logits of each of the A non-ignored anchors (a mean over elements, as the
    original's kl_div(reduction='mean'); softmax over sigmoid-trained logits is its choice)."""
    s, t = s_logits[valid], t_logits[valid].detach()
    if s.numel() == 0:
        return s_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.softmax(t, dim=-1), reduction="sum")
    return weight * kl / s.numel()


@in_float32
def dense_reg_kd_loss(s_deltas: torch.Tensor, t_deltas: torch.Tensor, positive: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """L = w * sum_{a positive} ||d^s_a - d^t_a||_1 / max(1, #positive) (smooth-L1 with beta 0)."""
    num_pos = int(positive.sum())
    diff = (s_deltas[positive] - t_deltas[positive].detach()).abs().sum()
    return weight * diff / max(1, num_pos)
