"""DSIG distillation for detectron2: config, meta-architectures, losses, backbones, checkpoints."""
from .upstream_warnings import importing_upstream

# detectron2's imports print upstream deprecation notices (upstream_warnings.py): not here
with importing_upstream():
    from .config import add_distillation_config
    from . import backbones  # noqa: F401  (registers the MobileNetV2 / EfficientNet-B0 backbones)
    from .checkpoint import DistillationCheckpointer, export_student, load_teacher_weights
    from .meta_arch import DistillationRCNN
    from .meta_arch_retinanet import DistillationRetinaNet
    from .legacy import register_legacy_names

register_legacy_names()

__all__ = [
    "DistillationCheckpointer",
    "DistillationRCNN",
    "DistillationRetinaNet",
    "add_distillation_config",
    "export_student",
    "load_teacher_weights",
]
