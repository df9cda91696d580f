"""RetinaNet DSIG: the three configs, nodes = post-NMS student detections, zero losses for a
student equal to its teacher, dense KD by hand, export into a stock RetinaNet."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, RETINANET_CONFIGS, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from distillation import losses as L  # noqa: E402
from distillation.checkpoint import DistillationCheckpointer, export_student  # noqa: E402
from distillation.training import Trainer, load_config, register_datasets  # noqa: E402

DATASET = "dsig_tiny_retina"
EXPECTED = {
    RETINANET_CONFIGS[0]: {"node", "edge", "feature", "dense_cls", "dense_reg"},
    RETINANET_CONFIGS[1]: {"node", "edge", "feature"},
    RETINANET_CONFIGS[2]: {"node", "edge", "feature"},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    json_file, image_root = make_coco_dataset(str(tmp_path_factory.mktemp("tiny_retina")))
    if DATASET not in DatasetCatalog.list():
        register_datasets([(DATASET, json_file, image_root)])


def config(name, tmp_path, extra=()):
    return load_config(os.path.join(CONFIGS, name),
                       tiny_opts(DATASET, str(tmp_path)) + list(extra))


def model_of(cfg):
    cfg = cfg.clone()
    cfg.freeze()
    return build_model(cfg)


@pytest.mark.parametrize("name", RETINANET_CONFIGS)
def test_config_trains_one_iteration(name, dataset, tmp_path):
    cfg = config(name, tmp_path)
    assert cfg.SOLVER.BASE_LR == 0.001 and len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) == 3
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    assert {k[len("loss_dsig_"):] for k in latest if k.startswith("loss_dsig_")} == EXPECTED[name]
    assert all(np.isfinite(v[0]) for k, v in latest.items() if k.startswith("loss"))
    assert 0 < latest["dsig/graph_nodes"][0] <= cfg.DISTILL.NODE_MAX_PER_IMAGE


def test_original_schedule_and_anchors():
    cfg = load_config(os.path.join(CONFIGS, RETINANET_CONFIGS[0]))
    assert cfg.SOLVER.BASE_LR == 0.005 and cfg.SOLVER.MAX_ITER == 180000
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and tuple(cfg.SOLVER.STEPS) == (120000, 160000)
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    expected = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
    assert np.allclose(sizes, expected, rtol=1e-12)
    mnv2 = load_config(os.path.join(CONFIGS, RETINANET_CONFIGS[1]))
    assert list(mnv2.MODEL.FPN.IN_FEATURES) == ["m3", "m4", "m5"]  # no unused p2 branch (B5)


def _batch(cfg):
    return next(iter(build_detection_train_loader(cfg)))


def test_feature_loss_levels_default_to_the_heads_and_unknown_ones_fail(dataset, tmp_path):
    model = model_of(config(RETINANET_CONFIGS[1], tmp_path, ["DISTILL.FEATURE_LOSS_LEVELS", "[]"]))
    assert model.feature_loss_levels == ["p3", "p4", "p5", "p6", "p7"]
    with pytest.raises(ValueError, match="unknown level 'p2'"):
        model_of(config(RETINANET_CONFIGS[1], tmp_path,
                        ["DISTILL.FEATURE_LOSS_LEVELS", "['p2', 'p3']"]))


def test_nodes_are_the_students_post_nms_detections(dataset, tmp_path):
    cfg = config(RETINANET_CONFIGS[1], tmp_path)
    model = model_of(cfg)
    s = model.student
    batch = _batch(cfg)
    with torch.no_grad():
        # a fresh head gives padded regions identical logits; tied scores are ordered
        # arbitrarily (by the inference path's sort as by the nodes' top-k), so untie them
        g = torch.Generator().manual_seed(0)
        for p in s.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        images = s.preprocess_image(batch)
        feats = s.backbone(images.tensor)
        features = [feats[f] for f in s.head_in_features]
        predictions = s.head(features)
        nodes = model.student_detections(images, features, predictions)
        # the stock inference path with the node settings: score threshold 0, top 1000 per
        # level, class-wise NMS 0.5, keep 100, no clipping
        s.test_score_thresh, s.test_topk_candidates = 0.0, 1000
        s.test_nms_thresh, s.max_detections_per_image = 0.5, 100
        expected = s.forward_inference(images, features, [[p.clone() for p in q]
                                                          for q in predictions])
    for a, b in zip(nodes, expected):
        assert len(a) == len(b) == 100
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
        torch.testing.assert_close(a.scores, b.scores)


def test_losses_vanish_when_student_equals_teacher(dataset, tmp_path):
    teacher = os.path.join(CONFIGS, "teachers", "retinanet_R_50_FPN.yaml")
    cfg = config(RETINANET_CONFIGS[0], tmp_path, [
        "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
        "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]",
        "INPUT.FORMAT", "BGR", "DISTILL.TEACHER.CONFIG", teacher])
    model = model_of(cfg)
    model.teacher.load_state_dict(model.student.state_dict())
    model.train()
    with EventStorage():
        losses = model(_batch(cfg))
    dsig = {k: v.item() for k, v in losses.items() if k.startswith("loss_dsig_")}
    assert set(dsig) == {"loss_dsig_node", "loss_dsig_edge", "loss_dsig_feature",
                         "loss_dsig_dense_cls", "loss_dsig_dense_reg"}
    assert all(abs(v) < 1e-6 for v in dsig.values()), dsig


def test_dense_kd_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    labels = torch.tensor([[0, -1, 3, 1, 3], [2, 3, -1, -1, 0]])  # 3 = background, -1 ignored
    valid = labels >= 0
    manual = 0.0
    for n in range(2):
        for a in range(5):
            if labels[n, a] >= 0:
                p = F.softmax(t[n, a], 0)
                manual += (p * (p.log() - F.log_softmax(s[n, a], 0))).sum()
    manual /= valid.sum() * 3
    torch.testing.assert_close(L.dense_cls_kd_loss(s, t, valid, 1.0), manual)
    ds, dt = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    pos = valid & (labels != 3)
    manual = sum((ds[n, a] - dt[n, a]).abs().sum() for n in range(2) for a in range(5)
                 if pos[n, a]) / int(pos.sum())
    torch.testing.assert_close(L.dense_reg_kd_loss(ds, dt, pos, 1.0), manual)
    none = torch.zeros_like(pos)
    assert L.dense_reg_kd_loss(ds, dt, none, 1.0) == 0  # divided by max(1, 0)


def test_export_into_stock_retinanet_and_no_teacher_at_inference(dataset, tmp_path):
    cfg = config(RETINANET_CONFIGS[2], tmp_path)
    model = model_of(cfg)
    DistillationCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    export_student(str(tmp_path / "model_final.pth"), str(tmp_path / "student.pth"))
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    stock = model_of(stock_cfg)
    DetectionCheckpointer(stock).load(str(tmp_path / "student.pth"))
    model.eval()
    stock.eval()
    calls = []
    model.teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _batch(cfg)]
    with torch.no_grad():
        a, b = model(copy.deepcopy(batch)), stock(copy.deepcopy(batch))
    assert not calls  # the teacher does no work at inference (original W1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x["instances"].pred_boxes.tensor,
                                   y["instances"].pred_boxes.tensor)
