"""DSIG with Mask R-CNN students: the box-branch DSIG terms, the student's own mask branch (on the
fused pooler too), export into a stock Mask R-CNN, mask AP. Tiny images, random weights; CPU."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, MASK_RCNN_CONFIGS, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import ROIPooler  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import dsig_ext  # noqa: E402
from distillation.checkpoint import export_student  # noqa: E402
from distillation.training import Trainer, load_config, register_datasets  # noqa: E402

DATASET = "dsig_tiny_masks"
EXPECTED = {  # as the Faster R-CNN recipe each config extends
    MASK_RCNN_CONFIGS[0]: {"fg_node", "bg_node", "edge", "feature", "roi_cls", "roi_reg"},
    MASK_RCNN_CONFIGS[1]: {"fg_node", "bg_node", "edge"},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco_masks")
    json_file, image_root = make_coco_dataset(str(root), with_masks=True)
    if DATASET not in DatasetCatalog.list():
        register_datasets([(DATASET, json_file, image_root)])
    return json_file, image_root


def config(name, tmp_path, extra=()):
    return load_config(os.path.join(CONFIGS, name),
                       tiny_opts(DATASET, str(tmp_path)) + list(extra))


def frozen(cfg):
    cfg = cfg.clone()
    cfg.freeze()
    return cfg


@pytest.mark.parametrize("name", MASK_RCNN_CONFIGS)
def test_config_trains_one_iteration(name, dataset, tmp_path):
    shipped = load_config(os.path.join(CONFIGS, name))
    assert shipped.MODEL.MASK_ON and shipped.DISTILL.TEACHER.WEIGHTS.startswith(
        "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_")
    cfg = config(name, tmp_path)
    trainer = Trainer(frozen(cfg))
    assert trainer.model.teacher.roi_heads.mask_on  # a Mask R-CNN teacher, as in the zoo
    assert isinstance(trainer.model.student.roi_heads.mask_pooler, dsig_ext.MultiLevelRoIAlign)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    assert {k[len("loss_dsig_"):] for k in latest if k.startswith("loss_dsig_")} == EXPECTED[name]
    assert "loss_mask" in latest
    assert all(np.isfinite(v[0]) for k, v in latest.items() if k.startswith("loss"))
    assert os.path.isfile(os.path.join(str(tmp_path), "model_final_student.pth"))


def test_fused_and_reference_backends_agree(dataset, tmp_path):
    cfg = config(MASK_RCNN_CONFIGS[0], tmp_path)
    batch = next(iter(build_detection_train_loader(frozen(cfg))))
    results = []
    for backend in ("fused", "reference"):
        c = cfg.clone()
        c.DISTILL.BACKEND = backend
        torch.manual_seed(3)
        model = build_model(frozen(c))
        pooler = model.student.roi_heads.mask_pooler
        assert isinstance(pooler, dsig_ext.MultiLevelRoIAlign if backend == "fused" else ROIPooler)
        model.train()
        torch.manual_seed(4)
        with EventStorage():
            losses = model(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters()
                 if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (l_f, g_f), (l_r, g_r) = results
    assert l_f.keys() == l_r.keys() and "loss_mask" in l_f
    for k in l_f:
        assert l_f[k] == pytest.approx(l_r[k], rel=1e-4, abs=1e-6), k
    assert g_f.keys() == g_r.keys()
    assert any(n.startswith("roi_heads.mask_head.") for n in g_f)
    for n in g_f:
        scale = g_r[n].abs().max().item()
        torch.testing.assert_close(g_f[n], g_r[n], rtol=1e-4, atol=1e-5 * scale + 1e-10)


def test_exported_student_is_a_stock_mask_rcnn_with_equal_outputs_and_ap(dataset, tmp_path):
    # GN: a random FrozenBN ResNet's activations overflow, leaving nothing to evaluate
    cfg = config(MASK_RCNN_CONFIGS[0], tmp_path, ["DATASETS.TEST", f"('{DATASET}',)",
                                                  "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                                  "MODEL.RESNETS.NORM", "GN",
                                                  "MODEL.FPN.NORM", "GN"])
    trainer = Trainer(frozen(cfg))
    trainer.resume_or_load(resume=False)
    trainer.train()  # one step
    own = trainer.test(frozen(cfg), trainer.model)
    assert "AP" in own["segm"] and "AP" in own["bbox"]  # mask AP computed
    export_student(os.path.join(str(tmp_path), "model_final.pth"), str(tmp_path / "s.pth"))
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    stock = build_model(frozen(stock_cfg)).eval()
    DetectionCheckpointer(stock).load(str(tmp_path / "s.pth"))
    assert isinstance(stock.roi_heads.mask_pooler, ROIPooler)  # detectron2's own pooler

    ours = trainer.model.eval()
    image = torch.as_tensor(np.random.default_rng(0).integers(0, 255, (3, 96, 128)),
                            dtype=torch.uint8)
    with torch.no_grad():
        a = ours([{"image": image}])[0]["instances"]
        b = stock([{"image": image}])[0]["instances"]
    assert len(a) == len(b) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3  # thresholded at 0.5
    theirs = Trainer.test(frozen(stock_cfg), stock)
    for task in ("bbox", "segm"):
        for k, v in own[task].items():
            assert v == pytest.approx(theirs[task][k], abs=1e-6, nan_ok=True), (task, k)


def test_faster_rcnn_teacher_with_mask_rcnn_student(dataset, tmp_path):
    cfg = config(MASK_RCNN_CONFIGS[0], tmp_path, [
        "DISTILL.TEACHER.CONFIG", os.path.join(CONFIGS, "teachers", "faster_rcnn_R_50_FPN.yaml")])
    trainer = Trainer(frozen(cfg))
    assert not trainer.model.teacher.roi_heads.mask_on
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    assert "loss_mask" in latest and "loss_dsig_edge" in latest


def test_non_roialign_mask_pooler_stays_with_detectron2(dataset, tmp_path):
    cfg = config(MASK_RCNN_CONFIGS[0], tmp_path, ["MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIPool"])
    trainer = Trainer(frozen(cfg))
    heads = trainer.model.student.roi_heads
    assert isinstance(heads.mask_pooler, ROIPooler)
    assert isinstance(heads.box_pooler, dsig_ext.MultiLevelRoIAlign)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert np.isfinite(trainer.storage.latest()["loss_mask"][0])


def test_keypoint_students_are_refused(dataset, tmp_path):
    cfg = config(MASK_RCNN_CONFIGS[0], tmp_path, ["MODEL.KEYPOINT_ON", "True"])
    with pytest.raises(ValueError, match="KEYPOINT_ON is not supported"):
        build_model(frozen(cfg))


def test_trains_under_autocast(dataset, tmp_path):
    from distillation.training import AutocastTrainer

    cfg = config(MASK_RCNN_CONFIGS[0], tmp_path, ["SOLVER.AMP.ENABLED", "True"])
    trainer = Trainer(frozen(cfg))
    assert isinstance(trainer._trainer, AutocastTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    assert "loss_mask" in latest and "loss_dsig_edge" in latest
    assert all(np.isfinite(v[0]) for k, v in latest.items() if k.startswith("loss"))
