"""Tiny synthetic COCO datasets and config overrides for the trainer tests."""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, "projects", "Distillation")
CONFIGS = os.path.join(PROJECT, "configs")
if PROJECT not in sys.path:
    sys.path.insert(0, PROJECT)

FASTER_RCNN_CONFIGS = [
    "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml",
    "Distillation-FasterRCNN-R50-R101-dsig-1x.yaml",
    "Distillation-FasterRCNN-R101-R152-dsig-1x.yaml",
    "Distillation-FasterRCNN-MNV2-R50-dsig-1x.yaml",
    "Distillation-FasterRCNN-EB0-R101-dsig-1x.yaml",
]


def make_coco_dataset(root, num_images=4, size=(96, 128), num_classes=3, seed=0,
                      with_masks=False):
    """Images of coloured rectangles on noise, with a COCO json (and, with_masks, each
    rectangle's polygon as its segmentation). Returns (json, image_root)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    h, w = size
    for i in range(num_images):
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cls = int(rng.integers(0, num_classes))
            img[y:y + bh, x:x + bw] = np.array([80, 160, 240])[[cls % 3, (cls + 1) % 3, 2 - cls % 3]]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": cls + 1, "bbox": [x, y, bw, bh],
                                "area": bw * bh, "iscrowd": 0})
            if with_masks:
                annotations[-1]["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        name = f"{i:04d}.png"
        Image.fromarray(img).save(os.path.join(root, "images", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    return path, os.path.join(root, "images")


# Random-weight networks with frozen BN blow up within a few steps: multi-step tests train a
# MobileNetV2 student with BN against a GN teacher.
STABLE_MNV2_OPTS = ["MODEL.MOBILENETV2.NORM", "BN"]
STABLE_TEACHER_OPTS = ", 'MODEL.RESNETS.NORM', 'GN', 'MODEL.FPN.NORM', 'GN'"


def tiny_opts(dataset, output_dir, num_classes=3, iters=1, batch=2, stable=False):
    """Overrides that make any config run in seconds on a CPU with random weights."""
    teacher_opts = (f"['MODEL.ROI_HEADS.NUM_CLASSES', {num_classes}, "
                    f"'MODEL.RETINANET.NUM_CLASSES', {num_classes}")
    teacher_opts += (STABLE_TEACHER_OPTS if stable else "") + "]"
    return (STABLE_MNV2_OPTS if stable else []) + [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes),
        "MODEL.RETINANET.NUM_CLASSES", str(num_classes),
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
        "DISTILL.TEACHER.WEIGHTS", "", "DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True",
        "DISTILL.TEACHER.OPTS", teacher_opts,
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
        "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.MAX_ITER", str(iters),
        "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", output_dir, "SEED", "1",
    ]

MASK_RCNN_CONFIGS = [
    "Distillation-MaskRCNN-R18-R50-dsig-1x.yaml",
    "Distillation-MaskRCNN-R50-R101-dsig-1x.yaml",
]

RETINANET_CONFIGS = [
    "Distillation-RetinaNet-R18-R50-dsig-1x.yaml",
    "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml",
    "Distillation-RetinaNet-EB0-R101-dsig-1x.yaml",
]

# A Faster R-CNN MobileNetV2 base config in the original repository's vocabulary (its layout,
# TEACHER tree and registry names), written as its Base-Distillation.yaml.
LEGACY_BASE = """
MODEL:
  META_ARCHITECTURE: "Distillation"
  BACKBONE:
    NAME: "build_mobilenetv2_fpn_backbone"
  MOBILENETV2:
    OUT_FEATURES: ["m2", "m3", "m4", "m5"]
  FPN:
    IN_FEATURES: ["m2", "m3", "m4", "m5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    POST_NMS_TOPK_TRAIN: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
SOLVER:
  IMS_PER_BATCH: 16
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
TEACHER:
  MODEL:
    META_ARCHITECTURE: "GeneralizedRCNN"
    WEIGHTS: "projects/Distillation/teacher/R50.pkl"
    MASK_ON: False
    BACKBONE:
      NAME: "build_resnet_fpn_backbone"
    RESNETS:
      OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    FPN:
      IN_FEATURES: ["res2", "res3", "res4", "res5"]
    PROPOSAL_GENERATOR:
      NAME: "TeacherRPN"
    RPN:
      IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    ROI_HEADS:
      NAME: "TeacherROIHeads"
      IN_FEATURES: ["p2", "p3", "p4", "p5"]
    ROI_BOX_HEAD:
      NAME: "FastRCNNConvFCHead"
      NUM_FC: 2
      POOLER_RESOLUTION: 7
  SOLVER:
    IMS_PER_BATCH: 16
VERSION: 2
"""
