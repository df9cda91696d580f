// CPU epilogues of the cosine-edge ops: plain loops over the diagonal blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../edge_loss.h"
#include "../edge_loss_common.h"

namespace dsig {
namespace ops {
namespace {

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
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = rg[2 * i]; j < rg[2 * i + 1]; ++j)
          g[i * N + j] = detail::edge_entry(g[i * N + j], r[i], r[j]);
    });
  });
}

at::Tensor loss_and_grads_cpu(const at::Tensor& e_s, const at::Tensor& e_t,
                              const at::Tensor& ranges, at::Tensor* s_s, at::Tensor* s_t) {
  const int64_t N = e_s.size(0);
  const int64_t* rg = ranges.data_ptr<int64_t>();
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(e_s.scalar_type(), "edge_mse_loss_cpu", [&] {
    const scalar_t* es = e_s.data_ptr<scalar_t>();
    const scalar_t* et = e_t.data_ptr<scalar_t>();
    scalar_t* ss = s_s ? s_s->zero_().data_ptr<scalar_t>() : nullptr;
    scalar_t* st = s_t ? s_t->zero_().data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t n = rg[2 * i + 1] - rg[2 * i];
      double row = 0;  // fixed order: deterministic
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
  return at::scalar_tensor(loss, e_s.options());
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
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
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

const EdgeEpilogue kCpuEpilogue{normalize_cpu, loss_and_grads_cpu, symmetrize_cpu, factor_cpu};

at::Tensor cosine_edges_cpu(const at::Tensor& x, const at::Tensor& offsets, double eps,
                            bool /*zero_dead_rows: backward only*/) {
  return cosine_edges_impl(kCpuEpilogue, x, offsets, eps);
}

at::Tensor cosine_edges_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& edges, const at::Tensor& offsets,
                                     double eps, bool zero_dead_rows) {
  return cosine_edges_backward_impl(kCpuEpilogue, grad, x, edges, offsets, eps, zero_dead_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& offsets, double eps,
    bool zero_dead_rows, bool student_grad, bool teacher_grad) {
  return edge_mse_loss_forward_impl(kCpuEpilogue, student, teacher, offsets, eps, zero_dead_rows,
                                    student_grad, teacher_grad);
}

}  // namespace
}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CPU, m) {
  m.impl("cosine_edges", &dsig::ops::cosine_edges_cpu);
  m.impl("_cosine_edges_backward", &dsig::ops::cosine_edges_backward_cpu);
  m.impl("_edge_mse_loss_forward", &dsig::ops::edge_mse_loss_forward_cpu);
  m.impl("_edge_factor_matmul", &dsig::ops::edge_factor_matmul_impl);
}
