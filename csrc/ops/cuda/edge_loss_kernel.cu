// CUDA epilogues of the cosine-edge ops: one block per row i of the block-diagonal matrices,
// its threads over the columns of i's graph; every graph in one launch. Row reductions use a
// fixed-shape tree, so results are reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../edge_loss.h"
#include "../edge_loss_common.h"

namespace dsig {
namespace ops {
namespace {

constexpr int kThreads = 128;  // power of two: block_sum's tree

// Sum over the block in a fixed order; every thread gets the result.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();
  return total;
}

template <typename acc_t>
__global__ void norms_kernel(const acc_t* gram, int64_t N, acc_t eps, acc_t* norms, bool* live) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const acc_t n = detail::row_norm(gram[i * N + i]);
  norms[i] = detail::clamped_norm(n, eps);
  live[i] = detail::live_row(n, eps);
}

template <typename acc_t>
__global__ void normalize_kernel(acc_t* gram, const int64_t* ranges, int64_t N,
                                 const acc_t* norms) {
  const int64_t i = blockIdx.x;
  for (int64_t j = ranges[2 * i] + threadIdx.x; j < ranges[2 * i + 1]; j += blockDim.x)
    gram[i * N + j] = detail::edge_entry(gram[i * N + j], norms[i], norms[j]);
}

template <typename acc_t>
__global__ void loss_and_grads_kernel(const acc_t* es, const acc_t* et, const int64_t* ranges,
                                      int64_t N, acc_t* ss, acc_t* st, acc_t* row_loss) {
  __shared__ acc_t shared[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t n = ranges[2 * i + 1] - ranges[2 * i];
  acc_t part = acc_t(0);
  for (int64_t j = ranges[2 * i] + threadIdx.x; j < ranges[2 * i + 1]; j += blockDim.x) {
    const int64_t k = i * N + j;
    part += detail::edge_loss_entry(es[k], et[k], n);
    const acc_t gs = detail::edge_loss_student_grad(es[k], et[k], n);
    if (ss) ss[k] = gs;
    if (st) st[k] = -gs;
  }
  const acc_t total = block_sum(part, shared);
  if (threadIdx.x == 0) row_loss[i] = total;
}

template <typename acc_t>
__global__ void symmetrize_kernel(const acc_t* g, const int64_t* ranges, int64_t N, acc_t* s) {
  const int64_t i = blockIdx.x;
  for (int64_t j = ranges[2 * i] + threadIdx.x; j < ranges[2 * i + 1]; j += blockDim.x)
    s[i * N + j] = g[i * N + j] + g[j * N + i];
}

template <typename acc_t>
__global__ void factor_kernel(acc_t* s, const acc_t* e, const int64_t* ranges, int64_t N,
                              const acc_t* norms, const bool* live, bool zero_dead_rows) {
  __shared__ acc_t shared[kThreads];
  const int64_t i = blockIdx.x;
  acc_t part = acc_t(0);
  if (live[i])
    for (int64_t j = ranges[2 * i] + threadIdx.x; j < ranges[2 * i + 1]; j += blockDim.x)
      part += s[i * N + j] * e[i * N + j];
  const acc_t dot = block_sum(part, shared);  // all reads of row i happen before the writes
  for (int64_t j = ranges[2 * i] + threadIdx.x; j < ranges[2 * i + 1]; j += blockDim.x)
    s[i * N + j] = detail::factor_entry(s[i * N + j], dot, norms[i], norms[j], i == j, live[i],
                                        zero_dead_rows);
}

unsigned rows_grid(int64_t N) { return static_cast<unsigned>(N); }

void normalize_cuda(at::Tensor& gram, const at::Tensor& ranges, double eps, at::Tensor& norms,
                    at::Tensor& live) {
  const int64_t N = gram.size(0);
  norms = at::empty({N}, gram.options());
  live = at::empty({N}, gram.options().dtype(at::kBool));
  if (N == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "cosine_edges_normalize_cuda", [&] {
    norms_kernel<scalar_t><<<static_cast<unsigned>((N + kThreads - 1) / kThreads), kThreads, 0,
                             stream>>>(gram.data_ptr<scalar_t>(), N, static_cast<scalar_t>(eps),
                                       norms.data_ptr<scalar_t>(), live.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<scalar_t><<<rows_grid(N), kThreads, 0, stream>>>(
        gram.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(), N, norms.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor loss_and_grads_cuda(const at::Tensor& e_s, const at::Tensor& e_t,
                               const at::Tensor& ranges, at::Tensor* s_s, at::Tensor* s_t) {
  const int64_t N = e_s.size(0);
  at::Tensor row_loss = at::zeros({N}, e_s.options());
  if (s_s) s_s->zero_();
  if (s_t) s_t->zero_();
  if (N > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(e_s.scalar_type(), "edge_mse_loss_cuda", [&] {
      loss_and_grads_kernel<scalar_t><<<rows_grid(N), kThreads, 0, stream>>>(
          e_s.data_ptr<scalar_t>(), e_t.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(), N,
          s_s ? s_s->data_ptr<scalar_t>() : nullptr, s_t ? s_t->data_ptr<scalar_t>() : nullptr,
          row_loss.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return row_loss.sum();
}

at::Tensor symmetrize_cuda(const at::Tensor& grad_edges, const at::Tensor& ranges) {
  const int64_t N = grad_edges.size(0);
  const at::Tensor g = grad_edges.contiguous();
  at::Tensor s = at::zeros_like(g);
  if (N == 0) return s;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cosine_edges_symmetrize_cuda", [&] {
    symmetrize_kernel<scalar_t><<<rows_grid(N), kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(), N, s.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return s;
}

void factor_cuda(at::Tensor& s, const at::Tensor& edges, const at::Tensor& ranges,
                 const at::Tensor& norms, const at::Tensor& live, bool zero_dead_rows) {
  const int64_t N = s.size(0);
  if (N == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "edge_factor_cuda", [&] {
    factor_kernel<scalar_t><<<rows_grid(N), kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), edges.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(), N,
        norms.data_ptr<scalar_t>(), live.data_ptr<bool>(), zero_dead_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const EdgeEpilogue kCudaEpilogue{normalize_cuda, loss_and_grads_cuda, symmetrize_cuda,
                                 factor_cuda};

at::Tensor cosine_edges_cuda(const at::Tensor& x, const at::Tensor& offsets, double eps,
                             bool /*zero_dead_rows: backward only*/) {
  c10::cuda::CUDAGuard guard(x.device());
  return cosine_edges_impl(kCudaEpilogue, x, offsets, eps);
}

at::Tensor cosine_edges_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& edges, const at::Tensor& offsets,
                                      double eps, bool zero_dead_rows) {
  c10::cuda::CUDAGuard guard(x.device());
  return cosine_edges_backward_impl(kCudaEpilogue, grad, x, edges, offsets, eps, zero_dead_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& offsets, double eps,
    bool zero_dead_rows, bool student_grad, bool teacher_grad) {
  c10::cuda::CUDAGuard guard(student.device());
  return edge_mse_loss_forward_impl(kCudaEpilogue, student, teacher, offsets, eps,
                                    zero_dead_rows, student_grad, teacher_grad);
}

at::Tensor edge_factor_matmul_cuda(const at::Tensor& grad, const at::Tensor& factor,
                                   const at::Tensor& x, const at::Tensor& offsets) {
  c10::cuda::CUDAGuard guard(x.device());
  return edge_factor_matmul_impl(grad, factor, x, offsets);
}

}  // namespace
}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CUDA, m) {
  m.impl("cosine_edges", &dsig::ops::cosine_edges_cuda);
  m.impl("_cosine_edges_backward", &dsig::ops::cosine_edges_backward_cuda);
  m.impl("_edge_mse_loss_forward", &dsig::ops::edge_mse_loss_forward_cuda);
  m.impl("_edge_factor_matmul", &dsig::ops::edge_factor_matmul_cuda);
}
