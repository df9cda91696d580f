"""Moving over from the original DSIG repository: configs in its key vocabulary (KD.*, the
TEACHER tree, its registry names), its merged checkpoints, and safe YAML loading."""
import logging
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import LEGACY_BASE, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import (BACKBONE_REGISTRY, META_ARCH_REGISTRY,  # noqa: E402
                                 PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY, build_model)

from distillation import DistillationRCNN, DistillationRetinaNet  # noqa: E402
from distillation.checkpoint import DistillationCheckpointer  # noqa: E402
from distillation.training import Trainer, load_config, register_datasets  # noqa: E402
from distillation.yaml_io import UnsafeYAMLError  # noqa: E402

DATASET = "dsig_tiny_legacy"

LEGACY_R18 = """
_BASE_: "Base-Distillation.yaml"
MODEL:
  META_ARCHITECTURE: "Distillation"
  PIXEL_STD: [57.375, 57.120, 58.395]
  BACKBONE:
    NAME: "build_resnet_fpn_backbone_kd"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  PROPOSAL_GENERATOR:
    NAME: "DistillRPN"
  ROI_HEADS:
    NAME: "DistillROIHeads"
TEACHER:
  MODEL:
    RESNETS:
      DEPTH: 50
SOLVER:
  IMS_PER_BATCH: 8
  BASE_LR: 0.01
  MAX_ITER: 180000
  STEPS: [120000, 160000]
KD:
  FEATURE_ON: True
  FEATURE_LOSS_WEIGHT: 0.5
  REGION_CORRELATION_LOSS_ON: True
  REGION_CORRELATION_LOSS_WEIGHT: 1.0
  REGION_CORRELATION_LOSS_USE_BG_FEATURE: True
  REGION_CORRELATION_LOSS_WEIGHT_POOL: 2.0
  REGION_CORRELATION_HEAD_LOSS: False
  REGION_CORRELATION_POOL_LOSS: True
  FEATURE_ROIPOOL_FG_LOSS_ON: True
  FEATURE_ROIPOOL_FG_LOSS_WEIGHT: 0.5
  FEATURE_ROIPOOL_BG_LOSS_ON: True
  FEATURE_ROIPOOL_BG_LOSS_WEIGHT: 0.5
  ROI_CLS_ON: True
  ROI_CLS_LOSS_WEIGHT: 3.0
  ROI_REG_ON: True
  ROI_REG_LOSS_WEIGHT: 1.0
  USE_BG_FEATURE_MINING_THRS: True
  BG_MINING_THRS: 0.6
  BG_FEATURE_MINING_ON: True
  USE_BG_WEIGHT_SCALE: True
  BG_WEIGHT_ALPHA: 7.5
"""

LEGACY_RETINANET = """
_BASE_: "Base-Distillation.yaml"
MODEL:
  META_ARCHITECTURE: "RetinaNetKD"
  PIXEL_MEAN: [103.530, 116.280, 123.675]
  PIXEL_STD: [57.375, 57.120, 58.395]
  BACKBONE:
    NAME: "build_retinanet_mnv2_fpn_backbone"
    FREEZE_AT: 0
  MOBILENETV2:
    OUT_FEATURES: ["m3", "m4", "m5"]
  ANCHOR_GENERATOR:
    SIZES: !!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] for x in [32, 64, 128, 256, 512 ]]"]
  FPN:
    IN_FEATURES: ["m3", "m4", "m5"]
  RETINANET:
    IOU_THRESHOLDS: [0.4, 0.5]
    IOU_LABELS: [0, -1, 1]
    SMOOTH_L1_LOSS_BETA: 0.0
SOLVER:
  BASE_LR: 0.005
TEACHER:
  MODEL:
    META_ARCHITECTURE: "RetinaNet"
    BACKBONE:
      NAME: "build_retinanet_resnet_fpn_backbone"
    RESNETS:
      OUT_FEATURES: ["res3", "res4", "res5"]
      DEPTH: 50
    ANCHOR_GENERATOR:
      SIZES: !!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] for x in [32, 64, 128, 256, 512 ]]"]
    FPN:
      IN_FEATURES: ["res3", "res4", "res5"]
    RETINANET:
      IOU_THRESHOLDS: [0.4, 0.5]
      IOU_LABELS: [0, -1, 1]
KD:
  FEATURE_ON: True
  FEATURE_LOSS_WEIGHT: 0.5
  REGION_CORRELATION_LOSS_ON: True
  REGION_CORRELATION_LOSS_WEIGHT: 1.0
  REGION_CORRELATION_LOSS_WEIGHT_POOL: 1.0
  FEATURE_ROIPOOL_FG_LOSS_ON: True
  FEATURE_ROIPOOL_FG_LOSS_WEIGHT: 0.5
"""


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    json_file, image_root = make_coco_dataset(str(root / "data"))
    if DATASET not in DatasetCatalog.list():
        register_datasets([(DATASET, json_file, image_root)])
    (root / "Base-Distillation.yaml").write_text(LEGACY_BASE)
    (root / "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml").write_text(LEGACY_R18)
    (root / "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml").write_text(LEGACY_RETINANET)
    return root


def test_registry_names_of_the_original_resolve_to_ours():
    assert META_ARCH_REGISTRY.get("Distillation") is DistillationRCNN
    assert META_ARCH_REGISTRY.get("RetinaNetKD") is DistillationRetinaNet
    assert ROI_HEADS_REGISTRY.get("DistillROIHeads") is ROI_HEADS_REGISTRY.get("StandardROIHeads")
    assert ROI_HEADS_REGISTRY.get("TeacherROIHeads") is ROI_HEADS_REGISTRY.get("StandardROIHeads")
    assert PROPOSAL_GENERATOR_REGISTRY.get("DistillRPN") is PROPOSAL_GENERATOR_REGISTRY.get("RPN")
    assert PROPOSAL_GENERATOR_REGISTRY.get("TeacherRPN") is PROPOSAL_GENERATOR_REGISTRY.get("RPN")
    for old, new in (("build_resnet_fpn_backbone_kd", "build_resnet_fpn_backbone"),
                     ("build_e0_fpn_backbone_kd", "build_efficientnet_b0_fpn_backbone"),
                     ("build_retinanet_mnv2_fpn_backbone",
                      "build_retinanet_mobilenetv2_fpn_backbone"),
                     ("build_retinanet_e0_fpn_backbone",
                      "build_retinanet_efficientnet_b0_fpn_backbone")):
        assert BACKBONE_REGISTRY.get(old) is BACKBONE_REGISTRY.get(new)
    assert "build_mobilenetv2_fpn_backbone" in BACKBONE_REGISTRY


def test_original_faster_rcnn_config_translates_and_trains(legacy_dir, tmp_path, caplog):
    path = str(legacy_dir / "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)  # KD.REGION_CORRELATION_LOSS_WEIGHT made the original fail (B1)
    assert "REGION_CORRELATION_LOSS_WEIGHT" in caplog.text and "TEACHER.MODEL.WEIGHTS" in caplog.text
    d = cfg.DISTILL
    assert cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN"
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads" and cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
    assert (d.FEATURE_LOSS_ON, d.FEATURE_LOSS_WEIGHT, d.EDGE_LOSS_WEIGHT) == (True, 0.5, 2.0)
    assert (d.FG_NODE_LOSS_WEIGHT, d.BG_NODE_LOSS_ON, d.BG_WEIGHT_ALPHA) == (0.5, True, 7.5)
    assert d.BG_ADAPTIVE_WEIGHT_ON and d.BG_MINING_ON and d.BG_MINING_THRESHOLD == 0.6
    assert (d.ROI_CLS_KD_ON, d.ROI_CLS_KD_WEIGHT, d.ROI_REG_KD_WEIGHT) == (True, 3.0, 1.0)
    assert list(d.FEATURE_LOSS_LEVELS) == ["p2", "p3", "p4", "p5", "p6"]
    # the original's R18 channel flip becomes RGB input with reversed statistics
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_STD) == [58.395, 57.120, 57.375]
    assert d.TEACHER.CONFIG.endswith("Base-RCNN-FPN.yaml")
    opts = dict(zip(d.TEACHER.OPTS[::2], d.TEACHER.OPTS[1::2]))
    assert opts["MODEL.RESNETS.DEPTH"] == "50" and opts["MODEL.ROI_HEADS.NAME"] == "StandardROIHeads"
    cfg = load_config(path, tiny_opts(DATASET, str(tmp_path)))
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    keys = {k for k in trainer.storage.latest() if k.startswith("loss_dsig_")}
    assert keys == {"loss_dsig_fg_node", "loss_dsig_bg_node", "loss_dsig_edge",
                    "loss_dsig_feature", "loss_dsig_roi_cls", "loss_dsig_roi_reg"}


def test_python_yaml_tags_refused_unless_allowed(legacy_dir, tmp_path):
    path = str(legacy_dir / "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml")
    with pytest.raises(UnsafeYAMLError) as err:
        load_config(path)
    message = str(err.value)
    assert path + ":13:" in message and "--allow-unsafe-yaml" in message and "SIZES" in message
    cfg = load_config(path, tiny_opts(DATASET, str(tmp_path)), allow_unsafe_yaml=True)
    expected = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
    assert np.allclose(cfg.MODEL.ANCHOR_GENERATOR.SIZES, expected)
    assert cfg.MODEL.META_ARCHITECTURE == "DistillationRetinaNet"
    assert cfg.MODEL.BACKBONE.NAME == "build_retinanet_mobilenetv2_fpn_backbone"
    assert list(cfg.DISTILL.FEATURE_LOSS_LEVELS) == ["p3", "p4", "p5", "p6", "p7"]
    assert not cfg.DISTILL.BG_NODE_LOSS_ON and not cfg.DISTILL.BG_MINING_ON
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert {k for k in trainer.storage.latest() if k.startswith("loss_dsig_")} == {
        "loss_dsig_node", "loss_dsig_edge", "loss_dsig_feature"}


def test_safe_loading_also_guards_our_own_configs(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("MODEL:\n  WEIGHTS: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UnsafeYAMLError, match=r"x.yaml:2:"):
        load_config(str(bad))


def test_unsupported_original_switches_are_refused(tmp_path):
    cfg_file = tmp_path / "rpnkd.yaml"
    cfg_file.write_text(textwrap.dedent("""
        MODEL:
          META_ARCHITECTURE: "Distillation"
        KD:
          RPN_CLS_ON: True
    """))
    with pytest.raises(ValueError, match="RPN_CLS_ON"):
        load_config(str(cfg_file))


def test_original_merged_retinanet_checkpoint(legacy_dir, tmp_path):
    cfg = load_config(str(legacy_dir / "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml"),
                      tiny_opts(DATASET, str(tmp_path)), allow_unsafe_yaml=True)
    cfg.freeze()
    source, target = build_model(cfg), build_model(cfg)
    teacher = source.teacher.state_dict()
    assert any(k.startswith("head.") for k in teacher)
    merged = {"teacher." + k: v.numpy().copy() for k, v in teacher.items()}
    merged.update({k: v.numpy().copy() for k, v in source.student.state_dict().items()
                   if k.startswith("backbone.bottom_up.")})
    path = str(tmp_path / "mv2-r50-rt.pth")
    torch.save(merged, path)
    DistillationCheckpointer(target).load(path)
    assert target.teacher_weights_loaded
    for k, v in teacher.items():
        torch.testing.assert_close(target.teacher.state_dict()[k], v, msg=k)
