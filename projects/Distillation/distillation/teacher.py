"""The frozen teacher: a stock detectron2 detector built from its own config file."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from .checkpoint import load_teacher_weights
from .config import add_distillation_config
from .errors import ConfigError, MissingFileError
from .yaml_io import merge_into, read_config

logger = logging.getLogger(__name__)


def resolve_teacher_config_path(cfg) -> str:
    path = cfg.DISTILL.TEACHER.CONFIG
    if not path:
        raise ConfigError("DISTILL.TEACHER.CONFIG is empty: name the teacher's detectron2 config")
    if not os.path.isfile(path):  # load_config already resolved paths beside the config file
        raise MissingFileError(f"DISTILL.TEACHER.CONFIG {path!r} not found (a relative path is "
                               "read beside the student's config file)")
    return path


# the class count keys: the teacher takes the student's unless DISTILL.TEACHER.OPTS sets them
CLASS_COUNT_KEYS = ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")


def config_value(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        cfg = cfg[part]
    cfg[last] = value


def teacher_config(cfg):
    """The teacher's detectron2 config: its file, DISTILL.TEACHER.OPTS, the student's device
    and class count (DSIG compares the two networks' class scores: a class count in the
    teacher's file is replaced by the student's; one in DISTILL.TEACHER.OPTS is kept, and a
    mismatch is then refused when the model is built)."""
    tcfg = get_cfg()
    add_distillation_config(tcfg)
    path = resolve_teacher_config_path(cfg)
    merge_into(tcfg, read_config(path), path)
    opts = list(cfg.DISTILL.TEACHER.OPTS)
    for key in CLASS_COUNT_KEYS:
        if key not in opts[::2]:
            _set(tcfg, key, config_value(cfg, key))
    if opts:
        tcfg.merge_from_list(opts)
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = ""
    tcfg.freeze()
    return tcfg


def class_count_mismatch(key: str, student: int, teacher: int) -> ConfigError:
    """The error for a student and teacher with different class counts (`key` the config key,
    e.g. MODEL.ROI_HEADS.NUM_CLASSES), naming the overrides that fix it."""
    return ConfigError(
        f"student and teacher must have the same class count: {key} is {student} for the "
        f"student and {teacher} for the teacher (set by DISTILL.TEACHER.OPTS). The teacher takes "
        f"the student's count unless DISTILL.TEACHER.OPTS sets {key}: drop it from "
        f"DISTILL.TEACHER.OPTS, or set {key} {teacher} for the student. (train_net.py takes the "
        "count from the training data.)")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def build_teacher(cfg):
    """Build, load (strictly) and freeze the teacher. Returns (teacher, teacher_cfg)."""
    tcfg = teacher_config(cfg)
    teacher = build_model(tcfg)
    weights = cfg.DISTILL.TEACHER.WEIGHTS
    if weights:
        load_teacher_weights(teacher, weights)
    elif not cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT and not cfg.MODEL.WEIGHTS:
        # MODEL.WEIGHTS may still bring teacher.* keys (the original merged checkpoint); the
        # checkpointer checks them. Without either, training would distil from noise.
        logger.warning("DISTILL.TEACHER.WEIGHTS is empty: the teacher must come from "
                       "MODEL.WEIGHTS (teacher.* keys) or a resumed checkpoint")
    return freeze(teacher), tcfg


def needs_channel_flip(student_format: str, teacher_format: str) -> bool:
    """Whether the teacher needs the data's channels reversed (RGB student, BGR teacher...)."""
    if student_format == teacher_format:
        return False
    if {student_format, teacher_format} == {"RGB", "BGR"}:
        return True
    raise ValueError(f"cannot feed {student_format} images to a {teacher_format} teacher")


def teacher_images(teacher, batched_inputs, flip: bool, device) -> ImageList:
    """The batch normalised, channel-ordered and padded as the teacher expects."""
    images = []
    for x in batched_inputs:
        img = x["image"].to(device)
        if flip:
            img = img.flip(0)
        images.append((img - teacher.pixel_mean) / teacher.pixel_std)
    return ImageList.from_tensors(images, teacher.backbone.size_divisibility)
