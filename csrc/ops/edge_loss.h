// Host-side driver of the cosine-edge ops, shared by CPU and CUDA. Each device provides an
// EdgeBackend: the graph layout, the block-diagonal products and the elementwise stages
// (ops/cpu/edge_loss_kernel.cpp, ops/cuda/edge_loss_kernel.cu).
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
  std::vector<int64_t> offsets;  // host copy (G + 1 entries) when offsets live on the host
  at::Tensor ranges;             // [N, 2] int64 on the data's device
};

// Shape, dtype and device of `offsets`; no value is read.
void check_offsets(const at::Tensor& offsets, const at::Device& device, const char* op);

// Values of host `offsets` (0 = o_0 <= o_1 <= ... <= o_G = num_rows), validated.
std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t num_rows, const char* op);

// ranges [N, 2] on the host from validated host offsets.
at::Tensor host_ranges(const std::vector<int64_t>& offsets, int64_t num_rows);

void check_node_features(const at::Tensor& x, const char* op, const char* name);
void check_cosine_edges_args(const at::Tensor& x, const at::Tensor& offsets, double eps);
void check_cosine_edges_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& offsets);
void check_edge_mse_loss_args(const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& offsets, double eps);
void check_edge_factor_matmul_args(const at::Tensor& grad, const at::Tensor& factor,
                                   const at::Tensor& x, const at::Tensor& offsets);

struct EdgeBackend {
  GraphLayout (*layout)(const at::Tensor& offsets, int64_t num_rows, const at::Device& device,
                        const char* op);
  // Block-diagonal Gram X X^T per graph, in the accumulation dtype `acc`.
  at::Tensor (*gram)(const at::Tensor& x, const GraphLayout& layout, at::ScalarType acc);
  // dX = scale * blockdiag(M) X per graph (scale: 0-dim tensor or undefined = 1), in `dtype`.
  at::Tensor (*factor_matmul)(const at::Tensor& factor, const at::Tensor& x,
                              const GraphLayout& layout, const at::Tensor& scale,
                              at::ScalarType dtype);
  // r_i = max(||x_i||, eps) and live_i from the Gram diagonal; Gram -> E in place.
  void (*normalize)(at::Tensor& gram, const at::Tensor& ranges, double eps, at::Tensor& norms,
                    at::Tensor& live);
  // Loss (0-dim, acc dtype); writes S_s / S_t where the tensors are given.
  at::Tensor (*loss_and_grads)(const at::Tensor& e_s, const at::Tensor& e_t,
                               const at::Tensor& ranges, at::Tensor* s_s, at::Tensor* s_t);
  // S = G + G^T on the diagonal blocks.
  at::Tensor (*symmetrize)(const at::Tensor& grad_edges, const at::Tensor& ranges);
  // S -> M in place.
  void (*factor)(at::Tensor& s, const at::Tensor& edges, const at::Tensor& ranges,
                 const at::Tensor& norms, const at::Tensor& live, bool zero_dead_rows);
};

// The drivers expect their arguments checked (check_*_args above).
at::Tensor cosine_edges_impl(const EdgeBackend& be, const at::Tensor& x,
                             const at::Tensor& offsets, double eps);

at::Tensor cosine_edges_backward_impl(const EdgeBackend& be, const at::Tensor& grad,
                                      const at::Tensor& x, const at::Tensor& offsets, double eps,
                                      bool zero_dead_rows);

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_impl(
    const EdgeBackend& be, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& offsets, double eps, bool zero_dead_rows, bool student_grad,
    bool teacher_grad);

at::Tensor edge_factor_matmul_impl(const EdgeBackend& be, const at::Tensor& grad,
                                   const at::Tensor& factor, const at::Tensor& x,
                                   const at::Tensor& offsets);

}  // namespace ops
}  // namespace dsig
