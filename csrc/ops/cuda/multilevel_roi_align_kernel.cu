// CUDA kernels of multi-level RoIAlign: every level in one launch, levels passed as a table.
// Forward: one thread per output element. Backward, two modes:
//   atomic        one thread per gradient element, atomicAdd of the bilinear taps (fast);
//   deterministic one block per (image, channel) that owns that channel of every level, visits
//                 the RoIs in order and adds each RoI's footprint gradient Wy^T (G/count) Wx,
//                 each pixel written by one thread: no atomics, bitwise reproducible.
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
constexpr int kTile = 64;  // footprint tile edge of the deterministic backward

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

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

template <typename T, typename acc_t>
__global__ void forward_kernel(LevelTable<T> lv, const acc_t* __restrict__ rois,
                               const int64_t* __restrict__ levels, int64_t K, int64_t C,
                               int64_t num_images, int ph, int pw, int sampling_ratio,
                               bool aligned, T* __restrict__ out) {
  const int64_t total = K * C * ph * pw;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const auto [k, c, y, x] = output_index(idx, C, ph, pw);
    const acc_t* roi = rois + 5 * k;
    const int64_t b = batch_of(roi, num_images);
    const int64_t l = level_of(levels, k, lv.num_levels);
    acc_t v = acc_t(0);
    if (b >= 0 && l >= 0) {
      const RoiGeometry<acc_t> g = detail::roi_geometry<acc_t>(
          roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(lv.scale[l]), ph, pw,
          sampling_ratio, aligned);
      const T* plane = lv.data[l] + b * lv.stride_b[l] + c * lv.stride_c[l];
      v = detail::pooled_bin<T, acc_t>(plane, lv.stride_h[l], lv.stride_w[l], lv.height[l],
                                       lv.width[l], g, y, x);
    }
    out[idx] = static_cast<T>(v);
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

template <typename T, typename acc_t>
__global__ void backward_deterministic_kernel(GradTable<acc_t> gt, const T* __restrict__ grad,
                                              int64_t g0, int64_t g1, int64_t g2, int64_t g3,
                                              const acc_t* __restrict__ rois,
                                              const int64_t* __restrict__ levels, int64_t K,
                                              int64_t C, int64_t num_images, int ph, int pw,
                                              int sampling_ratio, bool aligned) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* wy = reinterpret_cast<acc_t*>(smem_raw);  // [ph][kTile]
  acc_t* wx = wy + ph * kTile;                     // [pw][kTile]
  acc_t* t1 = wx + pw * kTile;                     // [ph][kTile]
  const int64_t b = blockIdx.x / C;
  const int64_t c = blockIdx.x % C;
  for (int64_t k = 0; k < K; ++k) {  // every branch below is uniform across the block
    const acc_t* roi = rois + 5 * k;
    if (batch_of(roi, num_images) != b) continue;
    const int64_t l = level_of(levels, k, gt.num_levels);
    if (l < 0) continue;
    const int H = gt.height[l], W = gt.width[l];
    const RoiGeometry<acc_t> g = detail::roi_geometry<acc_t>(
        roi[1], roi[2], roi[3], roi[4], static_cast<acc_t>(gt.scale[l]), ph, pw, sampling_ratio,
        aligned);
    int y_first, y_last, x_first, x_last;
    detail::axis_extent(g.start_h, g.bin_h, ph, g.grid_h, H, &y_first, &y_last);
    detail::axis_extent(g.start_w, g.bin_w, pw, g.grid_w, W, &x_first, &x_last);
    if (y_first > y_last || x_first > x_last) continue;
    acc_t* plane = gt.data[l] + (b * C + c) * H * W;
    const T* gk = grad + k * g0 + c * g1;
    const acc_t inv_count = acc_t(1) / g.count;
    for (int ty0 = y_first; ty0 <= y_last; ty0 += kTile) {
      const int th = min(kTile, y_last - ty0 + 1);
      for (int tx0 = x_first; tx0 <= x_last; tx0 += kTile) {
        const int tw = min(kTile, x_last - tx0 + 1);
        for (int i = threadIdx.x; i < ph * th; i += blockDim.x) {
          const int p = i / th, y = i % th;
          wy[p * kTile + y] =
              detail::axis_pixel_weight(g.start_h, g.bin_h, p, g.grid_h, H, ty0 + y);
        }
        for (int i = threadIdx.x; i < pw * tw; i += blockDim.x) {
          const int q = i / tw, x = i % tw;
          wx[q * kTile + x] =
              detail::axis_pixel_weight(g.start_w, g.bin_w, q, g.grid_w, W, tx0 + x);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < ph * tw; i += blockDim.x) {
          const int p = i / tw, x = i % tw;
          acc_t s = acc_t(0);
          for (int q = 0; q < pw; ++q)
            s += static_cast<acc_t>(gk[p * g2 + q * g3]) * inv_count * wx[q * kTile + x];
          t1[p * kTile + x] = s;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < th * tw; i += blockDim.x) {
          const int y = i / tw, x = i % tw;
          acc_t s = acc_t(0);
          for (int p = 0; p < ph; ++p) s += wy[p * kTile + y] * t1[p * kTile + x];
          plane[int64_t(ty0 + y) * W + tx0 + x] += s;
        }
        __syncthreads();
      }
    }
  }
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
    forward_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        lv, rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K, C, f0.size(0),
        static_cast<int>(pooled_height), static_cast<int>(pooled_width),
        static_cast<int>(sampling_ratio), aligned, out.data_ptr<scalar_t>());
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
  std::vector<at::Tensor> acc_grads =
      zero_level_grads(grad, batch_size, channels, heights, widths);
  const int64_t K = rois.size(0);
  const int ph = static_cast<int>(grad.size(2)), pw = static_cast<int>(grad.size(3));
  if (grad.numel() > 0 && batch_size > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "multilevel_roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GradTable<acc_t> gt{};
      gt.num_levels = L;
      for (int l = 0; l < L; ++l) {
        gt.data[l] = acc_grads[l].data_ptr<acc_t>();
        gt.height[l] = static_cast<int>(heights[l]);
        gt.width[l] = static_cast<int>(widths[l]);
        gt.scale[l] = spatial_scales[l];
      }
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      if (deterministic) {
        const size_t smem = sizeof(acc_t) * kTile * (2 * ph + pw);
        TORCH_CHECK(smem <= 48 * 1024, "multilevel_roi_align: output size (", ph, ", ", pw,
                    ") is too large for the deterministic CUDA backward");
        backward_deterministic_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned>(batch_size * channels), kThreads, smem, stream>>>(
                gt, gp, grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
                rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K, channels,
                batch_size, ph, pw, static_cast<int>(sampling_ratio), aligned);
      } else {
        backward_atomic_kernel<scalar_t, acc_t><<<blocks_for(grad.numel()), kThreads, 0, stream>>>(
            gt, gp, grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
            rois_acc.data_ptr<acc_t>(), levels64.data_ptr<int64_t>(), K, channels, batch_size,
            ph, pw, static_cast<int>(sampling_ratio), aligned);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return cast_level_grads(std::move(acc_grads), grad.scalar_type());
}

}  // namespace
}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CUDA, m) {
  m.impl("multilevel_roi_align", &dsig::ops::multilevel_roi_align_forward_cuda);
  m.impl("_multilevel_roi_align_backward", &dsig::ops::multilevel_roi_align_backward_cuda);
}
