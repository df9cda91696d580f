// Host-side driver of the cosine-edge ops, shared by CPU and CUDA. Each device provides an
// EdgeBackend: the graph layout, the block-diagonal products and the elementwise stages
// (ops/cpu/edge_loss_kernel.cpp, ops/cuda/edge_loss_kernel.cu).
//
// Two layouts of the per-graph N_g x N_g matrices:
//   block-diagonal  the diagonal blocks of one [N, N] matrix, zero elsewhere: cosine_edges' result
//                   and its backward (static shapes);
//   packed          the blocks one after another, row-major, Sum_g N_g^2 entries: the factors M
//                   that edge_mse_loss saves for its backward, and its Gram buffers, so memory
//                   grows with the graphs' sizes, not with N^2 (16 graphs of 300 nodes: 5.8 MB
//                   per fp32 matrix instead of 92 MB). Packing needs the sizes on the host: with
//                   offsets on the device (no sync allowed) the buffers keep N^2 entries and
//                   row i at i * N.
// `ranges` is int64 [N, 2]: the [start, end) rows of the graph that row i belongs to. `row_base`
// is int64 [N]: entry (i, j) of i's graph, start <= j < end, is element row_base[i] + j of a
// packed buffer of `size` elements (i N + j where buffers keep [N, N]).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace dsig {
namespace ops {

struct GraphLayout {
  std::vector<int64_t> offsets;  // host copy (G + 1 entries) when offsets live on the host
  at::Tensor ranges;             // [N, 2] int64 on the data's device
  bool packed = false;
  int64_t size = 0;              // elements of a packed layout's buffer
  at::Tensor row_base;           // [N] int64, packed CUDA layouts from host offsets (the CPU
                                 // slices its blocks; device offsets keep [N, N])
};

// Start of graph g's block in a packed buffer, for g = 0 .. G (the last is the total size).
std::vector<int64_t> packed_block_starts(const std::vector<int64_t>& offsets);


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
  // ranges always; row_base and size where `packed` is asked.
  GraphLayout (*layout)(const at::Tensor& offsets, int64_t num_rows, const at::Device& device,
                        const char* op, bool packed);
  // Block-diagonal Gram X X^T per graph, in the accumulation dtype `acc`.
  at::Tensor (*gram)(const at::Tensor& x, const GraphLayout& layout, at::ScalarType acc);
  // dX = scale * M_g X_g per graph (scale: 0-dim tensor or undefined = 1), in `dtype`; M packed
  // where the layout is, block-diagonal [N, N] otherwise.
  at::Tensor (*factor_matmul)(const at::Tensor& factor, const at::Tensor& x,
                              const GraphLayout& layout, const at::Tensor& scale,
                              at::ScalarType dtype);
  // r_i = max(||x_i||, eps) and live_i from the Gram diagonal; Gram -> E in place.
  void (*normalize)(at::Tensor& gram, const at::Tensor& ranges, double eps, at::Tensor& norms,
                    at::Tensor& live);
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

at::Tensor edge_factor_matmul_impl(const EdgeBackend& be, const at::Tensor& grad,
                                   const at::Tensor& factor, const at::Tensor& x,
                                   const at::Tensor& offsets);

}  // namespace ops
}  // namespace dsig
