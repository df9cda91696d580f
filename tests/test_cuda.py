"""CUDA kernels: parity with the CPU kernels, both backward modes, determinism, adjoint and
opcheck. Skipped where no GPU exists; test_cuda_kernels_compiled runs everywhere."""
import glob
import os

import pytest
import torch

import dsig_ext
from conftest import CUDA, ROOT, requires_cuda
from helpers import make_boxes, make_pyramid, rois_from_lists, split_boxes

SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
OPS = ["multilevel_roi_align", "_multilevel_roi_align_backward", "assign_fpn_levels",
       "cosine_edges", "_cosine_edges_backward", "_edge_mse_loss_forward", "_edge_factor_matmul"]


def load_setup_module():
    """setup.py as a module: its build-plan helpers, without running setup()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dsig_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_kernels_compiled():
    """Where a CUDA toolkit exists (as on CI) every .cu file is compiled into the extension and
    registers its kernels, GPU or not; where a GPU is visible a build without them fails here."""
    if not CUDA and (os.environ.get("DSIG_CPU_ONLY") == "1"
                     or load_setup_module()._find_cuda_toolkit() is None):
        pytest.skip("no CUDA toolkit and no GPU: CPU-only build")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda",
                                                                       "*.cu")))
    assert dsig_ext.cuda_kernels_built(), (
        "dsig_ext was built without its CUDA kernels; rebuild with CUDA_HOME set (see setup.py)")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsig::{op}", "CUDA"), op


def test_build_plan():
    plan = load_setup_module().cuda_build_plan
    assert plan({}, "/opt/cuda", False) == (True, "/opt/cuda")
    assert plan({}, None, False) == (False, None)
    assert plan({"DSIG_CPU_ONLY": "1"}, "/opt/cuda", True) == (False, None)
    assert plan({"FORCE_CUDA": "1", "CUDA_HOME": "/x"}, None, True) == (True, "/x")
    with pytest.raises(RuntimeError, match="GPU is visible but no CUDA toolkit.*CUDA_HOME"):
        plan({}, None, True)


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


def _per_level_torchvision(feats, rois, levels, sampling_ratio, aligned):
    """torchvision's own roi_align of each RoI on its level, on the same device (forward and
    autograd backward): what detectron2's ROIPooler runs on a GPU."""
    from torchvision.ops import roi_align

    out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], 7, 7))
    for level in range(len(feats)):
        idx = torch.nonzero(levels == level).squeeze(1)
        if idx.numel():
            out[idx] = roi_align(feats[level], rois[idx], 7, SCALES[level], sampling_ratio,
                                 aligned)
    return out


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, False)])
def test_roi_align_cuda_float32_rounds_like_torchvision_cuda(deterministic, sampling_ratio,
                                                             aligned):
    """On the GPU the kernels follow torchvision's CUDA rounding (nvcc contracts the sample
    coordinate start + p * bin into one FMA; roi_align_common.h writes it out), so float32
    results match torchvision's CUDA roi_align (and detectron2 on a GPU) to 1e-5, while the CPU
    twin follows torchvision's CPU rounding: GPU vs CPU in float32 may differ by the effect of
    1 ulp in a coordinate, and agree to 1e-10 in float64 (next test)."""
    feats, rois, levels, grad = _case(torch.float32)
    fs = [f.cuda().requires_grad_() for f in feats]
    r, lv, gr = rois.cuda(), levels.cuda(), grad.cuda()
    ours = dsig_ext.multilevel_roi_align(fs, r, lv, SCALES, 7, sampling_ratio, aligned,
                                         deterministic=deterministic)
    theirs = _per_level_torchvision(fs, r, lv, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(ours, fs, gr), torch.autograd.grad(theirs, fs, gr)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    out_cpu, _ = _run(feats, rois, levels, grad, "cpu", True, sampling_ratio, aligned)
    # 1 ulp of a coordinate up to ~330 px times feature differences of a few units
    torch.testing.assert_close(ours.detach().cpu(), out_cpu, atol=5e-4, rtol=0)


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, False)])
def test_roi_align_cuda_matches_cpu_float64(deterministic, sampling_ratio, aligned):
    case = _case(torch.float64)
    out_cpu, g_cpu = _run(*case, "cpu", True, sampling_ratio, aligned)
    out_gpu, g_gpu = _run(*case, "cuda", deterministic, sampling_ratio, aligned)
    torch.testing.assert_close(out_gpu, out_cpu, atol=1e-10, rtol=0)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


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
@pytest.mark.parametrize("dtype, channels, output_size", [
    (torch.float64, 13, (14, 14)), (torch.float32, 3, (7, 5)), (torch.float64, 9, (1, 1))])
def test_roi_align_cuda_owner_backward_shapes(dtype, channels, output_size):
    """The owner-computes backward with channel counts that do not fill a block's channel
    group, other output sizes (a mask head's 14x14) and K = 0 equals the CPU in float64."""
    g = torch.Generator().manual_seed(21)
    feats = make_pyramid(2, channels, (200, 232), dtype=dtype, generator=g)
    rois = rois_from_lists(split_boxes(make_boxes(90, (200, 232), g, dtype=torch.float64), 2, g))
    levels = dsig_ext.assign_fpn_levels(rois[:, 1:], 2, 5)
    grad = torch.randn(rois.shape[0], channels, *output_size, generator=g, dtype=torch.float64)
    heights, widths = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    for k in (rois.shape[0], 0):
        args = (SCALES, 2, channels, heights, widths, 0, True, True)
        cpu = torch.ops.dsig._multilevel_roi_align_backward(
            grad[:k].to(dtype), rois[:k].to(dtype), levels[:k], *args)
        gpu = torch.ops.dsig._multilevel_roi_align_backward(
            grad[:k].to(dtype).cuda(), rois[:k].to(dtype).cuda(), levels[:k].cuda(), *args)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for a, b in zip(gpu, cpu):
            assert a.dtype == dtype and a.is_contiguous()
            torch.testing.assert_close(a.cpu(), b, atol=tol, rtol=0)


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
def test_roi_align_cuda_deterministic_backward_of_empty_buckets_is_zero():
    """Tiles of (image, level) buckets without RoIs, partial tiles included (widths 63, 32, 16, 8
    of a 250 x 250 image are not all multiples of 32), are written as exact zeros: the owner
    kernel's zero-fill and write-out must be separated by a barrier (found by tests/cudasim)."""
    feats, rois, levels, grad = _case(torch.float32, seed=6, hw=(250, 250), n=20)
    B, C = feats[0].shape[:2]
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    one = (rois[:, 0] == 0) & (levels == 0)  # RoIs of image 0 on level 0 only
    for keep in (torch.zeros_like(one), one):
        r, l, g = rois[keep].cuda(), levels[keep].cuda(), grad[keep].cuda()
        outs = [torch.ops.dsig._multilevel_roi_align_backward(g, r, l, SCALES, B, C, hs, ws, 0,
                                                              True, True) for _ in range(3)]
        for lvl, x in enumerate(outs[0]):
            untouched = x if lvl > 0 else x[1:]
            assert not untouched.any(), f"level {lvl}: gradient where no RoI is"
            assert all(torch.equal(x, o[lvl]) for o in outs[1:])


@requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_roi_align_cuda_nonfinite_gradient_stays_on_its_bin(deterministic):
    """A NaN upstream gradient reaches only the pixels its bin's samples touch, as on the CPU."""
    feats, rois, levels, grad = _case(torch.float64, seed=8, n=10)
    grad[1, 2, 3, 2] = float("nan")
    B, C = feats[0].shape[:2]
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    want = torch.ops.dsig._multilevel_roi_align_backward(grad, rois, levels, SCALES, B, C, hs, ws,
                                                         0, True, False)
    got = torch.ops.dsig._multilevel_roi_align_backward(grad.cuda(), rois.cuda(), levels.cuda(),
                                                        SCALES, B, C, hs, ws, 0, True,
                                                        deterministic)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu().isnan(), b.isnan())


@requires_cuda
def test_edge_factor_matmul_cuda_without_nodes_keeps_the_features_dtype():
    x = torch.zeros(0, 5, dtype=torch.float16)
    factor = torch.zeros(0, dtype=torch.float64)
    offsets = torch.zeros(1, dtype=torch.long)
    out = torch.ops.dsig._edge_factor_matmul(torch.tensor(1.0, dtype=torch.float64).cuda(),
                                             factor.cuda(), x.cuda(), offsets)
    assert out.dtype == torch.float16 and out.shape == (0, 5)


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


@requires_cuda
def test_wrong_device_mix_raises_op_messages():
    feats, rois, levels, _ = _case(torch.float32, n=10)
    fs = [f.cuda() for f in feats]
    with pytest.raises(RuntimeError, match="rois are on"):
        dsig_ext.multilevel_roi_align(fs, rois, levels.cuda(), SCALES, 7)
    with pytest.raises(RuntimeError, match="levels are on"):
        dsig_ext.multilevel_roi_align(fs, rois.cuda(), levels, SCALES, 7)
    xs, xt = torch.randn(9, 6), torch.randn(9, 6)
    offsets = torch.tensor([0, 4, 9])
    with pytest.raises(RuntimeError, match="student is on cpu but teacher is on cuda"):
        dsig_ext.edge_mse_loss(xs, xt.cuda(), offsets)
    with pytest.raises(RuntimeError, match="offsets are on cuda:0 but the node features are on"):
        dsig_ext.cosine_edges(xs, offsets.cuda())
    with pytest.raises(RuntimeError, match="offsets are on cuda:0 but the node features are on"):
        dsig_ext.edge_mse_loss(xs, xt, offsets.cuda())


def _edge_case(sizes, dim=300, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    xs = torch.randn(n, dim, generator=g, dtype=torch.float64).abs().to(dtype)
    xt = torch.randn(n, dim, generator=g, dtype=torch.float64).abs().to(dtype)
    return xs, xt, dsig_ext.offsets_from_counts(sizes)


def _edge_run(xs, xt, offsets, device, **kw):
    a = xs.to(device).requires_grad_()
    b = xt.to(device).requires_grad_()
    loss = dsig_ext.edge_mse_loss(a, b, offsets, **kw)
    ga, gb = torch.autograd.grad(loss, (a, b))
    e = dsig_ext.cosine_edges(a.detach().requires_grad_(), offsets, **kw)
    (ge,) = torch.autograd.grad((e * e).sum(), a)
    return [t.detach().cpu() for t in (loss, ga, gb, e, ge)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_edge_loss_cuda_half_types_on_tensor_cores(dtype):
    """16-bit features take the tensor-core kernels (Grams exact in fp32, M X with M in TF32):
    the GPU agrees with the CPU on the same 16-bit inputs (computed in fp32) to the 16-bit
    results' precision; graphs span several 64-row tiles, D splits K."""
    xs, xt, offsets = _edge_case([140, 90, 300, 1], dim=2056, dtype=dtype)
    gpu = _edge_run(xs, xt, offsets, "cuda")
    cpu = _edge_run(xs, xt, offsets, "cpu")
    for name, a, b in zip(("loss", "grad student", "grad teacher", "edges", "edges grad"), gpu,
                          cpu):
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2 * scale + 1e-6, rtol=1e-2,
                                   msg=lambda m: f"{name} ({dtype}): {m}")


@requires_cuda
def test_edge_loss_cuda_device_offsets_and_many_graphs():
    """Offsets on the GPU (layout by binary search) and on the host with more graphs than one
    launch carries (chunked), empty graphs included, all equal the CPU results."""
    g = torch.Generator().manual_seed(11)
    sizes = torch.randint(0, 7, (700,), generator=g).tolist()
    xs, xt, offsets = _edge_case(sizes, dim=40)
    expected = _edge_run(xs, xt, offsets, "cpu")
    for offs in (offsets, offsets.cuda(), offsets.int().cuda()):
        for x, y in zip(_edge_run(xs, xt, offs, "cuda"), expected):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    bad = offsets.clone().cuda()
    bad[3] = -5
    with pytest.raises(RuntimeError, match="non-decreasing"):
        dsig_ext.edge_mse_loss(xs.cuda(), xt.cuda(), bad)
    # unchecked malformed offsets: garbage, but never an out-of-bounds access
    dsig_ext.edge_mse_loss(xs.cuda(), xt.cuda(), bad, check_inputs=False)
    torch.cuda.synchronize()


@requires_cuda
def test_edge_loss_cuda_ignores_tf32_and_is_deterministic(monkeypatch):
    """The block-diagonal products use no cuBLAS: TF32 settings leave them exact fp32 (TF32 would
    move cosines by ~1e-3), deterministic mode needs no CUBLAS_WORKSPACE_CONFIG, and results are
    bitwise reproducible."""
    xs, xt, offsets = _edge_case([140, 90, 300, 1], dim=12544 // 4)
    base = _edge_run(xs, xt, offsets, "cuda")
    exact = _edge_run(xs.double(), xt.double(), offsets, "cpu")
    for x, y in zip(base, exact):
        torch.testing.assert_close(x.double(), y, atol=2e-5, rtol=1e-4)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = _edge_run(xs, xt, offsets, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(True)
    det = _edge_run(xs, xt, offsets, "cuda")
    for a, b, c in zip(base, tf32, det):
        assert torch.equal(a, b) and torch.equal(a, c)


@requires_cuda
def test_no_host_sync_with_check_inputs_false():
    feats, rois, levels, grad = _case(torch.float32, n=200)
    fs = [f.cuda().requires_grad_() for f in feats]
    r, lv, gr = rois.cuda(), levels.cuda(), grad.cuda()
    xs, xt, offsets = _edge_case([40, 0, 1, 130])
    a, b = xs.cuda().requires_grad_(), xt.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for deterministic in (False, True):
            out = dsig_ext.multilevel_roi_align(fs, r, lv, SCALES, 7, check_inputs=False,
                                                deterministic=deterministic)
            torch.autograd.grad(out, fs, gr)
        loss = dsig_ext.edge_mse_loss(a, b, offsets, check_inputs=False)
        torch.autograd.grad(loss, a)
        e = dsig_ext.cosine_edges(a, offsets, check_inputs=False)
        torch.autograd.grad(e.sum(), a)
        # host offsets are checked on the host: free even with check_inputs=True
        loss = dsig_ext.edge_mse_loss(a, b, offsets)
        torch.autograd.grad(loss, a)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@requires_cuda
@pytest.mark.parametrize("check_inputs", [False, True])
def test_cuda_graph_capture_forward_and_backward(check_inputs):
    """Both ops, forward and backward, captured in one CUDA graph and replayed on new data;
    check_inputs=True is skipped during capture instead of failing it."""
    feats, rois, levels, grad = _case(torch.float32, n=120)
    fs = [f.cuda().requires_grad_() for f in feats]
    r, lv, gr = rois.cuda(), levels.cuda(), grad.cuda()
    xs, xt, offsets = _edge_case([40, 0, 1, 130])
    a, b = xs.cuda().requires_grad_(), xt.cuda()

    def step():
        out = dsig_ext.multilevel_roi_align(fs, r, lv, SCALES, 7, check_inputs=check_inputs)
        feat_grads = torch.autograd.grad(out, fs, gr)
        out_det = dsig_ext.multilevel_roi_align(fs, r, lv, SCALES, 7, deterministic=True,
                                                check_inputs=check_inputs)
        feat_grads += torch.autograd.grad(out_det, fs, gr)
        loss = dsig_ext.edge_mse_loss(a, b, offsets, check_inputs=check_inputs)
        (node_grad,) = torch.autograd.grad(loss, a)
        e = dsig_ext.cosine_edges(a, offsets, check_inputs=check_inputs)
        (edge_grad,) = torch.autograd.grad((e * e).sum(), a)
        return [out, *feat_grads, loss, node_grad, e, edge_grad]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for f in fs:
            f.copy_(torch.randn_like(f))
        a.copy_(torch.rand_like(a))
        b.copy_(torch.rand_like(b))
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, step()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# --- code-level check of the no-sync rule (runs everywhere) ------------------------------------

_CUDA_PATH_SOURCES = ["csrc/ops/cuda/*.cu", "csrc/ops/edge_loss.cpp",
                      "csrc/ops/multilevel_roi_align.cpp", "csrc/ops/assign_fpn_levels.cpp"]
_HOST_READS = [r"\.item\s*[<(]", r"\.cpu\s*\(", r"\.tolist\s*\(", r"\bkCPU\b",
               r"cudaMemcpy\s*\(", r"cudaDeviceSynchronize", r"cudaStreamSynchronize",
               r"\.synchronize\s*\(", r"\bDeviceType::CPU\b"]
_CHECKED_CALLS = {"_check_roi_values", "_check_offsets_values"}


def test_cuda_path_sources_read_nothing_back_to_the_host():
    """No copy to the host, item() or synchronisation in the C++ the CUDA ops run (host offsets
    are read from CPU tensors only, asserted in host_offsets)."""
    import re

    files = sorted(set(p for pattern in _CUDA_PATH_SOURCES
                       for p in glob.glob(os.path.join(ROOT, pattern))))
    assert len(files) >= 5
    for path in files:
        text = open(path).read()
        text = re.sub(r"//[^\n]*", "", text)  # comments may name what the code avoids
        for pattern in _HOST_READS:
            assert not re.search(pattern, text), f"{os.path.relpath(path, ROOT)}: {pattern}"


def test_python_host_reads_only_in_gated_checks():
    """In the Python op wrappers, host reads (tolist, item, cpu, numpy) happen only inside the
    value checks, and those run only under `check_inputs and _checks_allowed(...)`."""
    import ast

    for name in ("ops.py", "poolers.py", "_autograd_registrations.py"):
        path = os.path.join(ROOT, "dsig_ext", name)
        tree = ast.parse(open(path).read())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def enclosing(node, kind):
            while node in parents:
                node = parents[node]
                if isinstance(node, kind):
                    return node
            return None

        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("tolist", "item", "cpu",
                                                                  "numpy", "synchronize"):
                fn = enclosing(node, ast.FunctionDef)
                assert fn is not None and fn.name in _CHECKED_CALLS | {"graph_blocks"}, (
                    f"{name}:{node.lineno} reads a tensor back to the host")
            if isinstance(func, ast.Name) and func.id in _CHECKED_CALLS:
                guard = enclosing(node, ast.If)
                assert guard is not None, f"{name}:{node.lineno} unguarded {func.id}"
                test = ast.unparse(guard.test)
                assert "check_inputs" in test and "_checks_allowed" in test, (
                    f"{name}:{node.lineno}: {func.id} not gated by check_inputs/_checks_allowed")
