// CPU kernels of multi-level RoIAlign. The bilinear weights are separable: a RoI's bins are
// Wy V Wx^T / count over its footprint V, with Wy [ph][fh] and Wx [pw][fw] (footprint_of).
// Forward: parallel over RoIs.
//   default        per RoI the cheaper of: separable, rows of V weighted per output row, then
//                  per column, over the pixels each bin touches (dense adaptive grids: ~1.8x
//                  faster at DSIG's 1024 RoIs); or the per-sample taps below (sparse grids);
//   deterministic  torchvision's order: a table of each RoI's valid samples (four tap offsets
//                  and weights) built once and reused for every channel, as torchvision does.
// Backward: parallel over channels, each thread owning its channels of every level and visiting
// the RoIs in order, so on the CPU both modes are deterministic for any thread count:
//   default        each RoI's footprint gradient Wy^T (G/count) Wx, formed row by row (gather):
//                  the algorithm of the CUDA deterministic kernel, and 2-3x faster here;
//   deterministic  additionally torchvision's summation order: each sample's four taps scattered
//                  as torchvision does, so float32 and float64 outputs and gradients are bitwise
//                  equal to detectron2's per-level ROIPooler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../multilevel_roi_align.h"
#include "../roi_align_common.h"

namespace dsig {
namespace ops {
namespace {

using detail::AxisTap;
using detail::RoiGeometry;

// Items per parallel chunk so that a chunk holds about at::internal::GRAIN_SIZE elementary
// steps: tiny problems stay on the calling thread (a parallel region opened for microseconds of
// work can wait milliseconds for a descheduled thread on a busy machine).
int64_t grain_for(int64_t steps_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, steps_per_item));
}

constexpr int64_t kTapsPerBin = 4;  // at least one bilinear sample of four taps per bin

template <typename acc_t>
RoiGeometry<acc_t> geometry_of(const acc_t* roi, const std::vector<double>& scales, int64_t level,
                               int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  return detail::roi_geometry<acc_t>(roi[1], roi[2], roi[3], roi[4],
                                     static_cast<acc_t>(scales[level]), static_cast<int>(ph),
                                     static_cast<int>(pw), static_cast<int>(sampling_ratio),
                                     aligned);
}

// Taps of every sample along one axis, [pooled][grid].
template <typename acc_t>
void axis_taps(acc_t start, acc_t bin, int64_t pooled, int grid, int size,
               std::vector<AxisTap<acc_t>>& taps) {
  taps.resize(pooled * grid);
  for (int p = 0; p < pooled; ++p)
    for (int i = 0; i < grid; ++i)
      taps[p * grid + i] = detail::axis_tap(detail::sample_coord(start, bin, p, i, grid), size);
}

// One valid bilinear sample: plane offsets and weights of its taps (lo,lo) (lo,hi) (hi,lo) (hi,hi).
template <typename acc_t>
struct Sample {
  int64_t o1, o2, o3, o4;
  acc_t w1, w2, w3, w4;
};

// The valid samples of every bin of a RoI; bin (p, q) owns samples [start[b], start[b + 1]).
template <typename acc_t>
struct SampleTable {
  acc_t count = acc_t(1);
  std::vector<Sample<acc_t>> samples;
  std::vector<int64_t> start;

  void build(const RoiGeometry<acc_t>& g, int H, int W, int64_t sh, int64_t sw, int64_t ph,
             int64_t pw, std::vector<AxisTap<acc_t>>& ytaps, std::vector<AxisTap<acc_t>>& xtaps) {
    count = g.count;
    axis_taps(g.start_h, g.bin_h, ph, g.grid_h, H, ytaps);
    axis_taps(g.start_w, g.bin_w, pw, g.grid_w, W, xtaps);
    samples.clear();
    start.assign(1, 0);
    for (int p = 0; p < ph; ++p) {
      for (int q = 0; q < pw; ++q) {
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const AxisTap<acc_t>& ty = ytaps[p * g.grid_h + iy];
          if (!ty.valid) continue;
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const AxisTap<acc_t>& tx = xtaps[q * g.grid_w + ix];
            if (!tx.valid) continue;
            // weights as torchvision forms them: w1 = hy * hx, ...
            samples.push_back({ty.lo * sh + tx.lo * sw, ty.lo * sh + tx.hi * sw,
                               ty.hi * sh + tx.lo * sw, ty.hi * sh + tx.hi * sw,
                               ty.w_lo * tx.w_lo, ty.w_lo * tx.w_hi, ty.w_hi * tx.w_lo,
                               ty.w_hi * tx.w_hi});
          }
        }
        start.push_back(static_cast<int64_t>(samples.size()));
      }
    }
  }
};

// One RoI in torchvision's order: per channel and bin, the sum over the bin's samples of their
// four weighted taps, divided by the sample count.
template <typename scalar_t, typename acc_t>
void pool_roi_by_samples(const SampleTable<acc_t>& table, const scalar_t* base, int64_t sc,
                         int64_t C, int64_t bins, scalar_t* o) {
  const Sample<acc_t>* smp = table.samples.data();
  const int64_t* start = table.start.data();
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* v = base + c * sc;
    for (int64_t bin = 0; bin < bins; ++bin) {
      acc_t sum = acc_t(0);
      for (int64_t i = start[bin]; i < start[bin + 1]; ++i) {
        const Sample<acc_t>& s = smp[i];
        sum += s.w1 * static_cast<acc_t>(v[s.o1]) + s.w2 * static_cast<acc_t>(v[s.o2]) +
               s.w3 * static_cast<acc_t>(v[s.o3]) + s.w4 * static_cast<acc_t>(v[s.o4]);
      }
      o[c * bins + bin] = static_cast<scalar_t>(sum / table.count);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_scatter_impl(const at::Tensor& grad, const at::Tensor& rois,
                           const at::Tensor& levels, const std::vector<double>& scales,
                           int64_t C, at::IntArrayRef heights, at::IntArrayRef widths,
                           int64_t sampling_ratio, bool aligned,
                           std::vector<at::Tensor>& acc_grads) {
  const int64_t K = rois.size(0);
  const int64_t ph = grad.size(2), pw = grad.size(3);
  const acc_t* roi_data = rois.data_ptr<acc_t>();
  const int64_t* lvl = levels.data_ptr<int64_t>();
  const scalar_t* gdata = grad.data_ptr<scalar_t>();
  const int64_t g0 = grad.stride(0), g1 = grad.stride(1), g2 = grad.stride(2),
                g3 = grad.stride(3);
  // Threads own channel ranges; within a range RoIs are the outer loop so each sample table
  // is reused for all the range's channels. Per element the order stays (RoI, bin, sample).
  const int64_t grain = std::max(C / std::max(1, at::get_num_threads()),
                                 grain_for(K * ph * pw * kTapsPerBin));
  at::parallel_for(0, C, grain, [&](int64_t c_begin, int64_t c_end) {
    std::vector<AxisTap<acc_t>> ytaps, xtaps;
    SampleTable<acc_t> table;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t l = lvl[k];
      const int64_t H = heights[l], W = widths[l];
      const RoiGeometry<acc_t> g =
          geometry_of(roi_data + 5 * k, scales, l, ph, pw, sampling_ratio, aligned);
      table.build(g, static_cast<int>(H), static_cast<int>(W), W, 1, ph, pw, ytaps, xtaps);
      const int64_t b = static_cast<int64_t>(roi_data[5 * k]);
      const Sample<acc_t>* smp = table.samples.data();
      const int64_t* start = table.start.data();
      const acc_t count = table.count;
      for (int64_t c = c_begin; c < c_end; ++c) {
        acc_t* plane = acc_grads[l].data_ptr<acc_t>() + (b * C + c) * H * W;
        for (int64_t p = 0; p < ph; ++p) {
          for (int64_t q = 0; q < pw; ++q) {
            const acc_t gv = static_cast<acc_t>(gdata[k * g0 + c * g1 + p * g2 + q * g3]);
            if (gv == acc_t(0)) continue;
            const int64_t bin = p * pw + q;
            for (int64_t i = start[bin]; i < start[bin + 1]; ++i) {
              const Sample<acc_t>& s = smp[i];
              // torchvision's rounding: g * w / count
              plane[s.o1] += gv * s.w1 / count;
              plane[s.o2] += gv * s.w2 / count;
              plane[s.o3] += gv * s.w3 / count;
              plane[s.o4] += gv * s.w4 / count;
            }
          }
        }
      }
    }
  });
}

// Dense separable footprint weights of one RoI, Wy [ph][fh] and Wx [pw][fw], and the pixels the
// samples of each bin touch, in footprint coordinates, ascending: rows of bin p are
// rows[row_start[p] .. row_start[p + 1]), columns of bin q likewise in cols.
template <typename acc_t>
struct Footprint {
  int y0 = 0, x0 = 0, fh = 0, fw = 0;
  acc_t count = acc_t(1), inv_count = acc_t(0);
  std::vector<acc_t> wy, wx;
  std::vector<int> rows, row_start, cols, col_start;
  int64_t samples_y = 0, samples_x = 0;  // valid samples along each axis, all bins together
};

// One axis of a footprint in one pass over the samples: per bin p the dense weights
// w[p][0, extent) of the pixels from `origin` (added in sample order, so equal to
// add_axis_weights' sums) and the pixels its valid samples touch (ascending, each once,
// appended to `touched` with the bin boundaries in `touched_start`). Returns the number of
// valid samples, all bins together.
template <typename acc_t>
int64_t axis_footprint(acc_t start, acc_t bin, int pooled, int grid, int size, int origin,
                       int extent, std::vector<acc_t>& w, std::vector<int>& touched,
                       std::vector<int>& touched_start) {
  w.assign(static_cast<size_t>(pooled) * extent, acc_t(0));
  touched.clear();
  touched_start.assign(1, 0);
  int64_t valid = 0;
  for (int p = 0; p < pooled; ++p) {
    acc_t* w_row = w.data() + static_cast<size_t>(p) * extent;
    const size_t first = touched.size();
    for (int i = 0; i < grid; ++i) {
      const AxisTap<acc_t> t =
          detail::axis_tap(detail::sample_coord(start, bin, p, i, grid), size);
      if (!t.valid) continue;
      ++valid;
      w_row[t.lo - origin] += t.w_lo;
      w_row[t.hi - origin] += t.w_hi;
      touched.push_back(t.lo - origin);
      touched.push_back(t.hi - origin);
    }
    std::sort(touched.begin() + first, touched.end());
    touched.erase(std::unique(touched.begin() + first, touched.end()), touched.end());
    touched_start.push_back(static_cast<int>(touched.size()));
  }
  return valid;
}

template <typename acc_t>
Footprint<acc_t> footprint_of(const RoiGeometry<acc_t>& g, int H, int W, int64_t ph,
                              int64_t pw) {
  Footprint<acc_t> fp;
  int y_first, y_last, x_first, x_last;
  detail::axis_extent(g.start_h, g.bin_h, static_cast<int>(ph), g.grid_h, H, &y_first, &y_last);
  detail::axis_extent(g.start_w, g.bin_w, static_cast<int>(pw), g.grid_w, W, &x_first, &x_last);
  if (y_first > y_last || x_first > x_last) return fp;  // no valid sample
  fp.y0 = y_first;
  fp.x0 = x_first;
  fp.fh = y_last - y_first + 1;
  fp.fw = x_last - x_first + 1;
  fp.count = g.count;
  fp.inv_count = acc_t(1) / g.count;
  fp.samples_y = axis_footprint(g.start_h, g.bin_h, static_cast<int>(ph), g.grid_h, H, fp.y0,
                                fp.fh, fp.wy, fp.rows, fp.row_start);
  fp.samples_x = axis_footprint(g.start_w, g.bin_w, static_cast<int>(pw), g.grid_w, W, fp.x0,
                                fp.fw, fp.wx, fp.cols, fp.col_start);
  return fp;
}

// Multiply-adds per channel of pooling one RoI separably (the first product runs over
// contiguous rows and vectorises: counted at half) against four taps per sample. Separable wins
// when the samples are dense (adaptive grids); sparse samples over a large footprint (a small
// fixed sampling ratio on a big RoI) are cheaper one by one.
template <typename acc_t>
bool separable_is_cheaper(const Footprint<acc_t>& fp, int64_t ph) {
  const double separable = 0.5 * static_cast<double>(fp.fw) * static_cast<double>(fp.rows.size()) +
                           static_cast<double>(ph) * static_cast<double>(fp.cols.size());
  return separable < 4.0 * static_cast<double>(fp.samples_y) * static_cast<double>(fp.samples_x);
}

// One RoI, separably: per channel U = Wy V (the footprint's touched rows weighted into each
// output row) then out = U Wx^T / count over each bin's touched columns.
template <typename scalar_t, typename acc_t>
void pool_roi_separable(const Footprint<acc_t>& fp, const scalar_t* corner, int64_t sc,
                        int64_t sh, int64_t sw, int64_t C, int64_t ph, int64_t pw,
                        std::vector<acc_t>& u, scalar_t* o) {
  u.resize(ph * fp.fw);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* v = corner + c * sc;
    std::fill(u.begin(), u.end(), acc_t(0));
    for (int64_t p = 0; p < ph; ++p) {
      acc_t* u_row = u.data() + p * fp.fw;
      for (int r = fp.row_start[p]; r < fp.row_start[p + 1]; ++r) {
        const int y = fp.rows[r];
        const acc_t wy = fp.wy[p * fp.fh + y];
        const scalar_t* row = v + y * sh;
        if (sw == 1) {
          for (int x = 0; x < fp.fw; ++x) u_row[x] += wy * static_cast<acc_t>(row[x]);
        } else {
          for (int x = 0; x < fp.fw; ++x) u_row[x] += wy * static_cast<acc_t>(row[x * sw]);
        }
      }
    }
    for (int64_t p = 0; p < ph; ++p) {
      const acc_t* u_row = u.data() + p * fp.fw;
      for (int64_t q = 0; q < pw; ++q) {
        const acc_t* wx_row = fp.wx.data() + q * fp.fw;
        const int j0 = fp.col_start[q], j1 = fp.col_start[q + 1];
        acc_t sum = acc_t(0);
        if (j1 > j0 && fp.cols[j1 - 1] - fp.cols[j0] == j1 - j0 - 1) {  // a run of columns
          for (int x = fp.cols[j0]; x <= fp.cols[j1 - 1]; ++x) sum += u_row[x] * wx_row[x];
        } else {
          for (int j = j0; j < j1; ++j) sum += u_row[fp.cols[j]] * wx_row[fp.cols[j]];
        }
        o[(c * ph + p) * pw + q] = static_cast<scalar_t>(sum / fp.count);
      }
    }
  }
}

// Forward, parallel over RoIs. Default: each RoI by the cheaper of the two algorithms (equal to
// torchvision up to rounding); deterministic: every RoI in torchvision's order (bitwise).
template <typename scalar_t, typename acc_t>
void forward_impl(const std::vector<at::Tensor>& feats, const at::Tensor& rois,
                  const at::Tensor& levels, const std::vector<double>& scales, int64_t ph,
                  int64_t pw, int64_t sampling_ratio, bool aligned, bool deterministic,
                  at::Tensor& out) {
  const int64_t K = rois.size(0);
  const int64_t C = out.size(1);
  const acc_t* roi_data = rois.data_ptr<acc_t>();
  const int64_t* lvl = levels.data_ptr<int64_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  at::parallel_for(0, K, grain_for(C * ph * pw * kTapsPerBin), [&](int64_t begin, int64_t end) {
    std::vector<AxisTap<acc_t>> ytaps, xtaps;
    SampleTable<acc_t> table;
    std::vector<acc_t> u;
    for (int64_t k = begin; k < end; ++k) {
      const at::Tensor& f = feats[lvl[k]];
      const int H = static_cast<int>(f.size(2)), W = static_cast<int>(f.size(3));
      const int64_t sc = f.stride(1), sh = f.stride(2), sw = f.stride(3);
      const RoiGeometry<acc_t> g =
          geometry_of(roi_data + 5 * k, scales, lvl[k], ph, pw, sampling_ratio, aligned);
      const int64_t b = static_cast<int64_t>(roi_data[5 * k]);
      const scalar_t* base = f.data_ptr<scalar_t>() + b * f.stride(0);
      scalar_t* o = out_data + k * C * ph * pw;
      if (!deterministic) {
        const Footprint<acc_t> fp = footprint_of(g, H, W, ph, pw);
        if (fp.fh == 0) {  // no valid sample: zeros, as the per-sample sum gives
          std::fill(o, o + C * ph * pw, scalar_t(0));
          continue;
        }
        if (separable_is_cheaper(fp, ph)) {
          pool_roi_separable(fp, base + fp.y0 * sh + fp.x0 * sw, sc, sh, sw, C, ph, pw, u, o);
          continue;
        }
      }
      table.build(g, H, W, sh, sw, ph, pw, ytaps, xtaps);
      pool_roi_by_samples(table, base, sc, C, ph * pw, o);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_gather_impl(const at::Tensor& grad, const at::Tensor& rois,
                          const at::Tensor& levels, const std::vector<double>& scales,
                          int64_t C, at::IntArrayRef heights, at::IntArrayRef widths,
                          int64_t sampling_ratio, bool aligned,
                          std::vector<at::Tensor>& acc_grads) {
  const int64_t K = rois.size(0);
  const int64_t ph = grad.size(2), pw = grad.size(3);
  const acc_t* roi_data = rois.data_ptr<acc_t>();
  const int64_t* lvl = levels.data_ptr<int64_t>();
  std::vector<Footprint<acc_t>> fps(K);
  at::parallel_for(0, K, grain_for((ph + pw) * 64), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const RoiGeometry<acc_t> g =
          geometry_of(roi_data + 5 * k, scales, lvl[k], ph, pw, sampling_ratio, aligned);
      fps[k] = footprint_of(g, static_cast<int>(heights[lvl[k]]),
                            static_cast<int>(widths[lvl[k]]), ph, pw);
    }
  });
  const scalar_t* gdata = grad.data_ptr<scalar_t>();
  const int64_t g0 = grad.stride(0), g1 = grad.stride(1), g2 = grad.stride(2),
                g3 = grad.stride(3);
  at::parallel_for(0, C, grain_for(K * ph * pw * kTapsPerBin), [&](int64_t c_begin,
                                                                      int64_t c_end) {
    std::vector<acc_t> t1;
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t k = 0; k < K; ++k) {
        const Footprint<acc_t>& fp = fps[k];
        if (fp.fh == 0) continue;
        const int64_t l = lvl[k];
        const int64_t W = widths[l];
        const int64_t b = static_cast<int64_t>(roi_data[5 * k]);
        acc_t* plane = acc_grads[l].data_ptr<acc_t>() + (b * C + c) * heights[l] * W;
        // t1[p][x] = sum_q G[p][q] / count * Wx[q][x]
        t1.assign(ph * fp.fw, acc_t(0));
        for (int64_t p = 0; p < ph; ++p) {
          acc_t* t1_row = t1.data() + p * fp.fw;
          for (int64_t q = 0; q < pw; ++q) {
            const acc_t gv =
                static_cast<acc_t>(gdata[k * g0 + c * g1 + p * g2 + q * g3]) * fp.inv_count;
            if (gv == acc_t(0)) continue;
            const acc_t* wx_row = fp.wx.data() + q * fp.fw;
            for (int j = fp.col_start[q]; j < fp.col_start[q + 1]; ++j)
              t1_row[fp.cols[j]] += gv * wx_row[fp.cols[j]];
          }
        }
        // plane[y0 + y][x0 + x] += sum_p Wy[p][y] t1[p][x]
        for (int64_t p = 0; p < ph; ++p) {
          const acc_t* t1_row = t1.data() + p * fp.fw;
          for (int r = fp.row_start[p]; r < fp.row_start[p + 1]; ++r) {
            const int y = fp.rows[r];
            const acc_t wy = fp.wy[p * fp.fh + y];
            if (wy == acc_t(0)) continue;
            acc_t* row = plane + (fp.y0 + y) * W + fp.x0;
            for (int x = 0; x < fp.fw; ++x) row[x] += wy * t1_row[x];
          }
        }
      }
    }
  });
}

at::Tensor multilevel_roi_align_forward_cpu(at::TensorList features, const at::Tensor& rois,
                                            const at::Tensor& levels,
                                            at::ArrayRef<double> spatial_scales,
                                            int64_t pooled_height, int64_t pooled_width,
                                            int64_t sampling_ratio, bool aligned,
                                            bool deterministic) {
  check_multilevel_roi_align_args(features, rois, levels, spatial_scales, pooled_height,
                                  pooled_width);
  const at::Tensor& f0 = features[0];
  at::Tensor rois_acc, levels64;  // no structured binding: lambdas capture them (C++17)
  std::tie(rois_acc, levels64) = prepare_rois(rois, levels, f0.scalar_type());
  check_roi_values_cpu(rois_acc, levels64, f0.size(0), static_cast<int64_t>(features.size()));
  at::Tensor out = at::empty({rois.size(0), f0.size(1), pooled_height, pooled_width},
                             f0.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> feats(features.begin(), features.end());
  std::vector<double> scales(spatial_scales.begin(), spatial_scales.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(),
                                  "multilevel_roi_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t, acc_t>(feats, rois_acc, levels64, scales, pooled_height,
                                  pooled_width, sampling_ratio, aligned, deterministic, out);
  });
  return out;
}

std::vector<at::Tensor> multilevel_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, int64_t batch_size, int64_t channels,
    at::IntArrayRef heights, at::IntArrayRef widths, int64_t sampling_ratio, bool aligned,
    bool deterministic) {
  check_multilevel_roi_align_backward_args(grad, rois, levels, spatial_scales, batch_size,
                                           channels, heights, widths);
  at::Tensor rois_acc, levels64;  // no structured binding: lambdas capture them (C++17)
  std::tie(rois_acc, levels64) = prepare_rois(rois, levels, grad.scalar_type());
  const int64_t L = static_cast<int64_t>(heights.size());
  check_roi_values_cpu(rois_acc, levels64, batch_size, L);
  std::vector<at::Tensor> acc_grads =
      zero_level_grads(grad, batch_size, channels, heights, widths);
  if (grad.numel() > 0) {
    std::vector<double> scales(spatial_scales.begin(), spatial_scales.end());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "multilevel_roi_align_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (!deterministic)
        backward_gather_impl<scalar_t, acc_t>(grad, rois_acc, levels64, scales, channels,
                                              heights, widths, sampling_ratio, aligned,
                                              acc_grads);
      else
        backward_scatter_impl<scalar_t, acc_t>(grad, rois_acc, levels64, scales, channels,
                                               heights, widths, sampling_ratio, aligned,
                                               acc_grads);
    });
  }
  return cast_level_grads(std::move(acc_grads), grad.scalar_type());
}

}  // namespace
}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CPU, m) {
  m.impl("multilevel_roi_align", &dsig::ops::multilevel_roi_align_forward_cpu);
  m.impl("_multilevel_roi_align_backward", &dsig::ops::multilevel_roi_align_backward_cpu);
}
