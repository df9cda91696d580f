// CUDA kernels of multi-level RoIAlign: every level in one launch, levels passed as a table.
// Forward: one block per (RoI, channel group); the RoI's sample taps are computed once into
// shared memory and every output sums its samples in torchvision's order. Backward, two modes:
//   atomic        one block per (RoI, channel group) forms the RoI's footprint gradient
//                 Wy^T (G / count) Wx, 32 x 32 pixels at a time in registers, and adds each
//                 pixel once (atomicAdd) into an fp32 (fp64) buffer, cast to the features' dtype;
//   deterministic owner-computes: each RoI's geometry and footprint are computed once, RoIs are
//                 bucketed by (image, level) keeping their order, and one block per (32 x 32-px
//                 tile of a level of an image, group of channels) adds, RoI after RoI in order,
//                 the footprint gradient Wy^T (G / count) Wx of the RoIs that touch its tile
//                 into registers, then writes its tile once in the features' dtype (no
//                 zero-fill, no atomics, no cast pass): bitwise reproducible, whatever the launch
//                 configuration. The per-element arithmetic is the CPU default's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../multilevel_roi_align.h"
#include "../roi_align_common.h"

namespace dsig {
namespace ops {
namespace {

using detail::RoiGeometry;

constexpr int kThreads = 256;

// Most blocks of a grid-stride launch. The CPU executor of this source (tests/cudasim) lowers it
// so that its small cases take several strides.
#ifdef DSIG_CUDA_MAX_GRID_BLOCKS
constexpr int64_t kMaxGridBlocks = DSIG_CUDA_MAX_GRID_BLOCKS;
#else
constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;
#endif

template <typename T>
struct LevelTable {
  const T* data[kMaxLevels];
  int64_t stride_b[kMaxLevels], stride_c[kMaxLevels], stride_h[kMaxLevels], stride_w[kMaxLevels];
  int height[kMaxLevels], width[kMaxLevels];
  double scale[kMaxLevels];
  bool offsets32[kMaxLevels];  // every pixel's offset in a (b, c) plane fits the tap tables' int
  int num_levels;
};

template <typename acc_t>
struct GradTable {
  acc_t* data[kMaxLevels];  // contiguous [B, C, H, W] accumulation buffers
  int height[kMaxLevels], width[kMaxLevels];
  double scale[kMaxLevels];
  int num_levels;
};

// Batch index of a RoI, or -1 when it is not an image of the batch (never read out of bounds,
// even for inputs that skipped the Python-side value checks).
template <typename acc_t>
__device__ __forceinline__ int64_t batch_of(const acc_t* roi, int64_t num_images) {
  const acc_t b = roi[0];
  if (!(b >= acc_t(0) && b < static_cast<acc_t>(num_images))) return -1;
  return static_cast<int64_t>(b);
}

__device__ __forceinline__ int64_t level_of(const int64_t* levels, int64_t k, int num_levels) {
  const int64_t l = levels[k];
  return (l >= 0 && l < num_levels) ? l : -1;
}

// Blocks of a grid-stride launch over n items (kernels that use it must loop).
inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxGridBlocks));
}

// Samples per axis whose taps a forward block keeps in shared memory (7 bins x 36 samples).
// Any RoI on its FPN level needs far fewer; a RoI needing more pools with taps computed in place.
constexpr int kTapTable = 256;

// Largest pixel offset within a (b, c) plane that the forward's tap tables hold (as int). The
// CPU executor of this source (tests/cudasim) lowers it so that its small cases take both paths.
#ifdef DSIG_CUDA_MAX_TAP_OFFSET
constexpr int64_t kMaxTapOffset = DSIG_CUDA_MAX_TAP_OFFSET;
#else
constexpr int64_t kMaxTapOffset = INT32_MAX;
#endif

// One sample's taps along one axis as offsets into a plane (their index times the axis' stride)
// and weights; lo < 0 marks an invalid sample. 16 bytes for float weights: one shared load.
template <typename acc_t>
struct alignas(16) PlaneTap {
  int lo, hi;
  acc_t w_lo, w_hi;
};

template <typename acc_t>
__device__ __forceinline__ PlaneTap<acc_t> plane_tap(acc_t v, int size, int64_t stride) {
  const detail::AxisTap<acc_t> t = detail::axis_tap(v, size);
  if (!t.valid) return PlaneTap<acc_t>{-1, -1, acc_t(0), acc_t(0)};
  return PlaneTap<acc_t>{static_cast<int>(t.lo * stride), static_cast<int>(t.hi * stride),
                         t.w_lo, t.w_hi};
}

// Channels per forward block: 32 (the RoI's taps reused over more channels), fewer when the
// grid would leave a GPU's SMs idle (~4 blocks on each of an H100's 132).
int forward_channels_per_block(int64_t K, int64_t C) {
  constexpr int64_t kMinBlocks = 4 * 132;
  int cpb = 32;
  while (cpb > 4 && K * ((C + cpb - 1) / cpb) < kMinBlocks) cpb /= 2;
  return static_cast<int>(std::min<int64_t>(cpb, std::max<int64_t>(C, 1)));
}

// One block per (RoI, group of cpb channels), grid-stride over RoIs. The RoI's geometry and
// the taps of its samples along y and x (torchvision's values, as plane offsets) are computed
// once into shared memory and reused by all its outputs, which sum their samples' taps in
// torchvision's order. Threads walk the outputs along x (NCHW) or along channels
// (channels-last), the direction in which neighbouring threads read neighbouring pixels.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(LevelTable<T> lv, const acc_t* __restrict__ rois,
               const int64_t* __restrict__ levels, int64_t K, int64_t C, int64_t num_images,
               int ph, int pw, int sampling_ratio, bool aligned, int cpb,
               T* __restrict__ out) {
  __shared__ PlaneTap<acc_t> ytaps[kTapTable];
  __shared__ PlaneTap<acc_t> xtaps[kTapTable];
  const int64_t c0 = int64_t(blockIdx.y) * cpb;
  const int nc = static_cast<int>(min(static_cast<int64_t>(cpb), C - c0));
  const int bins = ph * pw, outputs = nc * bins;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const acc_t* roi = rois + 5 * k;
    const int64_t b = batch_of(roi, num_images);
    const int l = static_cast<int>(level_of(levels, k, lv.num_levels));
    T* out_k = out + (k * C + c0) * bins;
    if (b < 0 || l < 0) {  // uniform over the block: no barrier is skipped by some threads only
      for (int e = threadIdx.x; e < outputs; e += blockDim.x) out_k[e] = static_cast<T>(0);
      continue;
    }
    const RoiGeometry<acc_t> g = detail::roi_geometry<acc_t>(
        roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(lv.scale[l]), ph, pw, sampling_ratio,
        aligned);
    const int H = lv.height[l], W = lv.width[l];
    const int ny = ph * g.grid_h, nx = pw * g.grid_w;
    const bool tabled = lv.offsets32[l] && ny <= kTapTable && nx <= kTapTable;
    __syncthreads();  // the previous RoI's outputs have read its tables
    if (tabled) {
      for (int i = threadIdx.x; i < ny + nx; i += blockDim.x) {
        if (i < ny) {
          ytaps[i] = plane_tap(
              detail::sample_coord(g.start_h, g.bin_h, i / g.grid_h, i % g.grid_h, g.grid_h), H,
              lv.stride_h[l]);
        } else {
          const int j = i - ny;
          xtaps[j] = plane_tap(
              detail::sample_coord(g.start_w, g.bin_w, j / g.grid_w, j % g.grid_w, g.grid_w), W,
              lv.stride_w[l]);
        }
      }
    }
    __syncthreads();
    const bool along_channels = lv.stride_c[l] == 1 && lv.stride_w[l] != 1;
    const T* base = lv.data[l] + b * lv.stride_b[l] + c0 * lv.stride_c[l];
    for (int e = threadIdx.x; e < outputs; e += blockDim.x) {
      int c, bin;
      if (along_channels) {
        c = e % nc;
        bin = e / nc;
      } else {
        c = e / bins;
        bin = e % bins;
      }
      const int p = bin / pw, q = bin % pw;
      const T* plane = base + c * lv.stride_c[l];
      acc_t v;
      if (tabled) {
        const PlaneTap<acc_t>* ty_bin = ytaps + p * g.grid_h;
        const PlaneTap<acc_t>* tx_bin = xtaps + q * g.grid_w;
        acc_t sum = acc_t(0);
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const PlaneTap<acc_t> ty = ty_bin[iy];
          if (ty.lo < 0) continue;
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const PlaneTap<acc_t> tx = tx_bin[ix];
            if (tx.lo < 0) continue;
            sum += detail::bilinear_at(plane, ty.lo, ty.hi, tx.lo, tx.hi, ty.w_lo, ty.w_hi,
                                       tx.w_lo, tx.w_hi);
          }
        }
        v = sum / g.count;
      } else {
        v = detail::pooled_bin<T, acc_t>(plane, lv.stride_h[l], lv.stride_w[l], H, W, g, p, q);
      }
      out_k[c * bins + bin] = static_cast<T>(v);
    }
  }
}

// --- backward: footprint gradients 32 x 32 pixels at a time ---------------------------------------
// Both backward kernels form a RoI's gradient on its footprint, Wy^T (G / count) Wx, one 32 x 32
// tile at a time: thread (lane, warp) owns tile column x = lane and rows warp + 8 r, and keeps
// their sums for a group of CPB channels in registers. For one RoI and tile:
//   1. tile_weights: the weights of each bin on the tile's rows (wy) and columns (wx), one thread
//      per bin adding its samples in order; stage_upstream: the group's upstream gradient / count;
//   2. column_sums: t1[c][p][x] = sum over the bins q reaching column x of gs[c][p][q] wx[q][x];
//   3. add_rows: each owned pixel += sum over the bins p reaching its row of wy[p][y] t1[c][p][x].
// Sums run over bins in ascending order and skip zero weights and gradients: the arithmetic of
// the CPU default, so a non-finite gradient stays on the pixels its bin's samples touch.

constexpr int kTile = 32;  // tile edge in pixels
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = kTile / kWarps;  // tile rows each thread accumulates

// Channels of a block, accumulated in registers: kTileRows x CPB values per thread.
template <typename acc_t>
constexpr int wide_channels() {
  return sizeof(acc_t) > 4 ? 8 : 16;
}

// Shared memory of the tile steps: wy [ph][32], wx [pw][32], gs [cpb][ph][pw], t1 [cpb][ph][32].
template <typename acc_t>
size_t tile_smem_bytes(int cpb, int ph, int pw) {
  return sizeof(acc_t) * (size_t(ph + pw) * kTile + size_t(cpb) * ph * pw +
                          size_t(cpb) * ph * kTile);
}

constexpr size_t kDefaultSmem = 46 * 1024;  // of the 48 KB, less the kernels' static part

// Channel group width (wide, half as wide, or 1) and dynamic shared memory of a kernel of tile
// steps with `extra` bytes of its own: the widest group that fits the 48 KB a launch gets
// without opting in, else one channel with an opt-in up to the device's limit; 0 if none fits.
template <typename acc_t>
int channels_per_block(int ph, int pw, size_t extra, size_t* smem) {
  constexpr int kWide = wide_channels<acc_t>();
  for (int c : {kWide, kWide / 2, 1}) {
    *smem = extra + tile_smem_bytes<acc_t>(c, ph, pw);
    if (*smem <= kDefaultSmem) return c;
  }
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  return *smem + 2 * 1024 <= optin ? 1 : 0;
}

// launch(std::integral_constant<int, cpb>()) for a width that channels_per_block returned.
template <typename acc_t, typename Launch>
void with_channels_per_block(int cpb, Launch&& launch) {
  constexpr int kWide = wide_channels<acc_t>();
  if (cpb == kWide) {
    launch(std::integral_constant<int, kWide>());
  } else if (cpb == kWide / 2) {
    launch(std::integral_constant<int, kWide / 2>());
  } else {
    launch(std::integral_constant<int, 1>());
  }
}

template <typename Kernel>
void allow_dynamic_smem(Kernel* kernel, size_t smem) {
  if (smem > kDefaultSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
}

template <typename acc_t>
struct TileSmem {
  acc_t *wy, *wx, *gs, *t1;
};

template <typename acc_t>
__device__ __forceinline__ TileSmem<acc_t> tile_smem(unsigned char* raw, int cpb, int ph,
                                                     int pw) {
  TileSmem<acc_t> s;
  s.wy = reinterpret_cast<acc_t*>(raw);
  s.wx = s.wy + ph * kTile;
  s.gs = s.wx + pw * kTile;
  s.t1 = s.gs + cpb * ph * pw;
  return s;
}

// Step 1 (weights) of the tile at (y0, x0), th x tw pixels of an H x W level.
template <typename acc_t>
__device__ __forceinline__ void tile_weights(const TileSmem<acc_t>& s,
                                             const RoiGeometry<acc_t>& g, int ph, int pw, int H,
                                             int W, int y0, int x0, int th, int tw) {
  for (int e = threadIdx.x; e < ph + pw; e += kThreads) {
    const bool along_y = e < ph;
    acc_t* w = along_y ? s.wy + e * kTile : s.wx + (e - ph) * kTile;
    for (int x = 0; x < kTile; ++x) w[x] = acc_t(0);
    if (along_y) {
      detail::add_axis_weights(g.start_h, g.bin_h, e, g.grid_h, H, y0, th, w);
    } else {
      detail::add_axis_weights(g.start_w, g.bin_w, e - ph, g.grid_w, W, x0, tw, w);
    }
  }
}

// Step 1 (upstream gradient) of RoI k for channels [c0, c0 + nc).
template <typename T, typename acc_t>
__device__ __forceinline__ void stage_upstream(const TileSmem<acc_t>& s, const T* grad,
                                               int64_t g0, int64_t g1, int64_t g2, int64_t g3,
                                               int64_t k, int64_t c0, int nc, int ph, int pw,
                                               acc_t count) {
  const acc_t inv_count = acc_t(1) / count;
  for (int e = threadIdx.x; e < nc * ph * pw; e += kThreads) {  // e = (c * ph + p) * pw + q
    const int c = e / (ph * pw), p = (e / pw) % ph, q = e % pw;
    s.gs[e] = static_cast<acc_t>(grad[k * g0 + (c0 + c) * g1 + p * g2 + q * g3]) * inv_count;
  }
}

// First and last of `bins` weights w[p][pix] (row stride kTile) that are not zero; first > last
// if none. Only those bins' samples reach pixel pix.
template <typename acc_t>
__device__ __forceinline__ void reaching_bins(const acc_t* w, int bins, int pix, int* first,
                                              int* last) {
  *first = bins;
  *last = -1;
  for (int p = 0; p < bins; ++p) {
    if (w[p * kTile + pix] != acc_t(0)) {
      if (*first == bins) *first = p;
      *last = p;
    }
  }
}

// Step 2; returns whether any bin reaches this thread's column (one that none reaches takes
// nothing in step 3).
template <typename acc_t>
__device__ __forceinline__ bool column_sums(const TileSmem<acc_t>& s, int nc, int ph, int pw) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int q_first, q_last;
  reaching_bins(s.wx, pw, lane, &q_first, &q_last);
  for (int cp = warp; cp < nc * ph; cp += kWarps) {
    const acc_t* gcp = s.gs + cp * pw;
    acc_t v = acc_t(0);
    for (int q = q_first; q <= q_last; ++q) {
      const acc_t w = s.wx[q * kTile + lane], gv = gcp[q];
      if (w != acc_t(0) && gv != acc_t(0)) v += gv * w;
    }
    s.t1[cp * kTile + lane] = v;
  }
  return q_first <= q_last;
}

// Step 3 into this thread's registers.
template <typename acc_t, int CPB>
__device__ __forceinline__ void add_rows(const TileSmem<acc_t>& s, int nc, int ph,
                                         acc_t (&acc)[CPB][kTileRows]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) {
    const int y = warp + kWarps * r;
    int p_first, p_last;
    reaching_bins(s.wy, ph, y, &p_first, &p_last);
    for (int p = p_first; p <= p_last; ++p) {
      const acc_t w = s.wy[p * kTile + y];
      if (w == acc_t(0)) continue;
      const acc_t* t1p = s.t1 + p * kTile + lane;
#pragma unroll
      for (int c = 0; c < CPB; ++c) {  // independent sums: each still over p in order
        if (c < nc) acc[c][r] += w * t1p[c * ph * kTile];
      }
    }
  }
}

template <typename acc_t, int CPB>
__device__ __forceinline__ void zero_rows(acc_t (&acc)[CPB][kTileRows]) {
#pragma unroll
  for (int c = 0; c < CPB; ++c) {
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) acc[c][r] = acc_t(0);
  }
}

// Atomic backward: one block per (RoI, group of CPB channels), grid-stride over RoIs. The RoI's
// footprint gradient is formed tile by tile with the steps above and each pixel's sum is added
// to the fp32 (fp64) buffer with one atomic per channel, coalesced along x: one atomic per
// footprint pixel instead of one per sample tap that reaches it.
template <typename T, typename acc_t, int CPB>
__global__ void __launch_bounds__(kThreads)
backward_atomic_kernel(GradTable<acc_t> gt, const T* __restrict__ grad, int64_t g0, int64_t g1,
                       int64_t g2, int64_t g3, const acc_t* __restrict__ rois,
                       const int64_t* __restrict__ levels, int64_t K, int64_t C,
                       int64_t num_images, int ph, int pw, int sampling_ratio, bool aligned) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<acc_t> s = tile_smem<acc_t>(smem_raw, CPB, ph, pw);
  __shared__ int extent[4];  // y_first, y_last, x_first, x_last of the RoI's footprint
  const int64_t c0 = int64_t(blockIdx.y) * CPB;
  const int nc = static_cast<int>(min(static_cast<int64_t>(CPB), C - c0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const acc_t* roi = rois + 5 * k;
    const int64_t b = batch_of(roi, num_images);
    const int l = static_cast<int>(level_of(levels, k, gt.num_levels));
    if (b < 0 || l < 0) continue;  // uniform over the block
    const RoiGeometry<acc_t> g = detail::roi_geometry<acc_t>(
        roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(gt.scale[l]), ph, pw, sampling_ratio,
        aligned);
    const int H = gt.height[l], W = gt.width[l];
    __syncthreads();  // the previous RoI is done with shared memory
    if (threadIdx.x == 0) {
      detail::axis_extent(g.start_h, g.bin_h, ph, g.grid_h, H, &extent[0], &extent[1]);
    } else if (threadIdx.x == 32) {
      detail::axis_extent(g.start_w, g.bin_w, pw, g.grid_w, W, &extent[2], &extent[3]);
    }
    stage_upstream(s, grad, g0, g1, g2, g3, k, c0, nc, ph, pw, g.count);
    __syncthreads();
    const int y_first = extent[0], y_last = extent[1], x_first = extent[2], x_last = extent[3];
    acc_t* plane = gt.data[l] + (b * C + c0) * H * int64_t(W);
    for (int y0 = y_first; y0 <= y_last; y0 += kTile) {
      for (int x0 = x_first; x0 <= x_last; x0 += kTile) {
        const int th = min(kTile, y_last - y0 + 1), tw = min(kTile, x_last - x0 + 1);
        tile_weights(s, g, ph, pw, H, W, y0, x0, th, tw);
        __syncthreads();
        const bool reached = column_sums(s, nc, ph, pw);
        __syncthreads();
        if (reached) {
          acc_t acc[CPB][kTileRows];
          zero_rows(acc);
          add_rows(s, nc, ph, acc);
#pragma unroll
          for (int r = 0; r < kTileRows; ++r) {
            const int y = warp + kWarps * r;
#pragma unroll
            for (int c = 0; c < CPB; ++c) {
              if (c < nc && y < th && acc[c][r] != acc_t(0)) {
                atomicAdd(plane + (c * int64_t(H) + y0 + y) * W + x0 + lane, acc[c][r]);
              }
            }
          }
        }
        __syncthreads();  // the next tile overwrites wy, wx and t1
      }
    }
  }
}

// --- atomic backward: level buffers --------------------------------------------------------------
// The level gradients as one flat index space, so that zeroing them (fp32/fp64) or casting the
// fp32 workspace to them (half types) is one launch for all levels, not one per level.

template <typename T>
struct LevelSpans {
  T* data[kMaxLevels];       // contiguous [B, C, H_l, W_l]
  int64_t end[kMaxLevels];   // elements of levels 0..l
  int num_levels;
};

template <typename T>
LevelSpans<T> level_spans(const std::vector<at::Tensor>& levels) {
  LevelSpans<T> spans{};
  spans.num_levels = static_cast<int>(levels.size());
  int64_t end = 0;
  for (int l = 0; l < spans.num_levels; ++l) {
    spans.data[l] = levels[l].data_ptr<T>();
    spans.end[l] = end += levels[l].numel();
  }
  return spans;
}

// (level, offset in it) of flat index i < total (a handful of levels: a scan).
template <typename T>
__device__ __forceinline__ T* span_element(const LevelSpans<T>& spans, int64_t i) {
  int l = 0;
  while (l + 1 < spans.num_levels && i >= spans.end[l]) ++l;
  return spans.data[l] + (i - (l > 0 ? spans.end[l - 1] : 0));
}

template <typename T>
__global__ void zero_levels_kernel(LevelSpans<T> spans) {
  const int64_t total = spans.end[spans.num_levels - 1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x)
    *span_element(spans, i) = T(0);
}

template <typename T, typename acc_t>
__global__ void cast_levels_kernel(const acc_t* __restrict__ workspace, LevelSpans<T> spans) {
  const int64_t total = spans.end[spans.num_levels - 1];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x)
    *span_element(spans, i) = static_cast<T>(workspace[i]);
}

// --- deterministic backward ----------------------------------------------------------------------

// What the owner kernel needs of a RoI, computed once.
template <typename acc_t>
struct RoiFootprint {
  RoiGeometry<acc_t> g;
  int y_first, y_last, x_first, x_last;  // pixels touched on its level; first > last if none
};

// Bucket key (image * L + level) of every RoI, num_images * L for RoIs that touch nothing.
template <typename acc_t>
__global__ void footprint_kernel(const acc_t* __restrict__ rois,
                                 const int64_t* __restrict__ levels, int64_t K,
                                 int64_t num_images, GradTable<acc_t> gt, int ph, int pw,
                                 int sampling_ratio, bool aligned,
                                 RoiFootprint<acc_t>* __restrict__ fps, int64_t* __restrict__ keys) {
  // grid-stride: the grid is capped at kMaxGridBlocks
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < K;
       k += int64_t(blockDim.x) * gridDim.x) {
    const acc_t* roi = rois + 5 * k;
    const int64_t b = batch_of(roi, num_images);
    const int64_t l = level_of(levels, k, gt.num_levels);
    RoiFootprint<acc_t> fp{};
    fp.y_first = fp.x_first = 1;
    fp.y_last = fp.x_last = 0;
    int64_t key = num_images * gt.num_levels;
    if (b >= 0 && l >= 0) {
      fp.g = detail::roi_geometry<acc_t>(roi[1], roi[2], roi[3], roi[4],
                                         static_cast<acc_t>(gt.scale[l]), ph, pw, sampling_ratio,
                                         aligned);
      detail::axis_extent(fp.g.start_h, fp.g.bin_h, ph, fp.g.grid_h, gt.height[l], &fp.y_first,
                          &fp.y_last);
      detail::axis_extent(fp.g.start_w, fp.g.bin_w, pw, fp.g.grid_w, gt.width[l], &fp.x_first,
                          &fp.x_last);
      if (fp.y_first <= fp.y_last && fp.x_first <= fp.x_last) key = b * gt.num_levels + l;
    }
    fps[k] = fp;
    keys[k] = key;
  }
}

template <typename T>
struct OwnerOutput {
  T* data[kMaxLevels];  // [B, C, H_l, W_l], contiguous, every element written once
  int height[kMaxLevels], width[kMaxLevels], tiles_x[kMaxLevels];
  int64_t tile_start[kMaxLevels + 1];  // tiles of one image before level l
  int num_levels;
};

// Block (32 x 32 tile of a level of an image, group of CPB channels): the tile's gradients stay
// in registers over all the RoIs that touch it, in order, and are written once at the end.
// Dynamic shared memory: the RoI list (int64), then the tile steps' arrays.
template <typename T, typename acc_t, int CPB>
__global__ void __launch_bounds__(kThreads)
backward_owner_kernel(OwnerOutput<T> out, const RoiFootprint<acc_t>* __restrict__ fps,
                      const int64_t* __restrict__ order, const int64_t* __restrict__ bucket_start,
                      const T* __restrict__ grad, int64_t g0, int64_t g1, int64_t g2, int64_t g3,
                      int64_t C, int ph, int pw) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* list = reinterpret_cast<int64_t*>(smem_raw);
  const TileSmem<acc_t> s = tile_smem<acc_t>(smem_raw + sizeof(int64_t) * kThreads, CPB, ph, pw);
  __shared__ int warp_base[kWarps + 1];

  // which tile
  const int64_t per_image = out.tile_start[out.num_levels];
  const int64_t b = blockIdx.x / per_image;
  int64_t t = blockIdx.x % per_image;
  int l = 0;
  while (l + 1 < out.num_levels && out.tile_start[l + 1] <= t) ++l;
  t -= out.tile_start[l];
  const int H = out.height[l], W = out.width[l];
  const int y0 = static_cast<int>(t / out.tiles_x[l]) * kTile;
  const int x0 = static_cast<int>(t % out.tiles_x[l]) * kTile;
  const int th = min(kTile, H - y0), tw = min(kTile, W - x0);
  const int64_t c0 = int64_t(blockIdx.y) * CPB;
  const int nc = static_cast<int>(min(static_cast<int64_t>(CPB), C - c0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  acc_t acc[CPB][kTileRows];
  zero_rows(acc);
  const int64_t bucket = b * out.num_levels + l;
  const int64_t first = bucket_start[bucket], last = bucket_start[bucket + 1];
  for (int64_t base = first; base < last; base += kThreads) {
    // the RoIs of this chunk that touch the tile, compacted in order
    const int64_t i = base + threadIdx.x;
    int64_t k = -1;
    bool touches = false;
    if (i < last) {
      k = order[i];
      const RoiFootprint<acc_t>& fp = fps[k];
      touches = fp.y_first <= y0 + th - 1 && fp.y_last >= y0 && fp.x_first <= x0 + tw - 1 &&
                fp.x_last >= x0;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, touches);
    if (lane == 0) warp_base[warp + 1] = __popc(mask);
    __syncthreads();
    if (threadIdx.x == 0) {
      warp_base[0] = 0;
      for (int w = 0; w < kWarps; ++w) warp_base[w + 1] += warp_base[w];
    }
    __syncthreads();
    if (touches) list[warp_base[warp] + __popc(mask & ((1u << lane) - 1u))] = k;
    const int n = warp_base[kWarps];
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      const int64_t kk = list[j];
      const RoiGeometry<acc_t> g = fps[kk].g;
      tile_weights(s, g, ph, pw, H, W, y0, x0, th, tw);
      stage_upstream(s, grad, g0, g1, g2, g3, kk, c0, nc, ph, pw, g.count);
      __syncthreads();
      const bool reached = column_sums(s, nc, ph, pw);
      __syncthreads();
      if (reached) add_rows(s, nc, ph, acc);
      __syncthreads();  // the next RoI overwrites wy, wx, gs and t1
    }
  }
  // every element of the tile written once, RoIs or not
  if (lane < tw) {
    T* column = out.data[l] + (b * C + c0) * H * int64_t(W) + int64_t(y0) * W + x0 + lane;
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) {
      const int y = warp + kWarps * r;
      if (y < th) {
#pragma unroll
        for (int c = 0; c < CPB; ++c) {
          if (c < nc) column[(c * int64_t(H) + y) * W] = static_cast<T>(acc[c][r]);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> backward_owner_cuda(const at::Tensor& grad, const at::Tensor& rois_acc,
                                            const at::Tensor& levels64,
                                            const GradTable<acc_t>& gt, int64_t batch_size,
                                            int64_t channels, int ph, int pw,
                                            int64_t sampling_ratio, bool aligned) {
  const int L = gt.num_levels;
  const int64_t K = rois_acc.size(0);
  std::vector<at::Tensor> grads;
  OwnerOutput<scalar_t> out{};
  out.num_levels = L;
  out.tile_start[0] = 0;
  for (int l = 0; l < L; ++l) {
    grads.push_back(at::empty({batch_size, channels, gt.height[l], gt.width[l]}, grad.options()));
    out.data[l] = grads.back().data_ptr<scalar_t>();
    out.height[l] = gt.height[l];
    out.width[l] = gt.width[l];
    out.tiles_x[l] = (gt.width[l] + kTile - 1) / kTile;
    out.tile_start[l + 1] =
        out.tile_start[l] + int64_t(out.tiles_x[l]) * ((gt.height[l] + kTile - 1) / kTile);
  }
  const int64_t tiles = batch_size * out.tile_start[L];
  if (tiles == 0 || channels == 0) return grads;
  size_t smem = 0;
  const int cpb = channels_per_block<acc_t>(ph, pw, sizeof(int64_t) * kThreads, &smem);
  TORCH_CHECK(cpb > 0, "multilevel_roi_align: output size (", ph, ", ", pw,
              ") is too large for the deterministic CUDA backward");
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto long_opts = rois_acc.options().dtype(at::kLong);
  const int64_t buckets = batch_size * L;
  at::Tensor fps = at::empty({std::max<int64_t>(K, 1) * int64_t(sizeof(RoiFootprint<acc_t>))},
                             rois_acc.options().dtype(at::kByte));
  at::Tensor order, bucket_start;
  if (K > 0) {
    at::Tensor keys = at::empty({K}, long_opts);
    footprint_kernel<acc_t><<<blocks_for(K), kThreads, 0, stream>>>(
        rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K, batch_size, gt, ph, pw,
        static_cast<int>(sampling_ratio), aligned,
        reinterpret_cast<RoiFootprint<acc_t>*>(fps.data_ptr()), keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    order = at::argsort(keys, /*stable=*/true);  // RoIs of a bucket stay in ascending order
    bucket_start = at::searchsorted(keys.index_select(0, order), at::arange(buckets + 1, long_opts));
  } else {
    order = at::empty({1}, long_opts);
    bucket_start = at::zeros({buckets + 1}, long_opts);
  }
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>((channels + cpb - 1) / cpb));
  TORCH_CHECK(grid.y <= 65535, "multilevel_roi_align: too many channels (", channels, ")");
  const auto* footprints = reinterpret_cast<const RoiFootprint<acc_t>*>(fps.data_ptr());
  with_channels_per_block<acc_t>(cpb, [&](auto group) {
    constexpr int kGroup = decltype(group)::value;
    allow_dynamic_smem(backward_owner_kernel<scalar_t, acc_t, kGroup>, smem);
    backward_owner_kernel<scalar_t, acc_t, kGroup><<<grid, kThreads, smem, stream>>>(
        out, footprints, order.data_ptr<int64_t>(), bucket_start.data_ptr<int64_t>(),
        grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
        grad.stride(3), channels, ph, pw);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

at::Tensor multilevel_roi_align_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                             const at::Tensor& levels,
                                             at::ArrayRef<double> spatial_scales,
                                             int64_t pooled_height, int64_t pooled_width,
                                             int64_t sampling_ratio, bool aligned,
                                             bool /*deterministic*/) {
  check_multilevel_roi_align_args(features, rois, levels, spatial_scales, pooled_height,
                                  pooled_width);
  const at::Tensor& f0 = features[0];
  c10::cuda::CUDAGuard guard(f0.device());
  at::Tensor rois_acc, levels64;  // no structured binding: lambdas capture them (C++17)
  std::tie(rois_acc, levels64) = prepare_rois(rois, levels, f0.scalar_type());
  const int64_t K = rois.size(0), C = f0.size(1);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width},
                             f0.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(),
                                  "multilevel_roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LevelTable<scalar_t> lv{};
    lv.num_levels = static_cast<int>(features.size());
    for (int l = 0; l < lv.num_levels; ++l) {
      const at::Tensor& f = features[l];
      lv.data[l] = f.data_ptr<scalar_t>();
      lv.stride_b[l] = f.stride(0);
      lv.stride_c[l] = f.stride(1);
      lv.stride_h[l] = f.stride(2);
      lv.stride_w[l] = f.stride(3);
      lv.height[l] = static_cast<int>(f.size(2));
      lv.width[l] = static_cast<int>(f.size(3));
      lv.scale[l] = spatial_scales[l];
      lv.offsets32[l] = (f.size(2) - 1) * std::abs(f.stride(2)) +
                            (f.size(3) - 1) * std::abs(f.stride(3)) <= kMaxTapOffset;
    }
    const int cpb = forward_channels_per_block(K, C);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(K, kMaxGridBlocks)),
                    static_cast<unsigned>((C + cpb - 1) / cpb));
    TORCH_CHECK(grid.y <= 65535, "multilevel_roi_align: too many channels (", C, ")");
    forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        lv, rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K, C, f0.size(0),
        static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        static_cast<int>(sampling_ratio), aligned, cpb, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> multilevel_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, int64_t batch_size, int64_t channels,
    at::IntArrayRef heights, at::IntArrayRef widths, int64_t sampling_ratio, bool aligned,
    bool deterministic) {
  check_multilevel_roi_align_backward_args(grad, rois, levels, spatial_scales, batch_size,
                                           channels, heights, widths);
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor rois_acc, levels64;  // no structured binding: lambdas capture them (C++17)
  std::tie(rois_acc, levels64) = prepare_rois(rois, levels, grad.scalar_type());
  const int L = static_cast<int>(heights.size());
  const int64_t K = rois.size(0);
  const int ph = static_cast<int>(grad.size(2)), pw = static_cast<int>(grad.size(3));
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "multilevel_roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GradTable<acc_t> gt{};
    gt.num_levels = L;
    for (int l = 0; l < L; ++l) {
      gt.height[l] = static_cast<int>(heights[l]);
      gt.width[l] = static_cast<int>(widths[l]);
      gt.scale[l] = spatial_scales[l];
    }
    if (deterministic) {
      result = backward_owner_cuda<scalar_t, acc_t>(grad, rois_acc, levels64, gt, batch_size,
                                                    channels, ph, pw, sampling_ratio, aligned);
      return;
    }
    // the outputs; for the half types the atomics go to one zeroed fp32 workspace, cast at the end
    std::vector<at::Tensor> grads;
    for (int l = 0; l < L; ++l)
      grads.push_back(at::empty({batch_size, channels, heights[l], widths[l]}, grad.options()));
    constexpr bool widened = !std::is_same_v<acc_t, scalar_t>;
    int64_t total = 0;
    for (const auto& g : grads) total += g.numel();
    at::Tensor workspace;
    if constexpr (widened) {
      workspace = at::zeros({total}, grad.options().dtype(at::CppTypeToScalarType<acc_t>::value));
      int64_t start = 0;
      for (int l = 0; l < L; ++l) {
        gt.data[l] = workspace.data_ptr<acc_t>() + start;
        start += grads[l].numel();
      }
    } else {
      for (int l = 0; l < L; ++l) gt.data[l] = grads[l].data_ptr<acc_t>();
      if (total > 0) {
        zero_levels_kernel<acc_t><<<blocks_for(total), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
            level_spans<acc_t>(grads));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (grad.numel() > 0 && batch_size > 0) {
      size_t smem = 0;
      const int cpb = channels_per_block<acc_t>(ph, pw, 0, &smem);
      TORCH_CHECK(cpb > 0, "multilevel_roi_align: output size (", ph, ", ", pw,
                  ") is too large for the CUDA backward");
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(K, kMaxGridBlocks)),
                      static_cast<unsigned>((channels + cpb - 1) / cpb));
      TORCH_CHECK(grid.y <= 65535, "multilevel_roi_align: too many channels (", channels, ")");
      with_channels_per_block<acc_t>(cpb, [&](auto group) {
        constexpr int kGroup = decltype(group)::value;
        allow_dynamic_smem(backward_atomic_kernel<scalar_t, acc_t, kGroup>, smem);
        backward_atomic_kernel<scalar_t, acc_t, kGroup>
            <<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
            gt, grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
            grad.stride(3), rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K,
            channels, batch_size, ph, pw, static_cast<int>(sampling_ratio), aligned);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if constexpr (widened) {
      if (total > 0) {
        cast_levels_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0,
                                              at::cuda::getCurrentCUDAStream()>>>(
            workspace.data_ptr<acc_t>(), level_spans<scalar_t>(grads));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    result = std::move(grads);
  });
  return result;
}

}  // namespace
}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CUDA, m) {
  m.impl("multilevel_roi_align", &dsig::ops::multilevel_roi_align_forward_cuda);
  m.impl("_multilevel_roi_align_backward", &dsig::ops::multilevel_roi_align_backward_cuda);
}
