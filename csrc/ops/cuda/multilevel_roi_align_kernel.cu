// CUDA kernels of multi-level RoIAlign: every level in one launch, levels passed as a table.
// Forward: one block per (RoI, channel group); the RoI's sample taps are computed once into
// shared memory and every output sums its samples in torchvision's order. Backward, two modes:
//   atomic        one thread per gradient element, atomicAdd of the bilinear taps into an fp32
//                 (fp64) buffer, cast to the features' dtype;
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

// Position (k, c, y, x) of flat output index idx of a [K, C, ph, pw] tensor.
struct OutputIndex {
  int64_t k, c;
  int y, x;
};

__device__ __forceinline__ OutputIndex output_index(int64_t idx, int64_t C, int ph, int pw) {
  OutputIndex o;
  o.x = idx % pw;
  o.y = (idx / pw) % ph;
  o.c = (idx / (pw * ph)) % C;
  o.k = idx / (int64_t(pw) * ph * C);
  return o;
}

// Blocks of a grid-stride launch over n items (kernels that use it must loop).
inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxGridBlocks));
}

// Samples per axis whose taps a forward block keeps in shared memory (7 bins x 36 samples).
// Any RoI on its FPN level needs far fewer; a RoI needing more pools with taps computed in place.
constexpr int kTapTable = 256;

// Channels per forward block: 32 (the RoI's taps reused over more channels), fewer when the
// grid would leave a GPU's SMs idle (~4 blocks on each of an H100's 132).
int forward_channels_per_block(int64_t K, int64_t C) {
  constexpr int64_t kMinBlocks = 4 * 132;
  int cpb = 32;
  while (cpb > 4 && K * ((C + cpb - 1) / cpb) < kMinBlocks) cpb /= 2;
  return static_cast<int>(std::min<int64_t>(cpb, std::max<int64_t>(C, 1)));
}

// One block per (RoI, group of cpb channels), grid-stride over RoIs. The RoI's geometry and
// the taps of its samples along y and x (lo, hi, weights, valid: torchvision's values) are
// computed once into shared memory and reused by all its outputs, which sum their samples'
// taps in torchvision's order. Threads walk the outputs along x (NCHW) or along channels
// (channels-last), the direction in which neighbouring threads read neighbouring pixels.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(LevelTable<T> lv, const acc_t* __restrict__ rois,
               const int64_t* __restrict__ levels, int64_t K, int64_t C, int64_t num_images,
               int ph, int pw, int sampling_ratio, bool aligned, int cpb,
               T* __restrict__ out) {
  __shared__ detail::AxisTap<acc_t> ytaps[kTapTable];
  __shared__ detail::AxisTap<acc_t> xtaps[kTapTable];
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
    const bool tabled = ny <= kTapTable && nx <= kTapTable;
    __syncthreads();  // the previous RoI's outputs have read its tables
    if (tabled) {
      for (int i = threadIdx.x; i < ny + nx; i += blockDim.x) {
        if (i < ny) {
          ytaps[i] = detail::axis_tap(
              detail::sample_coord(g.start_h, g.bin_h, i / g.grid_h, i % g.grid_h, g.grid_h), H);
        } else {
          const int j = i - ny;
          xtaps[j] = detail::axis_tap(
              detail::sample_coord(g.start_w, g.bin_w, j / g.grid_w, j % g.grid_w, g.grid_w), W);
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
        acc_t sum = acc_t(0);
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const detail::AxisTap<acc_t> ty = ytaps[p * g.grid_h + iy];
          if (!ty.valid) continue;
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const detail::AxisTap<acc_t> tx = xtaps[q * g.grid_w + ix];
            if (!tx.valid) continue;
            sum += detail::bilinear(plane, lv.stride_h[l], lv.stride_w[l], ty, tx);
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

template <typename T, typename acc_t>
__global__ void backward_atomic_kernel(GradTable<acc_t> gt, const T* __restrict__ grad,
                                       int64_t g0, int64_t g1, int64_t g2, int64_t g3,
                                       const acc_t* __restrict__ rois,
                                       const int64_t* __restrict__ levels, int64_t K, int64_t C,
                                       int64_t num_images, int ph, int pw, int sampling_ratio,
                                       bool aligned) {
  const int64_t total = K * C * ph * pw;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const auto [k, c, y, x] = output_index(idx, C, ph, pw);
    const acc_t* roi = rois + 5 * k;
    const int64_t b = batch_of(roi, num_images);
    const int64_t l = level_of(levels, k, gt.num_levels);
    if (b < 0 || l < 0) continue;
    const acc_t gv = static_cast<acc_t>(grad[k * g0 + c * g1 + y * g2 + x * g3]);
    if (gv == acc_t(0)) continue;
    const RoiGeometry<acc_t> g = detail::roi_geometry<acc_t>(
        roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(gt.scale[l]), ph, pw, sampling_ratio,
        aligned);
    const int H = gt.height[l], W = gt.width[l];
    acc_t* plane = gt.data[l] + (b * C + c) * H * W;
    const acc_t gc = gv / g.count;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const auto ty = detail::axis_tap(detail::sample_coord(g.start_h, g.bin_h, y, iy, g.grid_h), H);
      if (!ty.valid) continue;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const auto tx =
            detail::axis_tap(detail::sample_coord(g.start_w, g.bin_w, x, ix, g.grid_w), W);
        if (!tx.valid) continue;
        const acc_t w1 = ty.w_lo * tx.w_lo, w2 = ty.w_lo * tx.w_hi, w3 = ty.w_hi * tx.w_lo,
                    w4 = ty.w_hi * tx.w_hi;
        if (w1 != acc_t(0)) atomicAdd(plane + int64_t(ty.lo) * W + tx.lo, gc * w1);
        if (w2 != acc_t(0)) atomicAdd(plane + int64_t(ty.lo) * W + tx.hi, gc * w2);
        if (w3 != acc_t(0)) atomicAdd(plane + int64_t(ty.hi) * W + tx.lo, gc * w3);
        if (w4 != acc_t(0)) atomicAdd(plane + int64_t(ty.hi) * W + tx.hi, gc * w4);
      }
    }
  }
}

// --- deterministic backward ----------------------------------------------------------------------

constexpr int kOwnerTile = 32;  // tile edge in pixels
constexpr int kWarps = kThreads / 32;

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

constexpr int kOwnerRows = kOwnerTile / kWarps;  // tile rows each thread accumulates

// Channels of an owner block, accumulated in registers: kOwnerRows x CPB values per thread.
template <typename acc_t>
constexpr int owner_wide_channels() {
  return sizeof(acc_t) > 4 ? 8 : 16;
}

// Dynamic shared memory of an owner block: the RoI list (int64), then wy [ph][32], wx [pw][32],
// gs [cpb][ph][pw] and t1 [cpb][ph][32] (acc_t).
template <typename acc_t>
size_t owner_smem_bytes(int cpb, int ph, int pw) {
  return sizeof(int64_t) * kThreads +
         sizeof(acc_t) * (size_t(ph + pw) * kOwnerTile + size_t(cpb) * ph * pw +
                          size_t(cpb) * ph * kOwnerTile);
}

// First and last of `bins` weights w[p][pix] (row stride kOwnerTile) that are not zero; first >
// last if none. Only those bins' samples reach pixel pix.
template <typename acc_t>
__device__ __forceinline__ void reaching_bins(const acc_t* w, int bins, int pix, int* first,
                                              int* last) {
  *first = bins;
  *last = -1;
  for (int p = 0; p < bins; ++p) {
    if (w[p * kOwnerTile + pix] != acc_t(0)) {
      if (*first == bins) *first = p;
      *last = p;
    }
  }
}

// Block (32 x 32 tile of a level of an image, group of CPB channels). Thread (lane, warp) owns
// tile column x = lane and rows warp + 8 r: their gradients of every channel of the group stay in
// registers over all RoIs and are written once at the end. Per RoI touching the tile:
//   1. the weights of each bin on the tile's rows (wy) and columns (wx), one thread per bin
//      adding its samples in order, and the upstream gradient of the group / count (gs);
//   2. t1[c][p][x] = sum over the bins q reaching column x of gs[c][p][q] wx[q][x];
//   3. each owned pixel += sum over the bins p reaching its row of wy[p][y] t1[c][p][x].
// Sums run over bins in ascending order and skip zero weights and gradients: the arithmetic of
// the CPU default, so a non-finite gradient stays on the pixels its bin's samples touch.
template <typename T, typename acc_t, int CPB>
__global__ void __launch_bounds__(kThreads)
backward_owner_kernel(OwnerOutput<T> out, const RoiFootprint<acc_t>* __restrict__ fps,
                      const int64_t* __restrict__ order, const int64_t* __restrict__ bucket_start,
                      const T* __restrict__ grad, int64_t g0, int64_t g1, int64_t g2, int64_t g3,
                      int64_t C, int ph, int pw) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int E = kOwnerTile;
  int64_t* list = reinterpret_cast<int64_t*>(smem_raw);
  acc_t* wy = reinterpret_cast<acc_t*>(list + kThreads);
  acc_t* wx = wy + ph * E;
  acc_t* gs = wx + pw * E;
  acc_t* t1 = gs + CPB * ph * pw;
  __shared__ int warp_base[kWarps + 1];

  // which tile
  const int64_t per_image = out.tile_start[out.num_levels];
  const int64_t b = blockIdx.x / per_image;
  int64_t t = blockIdx.x % per_image;
  int l = 0;
  while (l + 1 < out.num_levels && out.tile_start[l + 1] <= t) ++l;
  t -= out.tile_start[l];
  const int H = out.height[l], W = out.width[l];
  const int y0 = static_cast<int>(t / out.tiles_x[l]) * E;
  const int x0 = static_cast<int>(t % out.tiles_x[l]) * E;
  const int th = min(E, H - y0), tw = min(E, W - x0);
  const int64_t c0 = int64_t(blockIdx.y) * CPB;
  const int nc = static_cast<int>(min(static_cast<int64_t>(CPB), C - c0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  acc_t acc[CPB][kOwnerRows];
#pragma unroll
  for (int c = 0; c < CPB; ++c) {
#pragma unroll
    for (int r = 0; r < kOwnerRows; ++r) acc[c][r] = acc_t(0);
  }
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
      // 1. the weights of every bin on the tile (a thread per bin and axis), gs
      for (int e = threadIdx.x; e < ph + pw; e += kThreads) {
        const bool along_y = e < ph;
        acc_t* w = along_y ? wy + e * E : wx + (e - ph) * E;
        for (int x = 0; x < E; ++x) w[x] = acc_t(0);
        if (along_y) {
          detail::add_axis_weights(g.start_h, g.bin_h, e, g.grid_h, H, y0, th, w);
        } else {
          detail::add_axis_weights(g.start_w, g.bin_w, e - ph, g.grid_w, W, x0, tw, w);
        }
      }
      const acc_t inv_count = acc_t(1) / g.count;
      for (int e = threadIdx.x; e < nc * ph * pw; e += kThreads) {  // e = (c * ph + p) * pw + q
        const int c = e / (ph * pw), p = (e / pw) % ph, q = e % pw;
        gs[e] = static_cast<acc_t>(grad[kk * g0 + (c0 + c) * g1 + p * g2 + q * g3]) * inv_count;
      }
      __syncthreads();
      // 2. t1 over the bins reaching this thread's column
      int q_first, q_last;
      reaching_bins(wx, pw, lane, &q_first, &q_last);
      for (int cp = warp; cp < nc * ph; cp += kWarps) {
        const acc_t* gcp = gs + cp * pw;
        acc_t v = acc_t(0);
        for (int q = q_first; q <= q_last; ++q) {
          const acc_t w = wx[q * E + lane], gv = gcp[q];
          if (w != acc_t(0) && gv != acc_t(0)) v += gv * w;
        }
        t1[cp * E + lane] = v;
      }
      __syncthreads();
      // 3. the owned pixels, over the bins reaching their rows (a column that no bin reaches
      //    takes nothing)
      if (q_first <= q_last) {
#pragma unroll
        for (int r = 0; r < kOwnerRows; ++r) {
          const int y = warp + kWarps * r;
          int p_first, p_last;
          reaching_bins(wy, ph, y, &p_first, &p_last);
#pragma unroll
          for (int c = 0; c < CPB; ++c) {
            if (c < nc) {
              acc_t v = acc[c][r];
              for (int p = p_first; p <= p_last; ++p) {
                const acc_t w = wy[p * E + y];
                if (w != acc_t(0)) v += w * t1[(c * ph + p) * E + lane];
              }
              acc[c][r] = v;
            }
          }
        }
      }
      __syncthreads();  // the next RoI overwrites wy, wx, gs and t1
    }
  }
  // every element of the tile written once, RoIs or not
  if (lane < tw) {
    T* column = out.data[l] + (b * C + c0) * H * int64_t(W) + int64_t(y0) * W + x0 + lane;
#pragma unroll
    for (int r = 0; r < kOwnerRows; ++r) {
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
    out.tiles_x[l] = (gt.width[l] + kOwnerTile - 1) / kOwnerTile;
    out.tile_start[l + 1] =
        out.tile_start[l] + int64_t(out.tiles_x[l]) * ((gt.height[l] + kOwnerTile - 1) / kOwnerTile);
  }
  const int64_t tiles = batch_size * out.tile_start[L];
  if (tiles == 0 || channels == 0) return grads;
  // the widest channel group whose shared memory fits the 48 KB a launch gets without opting in
  constexpr int kWide = owner_wide_channels<acc_t>();
  const size_t kSmemLimit = 46 * 1024;  // less the kernel's static part
  const bool wide = owner_smem_bytes<acc_t>(kWide, ph, pw) <= kSmemLimit;
  const int cpb = wide ? kWide : 1;
  const size_t smem = owner_smem_bytes<acc_t>(cpb, ph, pw);
  TORCH_CHECK(smem <= kSmemLimit, "multilevel_roi_align: output size (", ph, ", ", pw,
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
  if (wide) {
    backward_owner_kernel<scalar_t, acc_t, kWide><<<grid, kThreads, smem, stream>>>(
        out, footprints, order.data_ptr<int64_t>(), bucket_start.data_ptr<int64_t>(),
        grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
        grad.stride(3), channels, ph, pw);
  } else {
    backward_owner_kernel<scalar_t, acc_t, 1><<<grid, kThreads, smem, stream>>>(
        out, footprints, order.data_ptr<int64_t>(), bucket_start.data_ptr<int64_t>(),
        grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
        grad.stride(3), channels, ph, pw);
  }
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
    std::vector<at::Tensor> acc_grads =
        zero_level_grads(grad, batch_size, channels, heights, widths);
    if (grad.numel() > 0 && batch_size > 0) {
      for (int l = 0; l < L; ++l) gt.data[l] = acc_grads[l].data_ptr<acc_t>();
      backward_atomic_kernel<scalar_t, acc_t>
          <<<blocks_for(grad.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              gt, grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2),
              grad.stride(3), rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K,
              channels, batch_size, ph, pw, static_cast<int>(sampling_ratio), aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    result = cast_level_grads(std::move(acc_grads), grad.scalar_type());
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
