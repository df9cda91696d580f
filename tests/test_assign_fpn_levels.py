"""assign_fpn_levels is bitwise detectron2's assign_boxes_to_levels on the same device."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import dsig_ext
from helpers import make_boxes
from conftest import DEVICES


def _boundary_boxes(dtype):
    """Squares and rectangles whose sqrt(area) sits on, or one ulp around, 112/224/448 and other
    powers of two times the canonical size."""
    rows = []
    for side in (14.0, 28.0, 56.0, 112.0, 224.0, 448.0, 896.0, 1792.0):
        s = torch.tensor(side, dtype=dtype)
        for v in (torch.nextafter(s, torch.tensor(0.0, dtype=dtype)), s,
                  torch.nextafter(s, torch.tensor(1e9, dtype=dtype))):
            rows.append([0.0, 0.0, v.item(), v.item()])
            rows.append([10.0, 20.0, 10.0 + v.item(), 20.0 + v.item()])
            rows.append([0.0, 0.0, 2 * v.item(), v.item() / 2])
    rows += [[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 4.0, 9.0], [0.0, 0.0, 1e-6, 1e-6]]
    return torch.tensor(rows, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [(2, 5), (3, 7), (4, 4)])
def test_bitwise_equal_to_detectron2(device, dtype, levels):
    poolers = pytest.importorskip("detectron2.modeling.poolers")
    from detectron2.structures import Boxes

    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([_boundary_boxes(dtype),
                       make_boxes(500, (800, 1333), g, dtype=dtype)]).to(device)
    min_level, max_level = levels
    for canonical_box_size, canonical_level in ((224, 4), (160, 3)):
        expected = poolers.assign_boxes_to_levels([Boxes(boxes[:17]), Boxes(boxes[17:])],
                                                  min_level, max_level, canonical_box_size,
                                                  canonical_level)
        got = dsig_ext.assign_fpn_levels(boxes, min_level, max_level, canonical_box_size,
                                         canonical_level)
        assert got.dtype == torch.int64 and got.device == boxes.device
        assert torch.equal(got, expected)
        with dsig_ext.use_backend("reference"):
            assert torch.equal(dsig_ext.assign_fpn_levels(boxes, min_level, max_level,
                                                          canonical_box_size, canonical_level),
                               expected)


def test_level_boundaries_are_where_the_fpn_rule_puts_them():
    boxes = torch.tensor([[0, 0, 111.9, 111.9], [0, 0, 112, 112], [0, 0, 223.99, 223.99],
                          [0, 0, 224, 224], [0, 0, 447.9, 447.9], [0, 0, 448, 448]])
    assert dsig_ext.assign_fpn_levels(boxes, 2, 5).tolist() == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 5), r"\[K, 4\]"),
    (torch.zeros(3, 4, dtype=torch.long), r"\[K, 4\]|floating"),
])
def test_malformed_boxes(bad, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        dsig_ext.assign_fpn_levels(bad, 2, 5)


def test_min_greater_than_max():
    with pytest.raises(RuntimeError, match="min_level"):
        dsig_ext.assign_fpn_levels(torch.zeros(2, 4), 5, 2)


@settings(max_examples=200, deadline=None)
@given(coords=st.lists(st.tuples(*[st.floats(-2000, 4000, width=32)] * 4), min_size=0,
                       max_size=30),
       min_level=st.integers(0, 4), span=st.integers(0, 4),
       canonical=st.sampled_from([(224, 4), (160, 3), (56, 2)]))
def test_property_matches_reference(coords, min_level, span, canonical):
    boxes = torch.tensor(coords, dtype=torch.float32).reshape(-1, 4)
    args = (boxes, min_level, min_level + span, *canonical)
    got = dsig_ext.assign_fpn_levels(*args)
    expected = dsig_ext.reference.assign_fpn_levels(*args)
    assert torch.equal(got, expected)
    # a negative area has no level (detectron2 casts a NaN); every other box gets one in range
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    ok = got[area >= 0]
    assert ((ok >= 0) & (ok <= span)).all()
