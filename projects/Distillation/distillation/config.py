"""Config extension of the DSIG distillation project."""
from detectron2.config import CfgNode as CN


def add_distillation_config(cfg):
    """Add the keys of this project to a detectron2 config (in place)."""
    _C = cfg

    # --- mixed precision: SOLVER.AMP.ENABLED trains under torch.autocast on MODEL.DEVICE ----
    # "auto": float16 with a gradient scaler on CUDA (detectron2's AMPTrainer), bfloat16 on the
    # CPU (its only autocast dtype); or "float16" / "bfloat16"
    _C.SOLVER.AMP.PRECISION = "auto"

    # --- MobileNetV2 / EfficientNet-B0 students -------------------------------------------------
    # LAYOUT "torchvision": torchvision's modules (its ImageNet weights, RGB); "original": the
    # original DSIG repository's module names and numerics (its checkpoints; they were fed BGR)
    _C.MODEL.MOBILENETV2 = CN()
    _C.MODEL.MOBILENETV2.LAYOUT = "torchvision"
    _C.MODEL.MOBILENETV2.OUT_FEATURES = ["m2", "m3", "m4", "m5"]
    _C.MODEL.MOBILENETV2.NORM = "FrozenBN"  # FrozenBN, BN, SyncBN, GN
    _C.MODEL.MOBILENETV2.FREEZE_AT = 0  # 0: nothing frozen; 1: stem; k: stem + stages m2..m_k
    _C.MODEL.EFFICIENTNET = CN()
    _C.MODEL.EFFICIENTNET.LAYOUT = "torchvision"
    _C.MODEL.EFFICIENTNET.OUT_FEATURES = ["e2", "e3", "e4", "e5"]
    _C.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    _C.MODEL.EFFICIENTNET.FREEZE_AT = 0
    _C.MODEL.EFFICIENTNET.STOCHASTIC_DEPTH = 0.2  # drop-connect rate of the last block

    _C.DISTILL = CN()
    # dsig_ext backend: "fused" (compiled ops, the student's box pooler too) or "reference"
    _C.DISTILL.BACKEND = "fused"

    # --- teacher: a detectron2 config file plus weights (no duplicated config tree) -----------
    _C.DISTILL.TEACHER = CN()
    _C.DISTILL.TEACHER.CONFIG = ""  # path; relative paths resolve against the student config
    _C.DISTILL.TEACHER.WEIGHTS = ""  # detectron2 .pkl/.pth; must match the teacher exactly
    _C.DISTILL.TEACHER.OPTS = []  # ["KEY", "VALUE", ...] overrides of the teacher config
    # Teachers without weights are refused unless this is set (tests, smoke runs only).
    _C.DISTILL.TEACHER.ALLOW_RANDOM_INIT = False

    # --- node losses ---------------------------------------------------------------------------
    _C.DISTILL.FG_NODE_LOSS_ON = True
    _C.DISTILL.FG_NODE_LOSS_WEIGHT = 0.5
    _C.DISTILL.BG_NODE_LOSS_ON = True
    _C.DISTILL.BG_NODE_LOSS_WEIGHT = 0.5
    _C.DISTILL.BG_WEIGHT_ALPHA = 7.5  # adaptive bg weight alpha * n_fg / n_bg (sampled counts)
    _C.DISTILL.BG_ADAPTIVE_WEIGHT_ON = True

    # --- edges and background mining -----------------------------------------------------------
    _C.DISTILL.EDGE_LOSS_ON = True
    # w_edge of L = w_edge * sum_g 0.5 * mean((E_t - E_s)^2) (the original's *_WEIGHT_POOL)
    _C.DISTILL.EDGE_LOSS_WEIGHT = 1.0
    _C.DISTILL.BG_MINING_ON = True  # mined bg RoIs join the graph; off: fg nodes only
    _C.DISTILL.BG_MINING_THRESHOLD = 0.6  # teacher cross-entropy to the bg label >= this
    _C.DISTILL.BG_MINING_MAX = 0  # 0: no cap (as the original); > 0: hardest k per image
    # An all-zero node (a degenerate RoI) gets no edge gradient instead of F.normalize's 1/eps
    _C.DISTILL.EDGE_ZERO_DEAD_ROWS = False

    # --- optional terms ------------------------------------------------------------------------
    _C.DISTILL.FEATURE_LOSS_ON = False  # full-map FPN MSE
    _C.DISTILL.FEATURE_LOSS_WEIGHT = 0.5
    # empty: every level the detector uses (p2-p6 for Faster R-CNN, the head's p3-p7 for
    # RetinaNet); a name the student or teacher lacks is an error
    _C.DISTILL.FEATURE_LOSS_LEVELS = []
    _C.DISTILL.ROI_CLS_KD_ON = False  # KL(teacher || student) over the sampled RoIs
    _C.DISTILL.ROI_CLS_KD_WEIGHT = 3.0
    _C.DISTILL.ROI_CLS_KD_TEMPERATURE = 1.0
    _C.DISTILL.ROI_REG_KD_ON = False  # L1 on the GT-class deltas of fg RoIs
    _C.DISTILL.ROI_REG_KD_WEIGHT = 1.0

    # --- one-stage (RetinaNet) nodes: the student's own current detections --------------------
    _C.DISTILL.NODE_TOPK_PER_LEVEL = 1000
    _C.DISTILL.NODE_SCORE_THRESH = 0.0
    _C.DISTILL.NODE_NMS_THRESH = 0.5  # class-wise
    _C.DISTILL.NODE_MAX_PER_IMAGE = 100
    _C.DISTILL.NODE_POOLER_RESOLUTION = 7  # ROIAlignV2, sampling 0, canonical 224 at level 4

    # --- image reduction of the node and edge losses (original W3) ----------------------------
    # "sum": sum over the images on one GPU, as the original (weight grows with images/GPU);
    # "mean": REFERENCE_IMAGES * mean over images, equal to "sum" at REFERENCE_IMAGES per GPU
    # and independent of the GPU count.
    _C.DISTILL.IMAGE_REDUCTION = "mean"
    _C.DISTILL.REFERENCE_IMAGES = 2
    return cfg


def resolve_feature_loss_levels(requested, detector_levels, teacher_levels):
    """The FPN levels the feature loss imitates: `requested` (DISTILL.FEATURE_LOSS_LEVELS), or
    all of `detector_levels` when it is empty. Raises for a level the student's detector does not
    use or the teacher does not produce, listing the available ones."""
    levels = list(requested) or list(detector_levels)
    for level in levels:
        if level not in detector_levels:
            raise ValueError(f"DISTILL.FEATURE_LOSS_LEVELS: unknown level {level!r}; the "
                             f"student uses {', '.join(detector_levels)} (an empty list means "
                             "all of them)")
        if level not in teacher_levels:
            raise ValueError(f"DISTILL.FEATURE_LOSS_LEVELS: the teacher has no level {level!r}; "
                             f"it has {', '.join(teacher_levels)}")
    return levels
