"""DSIG loss terms against hand computations (no detectron2 model needed)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")
import distill_utils  # noqa: E402,F401  (puts projects/Distillation on sys.path)
from distillation import losses as L  # noqa: E402


def test_node_loss_is_per_image_element_mean_summed():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 12, generator=g), torch.randn(7, 12, generator=g)
    counts = [3, 0, 4]
    expected = ((s[:3] - t[:3]) ** 2).mean() + ((s[3:] - t[3:]) ** 2).mean()
    rows = L.row_mse(s, t)
    torch.testing.assert_close(L.fg_node_loss(rows, counts, 0.5, 1.0), 0.5 * expected)
    torch.testing.assert_close(L.fg_node_loss(rows, counts, 0.5, 2 / 3), 0.5 * expected * 2 / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_mse_gradient_equals_autograd_of_the_formula(dtype):
    """row_mse's one-pass backward against autograd of mean((S - T)^2) per row; low-precision
    rows are accumulated in float32 and their gradient comes back in their own dtype."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 2, 5, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randn(6, 2, 5, generator=g, dtype=torch.float64).to(dtype)
    weights = torch.rand(6, generator=g, dtype=torch.float64)
    rows = L.row_mse(s, t)
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (grad,) = torch.autograd.grad((rows.double() * weights).sum(), s)
    s_ref = s.detach().double().requires_grad_()
    ref_rows = (s_ref - t.double()).pow(2).flatten(1).mean(1)
    (grad_ref,) = torch.autograd.grad((ref_rows * weights).sum(), s_ref)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rows.double(), ref_rows.detach(), **tol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), grad_ref, **tol)
    empty = L.fg_node_loss(L.row_mse(s[:0], t[:0]), [0, 0], 0.5, 1.0)
    assert empty.item() == 0 and empty.requires_grad  # stays connected to the graph


def test_adaptive_background_weight():
    assert L.adaptive_bg_weights([64, 10, 0], [448, 502, 512], 7.5) == pytest.approx(
        [7.5 * 64 / 448, 7.5 * 10 / 502, 0.0])
    assert L.adaptive_bg_weights([5], [0], 7.5) == [0.0]
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    w = L.adaptive_bg_weights([2, 6], [4, 5], 7.5)
    expected = w[0] * ((s[:4] - t[:4]) ** 2).mean() + w[1] * ((s[4:] - t[4:]) ** 2).mean()
    torch.testing.assert_close(L.bg_node_loss(L.row_mse(s, t), [4, 5], w, 0.5, 1.0),
                               0.5 * expected)


def test_image_reduction():
    assert L.image_reduction_factor(2, "sum", 2) == 1.0
    assert L.image_reduction_factor(2, "mean", 2) == 1.0  # equal to the original at 2 / GPU
    assert L.image_reduction_factor(4, "mean", 2) == 0.5
    with pytest.raises(ValueError, match="IMAGE_REDUCTION"):
        L.image_reduction_factor(2, "median", 2)


def test_mining_threshold_and_monotonicity():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 6, generator=g) * 3
    ce = F.cross_entropy(logits, torch.full((200,), 5), reduction="none")
    mask = L.mine_background(logits, 5, 0.6, [120, 80])
    assert torch.equal(mask, ce >= 0.6)
    previous = None
    for tau in (3.0, 2.0, 1.0, 0.6, 0.3, 0.0):
        m = L.mine_background(logits, 5, tau, [120, 80])
        if previous is not None:  # lowering tau only adds nodes
            assert bool((m | ~previous).all()) and int(m.sum()) >= int(previous.sum())
        previous = m
    capped = L.mine_background(logits, 5, 0.0, [120, 80], max_per_image=10)
    assert int(capped[:120].sum()) == 10 and int(capped[120:].sum()) == 10
    assert ce[:120][capped[:120]].min() >= ce[:120][~capped[:120]].max()


def test_roi_cls_kd_divides_by_all_elements():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    p_t = F.softmax(t, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(s, 1))).sum() / (6 * 4)
    torch.testing.assert_close(L.roi_cls_kd_loss(s, t, 1.0, 3.0), 3.0 * manual)
    T = 2.0
    p_t = F.softmax(t / T, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum() / 24 * T * T
    torch.testing.assert_close(L.roi_cls_kd_loss(s, t, T, 1.0), manual)


def test_roi_reg_kd_on_gt_class_deltas_of_fg():
    g = torch.Generator().manual_seed(4)
    K = 3
    s, t = torch.randn(5, 4 * K, generator=g), torch.randn(5, 4 * K, generator=g)
    gt = torch.tensor([0, 3, 2, 3, 1])  # 3 = background
    manual = sum((s[r, 4 * c:4 * c + 4] - t[r, 4 * c:4 * c + 4]).abs().sum()
                 for r, c in ((0, 0), (2, 2), (4, 1))) / 5
    torch.testing.assert_close(L.roi_reg_kd_loss(s, t, gt, K, 1.0), manual)


def test_everything_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 8, generator=g).abs()
    assert L.fg_node_loss(L.row_mse(x, x), [4, 6], 0.5, 1.0) == 0
    assert L.bg_node_loss(L.row_mse(x, x), [4, 6], [1.0, 2.0], 0.5, 1.0) == 0
    assert L.edge_loss(x, x, [4, 6], 2.0, 1.0).abs() < 1e-12
    assert L.roi_cls_kd_loss(x, x, 1.0, 3.0).abs() < 1e-7
    assert L.feature_map_loss({"p2": x}, {"p2": x}, ["p2"], 0.5) == 0


def test_feature_loss_levels_follow_the_detector_and_unknown_ones_fail():
    from distillation.config import resolve_feature_loss_levels

    retina = ["p3", "p4", "p5", "p6", "p7"]
    assert resolve_feature_loss_levels([], retina, retina) == retina
    assert resolve_feature_loss_levels(["p4", "p6"], retina, retina) == ["p4", "p6"]
    with pytest.raises(ValueError, match="unknown level 'p2'.*p3, p4, p5, p6, p7"):
        resolve_feature_loss_levels(["p2", "p3"], retina, retina)
    with pytest.raises(ValueError, match="teacher has no level 'p7'"):
        resolve_feature_loss_levels(["p7"], retina, retina[:-1])
