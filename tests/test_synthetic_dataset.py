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
    from pycocotools.cocoeval import COCOeval

    dets = [dict(a, score=1.0) for a in anns]
    for d in dets:
        d.pop("id")
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] > 0.99  # the ground truth scores AP 1


def test_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        synthetic.generate(str(tmp_path), "test", 1)
