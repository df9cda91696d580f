"""CUDA kernels: parity with the CPU kernels, both backward modes, determinism, adjoint and
opcheck. Skipped where no GPU exists; test_cuda_kernels_compiled runs everywhere."""
import glob
import os

import pytest
import torch

import dsig_ext
from conftest import ROOT, requires_cuda
from helpers import make_boxes, make_pyramid, rois_from_lists, split_boxes

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
OPS = ["multilevel_roi_align", "_multilevel_roi_align_backward", "assign_fpn_levels",
       "cosine_edges", "_cosine_edges_backward", "_edge_mse_loss_forward", "_edge_factor_matmul"]


def _toolkit_present():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dsig_setup_probe", os.path.join(ROOT, "setup.py"))
    text = open(spec.origin).read()
    namespace = {"__file__": spec.origin}
    # evaluate only the toolkit finder of setup.py, not setup() itself
    exec(text.split("def _want_cuda")[0], namespace)
    return namespace["_find_cuda_toolkit"]() is not None


def test_cuda_kernels_compiled():
    """Where a CUDA toolkit exists (as on CI) every .cu file is compiled into the extension and
    registers its kernels, GPU or not."""
    if os.environ.get("DSIG_CPU_ONLY") == "1" or not _toolkit_present():
        pytest.skip("no CUDA toolkit: CPU-only build")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda",
                                                                       "*.cu")))
    assert dsig_ext.cuda_kernels_built()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsig::{op}", "CUDA"), op


def _case(dtype, seed=0, batch=2, channels=16, n=300, hw=(256, 320)):
    g = torch.Generator().manual_seed(seed)
    feats = make_pyramid(batch, channels, hw, dtype=dtype, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(n, hw, g, dtype=torch.float64), batch, g))
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    grad = torch.randn(rois.shape[0], channels, 7, 7, generator=g, dtype=torch.float64)
    return feats, rois.to(dtype), levels, grad.to(dtype)


def _run(feats, rois, levels, grad, device, deterministic, sampling_ratio=0, aligned=True):
    fs = [f.to(device).requires_grad_() for f in feats]
    out = dsig_ext.multilevel_roi_align(fs, rois.to(device), levels.to(device), SCALES, 7,
                                        sampling_ratio, aligned, deterministic=deterministic)
    grads = torch.autograd.grad(out, fs, grad.to(device))
    return out.cpu(), [x.cpu() for x in grads]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, False)])
def test_roi_align_cuda_matches_cpu(dtype, deterministic, sampling_ratio, aligned):
    case = _case(dtype)
    out_cpu, g_cpu = _run(*case, "cpu", True, sampling_ratio, aligned)
    out_gpu, g_gpu = _run(*case, "cuda", deterministic, sampling_ratio, aligned)
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=1e-10, rtol=0)
    torch.testing.assert_close(out_gpu, out_cpu, **tol)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a, b, **tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_cuda_low_precision(dtype):
    feats, rois, levels, grad = _case(dtype, channels=8)
    out, grads = _run(feats, rois, levels, grad, "cuda", False)
    ref_out, ref_grads = _run([f.float() for f in feats], rois.float(), levels, grad.float(),
                              "cuda", False)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, atol=5e-2 * b.abs().max().item() + 1e-3,
                                   rtol=2e-2)


@requires_cuda
def test_roi_align_cuda_deterministic_is_bitwise_reproducible():
    case = _case(torch.float32, seed=3, n=600)
    _, first = _run(*case, "cuda", True)
    _, second = _run(*case, "cuda", True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda
def test_roi_align_cuda_adjoint_and_gradcheck():
    feats, rois, levels, grad = _case(torch.float64, seed=4)
    fs = [f.cuda().requires_grad_() for f in feats]
    out = dsig_ext.multilevel_roi_align(fs, rois.cuda(), levels.cuda(), SCALES, 7)
    y = grad.cuda()
    grads = torch.autograd.grad(out, fs, y)
    torch.testing.assert_close((out * y).sum(), sum((f * g).sum() for f, g in zip(fs, grads)),
                               atol=1e-9, rtol=1e-12)
    small = [f[:1, :2, :12, :12].contiguous().cuda().requires_grad_() for f in feats[:2]]
    r = torch.tensor([[0, 2.0, 3.0, 30.0, 40.0], [0, -3.0, 1.0, 50.0, 20.0]],
                     dtype=torch.float64, device="cuda")
    for det in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b: dsig_ext.multilevel_roi_align([a, b], r, torch.tensor([0, 1]).cuda(),
                                                       SCALES[:2], (3, 3), deterministic=det),
            tuple(small))


@requires_cuda
def test_roi_align_cuda_channels_last_and_empty():
    feats, rois, levels, grad = _case(torch.float32, seed=5)
    a, _ = _run(feats, rois, levels, grad, "cuda", False)
    b, _ = _run([f.to(memory_format=torch.channels_last) for f in feats], rois, levels, grad,
                "cuda", False)
    assert torch.equal(a, b)
    fs = [f.cuda().requires_grad_() for f in feats]
    out = dsig_ext.multilevel_roi_align(fs, torch.zeros(0, 5, device="cuda"),
                                        torch.zeros(0, dtype=torch.long, device="cuda"), SCALES,
                                        7)
    assert out.shape == (0, 16, 7, 7)
    assert all(not g.any() for g in torch.autograd.grad(out.sum(), fs))


@requires_cuda
def test_roi_align_cuda_rejects_bad_values():
    feats, rois, levels, _ = _case(torch.float32)
    fs = [f.cuda() for f in feats]
    bad = rois.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="batch indices"):
        dsig_ext.multilevel_roi_align(fs, bad.cuda(), levels.cuda(), SCALES, 7)
    bad = rois.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dsig_ext.multilevel_roi_align(fs, bad.cuda(), levels.cuda(), SCALES, 7)
    # unchecked calls never read out of bounds: the bad RoI pools to zeros
    out = dsig_ext.multilevel_roi_align(fs, bad.cuda(), (levels + 10).cuda(), SCALES, 7,
                                        check_inputs=False)
    torch.cuda.synchronize()
    assert not out.any()


@requires_cuda
def test_assign_levels_cuda_bitwise_matches_reference_on_cuda():
    g = torch.Generator().manual_seed(6)
    boxes = make_boxes(2000, (800, 1333), g).cuda()
    with dsig_ext.use_backend("reference"):
        expected = dsig_ext.assign_fpn_levels(boxes, 2, 5)
    assert torch.equal(dsig_ext.assign_fpn_levels(boxes, 2, 5), expected)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_loss_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(7)
    sizes = [40, 0, 1, 130, 7]
    n = sum(sizes)
    xs = torch.randn(n, 500, generator=g, dtype=torch.float64).abs().to(dtype)
    xt = torch.randn(n, 500, generator=g, dtype=torch.float64).abs().to(dtype)
    xs[3] = 0
    offsets = dsig_ext.offsets_from_counts(sizes)
    results = []
    for device in ("cpu", "cuda"):
        a = xs.to(device).requires_grad_()
        b = xt.to(device).requires_grad_()
        loss = dsig_ext.edge_mse_loss(a, b, offsets)
        ga, gb = torch.autograd.grad(loss, (a, b))
        e = dsig_ext.cosine_edges(a.detach(), offsets.to(device))
        results.append([loss.cpu(), ga.cpu(), gb.cpu(), e.cpu()])
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, **tol)


@requires_cuda
@pytest.mark.parametrize("op", ["roi_align", "edges"])
def test_opcheck_cuda(op):
    if op == "roi_align":
        feats, rois, levels, grad = _case(torch.float32, channels=3, n=8, hw=(48, 64))
        torch.library.opcheck(torch.ops.dsig.multilevel_roi_align.default,
                              ([f.cuda().requires_grad_() for f in feats], rois.cuda(),
                               levels.cuda(), SCALES, 7, 7, 0, True, False))
    else:
        xs = torch.randn(9, 6, device="cuda", requires_grad=True)
        xt = torch.randn(9, 6, device="cuda")
        offsets = torch.tensor([0, 4, 9])
        torch.library.opcheck(torch.ops.dsig._edge_mse_loss_forward.default,
                              (xs, xt, offsets, 1e-12, False, True, False))
        torch.library.opcheck(torch.ops.dsig.cosine_edges.default, (xs, offsets, 1e-12, False))
