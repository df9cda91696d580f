"""cosine_edges / edge_mse_loss against a numpy float64 reference and autograd of the naive
per-graph formula: empty and single-node graphs, all-zero rows, dtypes, opcheck, compile."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsig_ext
from conftest import DEVICES, requires_cuda

EPS = 1e-12


def np_normalize(x):
    return x / np.maximum(np.sqrt((x * x).sum(1, keepdims=True)), EPS)


def np_edge_loss(xs, xt, offsets):
    """sum_g 0.5 * mean((E_t - E_s)^2), numpy float64 (empty graphs contribute 0)."""
    loss = 0.0
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b == a:
            continue
        es = np_normalize(xs[a:b]) @ np_normalize(xs[a:b]).T
        et = np_normalize(xt[a:b]) @ np_normalize(xt[a:b]).T
        loss += 0.5 * np.mean((et - es) ** 2)
    return loss


def naive_torch_loss(xs, xt, offsets):
    """The original DSIG per-image loop, differentiated by autograd."""
    loss = xs.sum() * 0.0
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b == a:
            continue
        es = F.normalize(xs[a:b]) @ F.normalize(xs[a:b]).t()
        et = F.normalize(xt[a:b]) @ F.normalize(xt[a:b]).t()
        loss = loss + 0.5 * F.mse_loss(et, es)
    return loss


def make_graphs(sizes, dim, dtype=torch.float64, device="cpu", seed=0, zero_rows=(), relu=True):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    xs = torch.randn(n, dim, dtype=torch.float64, generator=g)
    xt = torch.randn(n, dim, dtype=torch.float64, generator=g)
    if relu:  # post-ReLU pooled features, as DSIG's nodes are
        xs, xt = xs.abs(), xt.abs()
    for r in zero_rows:
        xs[r] = 0.0
    offsets = dsig_ext.offsets_from_counts(sizes)
    return xs.to(device=device, dtype=dtype), xt.to(device=device, dtype=dtype), offsets


SIZES = [5, 0, 9, 1, 14]


@pytest.mark.parametrize("device", DEVICES)
def test_loss_equals_numpy_float64_reference(device):
    xs, xt, offsets = make_graphs(SIZES, 37, device=device)
    loss = dsig_ext.edge_mse_loss(xs, xt, offsets)
    ref = np_edge_loss(xs.cpu().numpy(), xt.cpu().numpy(), offsets.tolist())
    assert abs(loss.item() - ref) < 1e-13


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_rows", [(), (3,), (14, 15)])
def test_gradients_equal_autograd_of_naive_formula(device, zero_rows):
    xs, xt, offsets = make_graphs(SIZES, 23, device=device, zero_rows=zero_rows)
    a_s, a_t = xs.clone().requires_grad_(), xt.clone().requires_grad_()
    b_s, b_t = xs.clone().requires_grad_(), xt.clone().requires_grad_()
    fused = dsig_ext.edge_mse_loss(a_s, a_t, offsets)
    naive = naive_torch_loss(b_s, b_t, offsets.tolist())
    torch.testing.assert_close(fused, naive, atol=1e-13, rtol=0)
    fused.backward()
    naive.backward()
    # rows of norm 0 get torch's u/eps gradient (~1e12 scale): compare relatively
    torch.testing.assert_close(a_s.grad, b_s.grad, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(a_t.grad, b_t.grad, atol=1e-12, rtol=1e-9)


def test_zero_dead_rows_gives_them_no_gradient():
    xs, xt, offsets = make_graphs(SIZES, 11, zero_rows=(3,))
    xs.requires_grad_()
    loss = dsig_ext.edge_mse_loss(xs, xt, offsets, zero_dead_rows=True)
    (grad,) = torch.autograd.grad(loss, xs)
    assert not grad[3].any()
    ref = dsig_ext.reference.edge_mse_loss(xs, xt, offsets, zero_dead_rows=True)
    (grad_ref,) = torch.autograd.grad(ref, xs)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=0)
    (grad_default,) = torch.autograd.grad(dsig_ext.edge_mse_loss(xs, xt, offsets), xs)
    assert grad_default[3].abs().max() > 1e6  # torch's normalize rule: u / eps


@pytest.mark.parametrize("device", DEVICES)
def test_only_teacher_or_only_student_requires_grad(device):
    xs, xt, offsets = make_graphs([4, 6], 9, device=device)
    xt.requires_grad_()
    (gt,) = torch.autograd.grad(dsig_ext.edge_mse_loss(xs, xt, offsets), xt)
    xt2 = xt.detach().clone().requires_grad_()
    (gt_ref,) = torch.autograd.grad(naive_torch_loss(xs, xt2, [0, 4, 10]), xt2)
    torch.testing.assert_close(gt, gt_ref, atol=1e-13, rtol=0)
    assert dsig_ext.edge_mse_loss(xs, xt.detach(), offsets).grad_fn is None


@pytest.mark.parametrize("sizes", [[], [0], [0, 0], [1], [1, 1, 0], [2]])
def test_degenerate_graphs(sizes):
    xs, xt, offsets = make_graphs(sizes, 5)
    xs.requires_grad_()
    loss = dsig_ext.edge_mse_loss(xs, xt, offsets)
    ref = naive_torch_loss(xs, xt, offsets.tolist())
    torch.testing.assert_close(loss, ref.detach(), atol=1e-14, rtol=0)
    if sum(sizes) and loss.requires_grad:
        (g,) = torch.autograd.grad(loss, xs)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_edges_blocks(device):
    xs, _, offsets = make_graphs(SIZES, 13, device=device, zero_rows=(0,))
    edges = dsig_ext.cosine_edges(xs, offsets)
    assert edges.shape == (xs.shape[0], xs.shape[0])
    o = offsets.tolist()
    mask = torch.zeros_like(edges, dtype=torch.bool)
    for a, b, block in zip(o[:-1], o[1:], dsig_ext.graph_blocks(edges, offsets)):
        xn = F.normalize(xs[a:b])
        torch.testing.assert_close(block, xn @ xn.t(), atol=1e-14, rtol=0)
        mask[a:b, a:b] = True
    assert not edges[~mask].any()
    torch.testing.assert_close(edges, dsig_ext.reference.cosine_edges(xs, offsets), atol=1e-14,
                               rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    xs, xt, offsets = make_graphs([3, 0, 4, 1], 6, device=device)
    xs.requires_grad_()
    xt.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dsig_ext.edge_mse_loss(a, b, offsets), (xs, xt))
    assert torch.autograd.gradcheck(lambda a: dsig_ext.cosine_edges(a, offsets), (xs,))


def test_double_backward_raises():
    xs, xt, offsets = make_graphs([3, 4], 6)
    xs.requires_grad_()
    (g,) = torch.autograd.grad(dsig_ext.edge_mse_loss(xs, xt, offsets), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(device, dtype):
    xs, xt, offsets = make_graphs([20, 7, 33], 300, device=device)
    xs, xt = xs.to(dtype).requires_grad_(), xt.to(dtype)
    loss = dsig_ext.edge_mse_loss(xs, xt, offsets)
    assert loss.dtype == dtype
    xs64 = xs.detach().double().requires_grad_()
    ref = naive_torch_loss(xs64, xt.double(), offsets.tolist())
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-3)
    (g,) = torch.autograd.grad(loss, xs)
    (g_ref,) = torch.autograd.grad(ref, xs64)
    assert g.dtype == dtype
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(g.double(), g_ref, atol=tol * g_ref.abs().max().item(), rtol=tol)


def test_noncontiguous_inputs():
    xs, xt, offsets = make_graphs([6, 5], 16)
    big_s = torch.stack([xs, -xs], dim=2)[:, :, 0]  # xs with column stride 2
    assert not big_s.is_contiguous()
    torch.testing.assert_close(dsig_ext.edge_mse_loss(big_s, xt.t().contiguous().t(), offsets),
                               dsig_ext.edge_mse_loss(xs, xt, offsets), atol=1e-15, rtol=0)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(requires_grad, dtype):
    xs, xt, offsets = make_graphs([3, 0, 5], 7, dtype=dtype)
    xs.requires_grad_(requires_grad)
    xt.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.dsig.cosine_edges.default, (xs, offsets, 1e-12, False))
    torch.library.opcheck(torch.ops.dsig.edge_mse_loss.default, (xs, xt, offsets, 1e-12, False))
    torch.library.opcheck(torch.ops.dsig._edge_mse_loss_forward.default,
                          (xs, xt, offsets, 1e-12, False, requires_grad, requires_grad))
    factor = torch.randn(3 * 3 + 5 * 5, dtype=dtype)  # packed blocks of the graphs
    torch.library.opcheck(torch.ops.dsig._edge_factor_matmul.default,
                          (torch.ones((), dtype=dtype), factor, xs.detach(), offsets))
    torch.library.opcheck(torch.ops.dsig._cosine_edges_backward.default,
                          (torch.randn(8, 8, dtype=dtype), xs.detach(),
                           torch.randn(8, 8, dtype=dtype), offsets, 1e-12, False))


def test_saved_factors_are_packed_per_graph():
    """The factors saved for the backward hold graph g's n_g x n_g block at Sum_{h<g} n_h^2,
    row-major; block g times X_g is graph g's gradient."""
    sizes = [3, 0, 5, 1, 7]
    xs, xt, offsets = make_graphs(sizes, 6)
    loss, f_s, f_t = torch.ops.dsig._edge_mse_loss_forward(xs, xt, offsets, EPS, False, True,
                                                             True)
    assert f_s.shape == f_t.shape == (sum(n * n for n in sizes),)
    a_s, a_t = xs.clone().requires_grad_(), xt.clone().requires_grad_()
    g_s, g_t = torch.autograd.grad(naive_torch_loss(a_s, a_t, offsets.tolist()), (a_s, a_t))
    start = 0
    for a, n in zip(offsets.tolist(), sizes):
        for factor, x, grad in ((f_s, xs, g_s), (f_t, xt, g_t)):
            block = factor[start:start + n * n].view(n, n)
            torch.testing.assert_close(block @ x[a:a + n], grad[a:a + n], atol=1e-13, rtol=0)
        start += n * n


def test_a_batch_of_large_graphs_does_not_allocate_n_squared():
    """16 images x 300 nodes: the factor holds 16 * 300^2 entries (5.8 MB in fp32), not
    4800^2 (92 MB); only the asked factor is built."""
    xs, xt, offsets = make_graphs([300] * 16, 4, dtype=torch.float32)
    loss, f_s, f_t = torch.ops.dsig._edge_mse_loss_forward(xs, xt, offsets, EPS, False, True,
                                                             False)
    assert f_s.numel() == 16 * 300 * 300 and f_t.numel() == 0
    ref = np_edge_loss(xs.double().numpy(), xt.double().numpy(), offsets.tolist())
    assert abs(loss.item() - ref) < 1e-5 * ref


def test_factor_of_the_wrong_size_is_refused():
    xs, _, offsets = make_graphs([3, 5], 4)
    grad = torch.ones((), dtype=xs.dtype)
    with pytest.raises(RuntimeError, match="factor has 9 entries but the offsets' packed "
                                           "blocks need 34"):
        torch.ops.dsig._edge_factor_matmul(grad, torch.zeros(9, dtype=xs.dtype), xs, offsets)
    with pytest.raises(RuntimeError, match="packed 1-D factor"):
        torch.ops.dsig._edge_factor_matmul(grad, torch.zeros(8, 8, dtype=xs.dtype), xs, offsets)


def test_torch_compile_fullgraph():
    xs, xt, offsets = make_graphs([4, 6], 12, dtype=torch.float32)
    xs.requires_grad_()

    def f(a, b, o):
        return dsig_ext.edge_mse_loss(a, b, o) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = compiled(xs, xt, offsets)
    b = f(xs, xt, offsets)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, xs)[0], torch.autograd.grad(b, xs)[0])


def test_reference_backend_matches():
    xs, xt, offsets = make_graphs(SIZES, 19)
    with dsig_ext.use_backend("reference"):
        ref = dsig_ext.edge_mse_loss(xs, xt, offsets)
    torch.testing.assert_close(dsig_ext.edge_mse_loss(xs, xt, offsets), ref, atol=1e-14, rtol=0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 9), min_size=0, max_size=5), dim=st.integers(1, 20),
       seed=st.integers(0, 2**31 - 1), zero_first=st.booleans(), relu=st.booleans())
def test_property_matches_naive(sizes, dim, seed, zero_first, relu):
    zero_rows = (0,) if zero_first and sum(sizes) else ()
    xs, xt, offsets = make_graphs(sizes, dim, seed=seed, zero_rows=zero_rows, relu=relu)
    a_s = xs.clone().requires_grad_()
    b_s = xs.clone().requires_grad_()
    fused = dsig_ext.edge_mse_loss(a_s, xt, offsets)
    naive = naive_torch_loss(b_s, xt, offsets.tolist())
    torch.testing.assert_close(fused, naive.detach(), atol=1e-12, rtol=1e-10)
    if naive.requires_grad and sum(sizes):
        (ga,) = torch.autograd.grad(fused, a_s)
        (gb,) = torch.autograd.grad(naive, b_s)
        live = xs.norm(dim=1) >= EPS
        torch.testing.assert_close(ga[live], gb[live], atol=1e-10, rtol=1e-8)
        # a zero row's gradient is (1/eps) * sum_j S_ij x_j / r_j: rounding noise times 1e12
        torch.testing.assert_close(ga[~live], gb[~live], atol=1e-3, rtol=1e-6)
    edges = dsig_ext.cosine_edges(xs, offsets)
    torch.testing.assert_close(edges, dsig_ext.reference.cosine_edges(xs, offsets), atol=1e-13,
                               rtol=0)


# --- malformed input ---------------------------------------------------------------------------

@pytest.mark.parametrize("offsets, match", [
    ([0, 5, 3, 10], "non-decreasing"),
    ([0, 4, 9], "must end at N = 10"),
    ([1, 4, 10], "must start at 0"),
    ([0, 4, 12], "must end at N = 10"),
])
def test_bad_offsets(offsets, match):
    xs, xt, _ = make_graphs([4, 6], 5)
    with pytest.raises(RuntimeError, match=match):
        dsig_ext.edge_mse_loss(xs, xt, torch.tensor(offsets))
    with pytest.raises(RuntimeError, match=match):
        dsig_ext.cosine_edges(xs, torch.tensor(offsets))


def test_other_malformed_inputs():
    xs, xt, offsets = make_graphs([4, 6], 5)
    with pytest.raises(RuntimeError, match="same shape"):
        dsig_ext.edge_mse_loss(xs, xt[:, :3], offsets)
    with pytest.raises(RuntimeError, match=r"must be \[N, D\]"):
        dsig_ext.edge_mse_loss(xs[None], xt[None], offsets)
    with pytest.raises(RuntimeError, match="offsets must be int64"):
        dsig_ext.edge_mse_loss(xs, xt, offsets.float())
    with pytest.raises(RuntimeError, match=r"1-D tensor \[G \+ 1\]"):
        dsig_ext.edge_mse_loss(xs, xt, torch.zeros((), dtype=torch.long))
    with pytest.raises(RuntimeError, match="must be floating"):
        dsig_ext.cosine_edges(xs.long(), offsets)


@requires_cuda
def test_device_mix_raises():
    xs, xt, offsets = make_graphs([4, 6], 5)
    with pytest.raises(RuntimeError, match="teacher is on"):
        dsig_ext.edge_mse_loss(xs.cuda(), xt, offsets)


# --- the Python layer: offsets as lists, argument types, dtype mixes (#22) -----------------------

@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_offsets_as_a_list_of_ints(backend):
    """A list / tuple of ints is taken as CPU int64 offsets (numpy ints and int 0-d tensors too)."""
    xs, xt, offsets = make_graphs([4, 6], 5)
    want = dsig_ext.edge_mse_loss(xs, xt, offsets, backend=backend)
    for given in ([0, 4, 10], (0, 4, 10), [np.int64(0), torch.tensor(4), 10]):
        assert torch.equal(dsig_ext.edge_mse_loss(xs, xt, given, backend=backend), want)
        assert torch.equal(dsig_ext.cosine_edges(xs, given, backend=backend),
                           dsig_ext.cosine_edges(xs, offsets, backend=backend))
    blocks = dsig_ext.graph_blocks(dsig_ext.cosine_edges(xs, offsets), [0, 4, 10])
    assert [tuple(b.shape) for b in blocks] == [(4, 4), (6, 6)]
    with pytest.raises(RuntimeError, match="must end at N = 10"):
        dsig_ext.edge_mse_loss(xs, xt, [0, 4, 9], backend="fused")


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("offsets, error, match", [
    (None, TypeError, r"cosine_edges: offsets must be an int64 tensor \[G \+ 1\] or a list of "
                      r"ints .* got NoneType"),
    ("0,4,10", TypeError, "got str"),
    ([0, 4.0, 10], TypeError, r"offsets\[1\] must be an int, got 4.0"),
    ([0, True, 10], TypeError, r"offsets\[1\] must be an int, got True"),
])
def test_offsets_of_the_wrong_type(backend, offsets, error, match):
    xs, xt, _ = make_graphs([4, 6], 5)
    with pytest.raises(error, match=match):
        dsig_ext.cosine_edges(xs, offsets, backend=backend)
    with pytest.raises(error, match=match.replace("cosine_edges", "edge_mse_loss")):
        dsig_ext.edge_mse_loss(xs, xt, offsets, backend=backend)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_node_features_of_the_wrong_type_or_rank(backend):
    """Both backends give the op's message (the reference one used to fail inside its loop)."""
    xs, xt, offsets = make_graphs([4, 6], 5)
    with pytest.raises(TypeError, match=r"edge_mse_loss: teacher must be a tensor \[N, D\], "
                                        r"got list"):
        dsig_ext.edge_mse_loss(xs, xt.tolist(), offsets, backend=backend)
    with pytest.raises(RuntimeError, match=r"edge_mse_loss: student must be \[N, D\], "
                                           r"got \[1, 10, 5\]"):
        dsig_ext.edge_mse_loss(xs[None], xt, offsets, backend=backend)
    with pytest.raises(RuntimeError, match=r"cosine_edges: x must be \[N, D\], got \[10\]"):
        dsig_ext.cosine_edges(xs[:, 0], offsets, backend=backend)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("s_dtype, t_dtype", [(torch.float64, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_student_teacher_dtype_mix_is_refused(backend, s_dtype, t_dtype):
    """The op itself would promote to the wider dtype; the Python API refuses the mix."""
    xs, xt, offsets = make_graphs([4, 6], 5)
    with pytest.raises(TypeError, match=f"edge_mse_loss: student is {s_dtype} but teacher is "
                                        f"{t_dtype}; cast one to the other"):
        dsig_ext.edge_mse_loss(xs.to(s_dtype), xt.to(t_dtype), offsets, backend=backend)
    assert "refused" in dsig_ext.edge_mse_loss.__doc__


def test_offsets_from_counts_checks_its_counts():
    assert dsig_ext.offsets_from_counts([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert dsig_ext.offsets_from_counts(torch.tensor([3, 2])).tolist() == [0, 3, 5]
    assert dsig_ext.offsets_from_counts([]).tolist() == [0]
    with pytest.raises(ValueError, match=r"counts\[1\] = -1: a graph cannot have a negative"):
        dsig_ext.offsets_from_counts([3, -1])
    with pytest.raises(TypeError, match=r"counts\[1\] must be an int, got 2.5"):
        dsig_ext.offsets_from_counts([3, 2.5])
    with pytest.raises(TypeError, match=r"counts\[0\] must be an int"):
        dsig_ext.offsets_from_counts(torch.tensor([3.0]))
    with pytest.raises(ValueError, match=r"counts must be 1-D, got \[1, 2\]"):
        dsig_ext.offsets_from_counts(torch.tensor([[3, 2]]))
