// Schemas of the multi-level RoIAlign ops and the checks both backends share.
#include "multilevel_roi_align.h"

#include <torch/library.h>

#include <cmath>

namespace dsig {
namespace ops {

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::pair<at::Tensor, at::Tensor> prepare_rois(const at::Tensor& rois, const at::Tensor& levels,
                                               at::ScalarType dtype) {
  return {rois.to(accumulate_type(dtype)).contiguous(), levels.to(at::kLong).contiguous()};
}

std::vector<at::Tensor> zero_level_grads(const at::Tensor& grad, int64_t batch_size,
                                         int64_t channels, at::IntArrayRef heights,
                                         at::IntArrayRef widths) {
  std::vector<at::Tensor> grads;
  for (size_t l = 0; l < heights.size(); ++l)
    grads.push_back(at::zeros({batch_size, channels, heights[l], widths[l]},
                              grad.options().dtype(accumulate_type(grad.scalar_type()))));
  return grads;
}

std::vector<at::Tensor> cast_level_grads(std::vector<at::Tensor> grads, at::ScalarType dtype) {
  for (auto& t : grads)
    if (t.scalar_type() != dtype) t = t.to(dtype);
  return grads;
}

static void check_rois_levels(const at::Tensor& rois, const at::Tensor& levels,
                              const at::Device& device) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "multilevel_roi_align: rois must have shape [K, 5] (batch_index, x1, y1, x2, y2), "
              "got ", rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()),
              "multilevel_roi_align: rois must be a floating tensor, got ", rois.scalar_type());
  TORCH_CHECK(rois.device() == device, "multilevel_roi_align: rois are on ", rois.device(),
              " but the features are on ", device);
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0),
              "multilevel_roi_align: levels must have shape [K] = [", rois.size(0), "], got ",
              levels.sizes());
  TORCH_CHECK(levels.scalar_type() == at::kLong || levels.scalar_type() == at::kInt,
              "multilevel_roi_align: levels must be int64 or int32, got ", levels.scalar_type());
  TORCH_CHECK(levels.device() == device, "multilevel_roi_align: levels are on ", levels.device(),
              " but the features are on ", device);
}

static void check_scales(at::ArrayRef<double> spatial_scales, int64_t num_levels) {
  TORCH_CHECK(static_cast<int64_t>(spatial_scales.size()) == num_levels,
              "multilevel_roi_align: got ", spatial_scales.size(), " spatial_scales for ",
              num_levels, " feature levels");
  for (double s : spatial_scales) {
    TORCH_CHECK(std::isfinite(s) && s > 0, "multilevel_roi_align: spatial scales must be finite "
                "and positive, got ", s);
  }
}

void check_multilevel_roi_align_args(at::TensorList features, const at::Tensor& rois,
                                     const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                     int64_t pooled_height, int64_t pooled_width) {
  const int64_t L = static_cast<int64_t>(features.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLevels, "multilevel_roi_align: expected 1 to ", kMaxLevels,
              " feature levels, got ", L);
  const at::Tensor& f0 = features[0];
  TORCH_CHECK(f0.dim() == 4, "multilevel_roi_align: features[0] must be [B, C, H, W], got ",
              f0.sizes());
  TORCH_CHECK(at::isFloatingType(f0.scalar_type()),
              "multilevel_roi_align: features must be floating, got ", f0.scalar_type());
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "multilevel_roi_align: features[", l,
                "] must be [B, C, H, W], got ", f.sizes());
    TORCH_CHECK(f.device() == f0.device(), "multilevel_roi_align: features[", l, "] is on ",
                f.device(), " but features[0] is on ", f0.device());
    TORCH_CHECK(f.scalar_type() == f0.scalar_type(), "multilevel_roi_align: features[", l,
                "] has dtype ", f.scalar_type(), " but features[0] has ", f0.scalar_type());
    TORCH_CHECK(f.size(0) == f0.size(0), "multilevel_roi_align: features[", l, "] has batch ",
                f.size(0), " but features[0] has ", f0.size(0));
    TORCH_CHECK(f.size(1) == f0.size(1), "multilevel_roi_align: features[", l, "] has ",
                f.size(1), " channels but features[0] has ", f0.size(1),
                " (all levels must have the same channel count)");
    TORCH_CHECK(f.size(2) < (int64_t(1) << 31) && f.size(3) < (int64_t(1) << 31),
                "multilevel_roi_align: features[", l, "] is too large");
  }
  check_rois_levels(rois, levels, f0.device());
  check_scales(spatial_scales, L);
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0,
              "multilevel_roi_align: output size must be positive, got (", pooled_height, ", ",
              pooled_width, ")");
}

void check_multilevel_roi_align_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                              const at::Tensor& levels,
                                              at::ArrayRef<double> spatial_scales,
                                              int64_t batch_size, int64_t channels,
                                              at::IntArrayRef heights, at::IntArrayRef widths) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels,
              "multilevel_roi_align backward: grad must be [K, C, oh, ow] with K = ", rois.size(0),
              " and C = ", channels, ", got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "multilevel_roi_align backward: grad must be floating");
  const int64_t L = static_cast<int64_t>(heights.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLevels && static_cast<int64_t>(widths.size()) == L,
              "multilevel_roi_align backward: bad level shapes");
  TORCH_CHECK(batch_size >= 0 && channels >= 0, "multilevel_roi_align backward: bad shape");
  check_rois_levels(rois, levels, grad.device());
  check_scales(spatial_scales, L);
}

void check_roi_values_cpu(const at::Tensor& rois, const at::Tensor& levels, int64_t num_images,
                          int64_t num_levels) {
  const int64_t K = rois.size(0);
  const int64_t* lv = levels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(rois.scalar_type(), "check_roi_values", [&] {
    const scalar_t* r = rois.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* b = r + 5 * k;
      TORCH_CHECK(std::isfinite(static_cast<double>(b[1])) &&
                      std::isfinite(static_cast<double>(b[2])) &&
                      std::isfinite(static_cast<double>(b[3])) &&
                      std::isfinite(static_cast<double>(b[4])),
                  "multilevel_roi_align: box ", k, " has a NaN or infinite coordinate");
      const double bi = static_cast<double>(b[0]);
      TORCH_CHECK(bi >= 0 && bi < static_cast<double>(num_images) && bi == std::floor(bi),
                  "multilevel_roi_align: box ", k, " has batch index ", bi,
                  ", expected an integer in [0, ", num_images, ")");
      TORCH_CHECK(lv[k] >= 0 && lv[k] < num_levels, "multilevel_roi_align: box ", k,
                  " is assigned level ", lv[k], ", expected a level in [0, ", num_levels,
                  ") (assign_fpn_levels gives no valid level to a box of negative area)");
    }
  });
}

}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_FRAGMENT(dsig, m) {
  m.def(
      "assign_fpn_levels(Tensor boxes, int min_level, int max_level, "
      "float canonical_box_size=224., int canonical_level=4) -> Tensor");
  m.def(
      "multilevel_roi_align(Tensor[] features, Tensor rois, Tensor levels, "
      "float[] spatial_scales, int pooled_height, int pooled_width, int sampling_ratio, "
      "bool aligned, bool deterministic=False) -> Tensor");
  m.def(
      "_multilevel_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, "
      "float[] spatial_scales, SymInt batch_size, SymInt channels, SymInt[] heights, "
      "SymInt[] widths, int sampling_ratio, bool aligned, bool deterministic) -> Tensor[]");
}
