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
    """torch.jit.script (boxes as tensors) and torch.export
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


def _script(module):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(module)


def test_scripted_takes_detectron2_boxes():
    """detectron2's own ROIPooler scriptability check with the fused pooler swapped in: the
    scripted module takes List[Boxes], as the ROIPooler it replaces does, and equals eager
    bitwise; List[Tensor] still works."""
    pytest.importorskip("detectron2")
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes
    import distill_utils  # noqa: F401  (puts the project on the path)
    from distillation.meta_arch import fused_pooler_like

    g = torch.Generator().manual_seed(5)
    for scales in ((1 / 16,), SCALES):
        pooler = fused_pooler_like(ROIPooler(14, scales, 0, "ROIAlignV2"), "fused")
        assert isinstance(pooler, dsig_ext.MultiLevelRoIAlign)
        feats = make_pyramid(2, 4, (160, 128), strides=[round(1 / s) for s in scales],
                             generator=g)
        boxes = split_boxes(make_boxes(20, (160, 128), g), 2, g)
        eager = pooler(feats, [Boxes(b) for b in boxes])
        scripted = _script(pooler)
        assert torch.equal(scripted(feats, [Boxes(b) for b in boxes]), eager)
        assert torch.equal(scripted(feats, boxes), eager)


@pytest.mark.parametrize("fpn", [False, True], ids=["res4", "fpn"])
def test_standard_roi_heads_script_with_fused_poolers(fpn):
    """detectron2's StandardROIHeads scriptability check (box and mask branch) with both poolers
    swapped for the fused one, as the distillation models swap them: the scripted heads give
    the eager heads' instances exactly."""
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import StandardROIHeads
    from detectron2.structures import Boxes, ImageList, Instances
    from detectron2.export.torchscript_patch import freeze_training_mode, patch_instances
    import distill_utils  # noqa: F401  (puts the project on the path)
    from distillation.meta_arch import fused_pooler_like

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.01
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.01
    sizes = [(60, 50), (80, 96)]
    images = ImageList(torch.rand(2, 80, 96), sizes)
    if fpn:
        names, strides, channels = ["p2", "p3", "p4", "p5"], [4, 8, 16, 32], 16
    else:
        names, strides, channels = ["res4"], [16], 64
    cfg.MODEL.ROI_HEADS.IN_FEATURES = names
    features = {n: torch.rand(2, channels, -(-80 // s), -(-96 // s))
                for n, s in zip(names, strides)}
    shapes = {n: ShapeSpec(channels=channels, stride=s) for n, s in zip(names, strides)}
    heads = StandardROIHeads(cfg, shapes).eval()
    heads.box_pooler = fused_pooler_like(heads.box_pooler, "fused")
    heads.mask_pooler = fused_pooler_like(heads.mask_pooler, "fused")
    assert isinstance(heads.box_pooler, dsig_ext.MultiLevelRoIAlign)
    assert isinstance(heads.mask_pooler, dsig_ext.MultiLevelRoIAlign)

    def proposals(make):
        out = []
        for i, (h, w) in enumerate(sizes):
            inst = Instances((h, w))
            g = torch.Generator().manual_seed(i)
            inst.proposal_boxes = Boxes(make_boxes(12, (h, w), g, special=False))
            inst.objectness_logits = torch.rand(12, generator=g)
            out.append(make(inst))
        return out

    eager, _ = heads(images, features, proposals(lambda inst: inst))
    fields = {"objectness_logits": torch.Tensor, "proposal_boxes": Boxes,
              "pred_classes": torch.Tensor, "scores": torch.Tensor, "pred_masks": torch.Tensor,
              "pred_boxes": Boxes, "pred_keypoints": torch.Tensor,
              "pred_keypoint_heatmaps": torch.Tensor}
    with freeze_training_mode(heads), patch_instances(fields) as new_instances:
        scripted = _script(heads)
        result, _ = scripted(images, features, proposals(new_instances.from_instances))
    assert sum(len(r) for r in eager) > 0
    for a, b in zip(eager, result):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_masks, b.pred_masks)


def test_scripting_without_detectron2(monkeypatch):
    """`import dsig_ext` does not import detectron2; without detectron2 the scripted pooler is the
    List[Tensor] module itself."""
    import subprocess
    import sys

    code = "import sys, dsig_ext; sys.exit('detectron2' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    monkeypatch.setitem(sys.modules, "dsig_ext._scripting_with_boxes", None)  # import fails
    pooler = dsig_ext.MultiLevelRoIAlign(7, SCALES, 0)
    assert pooler.__prepare_scriptable__() is pooler
    g = torch.Generator().manual_seed(7)
    feats = make_pyramid(2, 3, (96, 64), generator=g)
    boxes = split_boxes(make_boxes(10, (96, 64), g), 2, g)
    assert torch.equal(_script(pooler)(feats, boxes), pooler(feats, boxes))
