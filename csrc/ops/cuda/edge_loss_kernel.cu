// CUDA backend of the cosine-edge ops. Every stage covers all graphs in one launch and reads
// the graph layout from the device, so nothing waits for the host: the ops run under
// torch.cuda.set_sync_debug_mode("error") and inside CUDA-graph capture.
//   layout      ranges [N, 2] (and row_base [N] for packed buffers) built on the device: from
//               host offsets passed by value in the launch (no copy), or from device offsets by
//               binary search;
//   products    tiled block-diagonal kernels for the Gram X X^T and for M X: tiles that hold no
//               same-graph pair exit at once; fp32 (fp64 for double) FMA accumulation, inputs
//               read in their own dtype; split-K partials summed in a fixed order. Half and
//               bfloat16 features run on tensor cores (wmma, fp32 accumulation): the Gram
//               exactly (16-bit products are exact in fp32), M X with M rounded to TF32. No
//               cuBLAS: results do not depend on allow_tf32, and are bitwise reproducible;
//   epilogues   one block per row i, its threads over the columns of i's graph; row reductions
//               use a fixed-shape tree. edge_mse_loss fuses its epilogues into one row kernel
//               and its two Grams into one launch (four launches in all, "the edge loss, fused").
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "../edge_loss.h"
#include "../edge_loss_common.h"
#include "../multilevel_roi_align.h"  // accumulate_type

namespace dsig {
namespace ops {
namespace {

constexpr int kThreads = 128;  // power of two: block_sum's tree

// --- layout -----------------------------------------------------------------------------------

constexpr int kOffsetsPerLaunch = 128;  // host offsets travel as a kernel argument (< 4 KB)

struct OffsetsChunk {
  int64_t o[kOffsetsPerLaunch + 1];    // offsets[g0 .. g0 + count]
  int64_t block[kOffsetsPerLaunch];    // packed start of each graph's block
  int count;                           // graphs in the chunk
};

// Row i of graph g gets ranges[i] = (o[g], o[g + 1]) and, where row_base is given, the packed
// base block[g] + (i - o[g]) n - o[g] (n = o[g + 1] - o[g]); the chunk's rows are
// o[0] .. o[count).
__global__ void ranges_from_host_offsets_kernel(OffsetsChunk chunk, int64_t* ranges,
                                                int64_t* row_base) {
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
    if (row_base)
      row_base[i] = chunk.block[lo] + (i - chunk.o[lo]) * (chunk.o[lo + 1] - chunk.o[lo]) -
                    chunk.o[lo];
  }
}

// Same from device offsets [G + 1]. Offsets that skipped validation still give every row a range
// with start <= i < end inside [0, N], so no later kernel reads out of bounds. (No row_base:
// packing needs the offsets on the host, so these layouts keep [N, N] buffers.)
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

// The kernels' row_base: nullptr addresses [N, N] buffers (block-diagonal, or device offsets).
const int64_t* row_base_of(const GraphLayout& layout) {
  return layout.row_base.defined() ? layout.row_base.data_ptr<int64_t>() : nullptr;
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
                        const char* op, bool packed) {
  GraphLayout layout;
  const auto index_options = at::TensorOptions().dtype(at::kLong).device(device);
  layout.ranges = at::empty({num_rows, 2}, index_options);
  layout.packed = packed;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (offsets.device().is_cpu()) {
    if (packed) layout.row_base = at::empty({num_rows}, index_options);
    int64_t* row_base = packed ? layout.row_base.data_ptr<int64_t>() : nullptr;
    layout.offsets = host_offsets(offsets, num_rows, op);
    const std::vector<int64_t> block = packed_block_starts(layout.offsets);
    if (packed) layout.size = block.back();
    const int64_t G = static_cast<int64_t>(layout.offsets.size()) - 1;
    for (int64_t g0 = 0; g0 < G; g0 += kOffsetsPerLaunch) {
      OffsetsChunk chunk;
      chunk.count = static_cast<int>(std::min<int64_t>(kOffsetsPerLaunch, G - g0));
      for (int g = 0; g <= chunk.count; ++g) chunk.o[g] = layout.offsets[g0 + g];
      for (int g = 0; g < chunk.count; ++g) chunk.block[g] = block[g0 + g];
      const int64_t rows = chunk.o[chunk.count] - chunk.o[0];
      if (rows == 0) continue;
      ranges_from_host_offsets_kernel<<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
          chunk, layout.ranges.data_ptr<int64_t>(), row_base);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    if (packed) layout.size = num_rows * num_rows;
    if (num_rows > 0) {
      const at::Tensor o = offsets.to(at::kLong).contiguous();  // stays on the device
      ranges_from_device_offsets_kernel<<<grid_for(num_rows, kThreads), kThreads, 0, stream>>>(
          o.data_ptr<int64_t>(), o.numel() - 1, num_rows, layout.ranges.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return layout;
}

// --- block-diagonal products --------------------------------------------------------------------
// 64 x 64 output tiles, K in steps of 16 staged in shared memory. Each thread accumulates a
// kMicro x kMicro sub-tile: 8 x 8 for float (64 threads: 64 FMAs per 4 four-wide shared loads),
// 4 x 4 for double (256 threads; 8 x 8 doubles would exhaust the registers). A thread's rows are
// ty * 4 + a + h * kSpan (a < 4, h < kMicro / 4, kSpan = 4 * kTile / kMicro) and its columns
// likewise from tx: four consecutive values per shared load, and a warp's loads of one k row
// fall on distinct banks or broadcast.

constexpr int kTile = 64;
constexpr int kStepK = 16;
constexpr int kTilePad = 4;  // rows of 68: 16-byte aligned for the four-wide shared loads
constexpr int kGemmMaxThreads = 256;
constexpr int kGemmMinBlocks = 2;  // <= 128 registers: 8 blocks of 64 threads per SM for float

template <typename acc_t>
struct GemmShape {
  static constexpr int kMicro = sizeof(acc_t) > 4 ? 4 : 8;
  static constexpr int kSide = kTile / kMicro;  // threads along each tile edge
  static constexpr int kThreads = kSide * kSide;
  static constexpr int kSpan = 4 * kSide;       // distance between a thread's 4-wide groups
};

template <typename acc_t>
using StagedTile = acc_t[kStepK][kTile + kTilePad];

// Offset in the tile of a thread's i-th row (or column), i < kMicro, from its ty (or tx).
template <typename acc_t>
__device__ __forceinline__ int micro_offset(int t, int i) {
  return (i / 4) * GemmShape<acc_t>::kSpan + 4 * t + i % 4;
}

// acc[a][b] += sum_k lhs[k][row a] * rhs[k][column b] over one K step of staged tiles.
template <typename acc_t>
__device__ __forceinline__ void tile_fma(const StagedTile<acc_t>& lhs, const StagedTile<acc_t>& rhs,
                                         int tx, int ty,
                                         acc_t (&acc)[GemmShape<acc_t>::kMicro]
                                                     [GemmShape<acc_t>::kMicro]) {
  constexpr int kMicro = GemmShape<acc_t>::kMicro;
#pragma unroll
  for (int k = 0; k < kStepK; ++k) {
    acc_t av[kMicro], bv[kMicro];
#pragma unroll
    for (int a = 0; a < kMicro; ++a) av[a] = lhs[k][micro_offset<acc_t>(ty, a)];
#pragma unroll
    for (int b = 0; b < kMicro; ++b) bv[b] = rhs[k][micro_offset<acc_t>(tx, b)];
#pragma unroll
    for (int a = 0; a < kMicro; ++a)
#pragma unroll
      for (int b = 0; b < kMicro; ++b) acc[a][b] += av[a] * bv[b];
  }
}

// Where entry (row, j) of row's graph lives in a buffer: row_base[row] + j in a packed layout
// (nullptr: block-diagonal [N, N], row N + j).
__device__ __forceinline__ int64_t entry_base(const int64_t* __restrict__ row_base, int64_t row,
                                              int64_t N) {
  return row_base ? row_base[row] : row * N;
}

// Gram tile (ti, tj), tj >= ti, of side blockIdx.z / splits (x0 or x1: the student's and the
// teacher's Grams share one launch) over the K range of split blockIdx.z % splits. Only entries
// whose row and column lie in one graph are written, and mirrored. Output [sides, splits, plane]
// (plane: the layout's size, N^2 for block-diagonal); tiles without a same-graph pair exit.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kGemmMaxThreads, kGemmMinBlocks)
block_gram_kernel(const T* __restrict__ x0, const T* __restrict__ x1, int64_t N, int64_t D,
                  int64_t splits, int64_t k_chunk, const int64_t* __restrict__ ranges,
                  const int64_t* __restrict__ row_base, int64_t plane, acc_t* __restrict__ out) {
  using Shape = GemmShape<acc_t>;
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;
  const int64_t r0 = ti * kTile, c0 = tj * kTile;
  const int64_t r_last = min(r0 + kTile, N) - 1;
  // graphs are contiguous row ranges: a same-graph pair exists iff c0 precedes the end of the
  // last row's graph
  if (c0 >= ranges[2 * r_last + 1]) return;
  const T* __restrict__ x = blockIdx.z < splits ? x0 : x1;
  const int64_t k_begin = (blockIdx.z % splits) * k_chunk;
  const int64_t k_end = min(k_begin + k_chunk, D);
  __shared__ __align__(16) StagedTile<acc_t> as;
  __shared__ __align__(16) StagedTile<acc_t> bs;
  const int tx = threadIdx.x % Shape::kSide, ty = threadIdx.x / Shape::kSide;
  acc_t acc[Shape::kMicro][Shape::kMicro] = {};
  // staging: thread t copies kPerThread consecutive k of row t % kTile of both tiles (one row
  // pointer, constant offsets; shared stores along m: conflict free)
  constexpr int kPerThread = kTile * kStepK / Shape::kThreads;
  const int m = threadIdx.x % kTile, kq = (threadIdx.x / kTile) * kPerThread;
  const bool a_row = r0 + m < N, b_row = c0 + m < N;
  const T* __restrict__ a_src = x + (r0 + m) * D + kq;
  const T* __restrict__ b_src = x + (c0 + m) * D + kq;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kStepK) {
    const int k_left = static_cast<int>(min(k_end - k0, int64_t(kStepK))) - kq;  // valid: i < it
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      as[kq + i][m] = (a_row && i < k_left) ? static_cast<acc_t>(a_src[k0 + i]) : acc_t(0);
      bs[kq + i][m] = (b_row && i < k_left) ? static_cast<acc_t>(b_src[k0 + i]) : acc_t(0);
    }
    __syncthreads();
    tile_fma<acc_t>(as, bs, tx, ty, acc);
    __syncthreads();
  }
  acc_t* o = out + blockIdx.z * plane;
#pragma unroll
  for (int a = 0; a < Shape::kMicro; ++a) {
    const int64_t row = r0 + micro_offset<acc_t>(ty, a);
    if (row >= N) continue;
    const int64_t start = ranges[2 * row], end = ranges[2 * row + 1];
    // rows of one graph are `ld` apart: (col, row) is at base + (col - row) ld + row
    const int64_t base = entry_base(row_base, row, N), ld = row_base ? end - start : N;
#pragma unroll
    for (int b = 0; b < Shape::kMicro; ++b) {
      const int64_t col = c0 + micro_offset<acc_t>(tx, b);
      if (col < start || col >= end) continue;
      o[base + col] = acc[a][b];
      if (ti != tj) o[base + (col - row) * ld + row] = acc[a][b];
    }
  }
}

// Tensor-core Gram of 16-bit features (wmma 16 x 16 x 16, float accumulation): the product of
// two half / bfloat16 values is exact in float, so only the order of the sums differs from
// block_gram_kernel. Same grid, tiles and output as there; 4 warps per 64 x 64 tile, each a
// 32 x 32 quarter (2 x 2 fragments); K in steps of 32 staged as 16-bit rows; the finished tile
// passes through shared memory so that only its same-graph entries are written (and mirrored).

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> { using type = __half; };
template <>
struct WmmaType<at::BFloat16> { using type = __nv_bfloat16; };

constexpr int kMmaThreads = 128;
constexpr int kMmaStepK = 32;
constexpr int kMmaRow = kMmaStepK + 8;  // 80-byte staged rows: a multiple of 16 bytes (wmma's
                                        // ldm) whose 8-row groups fall on distinct banks

// A warp's 32 x 32 quarter of a 64 x 64 tile (rows wr.., columns wc..): 2 x 2 accumulator
// fragments, shared by the tensor-core kernels.
template <typename Acc>
__device__ __forceinline__ void zero_quarter(Acc (&acc)[2][2]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) nvcuda::wmma::fill_fragment(acc[a][b], 0.0f);
}

// acc[a][b] += fa[a] fb[b]
template <typename Acc, typename FragA, typename FragB>
__device__ __forceinline__ void mma_quarter(Acc (&acc)[2][2], const FragA (&fa)[2],
                                            const FragB (&fb)[2]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) nvcuda::wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
}

template <typename Acc>
__device__ __forceinline__ void store_quarter(const Acc (&acc)[2][2],
                                              float (&tile)[kTile][kTile + kTilePad], int wr,
                                              int wc) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      nvcuda::wmma::store_matrix_sync(&tile[wr + 16 * a][wc + 16 * b], acc[a][b],
                                      kTile + kTilePad, nvcuda::wmma::mem_row_major);
}

template <typename T, bool kVectors>
__global__ void __launch_bounds__(kMmaThreads)
block_gram_mma_kernel(const T* __restrict__ x0, const T* __restrict__ x1, int64_t N, int64_t D,
                      int64_t splits, int64_t k_chunk, const int64_t* __restrict__ ranges,
                      const int64_t* __restrict__ row_base, int64_t plane,
                      float* __restrict__ out) {
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (tj < ti) return;
  const int64_t r0 = ti * kTile, c0 = tj * kTile;
  const int64_t r_last = min(r0 + kTile, N) - 1;
  if (c0 >= ranges[2 * r_last + 1]) return;  // no same-graph pair (see block_gram_kernel)
  const T* __restrict__ x = blockIdx.z < splits ? x0 : x1;
  const int64_t k_begin = (blockIdx.z % splits) * k_chunk;
  const int64_t k_end = min(k_begin + k_chunk, D);
  __shared__ __align__(32) T staged[2][kTile][kMmaRow];  // [0]: rows r0 + m, [1]: rows c0 + m
  __shared__ __align__(32) float tile[kTile][kTile + kTilePad];
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // the warp's quarter of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  zero_quarter(acc);
  // staging: 16-byte chunks (8 values) of both tiles' 64 rows x kMmaStepK values; chunk
  // q = threadIdx.x + kMmaThreads i, 4 to a row, so one warp's loads cover 8 rows' 64 bytes.
  // kVectors (D % 8 == 0, 16-byte aligned rows; k_chunk and the steps are multiples of 8): a
  // chunk is whole or zero; otherwise value by value.
  constexpr int kChunksPerRow = kMmaStepK / 8;
  constexpr int kChunksPerThread = 2 * kTile * kChunksPerRow / kMmaThreads;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaStepK) {
    const int k_left = static_cast<int>(min(k_end - k0, int64_t(kMmaStepK)));
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int q = threadIdx.x + kMmaThreads * i;
      const int side = q / (kTile * kChunksPerRow), m = (q / kChunksPerRow) % kTile;
      const int c = (q % kChunksPerRow) * 8;
      const int64_t row = (side ? c0 : r0) + m;
      T* dst = &staged[side][m][c];
      if (kVectors) {
        uint4 v = {0, 0, 0, 0};
        if (row < N && c < k_left) v = *reinterpret_cast<const uint4*>(x + row * D + k0 + c);
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
#pragma unroll
        for (int v = 0; v < 8; ++v)
          dst[v] = (row < N && c + v < k_left) ? x[row * D + k0 + c + v] : T(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaStepK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> fb[2];  // X^T: rows of X
#pragma unroll
      for (int a = 0; a < 2; ++a)
        wmma::load_matrix_sync(fa[a], reinterpret_cast<const W*>(&staged[0][wr + 16 * a][kk]),
                               kMmaRow);
#pragma unroll
      for (int b = 0; b < 2; ++b)
        wmma::load_matrix_sync(fb[b], reinterpret_cast<const W*>(&staged[1][wc + 16 * b][kk]),
                               kMmaRow);
      mma_quarter(acc, fa, fb);
    }
    __syncthreads();
  }
  store_quarter(acc, tile, wr, wc);
  __syncthreads();
  float* o = out + blockIdx.z * plane;
  for (int e = threadIdx.x; e < kTile * kTile; e += kMmaThreads) {
    const int64_t row = r0 + e / kTile, col = c0 + e % kTile;
    if (row >= N) break;  // rows grow with e
    const int64_t start = ranges[2 * row], end = ranges[2 * row + 1];
    if (col < start || col >= end) continue;
    const int64_t base = entry_base(row_base, row, N), ld = row_base ? end - start : N;
    const float v = tile[e / kTile][e % kTile];
    o[base + col] = v;
    if (ti != tj) o[base + (col - row) * ld + row] = v;
  }
}

// One launch of the Gram kernel for T: tensor cores for the 16-bit types, FMA otherwise.
template <typename T, typename acc_t>
void launch_block_gram(const dim3& grid, const at::cuda::CUDAStream& stream, const T* x0,
                       const T* x1, int64_t N, int64_t D, int64_t splits, int64_t k_chunk,
                       const int64_t* ranges, const int64_t* row_base, int64_t plane,
                       acc_t* out) {
  if constexpr (std::is_same<T, at::Half>::value || std::is_same<T, at::BFloat16>::value) {
    const bool vectors = D % 8 == 0 && reinterpret_cast<uintptr_t>(x0) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(x1) % 16 == 0;
    if (vectors)
      block_gram_mma_kernel<T, true><<<grid, kMmaThreads, 0, stream>>>(
          x0, x1, N, D, splits, k_chunk, ranges, row_base, plane, out);
    else
      block_gram_mma_kernel<T, false><<<grid, kMmaThreads, 0, stream>>>(
          x0, x1, N, D, splits, k_chunk, ranges, row_base, plane, out);
  } else {
    block_gram_kernel<T, acc_t><<<grid, GemmShape<acc_t>::kThreads, 0, stream>>>(
        x0, x1, N, D, splits, k_chunk, ranges, row_base, plane, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// A 0-dim tensor of any floating dtype (the upstream gradient), read where it is used: a cast
// to the accumulation dtype first would cost a launch.
struct DeviceScalar {
  const void* ptr = nullptr;  // nullptr reads as 1
  at::ScalarType dtype = at::kFloat;
};

DeviceScalar device_scalar(const at::Tensor& t) {
  if (!t.defined()) return {};
  TORCH_INTERNAL_ASSERT(t.numel() == 1 && at::isFloatingType(t.scalar_type()));
  return {t.data_ptr(), t.scalar_type()};
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_scalar(const DeviceScalar& s) {
  if (!s.ptr) return acc_t(1);
  switch (s.dtype) {
    case at::kDouble: return static_cast<acc_t>(*static_cast<const double*>(s.ptr));
    case at::kHalf: return static_cast<acc_t>(*static_cast<const at::Half*>(s.ptr));
    case at::kBFloat16: return static_cast<acc_t>(*static_cast<const at::BFloat16*>(s.ptr));
    default: return static_cast<acc_t>(*static_cast<const float*>(s.ptr));
  }
}

// dX tile (rows r0.., feature columns d0..) = scale * M[rows, J] X[J, cols], J the columns of the
// rows' graphs; M is read only inside each row's graph (packed by row_base, or block-diagonal).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kGemmMaxThreads, kGemmMinBlocks)
block_factor_matmul_kernel(const acc_t* __restrict__ m, const T* __restrict__ x, int64_t N,
                           int64_t D, const int64_t* __restrict__ ranges,
                           const int64_t* __restrict__ row_base, DeviceScalar scale,
                           T* __restrict__ dx) {
  using Shape = GemmShape<acc_t>;
  const int64_t r0 = int64_t(blockIdx.y) * kTile, d0 = int64_t(blockIdx.x) * kTile;
  const int64_t r_last = min(r0 + kTile, N) - 1;
  const int64_t j_begin = ranges[2 * r0], j_end = ranges[2 * r_last + 1];
  __shared__ __align__(16) StagedTile<acc_t> ms;  // ms[k][r] = M[r0 + r, j0 + k]
  __shared__ __align__(16) StagedTile<acc_t> xs;  // xs[k][d] = X[j0 + k, d0 + d]
  const int tx = threadIdx.x % Shape::kSide, ty = threadIdx.x / Shape::kSide;
  acc_t acc[Shape::kMicro][Shape::kMicro] = {};
  // staging: thread t copies kPerThread consecutive columns of M's row r0 + t % kTile, and
  // kPerThread rows of X's column d0 + t % kTile (shared stores conflict free)
  constexpr int kPerThread = kTile * kStepK / Shape::kThreads;
  const int lane = threadIdx.x % kTile, kq = (threadIdx.x / kTile) * kPerThread;
  const bool x_col = d0 + lane < D;
  // this thread's M row: its graph's columns [m_start, m_end) (empty past N)
  const int64_t m_row = r0 + lane;
  int64_t m_start = 0, m_end = 0;
  const acc_t* __restrict__ m_src = m;
  if (m_row < N) {
    m_start = ranges[2 * m_row];
    m_end = ranges[2 * m_row + 1];
    m_src = m + entry_base(row_base, m_row, N) + kq;
  }
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kStepK) {
    const int k_left = static_cast<int>(min(j_end - j0, int64_t(kStepK))) - kq;  // valid: i < it
    const int64_t m_lo = m_start - j0 - kq, m_hi = m_end - j0 - kq;  // valid: m_lo <= i < m_hi
    const T* __restrict__ x_src = x + (j0 + kq) * D + d0 + lane;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      ms[kq + i][lane] = (i >= m_lo && i < m_hi) ? m_src[j0 + i] : acc_t(0);
      xs[kq + i][lane] = (x_col && i < k_left) ? static_cast<acc_t>(*x_src) : acc_t(0);
      x_src += D;
    }
    __syncthreads();
    tile_fma<acc_t>(ms, xs, tx, ty, acc);
    __syncthreads();
  }
  const acc_t s = load_scalar<acc_t>(scale);
#pragma unroll
  for (int a = 0; a < Shape::kMicro; ++a) {
    const int64_t row = r0 + micro_offset<acc_t>(ty, a);
    if (row >= N) continue;
#pragma unroll
    for (int b = 0; b < Shape::kMicro; ++b) {
      const int64_t col = d0 + micro_offset<acc_t>(tx, b);
      if (col < D) dx[row * D + col] = static_cast<T>(s * acc[a][b]);
    }
  }
}

// dX for 16-bit features on tensor cores (wmma 16 x 16 x 8, TF32 inputs, float accumulation):
// M rounded to TF32 (10 mantissa bits), X exact in TF32 (half and bfloat16 significands fit), so
// dX, rounded to T at the end, keeps T's precision. Grid and tiles as block_factor_matmul_kernel;
// 4 warps, each a 32 x 32 quarter; the rows' graph columns in steps of 32 staged as floats; the
// finished tile passes through shared memory to be scaled and written in T.
constexpr int kTf32StepK = 32;

template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
block_factor_matmul_tf32_kernel(const float* __restrict__ m, const T* __restrict__ x, int64_t N,
                                int64_t D, const int64_t* __restrict__ ranges,
                                const int64_t* __restrict__ row_base, DeviceScalar scale,
                                T* __restrict__ dx) {
  namespace wmma = nvcuda::wmma;
  const int64_t r0 = int64_t(blockIdx.y) * kTile, d0 = int64_t(blockIdx.x) * kTile;
  const int64_t r_last = min(r0 + kTile, N) - 1;
  const int64_t j_begin = ranges[2 * r0], j_end = ranges[2 * r_last + 1];
  __shared__ __align__(32) float ms[kTf32StepK][kTile + kTilePad];  // ms[k][r] = M[r0 + r, j0 + k]
  __shared__ __align__(32) float xs[kTf32StepK][kTile + kTilePad];  // xs[k][d] = X[j0 + k, d0 + d]
  __shared__ __align__(32) float tile[kTile][kTile + kTilePad];
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // the warp's quarter of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
  zero_quarter(acc);
  // staging: thread t copies 16 consecutive columns of M's row r0 + t % 64 (its graph's only)
  // and 16 rows of X's column d0 + t % 64; shared stores along the tile's 64: conflict free
  constexpr int kPerThread = kTf32StepK * kTile / kMmaThreads;
  const int lane = threadIdx.x % kTile, kq = (threadIdx.x / kTile) * kPerThread;
  const bool x_col = d0 + lane < D;
  const int64_t m_row = r0 + lane;
  int64_t m_start = 0, m_end = 0;
  const float* __restrict__ m_src = m;
  if (m_row < N) {
    m_start = ranges[2 * m_row];
    m_end = ranges[2 * m_row + 1];
    m_src = m + entry_base(row_base, m_row, N) + kq;
  }
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTf32StepK) {
    const int k_left = static_cast<int>(min(j_end - j0, int64_t(kTf32StepK))) - kq;
    const int64_t m_lo = m_start - j0 - kq, m_hi = m_end - j0 - kq;  // valid: m_lo <= i < m_hi
    const T* __restrict__ x_src = x + (j0 + kq) * D + d0 + lane;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      ms[kq + i][lane] = (i >= m_lo && i < m_hi) ? m_src[j0 + i] : 0.0f;
      xs[kq + i][lane] = (x_col && i < k_left) ? static_cast<float>(*x_src) : 0.0f;
      x_src += D;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTf32StepK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        wmma::load_matrix_sync(fa[a], &ms[kk][wr + 16 * a], kTile + kTilePad);
#pragma unroll
        for (int e = 0; e < fa[a].num_elements; ++e) fa[a].x[e] = wmma::__float_to_tf32(fa[a].x[e]);
      }
#pragma unroll
      for (int b = 0; b < 2; ++b)  // X's values are TF32 already
        wmma::load_matrix_sync(fb[b], &xs[kk][wc + 16 * b], kTile + kTilePad);
      mma_quarter(acc, fa, fb);
    }
    __syncthreads();
  }
  store_quarter(acc, tile, wr, wc);
  __syncthreads();
  const float s = load_scalar<float>(scale);
  for (int e = threadIdx.x; e < kTile * kTile; e += kMmaThreads) {
    const int64_t row = r0 + e / kTile, col = d0 + e % kTile;
    if (row >= N) break;  // rows grow with e
    if (col < D) dx[row * D + col] = static_cast<T>(s * tile[e / kTile][e % kTile]);
  }
}

// One launch of the M X kernel for T: tensor cores (TF32) for the 16-bit types, FMA otherwise.
template <typename T, typename acc_t>
void launch_factor_matmul(const dim3& grid, const at::cuda::CUDAStream& stream, const acc_t* m,
                          const T* x, int64_t N, int64_t D, const int64_t* ranges,
                          const int64_t* row_base, DeviceScalar scale, T* dx) {
  if constexpr (std::is_same<T, at::Half>::value || std::is_same<T, at::BFloat16>::value) {
    block_factor_matmul_tf32_kernel<T><<<grid, kMmaThreads, 0, stream>>>(m, x, N, D, ranges,
                                                                         row_base, scale, dx);
  } else {
    block_factor_matmul_kernel<T, acc_t><<<grid, GemmShape<acc_t>::kThreads, 0, stream>>>(
        m, x, N, D, ranges, row_base, scale, dx);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Gram tiles (ti <= tj) that hold a same-graph pair: counted from host offsets, estimated from
// N and G where the offsets live on the device.
int64_t live_gram_tiles(const GraphLayout& layout, int64_t N, int64_t G) {
  const int64_t tiles_all = (N + kTile - 1) / kTile;
  if (layout.offsets.empty()) {
    const int64_t mean = N / std::max<int64_t>(G, 1);
    const int64_t t = (mean + kTile - 1) / kTile + 1;
    return std::max<int64_t>(
        1, std::min(std::max<int64_t>(G, 1) * t * (t + 1) / 2, tiles_all * (tiles_all + 1) / 2));
  }
  int64_t live = 0;
  for (int64_t ti = 0; ti < tiles_all; ++ti) {
    const int64_t r_last = std::min((ti + 1) * kTile, N) - 1;
    // end of r_last's graph: the first offset past it
    const int64_t end =
        *std::upper_bound(layout.offsets.begin(), layout.offsets.end(), r_last);
    live += (end + kTile - 1) / kTile - ti;
  }
  return std::max<int64_t>(1, live);
}

// Splits of the Gram's K dimension: enough blocks for two waves of the SMs over the live tiles
// of all sides, each split >= 512 columns, the partial buffers (`plane` entries per side and
// split) <= 256 MB.
int64_t gram_splits(int64_t plane, int64_t D, int64_t live_tiles, int64_t sides,
                    size_t elem_size) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = live_tiles * sides;
  int64_t s = (2 * sms + blocks - 1) / blocks;
  s = std::min<int64_t>(s, std::max<int64_t>(1, D / 512));
  const int64_t budget =
      (int64_t(256) << 20) / std::max<int64_t>(1, sides * plane * int64_t(elem_size));
  return std::max<int64_t>(1, std::min<int64_t>({s, budget, 32}));
}

// Columns per K split (a multiple of the k-step) and the number of splits that get columns.
std::pair<int64_t, int64_t> k_chunks(int64_t D, int64_t splits) {
  const int64_t k_chunk =
      std::max<int64_t>(kStepK, ((D + splits - 1) / splits + kStepK - 1) / kStepK * kStepK);
  return {k_chunk, D == 0 ? 1 : (D + k_chunk - 1) / k_chunk};
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
    const int64_t splits =
        D == 0 ? 1 : gram_splits(N * N, D, live_gram_tiles(layout, N, G), 1, sizeof(acc_t));
    const auto [k_chunk, used] = k_chunks(D, splits);
    at::Tensor partial = used == 1 ? gram : at::empty({used, N, N}, gram.options());
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles),
                    static_cast<unsigned>(used));
    launch_block_gram<scalar_t, acc_t>(grid, stream, x.data_ptr<scalar_t>(),
                                       x.data_ptr<scalar_t>(), N, D, used, k_chunk,
                                       layout.ranges.data_ptr<int64_t>(), /*row_base=*/nullptr,
                                       N * N, partial.data_ptr<acc_t>());
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
    launch_factor_matmul<scalar_t, acc_t>(grid, stream, factor.data_ptr<acc_t>(),
                                          x.data_ptr<scalar_t>(), N, D,
                                          layout.ranges.data_ptr<int64_t>(), row_base_of(layout),
                                          device_scalar(scale), dx.data_ptr<scalar_t>());
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

// --- the edge loss, fused ---------------------------------------------------------------------
// edge_mse_loss's forward in four launches: the layout, both Grams (one launch), one row kernel
// for every epilogue (split sums, norms, E_s and E_t, the loss row, S, the row dot, M) and the
// fixed-order sum of the row losses. The Gram partials and M are packed (edge_loss.h): row i's
// entry j at base_i + j, and the rows of i's graph ld = n apart (N apart for [N, N] buffers).

// Entry at `index` of side `side`'s Gram: its K splits summed in order.
template <typename acc_t>
__device__ __forceinline__ acc_t gram_entry(const acc_t* __restrict__ partial, int64_t splits,
                                            int64_t plane, int side, int64_t index) {
  acc_t v = acc_t(0);
  for (int64_t s = 0; s < splits; ++s) v += partial[(side * splits + s) * plane + index];
  return v;
}

// Row i (grid-stride over rows): the loss row sum_j (E_t - E_s)^2 / (2 n^2) over i's graph and,
// where asked, row i of M_s and M_t (the gradient factors, edge_loss_common.h). Pass 1 keeps S in
// M's row; pass 2 turns it into M once the row dot is known.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
edge_loss_rows_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t plane,
                      int64_t N, const int64_t* __restrict__ ranges,
                      const int64_t* __restrict__ row_base, acc_t eps, bool zero_dead_rows,
                      acc_t* __restrict__ m_s, acc_t* __restrict__ m_t,
                      acc_t* __restrict__ row_loss) {
  __shared__ acc_t shared[kThreads];
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    const int64_t start = ranges[2 * i], end = ranges[2 * i + 1], n = end - start;
    const int64_t base = entry_base(row_base, i, N), ld = row_base ? n : N;
    // clamped norm of row j of i's graph, from its diagonal entry (j, j)
    auto clamped_norm_of = [&](int side, int64_t j) {
      const acc_t g = gram_entry(partial, splits, plane, side, base + (j - i) * ld + j);
      return detail::clamped_norm(detail::row_norm(g), eps);
    };
    const acc_t norm_s = detail::row_norm(gram_entry(partial, splits, plane, 0, base + i));
    const acc_t norm_t = detail::row_norm(gram_entry(partial, splits, plane, 1, base + i));
    const acc_t rs_i = detail::clamped_norm(norm_s, eps), rt_i = detail::clamped_norm(norm_t, eps);
    const bool live_s = detail::live_row(norm_s, eps), live_t = detail::live_row(norm_t, eps);
    acc_t loss = acc_t(0), dot_s = acc_t(0), dot_t = acc_t(0);
    for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
      const acc_t e_s = detail::edge_entry(gram_entry(partial, splits, plane, 0, base + j), rs_i,
                                           clamped_norm_of(0, j));
      const acc_t e_t = detail::edge_entry(gram_entry(partial, splits, plane, 1, base + j), rt_i,
                                           clamped_norm_of(1, j));
      loss += detail::edge_loss_entry(e_s, e_t, n);
      const acc_t g = detail::edge_loss_student_grad(e_s, e_t, n);
      if (m_s) {
        m_s[base + j] = g;
        if (live_s) dot_s += g * e_s;
      }
      if (m_t) {
        m_t[base + j] = -g;
        if (live_t) dot_t += -g * e_t;
      }
    }
    loss = block_sum(loss, shared);
    if (m_s) dot_s = block_sum(dot_s, shared);
    if (m_t) dot_t = block_sum(dot_t, shared);
    if (threadIdx.x == 0) row_loss[i] = loss;
    // pass 2: S -> M; [N, N] buffers also get their zeros outside the graph (block_sum's
    // barriers order pass 1's writes before these reads)
    const int64_t j_first = row_base ? start : 0, j_last = row_base ? end : N;
    for (int64_t j = j_first + threadIdx.x; j < j_last; j += blockDim.x) {
      const bool same_graph = j >= start && j < end;
      if (m_s)
        m_s[base + j] = same_graph ? detail::factor_entry(m_s[base + j], dot_s, rs_i,
                                                          clamped_norm_of(0, j), i == j, live_s,
                                                          zero_dead_rows)
                                   : acc_t(0);
      if (m_t)
        m_t[base + j] = same_graph ? detail::factor_entry(m_t[base + j], dot_t, rt_i,
                                                          clamped_norm_of(1, j), i == j, live_t,
                                                          zero_dead_rows)
                                   : acc_t(0);
    }
  }
}

// loss = sum of the row losses in a fixed order, in the output dtype. One block.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
sum_rows_kernel(const acc_t* __restrict__ row_loss, int64_t N, out_t* __restrict__ loss) {
  __shared__ acc_t shared[kThreads];
  acc_t part = acc_t(0);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) part += row_loss[i];
  const acc_t total = block_sum(part, shared);
  if (threadIdx.x == 0) loss[0] = static_cast<out_t>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edge_mse_loss_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& offsets, double eps,
    bool zero_dead_rows, bool student_grad, bool teacher_grad) {
  const GraphLayout layout =
      layout_cuda(offsets, student.size(0), student.device(), "edge_mse_loss", /*packed=*/true);
  const auto out_dtype = at::promote_types(student.scalar_type(), teacher.scalar_type());
  const auto acc = accumulate_type(out_dtype);
  // one feature dtype for the shared Gram launch: mixed inputs are widened to acc first
  const bool same = student.scalar_type() == teacher.scalar_type();
  const at::Tensor xs = same ? in_accumulation_reach(student, acc) : student.to(acc).contiguous();
  const at::Tensor xt = same ? in_accumulation_reach(teacher, acc) : teacher.to(acc).contiguous();
  const int64_t N = xs.size(0), D = xs.size(1);
  const auto acc_options = xs.options().dtype(acc);
  at::Tensor m_s = at::empty({student_grad ? layout.size : 0}, acc_options);
  at::Tensor m_t = at::empty({teacher_grad ? layout.size : 0}, acc_options);
  at::Tensor loss = at::empty({}, xs.options().dtype(out_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 65535, "edge_mse_loss: too many nodes (", N, ") for one call");
  const int64_t G = std::max<int64_t>(1, static_cast<int64_t>(layout.offsets.size()) - 1);
  at::Tensor row_loss = at::empty({N}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(),
                                  "edge_mse_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(at::CppTypeToScalarType<acc_t>::value == acc);
    if (N > 0) {
      const int64_t splits =
          D == 0 ? 1 : gram_splits(layout.size, D, live_gram_tiles(layout, N, G), 2,
                                   sizeof(acc_t));
      const auto [k_chunk, used] = k_chunks(D, splits);
      at::Tensor partial = at::empty({2, used, layout.size}, acc_options);
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles),
                      static_cast<unsigned>(2 * used));
      launch_block_gram<scalar_t, acc_t>(grid, stream, xs.data_ptr<scalar_t>(),
                                         xt.data_ptr<scalar_t>(), N, D, used, k_chunk,
                                         layout.ranges.data_ptr<int64_t>(), row_base_of(layout),
                                         layout.size, partial.data_ptr<acc_t>());
      edge_loss_rows_kernel<acc_t><<<grid_for(N, 1), kThreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), used, layout.size, N, layout.ranges.data_ptr<int64_t>(),
          row_base_of(layout), static_cast<acc_t>(eps), zero_dead_rows,
          student_grad ? m_s.data_ptr<acc_t>() : nullptr,
          teacher_grad ? m_t.data_ptr<acc_t>() : nullptr, row_loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "edge_mse_loss_sum",
                                    [&] {
      sum_rows_kernel<acc_t, scalar_t><<<1, kThreads, 0, stream>>>(
          row_loss.data_ptr<acc_t>(), N, loss.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, m_s, m_t};
}

// edge_mse_loss's forward does not go through the shared driver (edge_mse_loss_fused_cuda).
const EdgeBackend kCudaBackend{layout_cuda,    gram_cuda,       factor_matmul_cuda, normalize_cuda,
                                symmetrize_cuda, factor_cuda};

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
  return edge_mse_loss_fused_cuda(student, teacher, offsets, eps, zero_dead_rows, student_grad,
                                  teacher_grad);
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
