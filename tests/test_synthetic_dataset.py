"""The procedural detection dataset: deterministic, valid COCO, real variation."""
import hashlib
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")  # the distillation package imports it
import distill_utils  # noqa: E402,F401  (puts projects/Distillation on sys.path)
from distillation import synthetic  # noqa: E402


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def _ground_truth_ap(coco, anns, iou_type):
    """COCO AP of the annotations scored as detections (pycocotools' loadRes/evaluate path, as
    COCOEvaluator uses it): 1 for a valid dataset."""
    from pycocotools.cocoeval import COCOeval

    dets = [{k: v for k, v in a.items() if k != "id"} | {"score": 1.0} for a in anns]
    ev = COCOeval(coco, coco.loadRes(dets), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[0]


def test_deterministic_for_a_seed(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), "train", 6, seed=3)
    b = synthetic.generate(str(tmp_path / "b"), "train", 6, seed=3)
    synthetic.generate(str(tmp_path / "c"), "train", 6, seed=4)
    assert open(a).read() == open(b).read()
    assert _digest(tmp_path / "a" / "train") == _digest(tmp_path / "b" / "train")
    assert _digest(tmp_path / "a" / "train") != _digest(tmp_path / "c" / "train")


def test_valid_coco_with_variation(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    path = synthetic.generate(str(tmp_path), "val", 40, image_size=(192, 256), seed=0)
    coco = COCO(path)
    assert len(coco.getImgIds()) == 40
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(synthetic.CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 80  # several objects per image
    assert {a["category_id"] for a in anns} == set(range(1, 9))
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in anns])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any()
    assert (areas >= 96 ** 2).any()  # COCO small, medium and large
    for a in anns:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 256 and y + h <= 192
    # loadRes/evaluate path works on it (what COCOEvaluator uses)
    assert _ground_truth_ap(coco, anns, "bbox") > 0.99


def test_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        synthetic.generate(str(tmp_path), "test", 1)


def test_instance_masks_are_the_visible_pixels(tmp_path):
    """with_masks: the same images and boxes, and each object's visible pixels as RLE that
    pycocotools decodes to a mask of the annotated area and box; mask AP of the truth is 1."""
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    plain = synthetic.generate(str(tmp_path / "plain"), "val", 12, image_size=(96, 128), seed=2)
    path = synthetic.generate(str(tmp_path / "masks"), "val", 12, image_size=(96, 128), seed=2,
                              with_masks=True)
    assert _digest(tmp_path / "plain" / "val") == _digest(tmp_path / "masks" / "val")
    coco = COCO(path)
    anns = coco.loadAnns(coco.getAnnIds())
    boxes_only = COCO(plain).loadAnns(COCO(plain).getAnnIds())
    assert [a["bbox"] for a in anns] == [a["bbox"] for a in boxes_only]
    for a in anns:
        m = coco.annToMask(a)
        assert m.shape == (96, 128) and m.sum() == a["area"]
        ys, xs = np.nonzero(m)
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == a["bbox"]
        rle = mask_util.frPyObjects(a["segmentation"], 96, 128)
        assert mask_util.area(rle) == a["area"]
    assert _ground_truth_ap(coco, anns, "segm") > 0.99


def test_rle_of_edge_cases():
    m = np.zeros((3, 4), bool)
    assert synthetic.mask_to_rle(m) == {"size": [3, 4], "counts": [12]}
    m[0, 0] = m[2, 3] = True
    assert synthetic.mask_to_rle(m) == {"size": [3, 4], "counts": [0, 1, 10, 1]}
    m[:] = True
    assert synthetic.mask_to_rle(m)["counts"] == [0, 12]
