"""What the demo trains: the presets (data size and schedules), the distilled students it can
compare (methods), the evaluation tasks and the model configs of each task."""
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "demo")


@dataclass
class Preset:
    """Generated data and schedule of one preset (`extra`: config overrides of its runs)."""
    train_images: int
    val_images: int
    image_size: List[int]
    teacher_iters: int
    student_iters: int
    batch: int = 4
    eval_period: int = 0
    extra: List[str] = field(default_factory=list)


_INPUT_160x224 = ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224",
                  "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224"]

PRESETS = {
    # seconds-scale pipeline check (tests)
    "tiny": Preset(12, 6, [96, 128], 8, 6, batch=2,
                   extra=["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
                          "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
                          "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                          # a few iterations from scratch: keep every detection so AP is defined
                          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]),
    # about 20 minutes end to end on the 2-core development CPU (README, measured)
    "quick": Preset(600, 150, [160, 224], 1000, 600, batch=2, extra=_INPUT_160x224),
    # firmer numbers: 2.5x the data, twice the schedule and the validation images of quick
    "full": Preset(1500, 300, [160, 224], 2000, 1200, batch=2, extra=_INPUT_160x224),
}

# What each preset is for, in words (describe_preset adds the numbers).
PRESET_PURPOSE = {
    "tiny": "a pipeline check: every stage runs, in minutes; its numbers mean nothing",
    "quick": "the demo: about 20 minutes on 2 CPU cores (measured end to end)",
    "full": "firmer numbers: 2.5x the data, twice the schedule and the validation images of "
            "quick",
}
# Presets too short to say anything about the methods: their report says so first.
PIPELINE_CHECKS = {"tiny"}


def describe_preset(name: str) -> str:
    """One line: what the preset is for, its data and its schedules."""
    p = PRESETS[name]
    return (f"{PRESET_PURPOSE[name]} ({p.train_images} train / {p.val_images} val images of "
            f"{p.image_size[0]}x{p.image_size[1]}; teacher {p.teacher_iters}, students "
            f"{p.student_iters} iterations, batch {p.batch})")


_DSIG_OFF = ["DISTILL.FG_NODE_LOSS_ON", "False", "DISTILL.BG_NODE_LOSS_ON", "False",
             "DISTILL.EDGE_LOSS_ON", "False"]
_FEATURE = ["DISTILL.FEATURE_LOSS_ON", "True", "DISTILL.FEATURE_LOSS_WEIGHT", "0.5"]
_LOGIT = ["DISTILL.ROI_CLS_KD_ON", "True", "DISTILL.ROI_CLS_KD_WEIGHT", "3.0",
          "DISTILL.ROI_REG_KD_ON", "True", "DISTILL.ROI_REG_KD_WEIGHT", "1.0"]
# Distilled students, each the demo's DSIG config (same student, teacher, data, schedule, seed)
# with these terms; feature and logit weights as in the original's R18 config.
METHODS = {
    "dsig": [],  # fg + bg nodes + edges: the paper's full graph
    "dsig-edges": ["DISTILL.FG_NODE_LOSS_ON", "False", "DISTILL.BG_NODE_LOSS_ON", "False"],
    "dsig-edges-fg": ["DISTILL.BG_NODE_LOSS_ON", "False"],
    "feature-mse": _DSIG_OFF + _FEATURE,  # full-map FPN imitation only
    "logit-kd": _DSIG_OFF + _LOGIT,  # RoI classification KL + RoI regression L1 only
    "dsig-all": _FEATURE + _LOGIT,  # DSIG plus both (the original's R18 configuration)
}
# What each method distils, in words (run_demo.py --help).
METHOD_PURPOSE = {
    "dsig": "DSIG, the paper's full graph: fg and bg nodes and edges",
    "dsig-edges": "DSIG edges only (the paper's ablation)",
    "dsig-edges-fg": "DSIG edges and fg nodes (the paper's ablation)",
    "feature-mse": "full-map FPN feature imitation only (MSE, weight 0.5)",
    "logit-kd": "RoI classification KL (weight 3.0) and RoI regression L1 (1.0) only",
    "dsig-all": "DSIG plus feature-mse and logit-kd (the original's R18 setting)",
}
ABLATION = ["dsig-edges", "dsig-edges-fg"]  # the paper's order, then dsig

# COCO evaluation tasks -> what the report calls their AP
TASKS = {"bbox": "box", "segm": "mask"}
# the demo's models per task: (teacher, baseline student, distilled student) configs
MODEL_CONFIGS = {"bbox": ("teacher-R50.yaml", "student-R18.yaml", "dsig-R18-R50.yaml"),
                 "segm": ("teacher-R50-mask.yaml", "student-R18-mask.yaml",
                          "dsig-R18-R50-mask.yaml")}


def select_methods(methods: Optional[Sequence[str]] = None, ablation: bool = False) -> List[str]:
    """The distilled students to train: `methods` (default: dsig), plus the ablation's, in
    METHODS order without repeats."""
    chosen = set(methods or ["dsig"]) | (set(ABLATION) if ablation else set())
    unknown = sorted(chosen - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return [m for m in METHODS if m in chosen]


def run_names(methods: Sequence[str]) -> List[str]:
    """Every run of one seed, in training order: the teacher, the baseline, the students."""
    return ["teacher", "baseline"] + list(methods)


def solver_opts(iters: int, batch: int) -> List[str]:
    """The schedule of one run: `iters` iterations, a step at 3/4, a short warm-up."""
    steps = f"({int(iters * 0.75)},)"
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps, "SOLVER.IMS_PER_BATCH",
            str(batch), "SOLVER.WARMUP_ITERS", str(min(100, max(1, iters // 10)))]

