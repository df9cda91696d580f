"""The Faster R-CNN distillation trainer: configs, teacher loading, checkpoints, export,
backends. Tiny images and random weights; CPU."""
import copy
import os
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, FASTER_RCNN_CONFIGS, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from distillation.checkpoint import (  # noqa: E402
    DistillationCheckpointer, TeacherWeightsError, load_pickle_safely, load_teacher_weights)
from distillation.training import Trainer, load_config, register_datasets  # noqa: E402

DATASET = "dsig_tiny_train"
EXPECTED = {  # the DSIG terms each config switches on
    "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml": {"fg_node", "bg_node", "edge", "feature",
                                                     "roi_cls", "roi_reg"},
    "Distillation-FasterRCNN-R50-R101-dsig-1x.yaml": {"fg_node", "bg_node", "edge"},
    "Distillation-FasterRCNN-R101-R152-dsig-1x.yaml": {"fg_node", "edge"},
    "Distillation-FasterRCNN-MNV2-R50-dsig-1x.yaml": {"fg_node", "bg_node", "edge", "feature",
                                                      "roi_cls", "roi_reg"},
    "Distillation-FasterRCNN-EB0-R101-dsig-1x.yaml": {"fg_node", "bg_node", "edge", "feature",
                                                      "roi_cls", "roi_reg"},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    json_file, image_root = make_coco_dataset(str(root))
    if DATASET not in DatasetCatalog.list():
        register_datasets([(DATASET, json_file, image_root)])
    return json_file, image_root


def config(name, tmp_path, extra=()):
    cfg = load_config(os.path.join(CONFIGS, name), tiny_opts(DATASET, str(tmp_path)) + list(extra))
    return cfg


def one_batch(cfg):
    loader = build_detection_train_loader(cfg)
    return next(iter(loader))


@pytest.mark.parametrize("name", FASTER_RCNN_CONFIGS)
def test_config_trains_one_iteration(name, dataset, tmp_path):
    cfg = config(name, tmp_path)
    assert cfg.SOLVER.IMS_PER_BATCH == 2 and cfg.DISTILL.BACKEND == "fused"
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    dsig = {k[len("loss_dsig_"):] for k in latest if k.startswith("loss_dsig_")}
    assert dsig == EXPECTED[name]
    assert all(np.isfinite(v[0]) for k, v in latest.items() if k.startswith("loss"))
    assert os.path.isfile(os.path.join(str(tmp_path), "model_final_student.pth"))


def test_original_schedule_values():
    cfg = load_config(os.path.join(CONFIGS, FASTER_RCNN_CONFIGS[0]))
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.MAX_ITER == 180000
    assert tuple(cfg.SOLVER.STEPS) == (120000, 160000) and cfg.SOLVER.BASE_LR == 0.01
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert cfg.DISTILL.EDGE_LOSS_WEIGHT == 2.0 and cfg.DISTILL.BG_MINING_THRESHOLD == 0.6
    assert os.path.isabs(cfg.DISTILL.TEACHER.CONFIG)


def _model(cfg):
    cfg = cfg.clone()
    cfg.freeze()
    return build_model(cfg)


def _same_teacher_as_student(dataset, tmp_path, backend="fused"):
    """R50 student with an R50 teacher holding the student's weights."""
    cfg = config("Distillation-FasterRCNN-R50-R101-dsig-1x.yaml", tmp_path, [
        "DISTILL.TEACHER.CONFIG", os.path.join(CONFIGS, "teachers", "faster_rcnn_R_50_FPN.yaml"),
        "DISTILL.FEATURE_LOSS_ON", "True", "DISTILL.ROI_CLS_KD_ON", "True",
        "DISTILL.ROI_REG_KD_ON", "True", "DISTILL.BACKEND", backend])
    model = _model(cfg)
    model.teacher.load_state_dict(model.student.state_dict())
    return cfg, model


def test_losses_vanish_when_student_equals_teacher(dataset, tmp_path):
    cfg, model = _same_teacher_as_student(dataset, tmp_path)
    model.train()
    torch.manual_seed(0)
    with EventStorage():
        losses = model(one_batch(cfg))
    dsig = {k: v for k, v in losses.items() if k.startswith("loss_dsig_")}
    assert set(dsig) == {"loss_dsig_fg_node", "loss_dsig_bg_node", "loss_dsig_edge",
                         "loss_dsig_feature", "loss_dsig_roi_cls", "loss_dsig_roi_reg"}
    for k, v in dsig.items():
        assert abs(v.item()) < 1e-6, (k, v.item())


def test_fused_and_reference_backends_agree(dataset, tmp_path):
    cfg = config("Distillation-FasterRCNN-R18-R50-dsig-1x.yaml", tmp_path)
    batch = one_batch(cfg)
    results = []
    for backend in ("fused", "reference"):
        c = cfg.clone()
        c.DISTILL.BACKEND = backend
        torch.manual_seed(3)
        model = _model(c)
        model.train()
        torch.manual_seed(4)
        with EventStorage():
            losses = model(batch)
        total = sum(losses.values())
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters()
                 if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (l_f, g_f), (l_r, g_r) = results
    assert l_f.keys() == l_r.keys()
    for k in l_f:
        assert l_f[k] == pytest.approx(l_r[k], rel=1e-4, abs=1e-6), k
    assert g_f.keys() == g_r.keys() and len(g_f) > 30
    for n in g_f:  # random FrozenBN networks give large activations: compare to the scale
        scale = g_r[n].abs().max().item()
        torch.testing.assert_close(g_f[n], g_r[n], rtol=1e-4, atol=1e-5 * scale + 1e-10)


@pytest.mark.parametrize("threshold", [0.0, 1e9])
def test_graph_sizes_are_logged(dataset, tmp_path, threshold):
    """dsig/graph_nodes and dsig/mined_bg_fraction describe the graphs the edge loss saw: every
    sampled bg RoI mined at threshold 0, none at an unreachable threshold."""
    # seeded: the random teacher's bg logits decide the mining (one unseeded full-file run, with
    # other tests' RNG use before it, saw a mined fraction below 1 at threshold 0)
    torch.manual_seed(0)
    cfg = config(FASTER_RCNN_CONFIGS[1], tmp_path, ["DISTILL.BG_MINING_THRESHOLD", threshold])
    model = _model(cfg)
    model.train()
    model.record_graph = True
    batch = one_batch(cfg)
    with EventStorage() as storage:
        model(batch)
    logged = {k: v for k, (v, _) in storage.latest().items()}
    nodes_per_image = sum(model.last_graph["counts"]) / len(batch)
    assert logged["dsig/graph_nodes"] == pytest.approx(nodes_per_image)
    # detectron2's own per-image means of the sampled RoIs
    fg, bg = logged["roi_head/num_fg_samples"], logged["roi_head/num_bg_samples"]
    assert bg > 0
    if threshold == 0.0:
        assert logged["dsig/mined_bg_fraction"] == 1.0
        assert nodes_per_image == pytest.approx(fg + bg)  # every sampled RoI is a node
    else:
        assert logged["dsig/mined_bg_fraction"] == 0.0
        assert nodes_per_image == pytest.approx(fg)


def test_teacher_is_frozen_and_in_eval(dataset, tmp_path):
    cfg = config(FASTER_RCNN_CONFIGS[1], tmp_path)
    model = _model(cfg)
    model.train()
    assert not model.teacher.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    with EventStorage():
        losses = model(one_batch(cfg))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_weight_mismatch_is_an_error(dataset, tmp_path):
    cfg = config(FASTER_RCNN_CONFIGS[1], tmp_path)  # R101 teacher
    model = _model(cfg)
    r50 = _model(config(FASTER_RCNN_CONFIGS[0], tmp_path)).teacher  # R50 teacher
    path = str(tmp_path / "r50_teacher.pth")
    torch.save({"model": r50.state_dict()}, path)
    with pytest.raises(TeacherWeightsError, match="missing in the weights") as err:
        load_teacher_weights(model.teacher, path)
    msg = str(err.value)  # R101 has res4.6 .. res4.22, R50 stops at res4.5
    assert "missing in the weights (" in msg and "backbone.bottom_up.res4.1" in msg
    # wrong shapes: a 5-class teacher checkpoint for a 3-class teacher
    state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(6, 1024)
    torch.save({"model": state}, path)
    with pytest.raises(TeacherWeightsError, match="wrong shape"):
        load_teacher_weights(model.teacher, path)
    # extra keys
    state = dict(model.teacher.state_dict(), **{"roi_heads.mask_head.x.weight": torch.zeros(1)})
    torch.save({"model": state}, path)
    with pytest.raises(TeacherWeightsError, match="unexpected"):
        load_teacher_weights(model.teacher, path)
    # a complete, matching file loads
    torch.save({"model": model.teacher.state_dict()}, path)
    load_teacher_weights(model.teacher, path)


def test_model_zoo_pkl_teacher_and_unsafe_pickle(tmp_path, dataset):
    cfg = config(FASTER_RCNN_CONFIGS[1], tmp_path)
    model = _model(cfg)
    zoo = {"model": {k: v.numpy().copy() for k, v in model.teacher.state_dict().items()},
           "__author__": "test"}
    path = str(tmp_path / "teacher.pkl")
    with open(path, "wb") as f:
        pickle.dump(zoo, f)
    first = next(iter(model.teacher.parameters()))
    with torch.no_grad():
        first.add_(1.0)
    load_teacher_weights(model.teacher, path)
    key = next(iter(model.teacher.state_dict()))
    torch.testing.assert_close(model.teacher.state_dict()[key], torch.as_tensor(zoo["model"][key]))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Evil()}, "__author__": "x"}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_pickle_safely(path)


def test_original_merged_student_teacher_checkpoint(dataset, tmp_path):
    cfg = config(FASTER_RCNN_CONFIGS[1], tmp_path)
    source = _model(cfg)
    merged = {"teacher." + k: v.numpy().copy() for k, v in source.teacher.state_dict().items()}
    merged.update({k: v.numpy().copy() for k, v in source.student.state_dict().items()
                   if k.startswith("backbone.bottom_up.")})
    path = str(tmp_path / "r50-r101.pth")
    torch.save(merged, path)  # one flat dict of numpy arrays, as the original's merge.py
    target = _model(cfg)
    DistillationCheckpointer(target).load(path)
    for k, v in source.teacher.state_dict().items():
        torch.testing.assert_close(target.teacher.state_dict()[k], v, msg=k)
    for k, v in source.student.state_dict().items():
        if k.startswith("backbone.bottom_up."):
            torch.testing.assert_close(target.student.state_dict()[k], v, msg=k)
    # a merged file whose teacher part does not fit is refused
    bad = dict(merged)
    bad.pop(next(k for k in bad if k.startswith("teacher.")))
    torch.save(bad, path)
    with pytest.raises(TeacherWeightsError, match="missing"):
        DistillationCheckpointer(_model(cfg)).load(path)


def test_exported_student_loads_into_stock_model(dataset, tmp_path):
    from distillation.checkpoint import export_student

    cfg = config(FASTER_RCNN_CONFIGS[3], tmp_path)  # MobileNetV2 student
    model = _model(cfg)
    ckpt = DistillationCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_final")
    out = str(tmp_path / "student.pth")
    keys = export_student(str(tmp_path / "model_final.pth"), out)
    assert keys and not any(k.startswith(("student.", "teacher.")) for k in keys)
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    stock = _model(stock_cfg)
    incompatible = DetectionCheckpointer(stock)._load_model(torch.load(out, weights_only=True))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    model.eval()
    stock.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in one_batch(cfg)]
    with torch.no_grad():
        a, b = model(copy.deepcopy(batch)), stock(copy.deepcopy(batch))
    for x, y in zip(a, b):
        torch.testing.assert_close(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        torch.testing.assert_close(x["instances"].scores, y["instances"].scores)


def test_torchvision_backbone_converter(tmp_path, dataset):
    import torchvision
    from tools_convert import convert

    for arch, name in (("resnet18", FASTER_RCNN_CONFIGS[0]), ("resnet50", FASTER_RCNN_CONFIGS[1]),
                       ("mobilenet_v2", FASTER_RCNN_CONFIGS[3]),
                       ("efficientnet_b0", FASTER_RCNN_CONFIGS[4])):
        net = getattr(torchvision.models, arch)(weights=None)
        weights = convert(arch, net.state_dict())
        path = str(tmp_path / f"{arch}.pth")
        torch.save({"model": weights}, path)
        model = _model(config(name, tmp_path))
        DistillationCheckpointer(model).load(path)
        student = model.student.state_dict()
        for k, v in weights.items():
            torch.testing.assert_close(student[k], v, msg=k)
        # every backbone tensor of the student comes from the file, and nothing else
        assert {k for k in student if k.startswith("backbone.bottom_up.")} == set(weights)


def test_teacher_without_weights_is_refused(dataset, tmp_path):
    cfg = config(FASTER_RCNN_CONFIGS[3], tmp_path, ["DISTILL.TEACHER.ALLOW_RANDOM_INIT", "False"])
    cfg.freeze()
    trainer = Trainer(cfg)
    with pytest.raises(RuntimeError, match="the teacher has no weights"):
        trainer.resume_or_load(resume=False)


def test_exported_student_evaluates_to_the_same_ap(dataset, tmp_path):
    from distillation.checkpoint import export_student

    cfg = config(FASTER_RCNN_CONFIGS[3], tmp_path, ["DATASETS.TEST", f"('{DATASET}',)",
                                                    "MODEL.MOBILENETV2.NORM", "BN"])
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # one step, then the trainer's own evaluation of the final model
    own = trainer.test(cfg, trainer.model)
    export_student(os.path.join(str(tmp_path), "model_final.pth"), str(tmp_path / "s.pth"))
    stock_cfg = cfg.clone()
    stock_cfg.defrost()
    stock_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    stock = _model(stock_cfg)
    DetectionCheckpointer(stock).load(str(tmp_path / "s.pth"))
    theirs = Trainer.test(stock_cfg, stock)
    assert own.keys() == theirs.keys() and "bbox" in own
    for k, v in own["bbox"].items():
        assert v == pytest.approx(theirs["bbox"][k], nan_ok=True), k


def test_every_absent_student_key_is_reported(dataset, tmp_path):
    """A student file without a FrozenBN layer's statistics: detectron2 fills them in silently
    for files without version metadata (the original's merged files); they are reported, with or
    without metadata. The original's pixel_mean/std keys are not reported as unused."""
    cfg = config(FASTER_RCNN_CONFIGS[0], tmp_path)  # ResNet-18 student, FrozenBN
    source = _model(cfg)
    state = source.student.state_dict()
    norm = next(k[:-len(".running_mean")] for k in state
                if k.endswith(".running_mean") and "bottom_up" in k)
    dropped = {f"{norm}.running_mean", f"{norm}.running_var"}
    plain = {k: v.clone() for k, v in state.items() if k not in dropped}  # no metadata
    plain["pixel_mean"] = torch.zeros(3)
    plain["pixel_std"] = torch.ones(3)
    with_metadata = type(state)((k, v) for k, v in state.items() if k not in dropped)
    with_metadata._metadata = state._metadata
    for weights in (plain, with_metadata):
        incompatible = DistillationCheckpointer(_model(cfg))._load_model({"model": weights})
        assert {"student." + k for k in dropped} <= set(incompatible.missing_keys)
        assert not [k for k in incompatible.unexpected_keys if "pixel_" in k]
        assert not [k for k in incompatible.missing_keys if k.startswith("student.")
                    and k[len("student."):] not in dropped]
