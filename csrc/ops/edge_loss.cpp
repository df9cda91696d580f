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

void check_offsets(const at::Tensor& offsets, const at::Device& device, const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must be a 1-D tensor [G + 1], got ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              ": offsets must be int64 (or int32), got ", offsets.scalar_type());
  TORCH_CHECK(offsets.device().is_cpu() || offsets.device() == device, op, ": offsets are on ",
              offsets.device(), " but the node features are on ", device);
}

std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t num_rows, const char* op) {
  TORCH_INTERNAL_ASSERT(offsets.device().is_cpu());
  const at::Tensor o64 = offsets.to(at::kLong).contiguous();
  std::vector<int64_t> o(o64.data_ptr<int64_t>(), o64.data_ptr<int64_t>() + o64.numel());
  TORCH_CHECK(o.front() == 0, op, ": offsets must start at 0, got ", o.front());
  for (size_t g = 1; g < o.size(); ++g) {
    TORCH_CHECK(o[g] >= o[g - 1], op, ": offsets must be non-decreasing, but offsets[", g,
                "] = ", o[g], " < offsets[", g - 1, "] = ", o[g - 1]);
  }
  TORCH_CHECK(o.back() == num_rows, op, ": offsets must end at N = ", num_rows, ", got ",
              o.back());
  return o;
}

at::Tensor host_ranges(const std::vector<int64_t>& o, int64_t num_rows) {
  at::Tensor ranges = at::empty({num_rows, 2}, at::kLong);
  int64_t* r = ranges.data_ptr<int64_t>();
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    for (int64_t i = o[g]; i < o[g + 1]; ++i) {
      r[2 * i] = o[g];
      r[2 * i + 1] = o[g + 1];
    }
  }
  return ranges;
}

std::vector<int64_t> packed_block_starts(const std::vector<int64_t>& o) {
  std::vector<int64_t> starts(o.size(), 0);
  for (size_t g = 0; g + 1 < o.size(); ++g) {
    const int64_t n = o[g + 1] - o[g];
    starts[g + 1] = starts[g] + n * n;
  }
  return starts;
}

void check_cosine_edges_args(const at::Tensor& x, const at::Tensor& offsets, double eps) {
  check_node_features(x, "cosine_edges", "x");
  check_offsets(offsets, x.device(), "cosine_edges");
  TORCH_CHECK(eps > 0, "cosine_edges: eps must be positive");
}

void check_cosine_edges_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& offsets) {
  check_node_features(x, "cosine_edges backward", "x");
  const int64_t N = x.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == N,
              "cosine_edges backward: grad must be [N, N]");
  TORCH_CHECK(grad.device() == x.device(), "cosine_edges backward: grad is on ", grad.device(),
              " but x is on ", x.device());
  check_offsets(offsets, x.device(), "cosine_edges backward");
}

void check_edge_mse_loss_args(const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& offsets, double eps) {
  check_node_features(student, "edge_mse_loss", "student");
  check_node_features(teacher, "edge_mse_loss", "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "edge_mse_loss: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " node features must have the same shape");
  TORCH_CHECK(student.device() == teacher.device(), "edge_mse_loss: student is on ",
              student.device(), " but teacher is on ", teacher.device());
  check_offsets(offsets, student.device(), "edge_mse_loss");
  TORCH_CHECK(eps > 0, "edge_mse_loss: eps must be positive");
}

void check_edge_factor_matmul_args(const at::Tensor& grad, const at::Tensor& factor,
                                   const at::Tensor& x, const at::Tensor& offsets) {
  check_node_features(x, "edge_mse_loss backward", "x");
  TORCH_CHECK(factor.dim() == 1, "edge_mse_loss backward: factor must be the packed 1-D factor "
              "of _edge_mse_loss_forward, got ", factor.sizes());
  TORCH_CHECK(grad.numel() == 1, "edge_mse_loss backward: grad must be a scalar");
  TORCH_CHECK(factor.device() == x.device() && grad.device() == x.device(),
              "edge_mse_loss backward: grad, factor and x must be on one device");
  check_offsets(offsets, x.device(), "edge_mse_loss backward");
}

static at::ScalarType acc_of(at::ScalarType t) { return accumulate_type(t); }

at::Tensor cosine_edges_impl(const EdgeBackend& be, const at::Tensor& x,
                             const at::Tensor& offsets, double eps) {
  const GraphLayout layout = be.layout(offsets, x.size(0), x.device(), "cosine_edges", false);
  at::Tensor edges = be.gram(x, layout, acc_of(x.scalar_type()));
  at::Tensor norms, live;
  be.normalize(edges, layout.ranges, eps, norms, live);
  return edges.to(x.scalar_type());
}

at::Tensor cosine_edges_backward_impl(const EdgeBackend& be, const at::Tensor& grad,
                                      const at::Tensor& x, const at::Tensor& offsets, double eps,
                                      bool zero_dead_rows) {
  const GraphLayout layout =
      be.layout(offsets, x.size(0), x.device(), "cosine_edges backward", false);
  const auto acc = acc_of(x.scalar_type());
  // The saved edges may be in low precision; recompute them (and the norms) in acc dtype.
  at::Tensor e = be.gram(x, layout, acc);
  at::Tensor norms, live;
  be.normalize(e, layout.ranges, eps, norms, live);
  at::Tensor s = be.symmetrize(grad.to(acc), layout.ranges);
  be.factor(s, e, layout.ranges, norms, live, zero_dead_rows);
  return be.factor_matmul(s, x, layout, at::Tensor(), x.scalar_type());
}

at::Tensor edge_factor_matmul_impl(const EdgeBackend& be, const at::Tensor& grad,
                                   const at::Tensor& factor, const at::Tensor& x,
                                   const at::Tensor& offsets) {
  const GraphLayout layout =
      be.layout(offsets, x.size(0), x.device(), "edge_mse_loss backward", /*packed=*/true);
  TORCH_CHECK(factor.numel() == layout.size, "edge_mse_loss backward: factor has ",
              factor.numel(), " entries but the offsets' packed blocks need ", layout.size);
  return be.factor_matmul(factor, x, layout, grad.reshape({}), x.scalar_type());
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
