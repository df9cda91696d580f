"""dsig_ext: fused operators for DSIG knowledge distillation of FPN detectors.

Ops (CPU and CUDA, forward and backward): ``assign_fpn_levels``, ``multilevel_roi_align``,
``cosine_edges``, ``edge_mse_loss``; ``MultiLevelRoIAlign`` replaces detectron2's ``ROIPooler``.
``dsig_ext.reference`` holds the pure-PyTorch twins; ``set_backend`` chooses between them.
This package never imports detectron2.
"""
from ._extension import cuda_kernels_built, extension_available
from .backend import get_backend, set_backend, use_backend
from .ops import (
    assign_fpn_levels,
    convert_boxes_to_rois,
    cosine_edges,
    edge_mse_loss,
    graph_blocks,
    multilevel_roi_align,
    offsets_from_counts,
)
from .poolers import MultiLevelRoIAlign
from . import reference

__version__ = "0.1.0"

__all__ = [
    "MultiLevelRoIAlign",
    "assign_fpn_levels",
    "convert_boxes_to_rois",
    "cosine_edges",
    "cuda_kernels_built",
    "edge_mse_loss",
    "extension_available",
    "get_backend",
    "graph_blocks",
    "multilevel_roi_align",
    "offsets_from_counts",
    "reference",
    "set_backend",
    "use_backend",
]
