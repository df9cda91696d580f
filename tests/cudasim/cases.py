"""Every CUDA kernel of csrc/ops/cuda through the cudasim executor, against the CPU ops.

Run by tests/test_cuda_executor.py in a subprocess that preloads the sanitizer runtime:
    CUDASIM_LIB=<library> CUDASIM_SCHEDULES=forward:0,reverse:0,random:7 pytest tests/cudasim/cases.py
Each case runs the op on the simulated device once per schedule (thread and block orders) and
compares with the CPU op on the same inputs. Tolerances: float64 within 1e-10 absolute and
relative (the CPU and CUDA
paths differ only by the FMA the CUDA source writes out in sample coordinates, ~1e-16 relative);
float32 within 2e-4 absolute + 1e-3 relative: a sample coordinate of magnitude <= 256 rounded
once with FMA and once without differs by up to 1 ulp (3e-5), which moves a bilinear weight by
as much and a sample of unit-variance features by ~1e-4; the edge ops sum D <= 1100 products in
another order than the CPU's (tiles, split-K): ~D * 6e-8 = 7e-5 relative per dot product, which
the cancellation in M X (rows of norm ~eps give entries ~1/eps^2) amplifies to a few 1e-4. Half types: against the CPU op in float32 on
the same (rounded) inputs, within the type's resolution. Ops that claim determinism (the
deterministic RoIAlign backward, every edge op) must be bitwise equal under every schedule.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # tests/: helpers
import runner  # noqa: E402

runner.load(os.environ["CUDASIM_LIB"])
import dsig_ext  # noqa: E402,F401  (the CPU ops and the Python autograd registrations)

SIM = torch.device("cudasim")
# schedule:seed[:fill] (fill: random bytes, or NaN bytes that no multiplication by 0 hides)
SCHEDULES = [tuple(s.split(":")) for s in os.environ.get("CUDASIM_SCHEDULES", "forward:0").split(",")]
OPS = torch.ops.dsig


def on_schedules(fn):
    """fn() under every schedule; the results (tuples of tensors, on the CPU)."""
    results = []
    for schedule, seed, *fill in SCHEDULES:
        runner.configure(schedule, int(seed), fill[0] if fill else "random")
        out = fn()
        out = out if isinstance(out, (tuple, list)) else (out,)
        results.append([o.cpu() if isinstance(o, torch.Tensor) else o for o in out])
    return results


def assert_close(got, want, dtype, what):
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
    elif dtype == torch.float32:
        tol = dict(rtol=1e-3, atol=2e-4)
    else:
        tol = dict(rtol=2e-2, atol=2e-2)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.double(), **tol, equal_nan=False,
                               msg=lambda m: f"{what}: {m}")


def assert_bitwise_same(results, what):
    first = results[0]
    for schedule, other in zip(SCHEDULES[1:], results[1:]):
        for a, b in zip(first, other):
            assert torch.equal(a, b) or (a.numel() == 0 and b.numel() == 0), (
                f"{what}: not bitwise reproducible under schedule {':'.join(schedule)}")


# --- multi-level RoIAlign ------------------------------------------------------------------------

LEVEL_HW = [(37, 45), (19, 23), (10, 12), (5, 6)]  # none a multiple of 32: partial tiles
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def roi_case(dtype, batch=3, channels=20, n_random=14, one_level=None, no_rois_image=2, seed=0):
    """Features, rois, levels: random boxes plus the adversarial ones of helpers.make_boxes, boxes
    straddling the 32-px tile edges of level 0, and an image without RoIs."""
    from helpers import make_boxes

    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64).to(dtype)
             for h, w in LEVEL_HW]
    hw = (LEVEL_HW[0][0] * 4, LEVEL_HW[0][1] * 4)
    boxes = make_boxes(n_random, hw, g, dtype=torch.float64)
    straddle = torch.tensor([[120.0, 10.0, 140.0, 30.0], [10.0, 120.0, 30.0, 135.0],
                             [126.0, 126.0, 131.0, 131.0], [60.0, 20.0, 60.0 - 8.0, 40.0]],
                            dtype=torch.float64)  # the last has x2 < x1
    boxes = torch.cat([boxes, straddle])
    images = [b for b in range(batch) if b != no_rois_image]
    idx = torch.tensor([images[i % len(images)] for i in range(len(boxes))], dtype=torch.float64)
    rois = torch.cat([idx[:, None], boxes], dim=1)
    if one_level is None:
        levels = torch.randint(0, 4, (len(boxes),), generator=g)
        levels[-len(straddle):] = 0  # on level 0, whose 32-px tiles they straddle
    else:
        levels = torch.full((len(boxes),), one_level, dtype=torch.long)
    return feats, rois.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32), levels


def sim_args(feats, rois, levels):
    return [f.to(SIM) for f in feats], rois.to(SIM), levels.to(SIM)


def cpu_reference_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def forward_both(feats, rois, levels, out, sampling, aligned):
    ref_dtype = cpu_reference_dtype(feats[0].dtype)
    want = OPS.multilevel_roi_align([f.to(ref_dtype) for f in feats], rois.to(ref_dtype), levels,
                                    SCALES, out[0], out[1], sampling, aligned, False)
    sf, sr, sl = sim_args(feats, rois, levels)
    got = on_schedules(lambda: OPS.multilevel_roi_align(sf, sr, sl, SCALES, out[0], out[1],
                                                        sampling, aligned, False))
    return got, want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampling,aligned,out", [(0, True, (7, 7)), (2, False, (14, 14)),
                                                  (2, True, (1, 1)), (0, False, (3, 5))])
def test_roi_align_forward(dtype, sampling, aligned, out):
    feats, rois, levels = roi_case(dtype)
    got, want = forward_both(feats, rois, levels, out, sampling, aligned)
    for sched, (g,) in zip(SCHEDULES, got):
        assert_close(g, want, dtype, f"forward {sched}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_forward_half(dtype):
    feats, rois, levels = roi_case(dtype, channels=9)
    got, want = forward_both(feats, rois, levels, (7, 7), 0, True)
    for (g,) in got:
        assert g.dtype == dtype
        assert_close(g.float(), want, dtype, f"forward {dtype}")


def feature_layouts(feats):
    yield "contiguous", feats
    yield "channels_last", [f.contiguous(memory_format=torch.channels_last) for f in feats]
    yield "transposed", [f.transpose(2, 3).contiguous().transpose(2, 3) for f in feats]


def sim_strided(t):
    """t on the simulated device with t's strides."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=SIM).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_align_forward_layouts_and_large_rois(dtype):
    """Every feature layout (the forward walks channels for channels-last), several channel
    groups with a partial last one, and RoIs whose samples fill the forward's tap tables exactly
    (36 per bin on both axes) or overflow them on one or both axes (taps computed in place).
    The forward is deterministic: bitwise equal under every schedule."""
    feats, rois, levels = roi_case(dtype, channels=10)
    big = torch.tensor([[0, -3.0, 2.0, 1005.0, 1010.0],    # 252 px on level 0: 36 samples/bin
                        [1, 5.0, 1.0, 1045.0, 1009.0],     # 260 px wide: 38 per bin in x only
                        [0, -500.0, -500.0, 1500.0, 1500.0]], dtype=rois.dtype)
    rois = torch.cat([rois, big])
    levels = torch.cat([levels, torch.zeros(3, dtype=torch.long)])
    want = OPS.multilevel_roi_align(feats, rois, levels, SCALES, 7, 7, 0, True, False)
    for layout, fs in feature_layouts(feats):
        sf = [sim_strided(f) for f in fs]
        sr, sl = rois.to(SIM), levels.to(SIM)
        got = on_schedules(lambda: OPS.multilevel_roi_align(sf, sr, sl, SCALES, 7, 7, 0, True,
                                                            False))
        for sched, (g,) in zip(SCHEDULES, got):
            assert_close(g, want, dtype, f"forward ({layout}) {sched}")
        assert_bitwise_same(got, f"forward ({layout})")


def test_roi_align_forward_wide_channel_groups():
    """Enough RoIs for the forward's widest channel groups (32), 40 channels: a full and a
    partial group, both layouts that map threads differently."""
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(2, 40, h, w, generator=g, dtype=torch.float64) for h, w in LEVEL_HW[1:3]]
    n = 300
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    rois = torch.cat([torch.randint(0, 2, (n, 1), generator=g).double(), xy,
                      xy + 2 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 40], dim=1)
    levels = torch.randint(0, 2, (n,), generator=g)
    scales = SCALES[1:3]
    want = OPS.multilevel_roi_align(feats, rois, levels, scales, 2, 3, 2, False, False)
    runner.configure("random", 11, "nan")
    for layout, fs in list(feature_layouts(feats))[:2]:
        sf = [sim_strided(f) for f in fs]
        got = OPS.multilevel_roi_align(sf, rois.to(SIM), levels.to(SIM), scales, 2, 3, 2, False,
                                       False)
        assert_close(got.cpu(), want, torch.float64, f"forward ({layout}), 32-channel groups")


def grad_layouts(k, c, ph, pw, dtype, g):
    base = torch.randn(k, c, ph, pw, generator=g, dtype=torch.float64).to(dtype)
    yield "contiguous", base
    yield "transposed", base.transpose(2, 3).contiguous().transpose(2, 3)
    yield "channels_last", base.contiguous(memory_format=torch.channels_last)


def backward_both(grad, rois, levels, feats, sampling, aligned, deterministic):
    B, C = feats[0].shape[:2]
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    ref_dtype = cpu_reference_dtype(grad.dtype)
    want = OPS._multilevel_roi_align_backward(grad.to(ref_dtype), rois.to(ref_dtype), levels,
                                              SCALES, B, C, hs, ws, sampling, aligned, False)
    sg, sr, sl = grad.to(SIM), rois.to(SIM), levels.to(SIM)
    if grad.stride() != sg.stride():  # .to keeps strides of dense tensors; make sure
        sg = torch.empty_strided(grad.shape, grad.stride(), dtype=grad.dtype, device=SIM).copy_(grad)
    got = on_schedules(lambda: OPS._multilevel_roi_align_backward(
        sg, sr, sl, SCALES, B, C, hs, ws, sampling, aligned, deterministic))
    return got, want


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampling,aligned,out", [(0, True, (7, 7)), (2, False, (14, 14)),
                                                  (2, True, (1, 1))])
def test_roi_align_backward(deterministic, dtype, sampling, aligned, out):
    feats, rois, levels = roi_case(dtype)
    g = torch.Generator().manual_seed(1)
    for layout, grad in grad_layouts(len(rois), feats[0].shape[1], out[0], out[1], dtype, g):
        got, want = backward_both(grad, rois, levels, feats, sampling, aligned, deterministic)
        for sched, grads in zip(SCHEDULES, got):
            for l, (a, b) in enumerate(zip(grads, want)):
                assert_close(a, b, dtype, f"backward ({layout}, level {l}) {sched}")
        if deterministic:
            assert_bitwise_same(got, f"deterministic backward ({layout})")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_backward_half(deterministic, dtype):
    feats, rois, levels = roi_case(dtype, channels=9)
    grad = torch.randn(len(rois), 9, 7, 7, dtype=torch.float64).to(dtype)
    got, want = backward_both(grad, rois, levels, feats, 0, True, deterministic)
    for grads in got:
        for a, b in zip(grads, want):
            assert a.dtype == dtype
            assert_close(a.float(), b, dtype, f"backward {dtype}")
    if deterministic:
        assert_bitwise_same(got, f"deterministic backward {dtype}")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_align_backward_large_outputs(deterministic, dtype):
    """Outputs large enough that the backward kernels' widest channel groups do not fit the
    48 KB of shared memory (14 x 14: half as many channels per block; 28 x 28: one; 72 x 72: one,
    with an opt-in to more shared memory): each against the CPU; an output that fits no block
    is refused with an error."""
    feats, rois, levels = roi_case(dtype, channels=5, n_random=4)
    g = torch.Generator().manual_seed(2)
    for out, k in (((14, 14), None), ((28, 28), None), ((3, 28), None), ((72, 72), 6)):
        grad = torch.randn(len(rois[:k]), 5, *out, generator=g, dtype=torch.float64).to(dtype)
        got, want = backward_both(grad, rois[:k], levels[:k], feats, 0, True, deterministic)
        for sched, grads in zip(SCHEDULES, got):
            for a, b in zip(grads, want):
                assert_close(a, b, dtype, f"backward {out} {sched}")
        if deterministic:
            assert_bitwise_same(got, f"deterministic backward {out}")
    B, C = feats[0].shape[:2]
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    grad = torch.zeros(2, 5, 250, 250, dtype=dtype, device=SIM)
    with pytest.raises(RuntimeError, match=r"output size \(250, 250\) is too large"):
        OPS._multilevel_roi_align_backward(grad, rois[:2].to(SIM), levels[:2].to(SIM), SCALES, B,
                                           C, hs, ws, 0, True, deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_roi_align_all_rois_on_one_level(deterministic):
    feats, rois, levels = roi_case(torch.float64, one_level=3, channels=5)
    got, want = forward_both(feats, rois, levels, (7, 7), 0, True)
    for (g,) in got:
        assert_close(g, want, torch.float64, "forward, one level")
    grad = torch.randn(len(rois), 5, 7, 7, dtype=torch.float64)
    got, want = backward_both(grad, rois, levels, feats, 0, True, deterministic)
    for grads in got:
        for a, b in zip(grads, want):
            assert_close(a, b, torch.float64, "backward, one level")
    if deterministic:
        assert_bitwise_same(got, "deterministic backward, one level")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_roi_align_no_rois(deterministic, dtype):
    """K = 0: an empty output, and input gradients that are exactly zero (every partial tile
    written)."""
    feats, rois, levels = roi_case(dtype, channels=11)
    rois, levels = rois[:0], levels[:0]
    got, want = forward_both(feats, rois, levels, (7, 7), 0, True)
    assert got[0][0].shape == (0, 11, 7, 7)
    grad = torch.zeros(0, 11, 7, 7, dtype=dtype)
    got, want = backward_both(grad, rois, levels, feats, 0, True, deterministic)
    for grads in got:
        for a, b in zip(grads, want):
            assert torch.equal(a, b) and not a.any(), "K = 0: gradients must be exactly zero"


@pytest.mark.parametrize("deterministic", [True, False])
def test_roi_align_unchecked_invalid_rois(deterministic):
    """RoIs that skipped the value checks (batch index out of range, negative or NaN, level out of
    range) pool to zero and receive no gradient; nothing is read or written out of bounds."""
    feats, rois, levels = roi_case(torch.float64, channels=6)
    bad_rois = rois.clone()
    bad_levels = levels.clone()
    bad = [0, 3, 5, 8]
    bad_rois[0, 0] = 7.0          # no such image
    bad_rois[3, 0] = -1.0
    bad_rois[5, 0] = float("nan")
    bad_levels[8] = 9             # no such level
    ok = torch.ones(len(rois), dtype=torch.bool)
    ok[bad] = False
    sf, sr, sl = sim_args(feats, bad_rois, bad_levels)
    want = OPS.multilevel_roi_align(feats, rois[ok], levels[ok], SCALES, 7, 7, 0, True, False)
    for (out,) in on_schedules(lambda: OPS.multilevel_roi_align(sf, sr, sl, SCALES, 7, 7, 0, True,
                                                                False)):
        assert not out[~ok].any(), "an invalid RoI must pool to zero"
        assert_close(out[ok], want, torch.float64, "valid RoIs beside invalid ones")
    grad = torch.randn(len(rois), 6, 7, 7, dtype=torch.float64)
    B, C = feats[0].shape[:2]
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    want = OPS._multilevel_roi_align_backward(grad[ok], rois[ok], levels[ok], SCALES, B, C, hs, ws,
                                              0, True, False)
    sg = grad.to(SIM)
    got = on_schedules(lambda: OPS._multilevel_roi_align_backward(
        sg, sr, sl, SCALES, B, C, hs, ws, 0, True, deterministic))
    for grads in got:
        for a, b in zip(grads, want):
            assert_close(a, b, torch.float64, "gradient with invalid RoIs")
    if deterministic:
        assert_bitwise_same(got, "deterministic backward with invalid RoIs")


@pytest.mark.parametrize("deterministic", [True, False])
def test_roi_align_nonfinite_upstream_gradient_stays_local(deterministic):
    """A NaN in the upstream gradient of one bin reaches only the pixels that bin's samples
    touch, as on the CPU (not the RoI's whole footprint)."""
    feats, rois, levels = roi_case(torch.float64, channels=3)
    grad = torch.randn(len(rois), 3, 7, 7, dtype=torch.float64)
    k = 1  # a random box of a few bins' extent
    grad[k, 1, 3, 2] = float("nan")
    got, want = backward_both(grad, rois, levels, feats, 0, True, deterministic)
    for grads in got:
        for l, (a, b) in enumerate(zip(grads, want)):
            assert torch.equal(a.isnan(), b.isnan()), (
                f"level {l}: NaN at {int(a.isnan().sum())} pixels on the simulated GPU, "
                f"{int(b.isnan().sum())} on the CPU")
            assert_close(torch.nan_to_num(a), torch.nan_to_num(b), torch.float64, "finite part")


def test_roi_align_many_rois_grid_stride():
    """More RoIs than the (lowered) grid cap times the block size: every grid-stride loop, the
    footprint kernel's included, must cover them all."""
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(1, 2, h, w, generator=g, dtype=torch.float64) for h, w in LEVEL_HW[2:]]
    n = 3 * 256 + 40
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40
    rois = torch.cat([torch.zeros(n, 1, dtype=torch.float64), xy,
                      xy + 4 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 20], dim=1)
    levels = torch.randint(0, 2, (n,), generator=g)
    scales = SCALES[2:]
    grad = torch.randn(n, 2, 2, 2, generator=g, dtype=torch.float64)
    hs, ws = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    want_f = OPS.multilevel_roi_align(feats, rois, levels, scales, 2, 2, 2, True, False)
    want_b = OPS._multilevel_roi_align_backward(grad, rois, levels, scales, 1, 2, hs, ws, 2, True,
                                                False)
    sf, sr, sl = sim_args(feats, rois, levels)
    sg = grad.to(SIM)
    runner.configure("forward", 0, "random")
    assert_close(OPS.multilevel_roi_align(sf, sr, sl, scales, 2, 2, 2, True, False).cpu(), want_f,
                 torch.float64, "forward, many RoIs")
    for det in (False, True):
        got = OPS._multilevel_roi_align_backward(sg, sr, sl, scales, 1, 2, hs, ws, 2, True, det)
        for a, b in zip(got, want_b):
            assert_close(a.cpu(), b, torch.float64, f"backward (deterministic={det}), many RoIs")


def test_roi_align_autograd_on_device():
    """The public op (Python autograd registration) on the simulated device: forward and
    backward of dsig_ext.multilevel_roi_align match the CPU."""
    feats, rois, levels = roi_case(torch.float64, channels=4)
    runner.configure("forward", 0, "random")
    sims = [f.to(SIM).requires_grad_() for f in feats]
    cpus = [f.clone().requires_grad_() for f in feats]
    out_s = dsig_ext.multilevel_roi_align(sims, rois.to(SIM), levels.to(SIM), SCALES, 7, 0, True,
                                          check_inputs=False)
    out_c = dsig_ext.multilevel_roi_align(cpus, rois, levels, SCALES, 7, 0, True)
    assert_close(out_s.cpu(), out_c.detach(), torch.float64, "public op forward")
    w = torch.randn_like(out_c)
    (out_s * w.to(SIM)).sum().backward()
    (out_c * w).sum().backward()
    for s, c in zip(sims, cpus):
        assert_close(s.grad.cpu(), c.grad, torch.float64, "public op backward")


# --- cosine edges and the edge loss --------------------------------------------------------------

GRAPHS = {
    "empty": [],
    "one": [1],
    "two": [2],
    "odd": [5],
    "tile_edges": [63, 1, 64, 65],
    "with_empty_graphs": [0, 3, 0, 7, 0],
}


def edge_inputs(counts, D, dtype, seed=0, zero_rows=(), tiny_rows=()):
    g = torch.Generator().manual_seed(seed)
    N = sum(counts)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    for r in zero_rows:
        if r < N:
            x[r] = 0
    for r in tiny_rows:
        if r < N:
            x[r] *= 1e-30
    offsets = torch.tensor([0] + list(torch.tensor(counts, dtype=torch.long).cumsum(0).tolist()
                                      if counts else []), dtype=torch.long)
    return x.to(dtype), offsets


def factor_in_layout(factor, counts, device_offsets):
    """The CPU's packed factor as the simulated op lays it out: packed for host offsets, the
    flattened block-diagonal [N, N] (zeros outside the blocks) for device offsets."""
    if not device_offsets or factor.numel() == 0:
        return factor
    N = sum(counts)
    dense = factor.new_zeros(N, N)
    packed = row = 0
    for n in counts:
        dense[row:row + n, row:row + n] = factor[packed:packed + n * n].view(n, n)
        packed, row = packed + n * n, row + n
    return dense.flatten()


def edge_check(counts, D, s_dtype, t_dtype=None, zero_dead_rows=False, device_offsets=False,
               seed=0):
    t_dtype = t_dtype or s_dtype
    wide = (torch.float32, torch.float64)
    half = s_dtype not in wide or t_dtype not in wide
    # all-zero and tiny rows: their gradients (~1/eps^2) exceed the half types' range, and in
    # float32 over D = 1100 their cancellation exceeds any useful tolerance
    special = not half and (D <= 64 or torch.float32 not in (s_dtype, t_dtype))
    s, offsets = edge_inputs(counts, D, s_dtype, seed, zero_rows=(0, 4) if special else (),
                             tiny_rows=(2,) if special else ())
    t, _ = edge_inputs(counts, D, t_dtype, seed + 1, zero_rows=(1,) if special else (),
                       tiny_rows=(3,) if special else ())
    ss, st = s.to(SIM), t.to(SIM)
    so = offsets.to(SIM) if device_offsets else offsets
    ref = lambda x: x if x.dtype in (torch.float32, torch.float64) else x.float()  # noqa: E731
    tol_dtype = torch.float16 if half else (torch.float32 if torch.float32 in (s_dtype, t_dtype)
                                            else torch.float64)
    eps = 1e-12
    what = f"counts {counts}, D {D}, {s_dtype}/{t_dtype}, zdr {zero_dead_rows}, " \
           f"{'device' if device_offsets else 'host'} offsets"

    # cosine_edges and its backward
    want_e = OPS.cosine_edges(ref(s), offsets, eps, zero_dead_rows)
    got = on_schedules(lambda: OPS.cosine_edges(ss, so, eps, zero_dead_rows))
    assert_bitwise_same(got, "cosine_edges " + what)
    assert got[0][0].dtype == s_dtype, what
    assert_close(got[0][0].to(want_e.dtype), want_e, tol_dtype, "cosine_edges " + what)
    edges = got[0][0].to(SIM)
    N = s.shape[0]
    grad_e = torch.randn(N, N, dtype=torch.float64).to(s_dtype)
    want_b = OPS._cosine_edges_backward(ref(grad_e), ref(s), want_e, offsets, eps, zero_dead_rows)
    sge = grad_e.to(SIM)
    got = on_schedules(lambda: OPS._cosine_edges_backward(sge, ss, edges, so, eps, zero_dead_rows))
    assert_bitwise_same(got, "cosine_edges backward " + what)
    assert got[0][0].dtype == s_dtype, what
    assert_close(got[0][0].to(want_b.dtype), want_b, tol_dtype, "cosine_edges backward " + what)

    # the loss: forward with both factors, then the factor products
    in_layout = lambda f: factor_in_layout(f, counts, device_offsets)  # noqa: E731
    want_cpu = OPS._edge_mse_loss_forward(ref(s), ref(t), offsets, eps, zero_dead_rows, True,
                                          True)
    want = (want_cpu[0], in_layout(want_cpu[1]), in_layout(want_cpu[2]))
    got = on_schedules(lambda: OPS._edge_mse_loss_forward(ss, st, so, eps, zero_dead_rows, True,
                                                          True))
    assert_bitwise_same(got, "edge_mse_loss " + what)
    for name, a, b in zip(("loss", "student factor", "teacher factor"), got[0], want):
        if not half:
            assert a.dtype == b.dtype, f"{name}: {a.dtype} != {b.dtype} ({what})"
        assert_close(a.to(b.dtype), b, tol_dtype, f"edge_mse_loss {name} " + what)
    # the training call (frozen teacher) and the loss alone: only the asked factors are built
    for flags in ((True, False), (False, False)):
        want_f = OPS._edge_mse_loss_forward(ref(s), ref(t), offsets, eps, zero_dead_rows, *flags)
        want_f = (want_f[0], in_layout(want_f[1]), in_layout(want_f[2]))
        got = on_schedules(lambda: OPS._edge_mse_loss_forward(ss, st, so, eps, zero_dead_rows,
                                                              *flags))
        assert_bitwise_same(got, f"edge_mse_loss {flags} " + what)
        for name, a, b in zip(("loss", "student factor", "teacher factor"), got[0], want_f):
            assert a.shape == b.shape, f"{name} {flags}: {a.shape} != {b.shape} ({what})"
            assert_close(a.to(b.dtype), b, tol_dtype, f"edge_mse_loss {name} {flags} " + what)
    factor_s = want[1]  # the same factor on both sides (in each one's layout): the product alone
    sfac = factor_s.to(SIM)
    grad = torch.tensor(0.75, dtype=torch.float64)
    want_m = OPS._edge_factor_matmul(grad.to(want[0].dtype), want_cpu[1], ref(s), offsets)
    got = on_schedules(lambda: OPS._edge_factor_matmul(grad.to(factor_s.dtype).to(SIM), sfac, ss,
                                                       so))
    assert_bitwise_same(got, "edge factor matmul " + what)
    assert got[0][0].dtype == s_dtype, f"factor matmul returns {got[0][0].dtype} for {s_dtype}"
    assert_close(got[0][0].to(want_m.dtype), want_m, tol_dtype, "edge factor matmul " + what)


@pytest.mark.parametrize("graphs", sorted(GRAPHS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edges(graphs, dtype):
    edge_check(GRAPHS[graphs], 33, dtype)


@pytest.mark.parametrize("zero_dead_rows", [False, True])
@pytest.mark.parametrize("device_offsets", [False, True])
def test_edges_options(zero_dead_rows, device_offsets):
    edge_check([3, 0, 6, 2], 20, torch.float64, zero_dead_rows=zero_dead_rows,
               device_offsets=device_offsets)


def test_edges_split_k():
    """D large enough for the split-K Gram path and its fixed-order sum."""
    edge_check([5, 9], 1100, torch.float64)
    edge_check([70], 1100, torch.float32)


def test_edges_many_graphs():
    """More graphs than one launch of host offsets carries (several launches), and device
    offsets over the same layout."""
    counts = [(i % 3) % 2 for i in range(260)]
    edge_check(counts, 6, torch.float64)
    edge_check(counts, 6, torch.float64, device_offsets=True)


@pytest.mark.parametrize("D", [0, 4])
def test_edges_degenerate_shapes(D):
    edge_check([], D, torch.float32)
    edge_check([4, 0], D, torch.float32)


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.float64),
                                             (torch.float16, torch.float64)])
def test_edges_dtypes(s_dtype, t_dtype):
    edge_check([4, 7], 24, s_dtype, t_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_edges_tensor_cores(dtype):
    """The 16-bit Grams run on tensor cores (wmma): tiles off the diagonal, graphs across tile
    edges, rows staged 16 bytes at a time (D % 8 == 0) or one value at a time, split K."""
    edge_check(GRAPHS["tile_edges"], 40, dtype)
    edge_check([3, 70], 37, dtype)
    edge_check([40], 1040, dtype)


@pytest.mark.parametrize("counts", [[], [0, 0]])
def test_edges_no_nodes_mixed_dtypes(counts):
    """N = 0 with a float16 student and a float64 teacher (every op and both offset places)."""
    edge_check(counts, 5, torch.float16, torch.float64)
    edge_check(counts, 5, torch.float16, torch.float64, device_offsets=True)


@pytest.mark.parametrize("s_dtype,f_dtype", [(torch.float16, torch.float64),
                                             (torch.float32, torch.float64),
                                             (torch.bfloat16, torch.float32)])
def test_edge_factor_matmul_no_nodes_keeps_feature_dtype(s_dtype, f_dtype):
    """N = 0 with a factor of another dtype: the result has the features' dtype, as on the CPU."""
    x = torch.zeros(0, 5, dtype=s_dtype)
    factor = torch.zeros(0, dtype=f_dtype)
    offsets = torch.zeros(1, dtype=torch.long)
    grad = torch.tensor(1.0, dtype=f_dtype)
    want = OPS._edge_factor_matmul(grad, factor, x, offsets)
    got = OPS._edge_factor_matmul(grad.to(SIM), factor.to(SIM), x.to(SIM), offsets)
    assert got.dtype == want.dtype == s_dtype and got.shape == want.shape
