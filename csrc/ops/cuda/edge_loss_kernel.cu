// CUDA backend of the cosine-edge ops. Every stage covers all graphs in one launch and reads
// the graph layout from the device, so nothing waits for the host: the ops run under
// torch.cuda.set_sync_debug_mode("error") and inside CUDA-graph capture.
//   layout      ranges [N, 2] built on the device: from host offsets passed by value in the
//               launch (no copy), or from device offsets by binary search;
//   products    tiled block-diagonal kernels for the Gram X X^T and for M X: tiles that hold no
//               same-graph pair exit at once; fp32 (fp64 for double) FMA accumulation, inputs
//               read in their own dtype; split-K partials summed in a fixed order. No cuBLAS:
//               results do not depend on allow_tf32, and are bitwise reproducible;
//   epilogues   one block per row i, its threads over the columns of i's graph; row reductions
//               use a fixed-shape tree.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../edge_loss.h"
#include "../edge_loss_common.h"
#include "../multilevel_roi_align.h"  // accumulate_type

namespace dsig {
namespace ops {
namespace {

constexpr int kThreads = 128;  // power of two: block_sum's tree

// --- layout -----------------------------------------------------------------------------------

constexpr int kOffsetsPerLaunch = 256;  // host offsets travel as a kernel argument (< 4 KB)

struct OffsetsChunk {
  int64_t o[kOffsetsPerLaunch + 1];  // offsets[g0 .. g0 + count]
  int count;                         // graphs in the chunk
};

// Row i of graph g gets ranges[i] = (o[g], o[g + 1]); the chunk's rows are o[0] .. o[count).
__global__ void ranges_from_host_offsets_kernel(OffsetsChunk chunk, int64_t* ranges) {
  const int64_t first = chunk.o[0];
  const int64_t rows = chunk.o[chunk.count] - first;
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows;
       r += int64_t(blockDim.x) * gridDim.x) {
    const int64_t i = first + r;
    int lo = 0, hi = chunk.count;  // o[lo] <= i < o[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (chunk.o[mid] <= i) lo = mid; else hi = mid;
    }
    ranges[2 * i] = chunk.o[lo];
    ranges[2 * i + 1] = chunk.o[lo + 1];
  }
}

// Same from device offsets [G + 1]. Offsets that skipped validation still give every row a range
// with start <= i < end inside [0, N], so no later kernel reads out of bounds.
__global__ void ranges_from_device_offsets_kernel(const int64_t* offsets, int64_t G, int64_t N,
                                                  int64_t* ranges) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N;
       i += int64_t(blockDim.x) * gridDim.x) {
    int64_t start = i, end = i + 1;
    if (G > 0) {
      int64_t lo = 0, hi = G;  // largest lo < G with offsets[lo] <= i
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (offsets[mid] <= i) lo = mid; else hi = mid;
      }
      start = offsets[lo];
      end = offsets[lo + 1];
    }
    start = start < 0 ? 0 : (start > i ? i : start);
    end = end > N ? N : (end <= i ? i + 1 : end);
    ranges[2 * i] = start;
    ranges[2 * i + 1] = end;
  }
}

// Most blocks of a grid-stride launch. The CPU executor of this source (tests/cudasim) lowers it
// so that its small cases take several strides.
#ifdef DSIG_CUDA_MAX_GRID_BLOCKS
constexpr int64_t kMaxGridBlocks = DSIG_CUDA_MAX_GRID_BLOCKS;
#else
constexpr int64_t kMaxGridBlocks = int64_t(1) << 16;
#endif

// Blocks of a grid-stride launch over n items (kernels that use it must loop).
unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads,
                                                                      kMaxGridBlocks)));
}

GraphLayout layout_cuda(const at::Tensor& offsets, int64_t num_rows, const at::Device& device,
                        const char* op) {
  GraphLayout layout;
  layout.ranges = at::empty({num_rows, 2}, at::TensorOptions().dtype(at::kLong).device(device));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (offsets.device().is_cpu()) {
    layout.offsets = host_offsets(offsets, num_rows, op);
    const int64_t G = static_cast<int64_t>(layout.offsets.size()) - 1;
    for (int64_t g0 = 0; g0 < G; g0 += kOffsetsPerLaunch) {
      OffsetsChunk chunk;
      chunk.count = static_cast<int>(std::min<int64_t>(kOffsetsPerLaunch, G - g0));
      for (int g = 0; g <= chunk.count; ++g) chunk.o[g] = layout.offsets[g0 + g];
      const int64_t rows = chunk.o[chunk.count] - chunk.o[0];
      if (rows == 0) continue;
      ranges_from_host_offsets_kernel<<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
          chunk, layout.ranges.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else if (num_rows > 0) {
    const at::Tensor o = offsets.to(at::kLong).contiguous();  // stays on the device
    ranges_from_device_offsets_kernel<<<grid_for(num_rows, kThreads), kThreads, 0, stream>>>(
        o.data_ptr<int64_t>(), o.numel() - 1, num_rows, layout.ranges.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return layout;
}

// --- block-diagonal products --------------------------------------------------------------------
// 64 x 64 output tiles, 256 threads, each thread 4 x 4 outputs at rows ty + 16 a and columns
// tx + 16 b (conflict-free shared-memory reads), K in steps of 16.

constexpr int kTile = 64;
constexpr int kStepK = 16;
constexpr int kGemmThreads = 256;

// acc[a][b] += sum_k lhs[k][ty + 16 a] * rhs[k][tx + 16 b] over one K step of shared tiles.
template <typename acc_t>
__device__ __forceinline__ void tile_fma(const acc_t (*lhs)[kTile + 1],
                                         const acc_t (*rhs)[kTile + 1], int tx, int ty,
                                         acc_t (&acc)[4][4]) {
#pragma unroll
  for (int k = 0; k < kStepK; ++k) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) av[a] = lhs[k][ty + 16 * a];
#pragma unroll
    for (int b = 0; b < 4; ++b) bv[b] = rhs[k][tx + 16 * b];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] += av[a] * bv[b];
  }
}

// Gram tile (ti, tj), tj >= ti, over K range [k_begin, k_end) of split blockIdx.z; entries whose
// row and column lie in different graphs are written as 0, and the tile is mirrored.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kGemmThreads)
block_gram_kernel(const T* __restrict__ x, int64_t N, int64_t D, int64_t k_chunk,
                  const int64_t* __restrict__ ranges, acc_t* __restrict__ out) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;
  const int64_t r0 = ti * kTile, c0 = tj * kTile;
  const int64_t r_last = min(r0 + kTile, N) - 1;
  // graphs are contiguous row ranges: a same-graph pair exists iff c0 precedes the end of the
  // last row's graph
  if (c0 >= ranges[2 * r_last + 1]) return;
  const int64_t k_begin = blockIdx.z * k_chunk;
  const int64_t k_end = min(k_begin + k_chunk, D);
  __shared__ acc_t as[kStepK][kTile + 1];
  __shared__ acc_t bs[kStepK][kTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kStepK) {
#pragma unroll
    for (int e = 0; e < kTile * kStepK / kGemmThreads; ++e) {
      const int idx = threadIdx.x + e * kGemmThreads;
      const int m = idx / kStepK, k = idx % kStepK;
      const int64_t kk = k0 + k;
      const bool k_ok = kk < k_end;
      as[k][m] = (k_ok && r0 + m < N) ? static_cast<acc_t>(x[(r0 + m) * D + kk]) : acc_t(0);
      bs[k][m] = (k_ok && c0 + m < N) ? static_cast<acc_t>(x[(c0 + m) * D + kk]) : acc_t(0);
    }
    __syncthreads();
    tile_fma(as, bs, tx, ty, acc);
    __syncthreads();
  }
  acc_t* o = out + blockIdx.z * N * N;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t row = r0 + ty + 16 * a;
    if (row >= N) continue;
    const int64_t start = ranges[2 * row], end = ranges[2 * row + 1];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t col = c0 + tx + 16 * b;
      if (col >= N) continue;
      const acc_t v = (col >= start && col < end) ? acc[a][b] : acc_t(0);
      o[row * N + col] = v;
      if (ti != tj) o[col * N + row] = v;
    }
  }
}

// out[i, j] = sum over splits s (in order) of partial[s, i, j], on the diagonal blocks.
template <typename acc_t>
__global__ void sum_splits_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t N,
                                  const int64_t* __restrict__ ranges, acc_t* __restrict__ out) {
  const int64_t i = blockIdx.x;
  for (int64_t j = ranges[2 * i] + threadIdx.x; j < ranges[2 * i + 1]; j += blockDim.x) {
    acc_t v = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) v += partial[(s * N + i) * N + j];
    out[i * N + j] = v;
  }
}

// dX tile (rows r0.., feature columns d0..) = scale * M[rows, J] X[J, cols], J the columns of the
// rows' graphs (M is zero outside its diagonal blocks).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kGemmThreads)
block_factor_matmul_kernel(const acc_t* __restrict__ m, const T* __restrict__ x, int64_t N,
                           int64_t D, const int64_t* __restrict__ ranges,
                           const acc_t* __restrict__ scale, T* __restrict__ dx) {
  const int64_t r0 = int64_t(blockIdx.y) * kTile, d0 = int64_t(blockIdx.x) * kTile;
  const int64_t r_last = min(r0 + kTile, N) - 1;
  const int64_t j_begin = ranges[2 * r0], j_end = ranges[2 * r_last + 1];
  __shared__ acc_t ms[kStepK][kTile + 1];  // ms[k][r] = M[r0 + r, j0 + k]
  __shared__ acc_t xs[kStepK][kTile + 1];  // xs[k][d] = X[j0 + k, d0 + d]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[4][4] = {};
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kStepK) {
#pragma unroll
    for (int e = 0; e < kTile * kStepK / kGemmThreads; ++e) {
      const int idx = threadIdx.x + e * kGemmThreads;
      const int r = idx / kStepK, k = idx % kStepK;  // along M's rows
      const int kx = idx / kTile, d = idx % kTile;   // along X's columns
      ms[k][r] = (r0 + r < N && j0 + k < j_end) ? m[(r0 + r) * N + j0 + k] : acc_t(0);
      xs[kx][d] = (j0 + kx < j_end && d0 + d < D) ? static_cast<acc_t>(x[(j0 + kx) * D + d0 + d])
                                                  : acc_t(0);
    }
    __syncthreads();
    tile_fma(ms, xs, tx, ty, acc);
    __syncthreads();
  }
  const acc_t s = scale ? scale[0] : acc_t(1);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t row = r0 + ty + 16 * a;
    if (row >= N) continue;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t col = d0 + tx + 16 * b;
      if (col < D) dx[row * D + col] = static_cast<T>(s * acc[a][b]);
    }
  }
}

// Splits of the Gram's K dimension: enough blocks for the SMs, each split >= 512 columns, the
// partial buffers <= 256 MB. The number of live tiles is estimated from N and G (host shapes).
int64_t gram_splits(int64_t N, int64_t D, int64_t G, size_t elem_size) {
  const int64_t mean = N / std::max<int64_t>(G, 1);
  const int64_t t = (mean + kTile - 1) / kTile + 1;
  const int64_t tiles_all = (N + kTile - 1) / kTile;
  const int64_t live = std::max<int64_t>(
      1, std::min(std::max<int64_t>(G, 1) * t * (t + 1) / 2, tiles_all * (tiles_all + 1) / 2));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t s = (2 * sms + live - 1) / live;
  s = std::min<int64_t>(s, std::max<int64_t>(1, D / 512));
  const int64_t budget = (int64_t(256) << 20) / std::max<int64_t>(1, N * N * elem_size);
  return std::max<int64_t>(1, std::min<int64_t>({s, budget, 32}));
}

// Features are read in their own dtype unless a wider accumulation is asked for (fp16 student
// with a float64 teacher): then they are converted first.
at::Tensor in_accumulation_reach(const at::Tensor& x, at::ScalarType acc) {
  return accumulate_type(x.scalar_type()) == acc ? x.contiguous() : x.to(acc).contiguous();
}

at::Tensor gram_cuda(const at::Tensor& x_in, const GraphLayout& layout, at::ScalarType acc) {
  const at::Tensor x = in_accumulation_reach(x_in, acc);
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor gram = at::zeros({N, N}, x.options().dtype(acc));
  if (N == 0) return gram;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 65535, "cosine edges: too many nodes (", N, ") for one call");
  const int64_t G = std::max<int64_t>(1, static_cast<int64_t>(layout.offsets.size()) - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_gram_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(at::CppTypeToScalarType<acc_t>::value == acc);
    const int64_t splits = D == 0 ? 1 : gram_splits(N, D, G, sizeof(acc_t));
    const int64_t k_chunk =
        std::max<int64_t>(kStepK, ((D + splits - 1) / splits + kStepK - 1) / kStepK * kStepK);
    const int64_t used = D == 0 ? 1 : (D + k_chunk - 1) / k_chunk;
    at::Tensor partial = used == 1 ? gram : at::empty({used, N, N}, gram.options());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles),
                    static_cast<unsigned>(used));
    block_gram_kernel<scalar_t, acc_t><<<grid, kGemmThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), N, D, k_chunk, layout.ranges.data_ptr<int64_t>(),
        partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (used > 1) {
      sum_splits_kernel<acc_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), used, N, layout.ranges.data_ptr<int64_t>(),
          gram.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gram;
}

at::Tensor factor_matmul_cuda(const at::Tensor& factor_in, const at::Tensor& x_in,
                              const GraphLayout& layout, const at::Tensor& scale,
                              at::ScalarType dtype) {
  const at::Tensor factor = factor_in.contiguous();
  const at::Tensor x = in_accumulation_reach(x_in, factor.scalar_type());
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor dx = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return dx.to(dtype);  // x may have been widened to the factor's dtype
  const at::Tensor s = scale.defined() ? scale.reshape({}).to(factor.scalar_type()) : scale;
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((D + kTile - 1) / kTile),
                  static_cast<unsigned>((N + kTile - 1) / kTile));
  TORCH_CHECK(grid.y <= 65535, "edge_mse_loss backward: too many nodes (", N, ") for one call");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "block_factor_matmul_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(factor.scalar_type() == at::CppTypeToScalarType<acc_t>::value,
                "edge_mse_loss backward: factor must be ", at::CppTypeToScalarType<acc_t>::value,
                " for ", x.scalar_type(), " features, got ", factor.scalar_type());
    block_factor_matmul_kernel<scalar_t, acc_t><<<grid, kGemmThreads, 0, stream>>>(
        factor.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), N, D,
        layout.ranges.data_ptr<int64_t>(), s.defined() ? s.data_ptr<acc_t>() : nullptr,
        dx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx.to(dtype);
}

// --- epilogues ----------------------------------------------------------------------------------

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

const EdgeBackend kCudaBackend{layout_cuda,         gram_cuda,       factor_matmul_cuda,
                                normalize_cuda,      loss_and_grads_cuda, symmetrize_cuda,
                                factor_cuda};

// Arguments are checked before the device guard: a CPU tensor among CUDA ones must get the op's
// own message, not the guard's internal assert.
at::Tensor cosine_edges_cuda(const at::Tensor& x, const at::Tensor& offsets, double eps,
                             bool /*zero_dead_rows: backward only*/) {
  check_cosine_edges_args(x, offsets, eps);
  TORCH_CHECK(x.is_cuda(), "cosine_edges: x is on ", x.device(), " but offsets are on ",
              offsets.device());
  c10::cuda::CUDAGuard guard(x.device());
  return cosine_edges_impl(kCudaBackend, x, offsets, eps);
}

at::Tensor cosine_edges_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                      const at::Tensor& /*edges: recomputed*/,
                                      const at::Tensor& offsets, double eps,
                                      bool zero_dead_rows) {
  check_cosine_edges_backward_args(grad, x, offsets);
  TORCH_CHECK(x.is_cuda(), "cosine_edges backward: x is on ", x.device(), " but offsets are on ",
              offsets.device());
  c10::cuda::CUDAGuard guard(x.device());
  return cosine_edges_backward_impl(kCudaBackend, grad, x, offsets, eps, zero_dead_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& offsets, double eps,
    bool zero_dead_rows, bool student_grad, bool teacher_grad) {
  check_edge_mse_loss_args(student, teacher, offsets, eps);
  TORCH_CHECK(student.is_cuda(), "edge_mse_loss: the node features are on ", student.device(),
              " but offsets are on ", offsets.device());
  c10::cuda::CUDAGuard guard(student.device());
  return edge_mse_loss_forward_impl(kCudaBackend, student, teacher, offsets, eps,
                                    zero_dead_rows, student_grad, teacher_grad);
}

at::Tensor edge_factor_matmul_cuda(const at::Tensor& grad, const at::Tensor& factor,
                                   const at::Tensor& x, const at::Tensor& offsets) {
  check_edge_factor_matmul_args(grad, factor, x, offsets);
  TORCH_CHECK(x.is_cuda(), "edge_mse_loss backward: x is on ", x.device(),
              " but offsets are on ", offsets.device());
  c10::cuda::CUDAGuard guard(x.device());
  return edge_factor_matmul_impl(kCudaBackend, grad, factor, x, offsets);
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
