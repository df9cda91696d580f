"""MultiLevelRoIAlign as a drop-in for detectron2's ROIPooler."""
import pytest
import torch

import dsig_ext
from helpers import make_boxes, make_pyramid, split_boxes

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


@pytest.mark.parametrize("scales", [SCALES, (1 / 8,), (1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128)])
@pytest.mark.parametrize("output_size", [7, (14, 14), 5])  # ROIPooler fails non-square sizes
def test_same_as_roipooler(scales, output_size):
    poolers = pytest.importorskip("detectron2.modeling.poolers")
    from detectron2.structures import Boxes

    g = torch.Generator().manual_seed(0)
    strides = [round(1 / s) for s in scales]
    feats = make_pyramid(2, 4, (200, 260), strides=strides, requires_grad=True, generator=g)
    boxes = [Boxes(b) for b in split_boxes(make_boxes(40, (200, 260), g), 2, g)]
    kwargs = dict(output_size=output_size, scales=scales, sampling_ratio=0,
                  pooler_type="ROIAlignV2", canonical_box_size=224, canonical_level=4)
    theirs, ours = poolers.ROIPooler(**kwargs), dsig_ext.MultiLevelRoIAlign(**kwargs)
    a, b = theirs(feats, boxes), ours(feats, boxes)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    ga = torch.autograd.grad(a.square().sum(), feats)
    gb = torch.autograd.grad(b.square().sum(), feats)
    for x, y in zip(gb, ga):  # gradients here reach ~1e2: fp32 rounding is relative
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_no_parameters_and_plain_tensor_boxes():
    pooler = dsig_ext.MultiLevelRoIAlign(7, SCALES, 0)
    assert list(pooler.state_dict()) == [] and list(pooler.parameters()) == []
    assert "ROIAlignV2" in repr(pooler)
    feats = make_pyramid(2, 3, (64, 64))
    out = pooler(feats, [torch.tensor([[0.0, 0.0, 30.0, 30.0]]), torch.zeros((0, 4))])
    assert out.shape == (1, 3, 7, 7)


def test_no_images():
    pooler = dsig_ext.MultiLevelRoIAlign(7, SCALES, 0)
    feats = [f[:0] for f in make_pyramid(1, 3, (64, 64))]
    assert pooler(feats, []).shape == (0, 3, 7, 7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(pooler_type="ROIPool"), "supports pooler_type.*use detectron2.s ROIPooler"),
    (dict(scales=(0.3, 0.15)), "powers of 1/2"),
    (dict(scales=(1 / 4, 1 / 16)), "consecutive"),
    (dict(scales=()), "at least one scale"),
])
def test_bad_construction(kwargs, match):
    args = dict(output_size=7, scales=SCALES, sampling_ratio=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dsig_ext.MultiLevelRoIAlign(**args)


def test_bad_forward():
    pooler = dsig_ext.MultiLevelRoIAlign(7, SCALES, 0)
    feats = make_pyramid(2, 3, (64, 64))
    with pytest.raises(ValueError, match="feature maps for 4 scales"):
        pooler(feats[:3], [torch.zeros(0, 4)] * 2)
    with pytest.raises(ValueError, match="boxes for 1 images"):
        pooler(feats, [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=r"\[n, 4\] tensor"):
        pooler(feats, [torch.zeros(3, 5), torch.zeros(0, 4)])


def test_scripted_and_exported_equal_detectron2_roipooler(tmp_path):
    """torch.jit.script (boxes as tensors: TorchScript needs one static type) and torch.export
    give detectron2's ROIPooler results and the eager module's gradients; a saved scripted
    module reloads and runs."""
    import warnings

    poolers = pytest.importorskip("detectron2.modeling.poolers")
    from detectron2.structures import Boxes

    g = torch.Generator().manual_seed(3)
    feats = make_pyramid(2, 4, (160, 224), requires_grad=True, generator=g)
    boxes = split_boxes(make_boxes(30, (160, 224), g), 2, g)
    expected = poolers.ROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, [Boxes(b) for b in boxes])
    for deterministic in (None, True):
        ours = dsig_ext.MultiLevelRoIAlign(7, SCALES, 0, deterministic=deterministic)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            scripted = torch.jit.script(ours)
        exported = torch.export.export(ours, (feats, boxes)).module()
        eager = ours(feats, boxes)
        for out in (scripted(feats, boxes), exported(feats, boxes)):
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        grads = torch.autograd.grad(scripted(feats, boxes).square().sum(), feats)
        for x, y in zip(grads, torch.autograd.grad(eager.square().sum(), feats)):
            assert torch.equal(x, y)
    path = str(tmp_path / "pooler.pt")
    torch.jit.save(scripted, path)
    torch.testing.assert_close(torch.jit.load(path)(feats, boxes), expected, atol=1e-5, rtol=0)
