"""``MultiLevelRoIAlign``: a drop-in replacement for detectron2's ``ROIPooler`` (RoIAlign
types) on the fused op, without importing detectron2."""
import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from . import ops

_POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}


class MultiLevelRoIAlign(nn.Module):
    """Pools each box on its FPN level, all levels in one launch.

    Same constructor as detectron2's ``ROIPooler``: ``output_size`` (int or pair), ``scales``
    (one per level, 1/stride, coarsest last), ``sampling_ratio``, ``pooler_type``
    ("ROIAlignV2" or "ROIAlign"; "ROIPool" and the rotated types stay with detectron2's
    ``ROIPooler``), ``canonical_box_size`` and ``canonical_level``. Has no parameters, so
    checkpoints stay interchangeable with detectron2's.

    ``torch.jit.script`` compiles it, alone or inside a detectron2 model: scripted, it takes the
    boxes as ``List[Tensor]``, and also as ``List[Boxes]`` where detectron2 is installed (its ROI
    heads pass ``Boxes``), and runs the fused ops. ``torch.export`` and
    ``torch.compile(fullgraph=True)`` trace it as it is.
    """

    deterministic: Optional[bool]

    def __init__(self, output_size, scales: Sequence[float], sampling_ratio: int,
                 pooler_type: str = "ROIAlignV2", canonical_box_size: int = 224,
                 canonical_level: int = 4, *, deterministic=None, backend=None):
        super().__init__()
        self.output_size = tuple(ops._pair(output_size))
        if pooler_type not in _POOLER_TYPES:
            raise ValueError(f"MultiLevelRoIAlign supports pooler_type {sorted(_POOLER_TYPES)}, "
                             f"got {pooler_type!r} (for ROIPool or the rotated types use "
                             "detectron2's ROIPooler)")
        if len(scales) == 0:
            raise ValueError("MultiLevelRoIAlign needs at least one scale")
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.pooler_type = pooler_type
        self.aligned = _POOLER_TYPES[pooler_type]
        min_level = -math.log2(self.scales[0])
        max_level = -math.log2(self.scales[-1])
        if not (math.isclose(min_level, round(min_level))
                and math.isclose(max_level, round(max_level))):
            raise ValueError(f"scales must be powers of 1/2 (one per FPN level), got {scales}")
        self.min_level, self.max_level = int(round(min_level)), int(round(max_level))
        if len(scales) != self.max_level - self.min_level + 1:
            raise ValueError("scales must be consecutive pyramid levels, got {scales}")
        if not 0 <= self.min_level <= self.max_level:
            raise ValueError(f"bad scales {scales}")
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        if canonical_box_size <= 0:
            raise ValueError("canonical_box_size must be positive")
        self.deterministic = deterministic
        self.backend = backend

    def forward(self, x: List[torch.Tensor], box_lists: List[torch.Tensor]) -> torch.Tensor:
        """x: L feature maps [B, C, H_l, W_l]; box_lists: B per-image boxes ([n, 4] tensors or
        detectron2 ``Boxes``; tensors when scripted) in image coordinates.
        Returns [sum n_i, C, oh, ow]."""
        if torch.jit.is_scripting():
            return self._forward_scripted(x, box_lists)
        return self._forward_eager(x, box_lists)

    @torch.jit.unused
    def _forward_eager(self, x, box_lists):
        if not isinstance(x, (list, tuple)):
            raise TypeError("MultiLevelRoIAlign: x must be a list of feature maps")
        if len(x) != len(self.scales):
            raise ValueError(f"MultiLevelRoIAlign: got {len(x)} feature maps for "
                             f"{len(self.scales)} scales")
        for i, f in enumerate(x):  # the box count below reads the batch size
            if not isinstance(f, torch.Tensor) or f.dim() != 4:
                raise ValueError(f"MultiLevelRoIAlign: x[{i}] must be a feature map "
                                 f"[B, C, H, W], got {ops._shape(f)}")
        if len(box_lists) != x[0].shape[0]:
            raise ValueError(f"MultiLevelRoIAlign: got boxes for {len(box_lists)} images but the "
                             f"features hold {x[0].shape[0]}")
        if len(box_lists) == 0:
            return x[0].new_zeros((0, x[0].shape[1]) + self.output_size)
        rois = ops.convert_boxes_to_rois(box_lists).to(device=x[0].device)
        levels = ops.assign_fpn_levels(rois[:, 1:], self.min_level, self.max_level,
                                       self.canonical_box_size, self.canonical_level,
                                       backend=self.backend)
        # rois and levels are well formed by construction: no value check (no host sync)
        return ops.multilevel_roi_align(x, rois, levels, self.scales, self.output_size,
                                        self.sampling_ratio, self.aligned,
                                        deterministic=self.deterministic, check_inputs=False,
                                        backend=self.backend)

    def _forward_scripted(self, x: List[torch.Tensor],
                          box_lists: List[torch.Tensor]) -> torch.Tensor:
        """The same computation in TorchScript: the fused ops called directly."""
        if len(x) != len(self.scales):
            raise ValueError("MultiLevelRoIAlign: one feature map per scale expected")
        if len(box_lists) != x[0].shape[0]:
            raise ValueError("MultiLevelRoIAlign: one box tensor per image expected")
        parts: List[torch.Tensor] = []
        for i, boxes in enumerate(box_lists):
            index = torch.full((boxes.shape[0], 1), float(i), dtype=boxes.dtype,
                               device=boxes.device)
            parts.append(torch.cat([index, boxes], dim=1))
        if len(parts) == 0:
            return x[0].new_zeros((0, x[0].shape[1], self.output_size[0], self.output_size[1]))
        rois = torch.cat(parts, dim=0).to(x[0].device)
        levels = torch.ops.dsig.assign_fpn_levels(rois[:, 1:], self.min_level, self.max_level,
                                                  float(self.canonical_box_size),
                                                  self.canonical_level)
        deterministic = False  # None: the backward still follows the global deterministic mode
        flag = self.deterministic
        if flag is not None:
            deterministic = flag
        return torch.ops.dsig.multilevel_roi_align(x, rois, levels, self.scales,
                                                   self.output_size[0], self.output_size[1],
                                                   self.sampling_ratio, self.aligned,
                                                   deterministic)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles in place of this module (it calls this on the
        module and on every submodule of a model it scripts): TorchScript fixes the boxes' type
        from the annotation, so where detectron2 is importable a twin whose ``forward`` also
        takes detectron2's ``Boxes``; the ``List[Tensor]`` module itself otherwise. The import
        happens here, not at ``import dsig_ext``: the package does not depend on detectron2."""
        try:
            from ._scripting_with_boxes import with_boxes
        except ImportError:
            return self
        return with_boxes(self)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, scales={self.scales}, "
                f"sampling_ratio={self.sampling_ratio}, pooler_type={self.pooler_type!r}, "
                f"canonical_box_size={self.canonical_box_size}, "
                f"canonical_level={self.canonical_level}")
