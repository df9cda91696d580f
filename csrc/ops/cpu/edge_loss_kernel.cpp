// CPU backend of the cosine-edge ops: one BLAS product per graph (host offsets), plain loops
// over the diagonal blocks for the elementwise stages.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../edge_loss.h"
#include "../edge_loss_common.h"
#include "../multilevel_roi_align.h"  // accumulate_type

namespace dsig {
namespace ops {
namespace {

// Rows per parallel chunk: a row of the block-diagonal matrix costs about its graph's size, at
// most N; tiny problems stay on the calling thread.
int64_t row_grain(int64_t N) {
  return std::max<int64_t>(16, at::internal::GRAIN_SIZE / std::max<int64_t>(1, N));
}

GraphLayout layout_cpu(const at::Tensor& offsets, int64_t num_rows, const at::Device& /*device*/,
                       const char* op, bool packed) {
  GraphLayout layout;
  layout.offsets = host_offsets(offsets, num_rows, op);
  layout.ranges = host_ranges(layout.offsets, num_rows);
  layout.packed = packed;
  if (packed) layout.size = packed_block_starts(layout.offsets).back();
  return layout;
}

// The layout of one graph of n nodes (rows 0 .. n).
GraphLayout single_graph_layout(int64_t n) {
  GraphLayout layout;
  layout.offsets = {0, n};
  layout.ranges = host_ranges(layout.offsets, n);
  return layout;
}

// Row blocks of a graph's symmetric Gram: with k blocks only the k(k + 1) / 2 upper block
// products are computed (2/3 of the full product at k = 3). Blocks keep >= 100 rows: measured
// on the 2-core development CPU (MKL, D = 12544), smaller blocks lose more BLAS efficiency than
// they save (n = 140: one product is fastest; n = 300: three blocks, 16 % under one product).
int64_t gram_blocks(int64_t n) { return std::min<int64_t>(3, std::max<int64_t>(1, n / 100)); }

at::Tensor gram_cpu(const at::Tensor& x, const GraphLayout& layout, at::ScalarType acc) {
  const at::Tensor x_acc = x.to(acc);
  const int64_t N = x_acc.size(0);
  at::Tensor gram = at::zeros({N, N}, x_acc.options());
  const auto& o = layout.offsets;
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    const int64_t a = o[g], n = o[g + 1] - o[g];
    if (n == 0) continue;
    const int64_t k = gram_blocks(n);
    std::vector<int64_t> edge(k + 1);
    for (int64_t b = 0; b <= k; ++b) edge[b] = a + n * b / k;
    for (int64_t i = 0; i < k; ++i) {
      const at::Tensor xi = x_acc.narrow(0, edge[i], edge[i + 1] - edge[i]);
      at::Tensor rows = gram.narrow(0, edge[i], edge[i + 1] - edge[i]);
      for (int64_t j = i; j < k; ++j) {
        at::Tensor block = rows.narrow(1, edge[j], edge[j + 1] - edge[j]);
        at::mm_out(block, xi, x_acc.narrow(0, edge[j], edge[j + 1] - edge[j]).t());
        if (j > i)  // mirror into the lower triangle
          gram.narrow(0, edge[j], edge[j + 1] - edge[j])
              .narrow(1, edge[i], edge[i + 1] - edge[i])
              .copy_(block.t());
      }
    }
  }
  return gram;
}

at::Tensor factor_matmul_cpu(const at::Tensor& factor, const at::Tensor& x,
                             const GraphLayout& layout, const at::Tensor& scale,
                             at::ScalarType dtype) {
  const at::Tensor x_acc = x.to(factor.scalar_type());
  // every row belongs to a graph, so every row of dx is written
  at::Tensor dx = at::empty_like(x_acc, at::MemoryFormat::Contiguous);
  const auto& o = layout.offsets;
  const std::vector<int64_t> starts =
      layout.packed ? packed_block_starts(o) : std::vector<int64_t>();
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    const int64_t a = o[g], n = o[g + 1] - o[g];
    if (n == 0) continue;
    at::Tensor out = dx.narrow(0, a, n);
    at::Tensor m = layout.packed ? factor.narrow(0, starts[g], n * n).view({n, n})
                                 : factor.narrow(0, a, n).narrow(1, a, n);
    // scale the n x n factor, not the n x D product
    at::mm_out(out, scale.defined() ? m * scale.to(m.scalar_type()) : m, x_acc.narrow(0, a, n));
  }
  return dx.to(dtype);
}

void normalize_cpu(at::Tensor& gram, const at::Tensor& ranges, double eps, at::Tensor& norms,
                   at::Tensor& live) {
  const int64_t N = gram.size(0);
  norms = at::empty({N}, gram.options());
  live = at::empty({N}, gram.options().dtype(at::kBool));
  const int64_t* rg = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "cosine_edges_normalize_cpu", [&] {
    scalar_t* g = gram.data_ptr<scalar_t>();
    scalar_t* r = norms.data_ptr<scalar_t>();
    bool* lv = live.data_ptr<bool>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t n = detail::row_norm(g[i * N + i]);
      r[i] = detail::clamped_norm(n, e);
      lv[i] = detail::live_row(n, e);
    }
    at::parallel_for(0, N, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = rg[2 * i]; j < rg[2 * i + 1]; ++j)
          g[i * N + j] = detail::edge_entry(g[i * N + j], r[i], r[j]);
    });
  });
}

// Adds graph-local rows' losses sum_j (E_t - E_s)^2 / (2 n^2) to `loss` in row order (fixed
// order: deterministic) and writes S_s / S_t where the tensors are given.
void add_loss_rows_cpu(const at::Tensor& e_s, const at::Tensor& e_t, const at::Tensor& ranges,
                       at::Tensor* s_s, at::Tensor* s_t, double& loss) {
  const int64_t N = e_s.size(0);
  const int64_t* rg = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(e_s.scalar_type(), "edge_mse_loss_cpu", [&] {
    const scalar_t* es = e_s.data_ptr<scalar_t>();
    const scalar_t* et = e_t.data_ptr<scalar_t>();
    scalar_t* ss = s_s ? s_s->data_ptr<scalar_t>() : nullptr;
    scalar_t* st = s_t ? s_t->data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t n = rg[2 * i + 1] - rg[2 * i];
      double row = 0;
      for (int64_t j = rg[2 * i]; j < rg[2 * i + 1]; ++j) {
        const int64_t k = i * N + j;
        row += static_cast<double>(detail::edge_loss_entry(es[k], et[k], n));
        const scalar_t gs = detail::edge_loss_student_grad(es[k], et[k], n);
        if (ss) ss[k] = gs;
        if (st) st[k] = -gs;
      }
      loss += row;
    }
  });
}

at::Tensor symmetrize_cpu(const at::Tensor& grad_edges, const at::Tensor& ranges) {
  const int64_t N = grad_edges.size(0);
  const at::Tensor g = grad_edges.contiguous();
  at::Tensor s = at::zeros_like(g);
  const int64_t* rg = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cosine_edges_symmetrize_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* sp = s.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = rg[2 * i]; j < rg[2 * i + 1]; ++j)
        sp[i * N + j] = gp[i * N + j] + gp[j * N + i];
  });
  return s;
}

void factor_cpu(at::Tensor& s, const at::Tensor& edges, const at::Tensor& ranges,
                const at::Tensor& norms, const at::Tensor& live, bool zero_dead_rows) {
  const int64_t N = s.size(0);
  const int64_t* rg = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "edge_factor_cpu", [&] {
    scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* e = edges.data_ptr<scalar_t>();
    const scalar_t* r = norms.data_ptr<scalar_t>();
    const bool* lv = live.data_ptr<bool>();
    at::parallel_for(0, N, row_grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t dot = scalar_t(0);
        if (lv[i])
          for (int64_t j = rg[2 * i]; j < rg[2 * i + 1]; ++j) dot += sp[i * N + j] * e[i * N + j];
        for (int64_t j = rg[2 * i]; j < rg[2 * i + 1]; ++j)
          sp[i * N + j] =
              detail::factor_entry(sp[i * N + j], dot, r[i], r[j], i == j, lv[i], zero_dead_rows);
      }
    });
  });
}

const EdgeBackend kCpuBackend{layout_cpu,    gram_cpu,       factor_matmul_cpu, normalize_cpu,
                               symmetrize_cpu, factor_cpu};

at::Tensor cosine_edges_cpu(const at::Tensor& x, const at::Tensor& offsets, double eps,
                            bool /*zero_dead_rows: backward only*/) {
  check_cosine_edges_args(x, offsets, eps);
  return cosine_edges_impl(kCpuBackend, x, offsets, eps);
}

at::Tensor cosine_edges_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& /*edges: recomputed*/,
                                     const at::Tensor& offsets, double eps,
                                     bool zero_dead_rows) {
  check_cosine_edges_backward_args(grad, x, offsets);
  return cosine_edges_backward_impl(kCpuBackend, grad, x, offsets, eps, zero_dead_rows);
}

// The loss graph by graph: each graph's Grams, edges and factors are n x n, and the factors go
// straight into their packed blocks, so memory grows with Sum_g n^2.
std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& offsets, double eps,
    bool zero_dead_rows, bool student_grad, bool teacher_grad) {
  check_edge_mse_loss_args(student, teacher, offsets, eps);
  const GraphLayout layout =
      layout_cpu(offsets, student.size(0), student.device(), "edge_mse_loss", /*packed=*/true);
  const auto out_dtype = at::promote_types(student.scalar_type(), teacher.scalar_type());
  const auto acc = accumulate_type(out_dtype);
  const auto acc_options = student.options().dtype(acc);
  at::Tensor f_s = at::empty({student_grad ? layout.size : 0}, acc_options);
  at::Tensor f_t = at::empty({teacher_grad ? layout.size : 0}, acc_options);
  const auto& o = layout.offsets;
  const std::vector<int64_t> starts = packed_block_starts(o);
  double loss = 0;
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    const int64_t a = o[g], n = o[g + 1] - o[g];
    if (n == 0) continue;
    const GraphLayout one = single_graph_layout(n);
    at::Tensor e_s = gram_cpu(student.narrow(0, a, n), one, acc);
    at::Tensor e_t = gram_cpu(teacher.narrow(0, a, n), one, acc);
    at::Tensor n_s, l_s, n_t, l_t;
    normalize_cpu(e_s, one.ranges, eps, n_s, l_s);
    normalize_cpu(e_t, one.ranges, eps, n_t, l_t);
    at::Tensor m_s = student_grad ? f_s.narrow(0, starts[g], n * n).view({n, n}) : at::Tensor();
    at::Tensor m_t = teacher_grad ? f_t.narrow(0, starts[g], n * n).view({n, n}) : at::Tensor();
    add_loss_rows_cpu(e_s, e_t, one.ranges, student_grad ? &m_s : nullptr,
                      teacher_grad ? &m_t : nullptr, loss);
    if (student_grad) factor_cpu(m_s, e_s, one.ranges, n_s, l_s, zero_dead_rows);
    if (teacher_grad) factor_cpu(m_t, e_t, one.ranges, n_t, l_t, zero_dead_rows);
  }
  return {at::scalar_tensor(loss, acc_options).to(out_dtype), f_s, f_t};
}

at::Tensor edge_factor_matmul_cpu(const at::Tensor& grad, const at::Tensor& factor,
                                  const at::Tensor& x, const at::Tensor& offsets) {
  check_edge_factor_matmul_args(grad, factor, x, offsets);
  return edge_factor_matmul_impl(kCpuBackend, grad, factor, x, offsets);
}

}  // namespace
}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CPU, m) {
  m.impl("cosine_edges", &dsig::ops::cosine_edges_cpu);
  m.impl("_cosine_edges_backward", &dsig::ops::cosine_edges_backward_cpu);
  m.impl("_edge_mse_loss_forward", &dsig::ops::edge_mse_loss_forward_cpu);
  m.impl("_edge_factor_matmul", &dsig::ops::edge_factor_matmul_cpu);
}
