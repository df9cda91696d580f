// Schemas of the cosine-edge ops and their device-independent driver.
#include "edge_loss.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "multilevel_roi_align.h"  // accumulate_type

namespace dsig {
namespace ops {

void check_node_features(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be [N, D], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ",
              x.scalar_type());
}

GraphLayout graph_layout(const at::Tensor& offsets, int64_t num_rows, const at::Device& device,
                         const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must be a 1-D tensor [G + 1], got ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              ": offsets must be int64 (or int32), got ", offsets.scalar_type());
  TORCH_CHECK(offsets.device().is_cpu() || offsets.device() == device, op, ": offsets are on ",
              offsets.device(), " but the node features are on ", device);
  const at::Tensor host = offsets.to(at::kCPU, at::kLong).contiguous();
  GraphLayout layout;
  layout.offsets.assign(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  const auto& o = layout.offsets;
  TORCH_CHECK(o.front() == 0, op, ": offsets must start at 0, got ", o.front());
  for (size_t g = 1; g < o.size(); ++g) {
    TORCH_CHECK(o[g] >= o[g - 1], op, ": offsets must be non-decreasing, but offsets[", g,
                "] = ", o[g], " < offsets[", g - 1, "] = ", o[g - 1]);
  }
  TORCH_CHECK(o.back() == num_rows, op, ": offsets must end at N = ", num_rows, ", got ",
              o.back());
  at::Tensor ranges = at::empty({num_rows, 2}, at::kLong);
  int64_t* r = ranges.data_ptr<int64_t>();
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    for (int64_t i = o[g]; i < o[g + 1]; ++i) {
      r[2 * i] = o[g];
      r[2 * i + 1] = o[g + 1];
    }
  }
  layout.ranges = ranges.to(device);
  return layout;
}

at::Tensor block_gram(const at::Tensor& x_acc, const GraphLayout& layout) {
  const int64_t N = x_acc.size(0);
  at::Tensor gram = at::zeros({N, N}, x_acc.options());
  const auto& o = layout.offsets;
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    const int64_t a = o[g], n = o[g + 1] - o[g];
    if (n == 0) continue;
    const at::Tensor xg = x_acc.narrow(0, a, n);
    if (n < 64) {
      at::Tensor block = gram.narrow(0, a, n).narrow(1, a, n);
      at::mm_out(block, xg, xg.t());
      continue;
    }
    // symmetric: [[P P^T, P Q^T], [(P Q^T)^T, Q Q^T]] costs 3/4 of one full product
    const int64_t h = n / 2;
    const at::Tensor p = xg.narrow(0, 0, h), q = xg.narrow(0, h, n - h);
    at::Tensor top = gram.narrow(0, a, h), bottom = gram.narrow(0, a + h, n - h);
    at::Tensor pp = top.narrow(1, a, h), pq = top.narrow(1, a + h, n - h);
    at::Tensor qq = bottom.narrow(1, a + h, n - h);
    at::mm_out(pp, p, p.t());
    at::mm_out(pq, p, q.t());
    at::mm_out(qq, q, q.t());
    bottom.narrow(1, a, h).copy_(pq.t());
  }
  return gram;
}

at::Tensor block_factor_matmul(const at::Tensor& factor, const at::Tensor& x_acc,
                               const GraphLayout& layout, const at::Tensor& scale,
                               at::ScalarType dtype) {
  // every row belongs to a graph, so every row of dx is written
  at::Tensor dx = at::empty_like(x_acc, at::MemoryFormat::Contiguous);
  const at::Tensor s = scale.to(x_acc.scalar_type());
  const auto& o = layout.offsets;
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    const int64_t a = o[g], n = o[g + 1] - o[g];
    if (n == 0) continue;
    at::Tensor out = dx.narrow(0, a, n);
    // scale the n x n factor, not the n x D product
    at::mm_out(out, factor.narrow(0, a, n).narrow(1, a, n) * s, x_acc.narrow(0, a, n));
  }
  return dx.to(dtype);
}

static at::Tensor to_acc(const at::Tensor& x) {
  return x.to(accumulate_type(x.scalar_type()));
}

at::Tensor cosine_edges_impl(const EdgeEpilogue& epi, const at::Tensor& x,
                             const at::Tensor& offsets, double eps) {
  check_node_features(x, "cosine_edges", "x");
  TORCH_CHECK(eps > 0, "cosine_edges: eps must be positive");
  const GraphLayout layout = graph_layout(offsets, x.size(0), x.device(), "cosine_edges");
  at::Tensor edges = block_gram(to_acc(x), layout);
  at::Tensor norms, live;
  epi.normalize(edges, layout.ranges, eps, norms, live);
  return edges.to(x.scalar_type());
}

at::Tensor cosine_edges_backward_impl(const EdgeEpilogue& epi, const at::Tensor& grad,
                                      const at::Tensor& x, const at::Tensor& edges,
                                      const at::Tensor& offsets, double eps,
                                      bool zero_dead_rows) {
  check_node_features(x, "cosine_edges backward", "x");
  const int64_t N = x.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == N,
              "cosine_edges backward: grad must be [N, N]");
  const GraphLayout layout = graph_layout(offsets, N, x.device(), "cosine_edges backward");
  const at::Tensor x_acc = to_acc(x);
  // The saved edges may be in low precision; recompute them (and the norms) in acc dtype.
  at::Tensor e = block_gram(x_acc, layout);
  at::Tensor norms, live;
  epi.normalize(e, layout.ranges, eps, norms, live);
  at::Tensor s = epi.symmetrize(grad.to(x_acc.scalar_type()), layout.ranges);
  epi.factor(s, e, layout.ranges, norms, live, zero_dead_rows);
  return block_factor_matmul(s, x_acc, layout, at::ones({}, x_acc.options()), x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_impl(
    const EdgeEpilogue& epi, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& offsets, double eps, bool zero_dead_rows, bool student_grad,
    bool teacher_grad) {
  check_node_features(student, "edge_mse_loss", "student");
  check_node_features(teacher, "edge_mse_loss", "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "edge_mse_loss: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " node features must have the same shape");
  TORCH_CHECK(student.device() == teacher.device(), "edge_mse_loss: student is on ",
              student.device(), " but teacher is on ", teacher.device());
  TORCH_CHECK(eps > 0, "edge_mse_loss: eps must be positive");
  const GraphLayout layout =
      graph_layout(offsets, student.size(0), student.device(), "edge_mse_loss");
  const auto acc = accumulate_type(at::promote_types(student.scalar_type(),
                                                     teacher.scalar_type()));
  at::Tensor e_s = block_gram(student.to(acc), layout);
  at::Tensor e_t = block_gram(teacher.to(acc), layout);
  at::Tensor n_s, l_s, n_t, l_t;
  epi.normalize(e_s, layout.ranges, eps, n_s, l_s);
  epi.normalize(e_t, layout.ranges, eps, n_t, l_t);
  at::Tensor f_s = student_grad ? at::empty_like(e_s) : at::empty({0, 0}, e_s.options());
  at::Tensor f_t = teacher_grad ? at::empty_like(e_t) : at::empty({0, 0}, e_t.options());
  at::Tensor loss = epi.loss_and_grads(e_s, e_t, layout.ranges, student_grad ? &f_s : nullptr,
                                       teacher_grad ? &f_t : nullptr);
  if (student_grad) epi.factor(f_s, e_s, layout.ranges, n_s, l_s, zero_dead_rows);
  if (teacher_grad) epi.factor(f_t, e_t, layout.ranges, n_t, l_t, zero_dead_rows);
  const auto out_dtype = at::promote_types(student.scalar_type(), teacher.scalar_type());
  return {loss.to(out_dtype), f_s, f_t};
}

at::Tensor edge_factor_matmul_impl(const at::Tensor& grad, const at::Tensor& factor,
                                   const at::Tensor& x, const at::Tensor& offsets) {
  check_node_features(x, "edge_mse_loss backward", "x");
  const int64_t N = x.size(0);
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == N && factor.size(1) == N,
              "edge_mse_loss backward: factor must be [N, N]");
  TORCH_CHECK(grad.numel() == 1, "edge_mse_loss backward: grad must be a scalar");
  const GraphLayout layout = graph_layout(offsets, N, x.device(), "edge_mse_loss backward");
  return block_factor_matmul(factor, x.to(factor.scalar_type()), layout, grad.reshape({}),
                             x.scalar_type());
}

// Public loss: the factored forward, computing M only for inputs that require grad.
at::Tensor edge_mse_loss(const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& offsets, double eps, bool zero_dead_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dsig::_edge_mse_loss_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
                           bool, bool)>();
  const bool grad_mode = at::GradMode::is_enabled();
  return std::get<0>(op.call(student, teacher, offsets, eps, zero_dead_rows,
                             grad_mode && student.requires_grad(),
                             grad_mode && teacher.requires_grad()));
}

}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_FRAGMENT(dsig, m) {
  m.def(
      "cosine_edges(Tensor x, Tensor offsets, float eps=1e-12, bool zero_dead_rows=False) "
      "-> Tensor");
  m.def(
      "_cosine_edges_backward(Tensor grad, Tensor x, Tensor edges, Tensor offsets, float eps, "
      "bool zero_dead_rows) -> Tensor");
  m.def(
      "edge_mse_loss(Tensor student, Tensor teacher, Tensor offsets, float eps=1e-12, "
      "bool zero_dead_rows=False) -> Tensor");
  m.def(
      "_edge_mse_loss_forward(Tensor student, Tensor teacher, Tensor offsets, float eps, "
      "bool zero_dead_rows, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def("_edge_factor_matmul(Tensor grad, Tensor factor, Tensor x, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsig, CompositeImplicitAutograd, m) {
  m.impl("edge_mse_loss", &dsig::ops::edge_mse_loss);
}
