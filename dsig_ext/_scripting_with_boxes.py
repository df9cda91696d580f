"""The TorchScript twin of ``MultiLevelRoIAlign`` that takes detectron2's ``Boxes`` (imported
only when a pooler is scripted; importing this module fails without detectron2)."""
from typing import List, Union

import torch
from detectron2.structures import Boxes

from .poolers import MultiLevelRoIAlign


class MultiLevelRoIAlignWithBoxes(MultiLevelRoIAlign):
    """``MultiLevelRoIAlign`` whose scripted ``forward`` takes ``List[Boxes]`` (what detectron2's
    ROI heads and ``ROIPooler`` callers pass) or ``List[Tensor]``. An empty Python list cannot be
    passed to the scripted module: TorchScript cannot tell which of the two it is."""

    def forward(self, x: List[torch.Tensor],
                box_lists: Union[List[torch.Tensor], List[Boxes]]) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return self._forward_eager(x, box_lists)
        if torch.jit.isinstance(box_lists, List[Boxes]):
            tensors = [b.tensor for b in box_lists]
        else:
            assert torch.jit.isinstance(box_lists, List[torch.Tensor])
            tensors = box_lists
        return self._forward_scripted(x, tensors)

    def __prepare_scriptable__(self):
        return self


def with_boxes(pooler: MultiLevelRoIAlign) -> MultiLevelRoIAlignWithBoxes:
    """The twin of `pooler`: the same geometry, determinism and backend."""
    twin = MultiLevelRoIAlignWithBoxes(
        pooler.output_size, pooler.scales, pooler.sampling_ratio, pooler.pooler_type,
        pooler.canonical_box_size, pooler.canonical_level,
        deterministic=pooler.deterministic, backend=pooler.backend)
    twin.train(pooler.training)
    return twin
