"""multilevel_roi_align against detectron2's ROIPooler, per-level torchvision roi_align and
float64, plus gradcheck, opcheck, adjoint, determinism, compile and malformed input."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align

import dsig_ext
from helpers import make_boxes, make_pyramid, rois_from_lists, split_boxes
from conftest import DEVICES, requires_cuda

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
TOL = {torch.float32: dict(atol=1e-5, rtol=0), torch.float64: dict(atol=1e-10, rtol=0)}


def per_level_torchvision(features, rois, levels, scales, out, sampling_ratio, aligned):
    """torchvision roi_align of each RoI on its own level (the oracle)."""
    res = features[0].new_zeros((rois.shape[0], features[0].shape[1]) + tuple(out))
    for i, level in enumerate(levels.tolist()):
        res[i:i + 1] = roi_align(features[level], rois[i:i + 1].to(features[0].dtype), out,
                                 scales[level], sampling_ratio, aligned)
    return res


def grads_of(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_detectron2_roipooler(device, dtype, pooler_type, sampling_ratio):
    poolers = pytest.importorskip("detectron2.modeling.poolers")
    from detectron2.structures import Boxes

    g = torch.Generator().manual_seed(0)
    image_hw = (160, 224)
    feats = make_pyramid(3, 8, image_hw, dtype=dtype, device=device, requires_grad=True,
                         generator=g)
    box_lists = split_boxes(make_boxes(60, image_hw, g, dtype=dtype), 3, g)
    box_lists[2] = box_lists[2][:0]  # an image without boxes
    boxes = [Boxes(b.to(device)) for b in box_lists]
    theirs = poolers.ROIPooler(7, SCALES, sampling_ratio, pooler_type)
    ours = dsig_ext.MultiLevelRoIAlign(7, SCALES, sampling_ratio, pooler_type)
    expected, got = theirs(feats, boxes), ours(feats, boxes)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=g).to(expected)
    expected_grads = grads_of(expected, feats, grad)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    if device == "cpu":  # deterministic: same arithmetic in the same order, bitwise equal
        exact = dsig_ext.MultiLevelRoIAlign(7, SCALES, sampling_ratio, pooler_type,
                                            deterministic=True)(feats, boxes)
        assert torch.equal(exact, expected)
        assert all(torch.equal(a, b) for a, b in zip(grads_of(exact, feats, grad),
                                                      expected_grads))
    for deterministic in (False, True):
        out = dsig_ext.MultiLevelRoIAlign(7, SCALES, sampling_ratio, pooler_type,
                                          deterministic=deterministic)(feats, boxes)
        for a, b in zip(grads_of(out, feats, grad), expected_grads):
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 3])
def test_matches_torchvision_on_any_level(device, dtype, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    image_hw = (96, 130)
    feats = make_pyramid(2, 5, image_hw, dtype=dtype, device=device, requires_grad=True,
                         generator=g)
    boxes = make_boxes(40, image_hw, g, dtype=dtype)
    rois = rois_from_lists(split_boxes(boxes, 2, g)).to(device)
    levels = torch.randint(0, 4, (rois.shape[0],), generator=g).to(device)
    got = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, (5, 6), sampling_ratio,
                                        aligned)
    expected = per_level_torchvision(feats, rois, levels, SCALES, (5, 6), sampling_ratio, aligned)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    grad = torch.randn(got.shape, dtype=torch.float64, generator=g).to(got)
    for a, b in zip(grads_of(got, feats, grad), grads_of(expected, feats, grad)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_cpu_forward_dense_and_sparse_samples(sampling_ratio):
    """The CPU forward pools each RoI separably or sample by sample, whichever is cheaper: big
    RoIs on a fine level with a small fixed grid go sample by sample, adaptive grids separably.
    Both equal torchvision; deterministic mode is torchvision's order, bitwise."""
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(2, 3, 60, 80, dtype=torch.float64, generator=g)]
    rois = torch.tensor([[0, 2.0, 3.0, 300.0, 230.0], [1, 40.0, 10.0, 250.0, 200.0],
                         [0, 10.0, 12.0, 30.0, 25.0], [1, -20.0, 100.0, 60.0, 260.0]],
                        dtype=torch.float64)
    levels = torch.zeros(4, dtype=torch.long)
    expected = per_level_torchvision(feats, rois, levels, [1 / 4], (7, 7), sampling_ratio, True)
    got = dsig_ext.multilevel_roi_align(feats, rois, levels, [1 / 4], 7, sampling_ratio)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    exact = dsig_ext.multilevel_roi_align(feats, rois, levels, [1 / 4], 7, sampling_ratio,
                                          deterministic=True)
    assert torch.equal(exact, expected)
    if sampling_ratio == 1:  # one sample per bin over a ~60 px footprint: sample by sample
        assert torch.equal(got[:2], expected[:2])


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64(device):
    g = torch.Generator().manual_seed(2)
    feats = make_pyramid(2, 4, (128, 128), dtype=torch.float64, device=device, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(50, (128, 128), g, dtype=torch.float64), 2, g))
    rois = rois.to(device)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    out64 = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    out32 = dsig_ext.multilevel_roi_align([f.float() for f in feats], rois.float(), levels,
                                          SCALES, 7)
    torch.testing.assert_close(out32.double(), out64, atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_boxes_and_dtype_flexible_indices(device):
    g = torch.Generator().manual_seed(3)
    feats = make_pyramid(2, 3, (64, 64), device=device, generator=g)
    box_lists = [b.to(device) for b in split_boxes(make_boxes(10, (64, 64), g, special=False),
                                                   2, g)]
    rois = rois_from_lists(box_lists)
    levels = torch.randint(0, 4, (rois.shape[0],), generator=g).to(device)
    a = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    b = dsig_ext.multilevel_roi_align(feats, box_lists, levels.int(), SCALES, 7)
    c = dsig_ext.multilevel_roi_align(feats, rois.double(), levels, SCALES, 7)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_no_rois(device):
    feats = make_pyramid(2, 3, (32, 32), device=device, requires_grad=True)
    rois = torch.zeros((0, 5), device=device)
    levels = torch.zeros((0,), dtype=torch.int64, device=device)
    out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    assert out.shape == (0, 3, 7, 7)
    grads = torch.autograd.grad(out.sum(), feats)
    assert all(gr.shape == f.shape and not gr.any() for gr, f in zip(grads, feats))


@pytest.mark.parametrize("device", DEVICES)
def test_levels_that_receive_no_box(device):
    g = torch.Generator().manual_seed(4)
    feats = make_pyramid(2, 3, (64, 64), device=device, requires_grad=True, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(8, (64, 64), g, special=False), 2, g))
    rois = rois.to(device)
    levels = torch.full((rois.shape[0],), 2, dtype=torch.int64, device=device)
    out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    grads = torch.autograd.grad(out.square().sum(), feats)
    assert grads[2].abs().sum() > 0
    assert not grads[0].any() and not grads[1].any() and not grads[3].any()


def test_only_levels_requiring_grad_get_one():
    feats = make_pyramid(1, 2, (32, 32))
    feats[1].requires_grad_(True)
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0], [0, 2.0, 3.0, 30.0, 31.0]])
    out = dsig_ext.multilevel_roi_align(feats, rois, torch.tensor([0, 1]), SCALES, 7)
    (grad,) = torch.autograd.grad(out.sum(), [feats[1]])
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_float32_on_rounded_inputs(device, dtype):
    g = torch.Generator().manual_seed(5)
    feats = make_pyramid(2, 4, (64, 80), dtype=dtype, device=device, requires_grad=True,
                         generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(20, (64, 80), g), 2, g)).to(device)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    feats32 = [f.detach().float().requires_grad_() for f in feats]
    out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    ref = dsig_ext.multilevel_roi_align(feats32, rois, levels, SCALES, 7)
    assert out.dtype == dtype
    scale = max(f.abs().max().item() for f in feats32)
    torch.testing.assert_close(out.float(), ref, atol=1e-2 * scale, rtol=1e-2)
    grad = torch.randn(out.shape, generator=g).to(device)
    for a, b in zip(grads_of(out, feats, grad.to(dtype)), grads_of(ref, feats32, grad)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, atol=2e-2 * b.abs().max().item() + 1e-3,
                                   rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_features_and_noncontiguous_grad(device):
    g = torch.Generator().manual_seed(6)
    feats = make_pyramid(2, 6, (64, 96), device=device, generator=g)
    feats_cl = [f.to(memory_format=torch.channels_last).requires_grad_() for f in feats]
    feats = [f.requires_grad_() for f in feats]
    rois = rois_from_lists(split_boxes(make_boxes(20, (64, 96), g), 2, g)).to(device)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    big = torch.randn(len(rois), 6, 7, 14, generator=g).to(device)
    grad = big[..., ::2]  # non-contiguous
    assert not grad.is_contiguous()
    for deterministic in (True, False):
        a = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7,
                                          deterministic=deterministic)
        b = dsig_ext.multilevel_roi_align(feats_cl, rois, levels, SCALES, 7,
                                          deterministic=deterministic)
        assert torch.equal(a, b)
        for x, y in zip(grads_of(a, feats, grad), grads_of(b, feats_cl, grad.contiguous())):
            if deterministic:  # the same sums in the same order
                assert torch.equal(x, y)
            else:  # CUDA atomics add in any order: a few ulp of the largest partial sums
                torch.testing.assert_close(x, y, atol=1e-5 * max(1.0, y.abs().max().item()),
                                           rtol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    feats = make_pyramid(2, 2, (24, 28), strides=(4, 8), dtype=torch.float64,
                         requires_grad=True, generator=g)
    rois = torch.tensor([[0, 1.5, 2.0, 17.0, 19.5], [1, -4.0, 3.0, 40.0, 30.0],
                         [0, 5.0, 5.0, 5.5, 9.0], [1, 20.0, 2.0, 26.0, 27.0],
                         [0, 3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    levels = torch.tensor([0, 1, 0, 1, 1])
    for aligned, sr in ((True, 0), (False, 2)):
        assert torch.autograd.gradcheck(
            lambda a, b: dsig_ext.multilevel_roi_align([a, b], rois, levels, [0.25, 0.125],
                                                       (3, 4), sr, aligned), tuple(feats))


@pytest.mark.parametrize("device", DEVICES)
def test_adjoint_identity(device):
    """<op(x), y> == <x, op^T(y)> for the linear map features -> pooled (realistic sizes)."""
    g = torch.Generator().manual_seed(8)
    feats = make_pyramid(2, 16, (200, 256), dtype=torch.float64, device=device,
                         requires_grad=True, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(150, (200, 256), g, dtype=torch.float64), 2,
                                       g)).to(device)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    y = torch.randn(out.shape, dtype=torch.float64, generator=g).to(device)
    lhs = (out * y).sum()
    grads = torch.autograd.grad(out, feats, y)
    rhs = sum((f * gr).sum() for f, gr in zip(feats, grads))
    torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bitwise_reproducible(device):
    g = torch.Generator().manual_seed(9)
    feats = make_pyramid(2, 8, (128, 160), device=device, requires_grad=True, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(200, (128, 160), g), 2, g)).to(device)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    grad = torch.randn(rois.shape[0], 8, 7, 7, generator=g).to(device)
    runs = []
    for _ in range(2):
        out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7, deterministic=True)
        runs.append(torch.autograd.grad(out, feats, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    torch.use_deterministic_algorithms(True)
    out = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    for a, b in zip(torch.autograd.grad(out, feats, grad), runs[0]):
        assert torch.equal(a, b)


def test_double_backward_raises():
    feats = make_pyramid(1, 2, (32, 32), dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0]], dtype=torch.float64)
    out = dsig_ext.multilevel_roi_align(feats, rois, torch.tensor([0]), SCALES, 7)
    (grad,) = torch.autograd.grad(out.square().sum(), feats[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(10)
    feats = make_pyramid(2, 3, (40, 48), dtype=dtype, device=device,
                         requires_grad=requires_grad, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(6, (40, 48), g, special=False), 2, g))
    rois = rois.to(device=device, dtype=dtype)
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:].float(), 2, 5)
    torch.library.opcheck(torch.ops.dsig.multilevel_roi_align.default,
                          (feats, rois, levels, SCALES, 7, 7, 0, True, False))
    grad = torch.randn(rois.shape[0], 3, 7, 7, generator=g).to(device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.dsig._multilevel_roi_align_backward.default,
                          (grad, rois, levels, SCALES, 2, 3, [f.shape[2] for f in feats],
                           [f.shape[3] for f in feats], 0, True, False))
    torch.library.opcheck(torch.ops.dsig.assign_fpn_levels.default,
                          (rois[:, 1:].float().contiguous(), 2, 5, 224.0, 4))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(11)
    feats = make_pyramid(2, 4, (64, 64), requires_grad=True, generator=g)
    box_lists = split_boxes(make_boxes(12, (64, 64), g, special=False), 2, g)
    pooler = dsig_ext.MultiLevelRoIAlign(7, SCALES, 0, "ROIAlignV2")

    def step(features, boxes0, boxes1):
        return pooler(features, [boxes0, boxes1]).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = compiled(feats, *box_lists)
    b = step(feats, *box_lists)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, feats)
    gb = torch.autograd.grad(b, feats)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_reference_backend_matches_fused():
    g = torch.Generator().manual_seed(12)
    feats = make_pyramid(2, 4, (64, 64), dtype=torch.float64, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(30, (64, 64), g, dtype=torch.float64), 2, g))
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    fused = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    with dsig_ext.use_backend("reference"):
        ref = dsig_ext.multilevel_roi_align(feats, rois, levels, SCALES, 7)
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3), channels=st.integers(1, 4), height=st.integers(1, 40),
    width=st.integers(1, 40), num_levels=st.integers(1, 4), num_rois=st.integers(0, 12),
    out_h=st.integers(1, 5), out_w=st.integers(1, 5), sampling_ratio=st.integers(0, 3),
    aligned=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(batch, channels, height, width, num_levels, num_rois, out_h,
                                    out_w, sampling_ratio, aligned, seed):
    g = torch.Generator().manual_seed(seed)
    strides = [2 ** (i + 2) for i in range(num_levels)]
    feats = [torch.randn(batch, channels, max(1, math.ceil(height * 4 / s)),
                         max(1, math.ceil(width * 4 / s)), dtype=torch.float64, generator=g)
             .requires_grad_() for s in strides]
    scales = [1.0 / s for s in strides]
    xy = (torch.rand(num_rois, 2, generator=g) * 1.4 - 0.2) * torch.tensor([width, height]) * 4
    wh = torch.rand(num_rois, 2, generator=g) * torch.tensor([width, height]) * 5
    rois = torch.cat([torch.randint(0, batch, (num_rois, 1), generator=g).double(), xy, xy + wh],
                     dim=1).double()
    levels = torch.randint(0, num_levels, (num_rois,), generator=g)
    got = dsig_ext.multilevel_roi_align(feats, rois, levels, scales, (out_h, out_w),
                                        sampling_ratio, aligned)
    ref = dsig_ext.reference.multilevel_roi_align(feats, rois, levels, scales, (out_h, out_w),
                                                  sampling_ratio, aligned)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    grad = torch.randn(got.shape, dtype=torch.float64, generator=g)
    for f, a, b in zip(feats, grads_of(got, feats, grad), grads_of(ref, feats, grad)):
        a = torch.zeros_like(f) if a is None else a
        b = torch.zeros_like(f) if b is None else b
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# --- malformed input: a clear Python error, never a crash -------------------------------------

def _valid_args():
    feats = make_pyramid(2, 3, (32, 32))
    rois = torch.tensor([[0, 1.0, 1.0, 20.0, 20.0], [1, 2.0, 3.0, 30.0, 31.0]])
    return feats, rois, torch.tensor([0, 1])


@pytest.mark.parametrize("case, match", [
    ("rois_not_k5", r"rois must have shape \[K, 5\]"),
    ("rois_integer", "rois must be a floating"),
    ("batch_out_of_range", "batch index"),
    ("batch_fractional", "batch index"),
    ("level_out_of_range", "assigned level"),
    ("level_negative", "assigned level"),
    ("nan_box", "NaN or infinite"),
    ("inf_box", "NaN or infinite"),
    ("channels_mismatch", "same channel count"),
    ("dtype_mix", "has dtype"),
    ("batch_mismatch", "has batch"),
    ("levels_length", r"levels must have shape \[K\]"),
    ("levels_float", "levels must be int64 or int32"),
    ("scales_length", "spatial_scales for"),
    ("bad_scale", "finite and positive"),
    ("output_size", "output size must be positive"),
    ("not_4d", r"must be \[B, C, H, W\]"),
])
def test_malformed_input_raises(case, match):
    feats, rois, levels = _valid_args()
    scales = SCALES
    out = (7, 7)
    if case == "rois_not_k5":
        rois = rois[:, :4]
    elif case == "rois_integer":
        rois = rois.long()
    elif case == "batch_out_of_range":
        rois[1, 0] = 2
    elif case == "batch_fractional":
        rois[1, 0] = 0.5
    elif case == "level_out_of_range":
        levels = torch.tensor([0, 4])
    elif case == "level_negative":
        levels = torch.tensor([-1, 0])
    elif case == "nan_box":
        rois[0, 3] = float("nan")
    elif case == "inf_box":
        rois[1, 1] = float("-inf")
    elif case == "channels_mismatch":
        feats[2] = feats[2][:, :2]
    elif case == "dtype_mix":
        feats[1] = feats[1].double()
    elif case == "batch_mismatch":
        feats[3] = feats[3][:1]
    elif case == "levels_length":
        levels = torch.tensor([0])
    elif case == "levels_float":
        levels = levels.float()
    elif case == "scales_length":
        scales = SCALES[:3]
    elif case == "bad_scale":
        scales = [0.25, 0.0, 1 / 16, 1 / 32]
    elif case == "output_size":
        out = (0, 7)
    elif case == "not_4d":
        feats[0] = feats[0][0]
    with pytest.raises((RuntimeError, ValueError), match=match):
        dsig_ext.multilevel_roi_align(feats, rois, levels, scales, out)


def test_backward_op_rejects_bad_rois():
    grad = torch.zeros(1, 3, 7, 7)
    with pytest.raises(RuntimeError, match="batch index"):
        torch.ops.dsig._multilevel_roi_align_backward(
            grad, torch.tensor([[5.0, 1, 1, 9, 9]]), torch.tensor([0]), [0.25], 2, 3, [8], [8],
            0, True, False)


@requires_cuda
def test_wrong_device_mix_raises():
    feats, rois, levels = _valid_args()
    feats = [f.cuda() for f in feats]
    with pytest.raises(RuntimeError, match="rois are on"):
        dsig_ext.multilevel_roi_align(feats, rois, levels.cuda(), SCALES, 7)
    with pytest.raises(RuntimeError, match="features\\[1\\] is on"):
        dsig_ext.multilevel_roi_align([feats[0], feats[1].cpu()] + feats[2:], rois.cuda(),
                                      levels.cuda(), SCALES, 7)


def test_device_mix_is_reported_before_value_checks():
    """Mixed devices get the op's own message, not an error from the value checks (which would
    stack flags from two devices); meta tensors stand in for a GPU here."""
    feats, rois, levels = _valid_args()
    meta = [f.to("meta") for f in feats]
    with pytest.raises(RuntimeError, match="levels are on cpu but the features are on meta"):
        dsig_ext.multilevel_roi_align(meta, rois.to("meta"), levels, SCALES, 7)
    with pytest.raises(RuntimeError, match="rois are on cpu but the features are on meta"):
        dsig_ext.multilevel_roi_align(meta, rois, levels.to("meta"), SCALES, 7)


def test_value_checks_only_when_asked_and_never_in_capture(monkeypatch):
    """check_inputs=False (and CUDA-graph capture) never reach the host-reading value checks."""
    from dsig_ext import ops

    calls = []
    monkeypatch.setattr(ops, "_check_roi_values", lambda *a: calls.append("rois"))
    monkeypatch.setattr(ops, "_check_offsets_values", lambda *a: calls.append("offsets"))
    feats, rois, levels = _valid_args()
    meta = [f.to("meta") for f in feats]
    xs = torch.empty(9, 6, device="meta")
    offsets = torch.tensor([0, 4, 9], device="meta")
    out = dsig_ext.multilevel_roi_align(meta, rois.to("meta"), levels.to("meta"), SCALES, 7)
    dsig_ext.edge_mse_loss(xs, xs, offsets)
    dsig_ext.cosine_edges(xs, offsets)
    assert out.device.type == "meta" and calls == ["rois", "offsets", "offsets"]
    calls.clear()
    dsig_ext.multilevel_roi_align(meta, rois.to("meta"), levels.to("meta"), SCALES, 7,
                                  check_inputs=False)
    dsig_ext.edge_mse_loss(xs, xs, offsets, check_inputs=False)
    dsig_ext.cosine_edges(xs, offsets, check_inputs=False)
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dsig_ext.multilevel_roi_align(meta, rois.to("meta"), levels.to("meta"), SCALES, 7)
    dsig_ext.edge_mse_loss(xs, xs, offsets)
    assert calls == []


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_features_of_the_wrong_rank_are_named_before_the_boxes(backend):
    """A 3-D map used to get a message about boxes per image (or a raw index error); a single
    tensor used to be split into its images by list()."""
    feats, rois, levels = _valid_args()
    boxes = [rois[:1, 1:], rois[1:, 1:]]
    with pytest.raises(RuntimeError, match=r"features\[0\] must be \[B, C, H, W\], "
                                           r"got \[3, 8, 8\]"):
        dsig_ext.multilevel_roi_align([feats[0][0]], boxes, levels[:1] * 0, SCALES[:1], 7,
                                      backend=backend)
    with pytest.raises(TypeError, match=r"features must be a list of L tensors \[B, C, H, W\], "
                                        r"got one tensor \[2, 3, 8, 8\]; for one level pass "
                                        r"\[features\]"):
        dsig_ext.multilevel_roi_align(feats[0], rois, levels * 0, SCALES[:1], 7, backend=backend)
    with pytest.raises(TypeError, match=r"features\[1\] must be a tensor"):
        dsig_ext.multilevel_roi_align([feats[0], None], rois, levels, SCALES[:2], 7,
                                      backend=backend)
    pooler = dsig_ext.MultiLevelRoIAlign(7, [1 / 4], 0, backend=backend)
    with pytest.raises(ValueError, match=r"x\[0\] must be a feature map \[B, C, H, W\], "
                                         r"got \[3, 8, 8\]"):
        pooler([feats[0][0]], boxes)
