"""Migration from the original DSIG repository (dvlab-research/Dsig): its config vocabulary
(`KD.*`, the `TEACHER.*` tree), its registry names and its merged checkpoints.

`translate_config(data, config_path)` turns a config dict written for the original into this
project's keys; `register_legacy_names()` makes the original's registry names resolve to ours.
The table below is the documented mapping (also in projects/Distillation/README.md).
"""
import copy
import logging
import os
from typing import Any, Dict, List, Tuple

logger = logging.getLogger(__name__)

META_ARCHITECTURES = {"Distillation": "DistillationRCNN", "RetinaNetKD": "DistillationRetinaNet"}
COMPONENTS = {  # proposal generators and RoI heads
    "DistillRPN": "RPN", "TeacherRPN": "RPN",
    "DistillROIHeads": "StandardROIHeads", "TeacherROIHeads": "StandardROIHeads",
}
BACKBONES = {
    "build_resnet_backbone_kd": "build_resnet_backbone",
    "build_resnet_fpn_backbone_kd": "build_resnet_fpn_backbone",
    "build_e0_fpn_backbone_kd": "build_efficientnet_b0_fpn_backbone",
    "build_retinanet_mnv2_fpn_backbone": "build_retinanet_mobilenetv2_fpn_backbone",
    "build_retinanet_e0_fpn_backbone": "build_retinanet_efficientnet_b0_fpn_backbone",
    # "build_mobilenetv2_fpn_backbone" keeps its name here
}

# original KD key -> (DISTILL key, the original's default)
KD_KEYS = {
    "FEATURE_ON": ("FEATURE_LOSS_ON", False),
    "FEATURE_LOSS_WEIGHT": ("FEATURE_LOSS_WEIGHT", 1.0),
    "FEATURE_ROIPOOL_FG_LOSS_ON": ("FG_NODE_LOSS_ON", False),
    "FEATURE_ROIPOOL_FG_LOSS_WEIGHT": ("FG_NODE_LOSS_WEIGHT", 1.0),
    "FEATURE_ROIPOOL_BG_LOSS_ON": ("BG_NODE_LOSS_ON", False),
    "FEATURE_ROIPOOL_BG_LOSS_WEIGHT": ("BG_NODE_LOSS_WEIGHT", 1.0),
    "USE_BG_WEIGHT_SCALE": ("BG_ADAPTIVE_WEIGHT_ON", False),
    "BG_WEIGHT_ALPHA": ("BG_WEIGHT_ALPHA", 1.0),
    "REGION_CORRELATION_LOSS_ON": ("EDGE_LOSS_ON", False),
    "REGION_CORRELATION_LOSS_WEIGHT_POOL": ("EDGE_LOSS_WEIGHT", 1.0),
    "BG_MINING_THRS": ("BG_MINING_THRESHOLD", 0.5),
    "ROI_CLS_ON": ("ROI_CLS_KD_ON", False),
    "ROI_CLS_LOSS_WEIGHT": ("ROI_CLS_KD_WEIGHT", 1.0),
    "ROI_REG_ON": ("ROI_REG_KD_ON", False),
    "ROI_REG_LOSS_WEIGHT": ("ROI_REG_KD_WEIGHT", 1.0),
    "TEMPERATURE": ("ROI_CLS_KD_TEMPERATURE", 1.0),
}
# read into DISTILL.BG_MINING_ON (mined bg join the graph iff all hold) and FEATURE_LOSS_LEVELS
MINING_KEYS = ("REGION_CORRELATION_LOSS_USE_BG_FEATURE", "BG_FEATURE_MINING_ON")
DEAD_KD_KEYS = {  # accepted and warned about: they had no effect in the original
    "REGION_CORRELATION_LOSS_WEIGHT": "deleted from the original's config (B1); unused",
    "REGION_CORRELATION_HEAD_LOSS": "unused", "REGION_CORRELATION_POOL_LOSS": "unused",
    "USE_BG_FEATURE_MINING_THRS": "the threshold is the only mining rule",
    "MINE_NUM_BG": "read but ignored by the original (DISTILL.BG_MINING_MAX sets a cap)",
    "CORR_MAT_SIM_FUNCTION": "cosine similarity is the only edge function",
    "CORR_MAT_SIMLOSS_REDUCTION": "no effect on the scalar loss",
    "POOL_FEATURES_ADAPPOOL_2D": "unused", "BOX_FEATURE_LOSS_WEIGHT": "unused",
    "RPN_CLS_LOSS_WEIGHT": "RPN KD is not implemented", "RPN_LOC_LOSS_WEIGHT": "ditto",
}
UNSUPPORTED_WHEN_TRUE = {  # off in every original config; refused rather than ignored
    "RPN_CLS_ON": "RPN objectness KD", "RPN_LOC_ON": "RPN delta KD",
    "USE_SEMANTIC_PAIRWISE_LOSS": "the SKD pairwise loss", "BOX_FEATURE_ON": "box-feature KD",
}
TEACHER_MODEL_DEAD = {"WEIGHTS": "never read by the original (teacher weights came from "
                                 "MODEL.WEIGHTS); set DISTILL.TEACHER.WEIGHTS or keep the merged "
                                 "checkpoint in MODEL.WEIGHTS",
                      "DEVICE": "the teacher runs on the student's device",
                      "LOAD_PROPOSALS": "unused", "KEYPOINT_ON": "unused"}
DEAD_STUDENT_KEYS = {("MODEL", "MOBILENETV2", "DEBUG"), ("MODEL", "EFFICIENTNET", "MODEL_NAME")}

TEACHER_BASES = {"GeneralizedRCNN": "Base-RCNN-FPN.yaml", "RetinaNet": "Base-RetinaNet.yaml"}
LEVELS = {"DistillationRCNN": ["p2", "p3", "p4", "p5", "p6"],
          "DistillationRetinaNet": ["p3", "p4", "p5", "p6", "p7"]}
TEACHERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "teachers")


def is_legacy(data: Dict[str, Any]) -> bool:
    meta = (data.get("MODEL") or {}).get("META_ARCHITECTURE")
    return "KD" in data or "TEACHER" in data or meta in META_ARCHITECTURES


def _rename(node: Dict[str, Any], path: Tuple[str, ...], table: Dict[str, str], notes: List[str]):
    cur = node
    for k in path[:-1]:
        cur = cur.get(k)
        if not isinstance(cur, dict):
            return
    old = cur.get(path[-1])
    if isinstance(old, str) and old in table:
        cur[path[-1]] = table[old]
        notes.append(f"{'.'.join(path)}: {old} -> {table[old]}")


def _rename_components(model: Dict[str, Any], prefix: str, notes: List[str]):
    wrapped = {"MODEL": model}
    for path, table in ((("MODEL", "META_ARCHITECTURE"), META_ARCHITECTURES),
                        (("MODEL", "PROPOSAL_GENERATOR", "NAME"), COMPONENTS),
                        (("MODEL", "ROI_HEADS", "NAME"), COMPONENTS),
                        (("MODEL", "BACKBONE", "NAME"), BACKBONES)):
        sub = []
        _rename(wrapped, path, table, sub)
        notes += [prefix + s for s in sub]


def _flatten(d: Dict[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    items = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            items += _flatten(v, key + ".")
        else:
            items.append((key, v))
    return items


def _teacher(teacher: Dict[str, Any], notes: List[str]) -> Tuple[str, List[str]]:
    """The original TEACHER tree -> (teacher base config, DISTILL.TEACHER.OPTS)."""
    model = copy.deepcopy(teacher.get("MODEL") or {})
    for key, why in TEACHER_MODEL_DEAD.items():
        if key in model:
            value = model.pop(key)
            logger.warning("original config key TEACHER.MODEL.%s=%r ignored: %s", key, value, why)
    meta = model.get("META_ARCHITECTURE", "GeneralizedRCNN")
    if meta not in TEACHER_BASES:
        raise ValueError(f"unsupported teacher META_ARCHITECTURE {meta!r} in the original config")
    _rename_components(model, "TEACHER.", notes)
    opts = []
    for key, value in _flatten(model, "MODEL."):
        opts += [key, value if isinstance(value, str) else repr(value)]
    fmt = (teacher.get("INPUT") or {}).get("FORMAT")
    if fmt:
        opts += ["INPUT.FORMAT", fmt]
    ignored = sorted(set(teacher) - {"MODEL", "INPUT"})
    if ignored:
        notes.append(f"TEACHER.{{{', '.join(ignored)}}}: not needed by a frozen teacher, ignored")
    return os.path.join(TEACHERS_DIR, TEACHER_BASES[meta]), opts


def translate_config(data: Dict[str, Any], source: str = "<config>") -> Dict[str, Any]:
    """A config dict written for the original repository -> this project's keys."""
    data = copy.deepcopy(data)
    notes: List[str] = []
    model = data.setdefault("MODEL", {})
    _rename_components(model, "", notes)
    meta = model.get("META_ARCHITECTURE", "DistillationRCNN")
    two_stage = meta == "DistillationRCNN"
    for path in DEAD_STUDENT_KEYS:
        node = data
        for k in path[:-1]:
            node = node.get(k) or {}
        if path[-1] in node:
            node.pop(path[-1])
            notes.append(f"{'.'.join(path)}: unused by the original, ignored")

    kd = dict(data.pop("KD", {}) or {})
    given = set(kd)
    distill = data.setdefault("DISTILL", {})
    for key, why in DEAD_KD_KEYS.items():
        if key in kd:
            logger.warning("%s: original config key KD.%s=%r accepted and ignored: %s", source,
                           key, kd.pop(key), why)
    for key, feature in UNSUPPORTED_WHEN_TRUE.items():
        if kd.pop(key, False):
            raise ValueError(f"{source}: KD.{key} (= {feature}) is not supported")
    always_on = set()
    if two_stage:  # the original added fg-node and edge losses whatever their switches (B4)
        always_on = {"FEATURE_ROIPOOL_FG_LOSS_ON", "REGION_CORRELATION_LOSS_ON"}
    for old, (new, default) in KD_KEYS.items():
        distill[new] = kd.pop(old, True if old in always_on else default)
        if old in always_on and old in given and not distill[new]:
            logger.warning("%s: KD.%s is False; the original computed that loss anyway (its "
                           "switch was ignored), this project honours it", source, old)
    mining = [kd.pop(k, False) for k in MINING_KEYS]
    distill["BG_MINING_ON"] = bool(two_stage and all(mining))
    levels = kd.pop("FEATURE_LEVEL", [0, 1, 2, 3, 4])
    distill["FEATURE_LOSS_LEVELS"] = [LEVELS[meta][i] for i in levels]
    if kd:
        raise KeyError(f"{source}: unknown original config keys KD.{sorted(kd)}")

    teacher = data.pop("TEACHER", None)
    if teacher:
        config, opts = _teacher(teacher, notes)
        distill.setdefault("TEACHER", {})
        distill["TEACHER"].setdefault("CONFIG", config)
        distill["TEACHER"]["OPTS"] = opts + list(distill["TEACHER"].get("OPTS", []))

    _flip_rule(data, model, notes)
    _original_backbone_layout(model, notes)
    for n in notes:
        logger.info("%s: %s", source, n)
    return data


def _flip_rule(data, model, notes):
    """The original fed ResNet students shallower than 50 layers RGB (normalised in BGR order,
    then flipped): the same as reading RGB with the statistics reversed."""
    resnets = model.get("RESNETS") or {}
    backbone = (model.get("BACKBONE") or {}).get("NAME", "")
    if "resnet" in backbone and resnets.get("DEPTH", 50) < 50:
        mean = model.get("PIXEL_MEAN", [103.530, 116.280, 123.675])
        std = model.get("PIXEL_STD", [1.0, 1.0, 1.0])
        model["PIXEL_MEAN"], model["PIXEL_STD"] = list(mean)[::-1], list(std)[::-1]
        data.setdefault("INPUT", {})["FORMAT"] = "RGB"
        notes.append("ResNet < 50 student: INPUT.FORMAT RGB with reversed pixel statistics "
                     "(the original's channel flip)")


def _original_backbone_layout(model, notes):
    """MobileNetV2 / EfficientNet-B0 students are built with the original's modules (their
    checkpoints' names and numerics). Its MobileNetV2 froze by MODEL.BACKBONE.FREEZE_AT
    (detectron2's default 2); its EfficientNet froze nothing."""
    backbone = (model.get("BACKBONE") or {}).get("NAME", "")
    if "mobilenetv2" in backbone:
        node = model.setdefault("MOBILENETV2", {})
        node["LAYOUT"] = "original"
        node["FREEZE_AT"] = (model.get("BACKBONE") or {}).get("FREEZE_AT", 2)
        notes.append(f"MobileNetV2 student: MODEL.MOBILENETV2.LAYOUT original, FREEZE_AT "
                     f"{node['FREEZE_AT']} (from MODEL.BACKBONE.FREEZE_AT)")
    elif "efficientnet" in backbone:
        node = model.setdefault("EFFICIENTNET", {})
        node["LAYOUT"] = "original"
        node["FREEZE_AT"] = 0
        notes.append("EfficientNet-B0 student: MODEL.EFFICIENTNET.LAYOUT original, FREEZE_AT 0")


def register_legacy_names() -> None:
    """Make the original's registry names resolve to this project's components."""
    from detectron2.modeling import (BACKBONE_REGISTRY, META_ARCH_REGISTRY,
                                     PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY)

    from .meta_arch import DistillationRCNN
    from .meta_arch_retinanet import DistillationRetinaNet

    aliases = [(META_ARCH_REGISTRY, "Distillation", DistillationRCNN),
               (META_ARCH_REGISTRY, "RetinaNetKD", DistillationRetinaNet)]
    aliases += [(PROPOSAL_GENERATOR_REGISTRY, old, PROPOSAL_GENERATOR_REGISTRY.get(new))
                for old, new in COMPONENTS.items() if new == "RPN"]
    aliases += [(ROI_HEADS_REGISTRY, old, ROI_HEADS_REGISTRY.get(new))
                for old, new in COMPONENTS.items() if new == "StandardROIHeads"]
    aliases += [(BACKBONE_REGISTRY, old, BACKBONE_REGISTRY.get(new))
                for old, new in BACKBONES.items()]
    for registry, name, obj in aliases:
        if name not in registry:
            registry._do_register(name, obj)
