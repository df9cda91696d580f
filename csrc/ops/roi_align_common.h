// Per-element math of multi-level RoIAlign, shared by the CPU and CUDA kernels.
// Semantics follow torchvision's roi_align (geometry, sampling grid, border rule, term order);
// invalid samples are skipped with a branch so non-finite pixels elsewhere cannot leak in.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSIG_HD __host__ __device__ __forceinline__
#else
#define DSIG_HD inline
#endif

namespace dsig {
namespace detail {

// Largest sampling grid per bin axis; only reached by absurd boxes, keeps every loop bounded.
constexpr int kMaxGrid = 1 << 14;

template <typename acc_t>
struct RoiGeometry {
  acc_t start_h, start_w;  // top-left corner in level coordinates
  acc_t bin_h, bin_w;      // bin size
  int grid_h, grid_w;      // samples per bin along each axis
  acc_t count;             // samples per bin (>= 1), the averaging divisor
};

DSIG_HD float ceil_of(float v) { return ceilf(v); }
DSIG_HD double ceil_of(double v) { return ::ceil(v); }

template <typename acc_t>
DSIG_HD int sampling_grid(acc_t roi_size, int pooled, int sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  const acc_t g = ceil_of(roi_size / static_cast<acc_t>(pooled));
  if (!(g >= acc_t(1))) return 0;  // empty, negative or NaN extent: no samples
  return g < acc_t(kMaxGrid) ? static_cast<int>(g) : kMaxGrid;
}

// v * scale - offset, rounded as torchvision rounds it on each device (see sample_coord).
template <typename acc_t>
DSIG_HD acc_t scaled_coord(acc_t v, acc_t scale, acc_t offset) {
#if defined(__CUDA_ARCH__)
  return fma(v, scale, -offset);
#else
  return v * scale - offset;
#endif
}

// Box (x1, y1, x2, y2) in image coordinates -> bins and sampling grid on a level of `scale`.
template <typename acc_t>
DSIG_HD RoiGeometry<acc_t> roi_geometry(acc_t x1, acc_t y1, acc_t x2, acc_t y2, acc_t scale,
                                        int pooled_h, int pooled_w, int sampling_ratio,
                                        bool aligned) {
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  RoiGeometry<acc_t> g;
  g.start_w = scaled_coord(x1, scale, offset);
  g.start_h = scaled_coord(y1, scale, offset);
  const acc_t end_w = scaled_coord(x2, scale, offset);
  const acc_t end_h = scaled_coord(y2, scale, offset);
  acc_t roi_w = end_w - g.start_w;
  acc_t roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy RoIAlign forces malformed boxes to 1x1
    roi_w = roi_w > acc_t(1) ? roi_w : acc_t(1);
    roi_h = roi_h > acc_t(1) ? roi_h : acc_t(1);
  }
  g.bin_h = roi_h / static_cast<acc_t>(pooled_h);
  g.bin_w = roi_w / static_cast<acc_t>(pooled_w);
  g.grid_h = sampling_grid(roi_h, pooled_h, sampling_ratio);
  g.grid_w = sampling_grid(roi_w, pooled_w, sampling_ratio);
  const int64_t n = static_cast<int64_t>(g.grid_h) * g.grid_w;
  g.count = static_cast<acc_t>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i of bin p (same operation order as torchvision). Rounding follows
// torchvision on each device: its CUDA kernel is built with nvcc's default -fmad=true, which
// contracts start + p * bin into one FMA, so the GPU path writes that FMA out (independent of
// compiler flags) and matches torchvision's and detectron2's GPU results; the CPU path rounds
// the product and the sum separately, as torchvision's CPU kernel does (bitwise parity there).
// float32 GPU and CPU results may therefore differ by the effect of 1 ulp in a coordinate.
template <typename acc_t>
DSIG_HD acc_t sample_coord(acc_t start, acc_t bin, int p, int i, int grid) {
#if defined(__CUDA_ARCH__)
  return fma(static_cast<acc_t>(p), bin, start) +
         static_cast<acc_t>(i + .5f) * bin / static_cast<acc_t>(grid);
#else
  return start + static_cast<acc_t>(p) * bin +
         static_cast<acc_t>(i + .5f) * bin / static_cast<acc_t>(grid);
#endif
}

// Linear interpolation taps of one coordinate along one axis of length `size`.
template <typename acc_t>
struct AxisTap {
  int lo, hi;
  acc_t w_lo, w_hi;
  bool valid;
};

template <typename acc_t>
DSIG_HD AxisTap<acc_t> axis_tap(acc_t v, int size) {
  AxisTap<acc_t> t;
  // negated form: NaN coordinates are invalid too
  if (size <= 0 || !(v >= acc_t(-1) && v <= static_cast<acc_t>(size))) {
    t.lo = t.hi = 0;
    t.w_lo = t.w_hi = acc_t(0);
    t.valid = false;
    return t;
  }
  if (v <= acc_t(0)) v = acc_t(0);
  t.lo = static_cast<int>(v);
  if (t.lo >= size - 1) {
    t.lo = t.hi = size - 1;
    v = static_cast<acc_t>(t.lo);
  } else {
    t.hi = t.lo + 1;
  }
  t.w_hi = v - static_cast<acc_t>(t.lo);
  t.w_lo = acc_t(1) - t.w_hi;
  t.valid = true;
  return t;
}

// Bilinear value from the plane offsets of two rows and two columns and their weights, in
// torchvision's term order.
template <typename T, typename acc_t, typename index_t>
DSIG_HD acc_t bilinear_at(const T* plane, index_t y_lo, index_t y_hi, index_t x_lo, index_t x_hi,
                          acc_t wy_lo, acc_t wy_hi, acc_t wx_lo, acc_t wx_hi) {
  const acc_t v1 = static_cast<acc_t>(plane[y_lo + x_lo]);
  const acc_t v2 = static_cast<acc_t>(plane[y_lo + x_hi]);
  const acc_t v3 = static_cast<acc_t>(plane[y_hi + x_lo]);
  const acc_t v4 = static_cast<acc_t>(plane[y_hi + x_hi]);
  return wy_lo * wx_lo * v1 + wy_lo * wx_hi * v2 + wy_hi * wx_lo * v3 + wy_hi * wx_hi * v4;
}

// Bilinear value at taps (ty, tx) of a plane with strides (sh, sw).
template <typename T, typename acc_t>
DSIG_HD acc_t bilinear(const T* plane, int64_t sh, int64_t sw, const AxisTap<acc_t>& ty,
                       const AxisTap<acc_t>& tx) {
  return bilinear_at(plane, ty.lo * sh, ty.hi * sh, tx.lo * sw, tx.hi * sw, ty.w_lo, ty.w_hi,
                     tx.w_lo, tx.w_hi);
}

// One output bin (ph, pw): mean of the bilinear samples of its grid.
template <typename T, typename acc_t>
DSIG_HD acc_t pooled_bin(const T* plane, int64_t sh, int64_t sw, int height, int width,
                         const RoiGeometry<acc_t>& g, int ph, int pw) {
  acc_t sum = acc_t(0);
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const AxisTap<acc_t> ty = axis_tap(sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), height);
    if (!ty.valid) continue;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const AxisTap<acc_t> tx =
          axis_tap(sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), width);
      if (!tx.valid) continue;
      sum += bilinear(plane, sh, sw, ty, tx);
    }
  }
  return sum / g.count;
}

// Weights that the samples of bin p give the pixels [origin, origin + extent) along one axis,
// added into w (zeroed by the caller) sample by sample, the low tap before the high one. The
// bilinear weights are separable, so a RoI's input gradient on its footprint is
// Wy^T (G / count) Wx with Wy[p] the weights of bin p along y: this gathers instead of scattering.
template <typename acc_t>
DSIG_HD void add_axis_weights(acc_t start, acc_t bin, int p, int grid, int size, int origin,
                              int extent, acc_t* w) {
  for (int i = 0; i < grid; ++i) {
    const AxisTap<acc_t> t = axis_tap(sample_coord(start, bin, p, i, grid), size);
    if (!t.valid) continue;
    const int lo = t.lo - origin, hi = t.hi - origin;
    if (lo >= 0 && lo < extent) w[lo] += t.w_lo;
    if (hi >= 0 && hi < extent) w[hi] += t.w_hi;
  }
}

// Pixel range [first, last] touched along one axis by all samples of a RoI; first > last if none.
template <typename acc_t>
DSIG_HD void axis_extent(acc_t start, acc_t bin, int pooled, int grid, int size, int* first,
                         int* last) {
  *first = size;
  *last = -1;
  for (int p = 0; p < pooled; ++p) {
    for (int i = 0; i < grid; ++i) {
      const AxisTap<acc_t> t = axis_tap(sample_coord(start, bin, p, i, grid), size);
      if (!t.valid) continue;
      if (t.lo < *first) *first = t.lo;
      if (t.hi > *last) *last = t.hi;
    }
  }
}

}  // namespace detail
}  // namespace dsig
