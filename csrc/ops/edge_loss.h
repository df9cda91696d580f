// Host-side driver of the cosine-edge ops, shared by CPU and CUDA. The Gram and M.X products go
// to the device BLAS per graph; every elementwise stage runs over all graphs in one pass of the
// device's Epilogue (ops/cpu/edge_loss_kernel.cpp, ops/cuda/edge_loss_kernel.cu).
//
// Block-diagonal layout: per-graph N_g x N_g matrices are stored as the diagonal blocks of one
// [N, N] matrix (zero elsewhere), so every shape is static and known to fake tensors.
// `ranges` is int64 [N, 2]: the [start, end) rows of the graph that row i belongs to.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace dsig {
namespace ops {

struct GraphLayout {
  std::vector<int64_t> offsets;  // host copy, G + 1 entries
  at::Tensor ranges;             // [N, 2] int64 on the data's device
};

// Validates `offsets` against N rows (host read: one copy if offsets live on a GPU).
GraphLayout graph_layout(const at::Tensor& offsets, int64_t num_rows, const at::Device& device,
                         const char* op);

void check_node_features(const at::Tensor& x, const char* op, const char* name);

// Block-diagonal Gram of x per graph, in `acc` dtype.
at::Tensor block_gram(const at::Tensor& x_acc, const GraphLayout& layout);

// dX = scale * blockdiag(M) X, per graph, returned in `dtype`.
at::Tensor block_factor_matmul(const at::Tensor& factor, const at::Tensor& x_acc,
                               const GraphLayout& layout, const at::Tensor& scale,
                               at::ScalarType dtype);

// Elementwise stages; each device provides one implementation.
struct EdgeEpilogue {
  // r_i = max(||x_i||, eps) and live_i from the Gram diagonal; Gram -> E in place.
  void (*normalize)(at::Tensor& gram, const at::Tensor& ranges, double eps, at::Tensor& norms,
                    at::Tensor& live);
  // Loss (0-dim, acc dtype); writes S_s / S_t where the tensors are defined.
  at::Tensor (*loss_and_grads)(const at::Tensor& e_s, const at::Tensor& e_t,
                               const at::Tensor& ranges, at::Tensor* s_s, at::Tensor* s_t);
  // S = G + G^T on the diagonal blocks.
  at::Tensor (*symmetrize)(const at::Tensor& grad_edges, const at::Tensor& ranges);
  // S -> M in place.
  void (*factor)(at::Tensor& s, const at::Tensor& edges, const at::Tensor& ranges,
                 const at::Tensor& norms, const at::Tensor& live, bool zero_dead_rows);
};

at::Tensor cosine_edges_impl(const EdgeEpilogue& epi, const at::Tensor& x,
                             const at::Tensor& offsets, double eps);

at::Tensor cosine_edges_backward_impl(const EdgeEpilogue& epi, const at::Tensor& grad,
                                      const at::Tensor& x, const at::Tensor& edges,
                                      const at::Tensor& offsets, double eps, bool zero_dead_rows);

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_impl(
    const EdgeEpilogue& epi, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& offsets, double eps, bool zero_dead_rows, bool student_grad,
    bool teacher_grad);

at::Tensor edge_factor_matmul_impl(const at::Tensor& grad, const at::Tensor& factor,
                                   const at::Tensor& x, const at::Tensor& offsets);

}  // namespace ops
}  // namespace dsig
