// FPN level of each box, computed with exactly the tensor operations detectron2's
// assign_boxes_to_levels uses, so results are bitwise equal on the same device. Like detectron2
// (whose Boxes hold float32) the rule is evaluated in float32 whatever the boxes' dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace dsig {
namespace ops {

at::Tensor assign_fpn_levels(const at::Tensor& boxes, int64_t min_level, int64_t max_level,
                             double canonical_box_size, int64_t canonical_level) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4,
              "assign_fpn_levels: boxes must have shape [K, 4] (x1, y1, x2, y2), got ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()),
              "assign_fpn_levels: boxes must be floating, got ", boxes.scalar_type());
  TORCH_CHECK(min_level <= max_level, "assign_fpn_levels: min_level ", min_level,
              " > max_level ", max_level);
  TORCH_CHECK(canonical_box_size > 0, "assign_fpn_levels: canonical_box_size must be > 0");
  const at::Tensor b = boxes.detach().to(at::kFloat);
  const at::Tensor area = (b.select(1, 2) - b.select(1, 0)) * (b.select(1, 3) - b.select(1, 1));
  const at::Tensor sizes = at::sqrt(area);
  at::Tensor lvl = at::floor(at::log2(sizes / canonical_box_size + 1e-8) + canonical_level);
  lvl = at::clamp(lvl, min_level, max_level);
  return lvl.to(at::kLong) - min_level;
}

}  // namespace ops
}  // namespace dsig

TORCH_LIBRARY_IMPL(dsig, CPU, m) {
  m.impl("assign_fpn_levels", &dsig::ops::assign_fpn_levels);
}
TORCH_LIBRARY_IMPL(dsig, CUDA, m) {
  m.impl("assign_fpn_levels", &dsig::ops::assign_fpn_levels);
}
