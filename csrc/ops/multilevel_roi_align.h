// Host-side helpers shared by the CPU and CUDA multi-level RoIAlign kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <utility>
#include <vector>

namespace dsig {
namespace ops {

// Most pyramid levels one call accepts (the CUDA kernels pass a fixed-size level table).
constexpr int64_t kMaxLevels = 8;

// Shape, dtype and device checks of the forward op; raises a descriptive error.
void check_multilevel_roi_align_args(at::TensorList features, const at::Tensor& rois,
                                     const at::Tensor& levels, at::ArrayRef<double> spatial_scales,
                                     int64_t pooled_height, int64_t pooled_width);

// Shape checks of the backward op.
void check_multilevel_roi_align_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                              const at::Tensor& levels,
                                              at::ArrayRef<double> spatial_scales,
                                              int64_t batch_size, int64_t channels,
                                              at::IntArrayRef heights, at::IntArrayRef widths);

// Value checks that need the data on the host (finite boxes, batch and level indices in range).
// `rois` and `levels` must be CPU tensors of the accumulation dtype and int64.
void check_roi_values_cpu(const at::Tensor& rois, const at::Tensor& levels, int64_t num_images,
                          int64_t num_levels);

// Accumulation dtype of a feature dtype: float for half/bfloat16/float, double for double.
at::ScalarType accumulate_type(at::ScalarType t);

// rois as contiguous [K, 5] in the accumulation dtype of `dtype`, levels as contiguous int64.
std::pair<at::Tensor, at::Tensor> prepare_rois(const at::Tensor& rois, const at::Tensor& levels,
                                               at::ScalarType dtype);

// Zeroed per-level gradient buffers [B, C, H_l, W_l] in the accumulation dtype of grad.
std::vector<at::Tensor> zero_level_grads(const at::Tensor& grad, int64_t batch_size,
                                         int64_t channels, at::IntArrayRef heights,
                                         at::IntArrayRef widths);

// The buffers cast to the gradient's dtype where it differs.
std::vector<at::Tensor> cast_level_grads(std::vector<at::Tensor> grads, at::ScalarType dtype);

}  // namespace ops
}  // namespace dsig
