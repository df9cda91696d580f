"""Loading weights safely and strictly; the distillation checkpointer; student export.

Checkpoints of this project hold ``student.*`` and ``teacher.*`` keys. Also accepted as
MODEL.WEIGHTS:
- a student initialisation (keys without prefix, e.g. ``backbone.bottom_up.*``): goes to the student;
- the original DSIG repository's merged "Student-Teacher" file (one flat dict: ``teacher.*`` = a full
  detector, ``backbone.bottom_up.*`` = the student's ImageNet backbone).
Teacher weights must match the teacher exactly; anything else is an error listing the keys.
Files are read without executing pickled code: ``torch.load(weights_only=True)`` for .pth and a
restricted unpickler (numpy arrays and plain containers only) for .pkl.
"""
import logging
import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .errors import InputError, MissingFileError
from .original_backbones import backbone_layout_mismatch
from .weights import (CONVERTED_AUTHORS, register_torchvision_handler, require_weights,
                      resolve_weights)

register_torchvision_handler()

logger = logging.getLogger(__name__)

# Buffers that checkpoints may carry or lack without consequence (rebuilt from the config).
_BENIGN = ("pixel_mean", "pixel_std", "anchor_generator.cell_anchors")

_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}' from a checkpoint: only arrays and plain "
            "containers are allowed (the file may execute code)")


def _numpy_safe_globals():
    """numpy array reconstruction for torch.load(weights_only=True): the original merged
    checkpoints are torch.save'd dicts of numpy arrays."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object()))
                     if n.endswith("DType")]
    return [_reconstruct, np.ndarray, np.dtype] + dtype_classes


def torch_load_safely(f):
    """torch.load of tensors, containers and numpy arrays only (never arbitrary code)."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(f, map_location="cpu", weights_only=True)


class NotACheckpointError(InputError, ValueError):
    """A weights file that torch.load (tensors only) cannot read."""


def read_checkpoint(path: str):
    """torch.load of a checkpoint of tensors and containers (never arbitrary code), with one line
    naming the problem when the file is not one, instead of torch's advice to load it unsafely."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return torch_load_safely(f)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise NotACheckpointError(
                f"{path} holds Python objects ({found.group(1)}), not only tensors: it is not "
                "loaded because unpickling them can run code (save model.state_dict() or use "
                "detectron2's checkpointer)") from None
        raise NotACheckpointError(f"{path} is not a PyTorch checkpoint (torch.load cannot "
                                  "read it as a torch.save file of tensors)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError):
        # torch's own messages here are parser internals ("101", "inline_container.cc")
        raise NotACheckpointError(f"{path} is not a PyTorch checkpoint (torch.load cannot "
                                  "read it as a torch.save file)") from None


def load_pickle_safely(path: str):
    with PathManager.open(path, "rb") as f:
        return _TensorOnlyUnpickler(f, encoding="latin1").load()


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that never executes pickled code."""

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = load_pickle_safely(filename)
            if "model" in data and "__author__" in data:
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 detection models
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = read_checkpoint(filename)
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded


def _shape(v):
    return tuple(v.shape) if hasattr(v, "shape") else ()


def _is_benign(key: str) -> bool:
    return any(b in key for b in _BENIGN)


def mismatched_keys(model_state: Dict[str, torch.Tensor], weights: Dict[str, object]):
    """(missing, unexpected, wrong-shaped) keys of ``weights`` against ``model_state``,
    ignoring buffers that are rebuilt from the config."""
    missing = sorted(k for k in model_state if k not in weights and not _is_benign(k))
    unexpected = sorted(k for k in weights if k not in model_state and not _is_benign(k))
    wrong = sorted((k, _shape(weights[k]), tuple(model_state[k].shape)) for k in model_state
                   if k in weights and _shape(weights[k]) != tuple(model_state[k].shape))
    return missing, unexpected, wrong


class TeacherWeightsError(InputError, RuntimeError):
    pass


def _raise_mismatch(source: str, missing, unexpected, wrong):
    def listing(keys, limit=100):
        keys = list(keys)
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return "\n".join(f"    {k}" for k in keys[:limit]) + more

    parts = [f"teacher weights from {source} do not match the teacher's architecture "
             "(a partially loaded teacher would be silently random):"]
    if missing:
        parts.append(f"  missing in the weights ({len(missing)}):\n{listing(missing)}")
    if unexpected:
        parts.append(f"  unexpected in the weights ({len(unexpected)}):\n{listing(unexpected)}")
    if wrong:
        parts.append(f"  wrong shape ({len(wrong)}, weights vs model):\n"
                     + listing(f"{k}: {a} vs {b}" for k, a, b in wrong))
    parts.append("  Check DISTILL.TEACHER.CONFIG against the weights (depth, classes, heads).")
    raise TeacherWeightsError("\n".join(parts))


def load_teacher_weights(teacher: torch.nn.Module, path: str) -> None:
    """Load a detectron2 checkpoint (.pkl model-zoo or .pth) into the teacher, strictly."""
    checkpointer = SafeDetectionCheckpointer(teacher)
    checkpoint = checkpointer._load_file(require_weights(path, "DISTILL.TEACHER.WEIGHTS"))
    weights = checkpoint["model"]
    if checkpoint.get("matching_heuristics", False):
        raise TeacherWeightsError(
            f"{path} is not a detectron2 detector checkpoint (no 'model' and '__author__'); a "
            "teacher must be loaded by exact names")
    weights = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
               for k, v in weights.items()}
    missing, unexpected, wrong = mismatched_keys(teacher.state_dict(), weights)
    if missing or unexpected or wrong:
        _raise_mismatch(path, missing, unexpected, wrong)
    checkpointer._load_model({"model": weights})
    logger.info("Loaded teacher weights from %s", path)


def split_distillation_state(weights: Dict[str, object]) -> Tuple[Dict, Dict, bool]:
    """Map a checkpoint onto (student, teacher) state dicts. Keys ``student.*`` / ``teacher.*``
    keep their side; any other key is a student key (student initialisation files and the
    original merged Student-Teacher format). Returns (student, teacher, had_prefixes)."""
    student, teacher = OrderedDict(), OrderedDict()
    for k, v in weights.items():
        if k.startswith("teacher."):
            teacher[k[len("teacher."):]] = v
        elif k.startswith("student."):
            student[k[len("student."):]] = v
        else:
            student[k] = v
    return student, teacher, any(k.startswith("student.") for k in weights)


def _prefixed_metadata(metadata, student_keys_prefixed: bool):
    """A state dict's per-module version metadata, re-rooted like its keys: entries of a
    student-only file move under ``student.``."""
    if metadata is None:
        return None
    out = OrderedDict()
    for prefix, value in metadata.items():
        if student_keys_prefixed or prefix.startswith(("student", "teacher")):
            out[prefix] = value
        else:
            out["student." + prefix if prefix else "student"] = value
    return out


def _student_metadata(metadata):
    """The student's module version metadata of a distillation checkpoint, re-rooted for a
    plain model (the student's keys lose their ``student.`` prefix)."""
    if metadata is None:
        return None
    out = OrderedDict()
    for prefix, value in metadata.items():
        if prefix == "student" or prefix.startswith("student."):
            out[prefix[len("student."):]] = value
    return out


def _check_backbone_init(weights, student_state, source):
    """A converted torchvision backbone must fill the student's backbone exactly."""
    backbone = {k for k in student_state if k.startswith("backbone.bottom_up.")}
    missing = sorted(backbone - set(weights))
    unexpected = sorted(set(weights) - set(student_state))
    wrong = sorted(k for k in set(weights) & backbone
                   if _shape(weights[k]) != tuple(student_state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"the backbone weights from {source} do not fit the student's backbone (is "
            f"MODEL.BACKBONE / RESNETS.DEPTH the converted architecture?): missing {missing[:20]}, "
            f"unexpected {unexpected[:20]}, wrong shape {wrong[:20]}")


def _check_backbone_layout(weights, student_state):
    """MobileNetV2 / EfficientNet-B0 weights in the other layout would load nothing into the
    backbone (detectron2 only logs unmatched keys): refuse them, naming the config key."""
    message = backbone_layout_mismatch(weights, student_state)
    if message:
        raise ValueError(message)


class IncompleteCheckpointError(InputError, RuntimeError):
    pass


def _raise_if_incomplete(source: str, incompatible, exempt=("teacher.",)) -> None:
    """Refuse a load that leaves model weights without a value (evaluation: a partly random
    model would report a meaningless AP). Keys starting with ``exempt`` are not checked."""
    if incompatible is None:
        return
    wrong = {k: (a, b) for k, a, b in incompatible.incorrect_shapes}
    unfilled = sorted(k for k in set(incompatible.missing_keys) | set(wrong)
                      if not k.startswith(exempt) and not _is_benign(k))
    if not unfilled:
        return
    lines = [f"{k}: shape {tuple(wrong[k][0])} in the checkpoint, {tuple(wrong[k][1])} in the "
             "model" if k in wrong else k for k in unfilled]
    shown = "\n".join(f"    {line}" for line in lines[:100])
    more = f"\n    ... and {len(lines) - 100} more" if len(lines) > 100 else ""
    unexpected = [k for k in incompatible.unexpected_keys if not _is_benign(k)]
    extra = (f"\n  It also holds {len(unexpected)} key(s) the model lacks, e.g. "
             f"{', '.join(unexpected[:3])}." if unexpected else "")
    raise IncompleteCheckpointError(
        f"checkpoint {source} leaves {len(unfilled)} model weight(s) without a value (is it the "
        f"config's architecture?):\n{shown}{more}{extra}")


class DistillationCheckpointer(SafeDetectionCheckpointer):
    """Checkpointer of this project's models: the distillation wrapper (``model.student`` /
    ``model.teacher``) and plain detectron2 detectors (baselines, exported students).

    Student weights load as detectron2 loads any init file (by name, non-strict, c2 heuristics for
    .pkl); teacher weights present in the file must match the teacher exactly. Every student key
    the file leaves without a value is reported, including FrozenBN statistics that detectron2
    fills in silently for files without version metadata (as the original's merged files). A plain
    model takes the student part of a distillation checkpoint (its ``teacher.*`` keys are dropped).

    ``require_complete=True`` (evaluation) makes a load that leaves any model weight without a
    value an error listing them; the teacher is exempt (it does no work at inference)."""

    def __init__(self, model, save_dir="", *, require_complete=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.require_complete = require_complete
        self._source = None

    def load(self, path, *args, **kwargs):
        if self.require_complete and not path:
            raise IncompleteCheckpointError(
                "no checkpoint to evaluate: set MODEL.WEIGHTS (or --resume with a checkpoint in "
                "OUTPUT_DIR); the model would run with random weights")
        # detectron2:// and torchvision:// forms: a clear error instead of a hang when offline
        self._source = path
        return super().load(resolve_weights(path, "MODEL.WEIGHTS") if path else path, *args,
                            **kwargs)

    def _load_model(self, checkpoint):
        incompatible = self._load_weights(checkpoint)
        if self.require_complete:
            _raise_if_incomplete(self._source or "(unnamed)", incompatible)
        return incompatible

    def _load_weights(self, checkpoint):
        model = self.model.module if hasattr(self.model, "module") else self.model
        distill = hasattr(model, "student")
        target = model.student if distill else model  # the detector the student keys fill
        if checkpoint.get("matching_heuristics", False):  # an ImageNet/C2 student init file
            _check_backbone_layout(checkpoint["model"], target.state_dict())
            return SafeDetectionCheckpointer(target)._load_model(checkpoint)
        metadata = getattr(checkpoint["model"], "_metadata", None)
        weights = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                   for k, v in checkpoint["model"].items()}
        student, teacher, had_prefixes = split_distillation_state(weights)
        student_state = target.state_dict()
        _check_backbone_layout(student, student_state)
        # buffers the model rebuilds from its config (pixel_mean/std in the original's files)
        student = OrderedDict((k, v) for k, v in student.items()
                              if k in student_state or not _is_benign(k))
        if teacher and distill:
            missing, unexpected, wrong = mismatched_keys(model.teacher.state_dict(), teacher)
            if missing or unexpected or wrong:
                _raise_mismatch("MODEL.WEIGHTS (teacher.* keys)", missing, unexpected, wrong)
            model.teacher_weights_loaded = True
        elif teacher:
            logger.info("Plain detector: the checkpoint's %d teacher.* keys are not loaded",
                        len(teacher))
            teacher = {}
        if checkpoint.get("__author__") in CONVERTED_AUTHORS:
            _check_backbone_init(student, student_state, checkpoint.get("__source__", "file"))
        prefix = "student." if distill else ""
        absent = [prefix + k for k in student_state if k not in student and not _is_benign(k)]
        merged = OrderedDict([(prefix + k, v) for k, v in student.items()])
        merged.update(("teacher." + k, v) for k, v in teacher.items())
        if distill:
            metadata = _prefixed_metadata(metadata, had_prefixes)
        elif had_prefixes:
            metadata = _student_metadata(metadata)
        if metadata is not None:  # module versions: FrozenBN reads them
            merged._metadata = metadata
        checkpoint["model"] = merged
        incompatible = super()._load_model(checkpoint)
        reported = set(incompatible.missing_keys)
        incompatible.missing_keys.extend(k for k in absent if k not in reported)
        return incompatible


def student_state_dict(weights: Dict[str, object]) -> "OrderedDict[str, object]":
    """The student alone, with stock detectron2 names, from a distillation checkpoint."""
    student, _, had_prefixes = split_distillation_state(weights)
    if not had_prefixes:
        raise ValueError("not a distillation checkpoint: it has no 'student.' keys")
    return student


def export_student(checkpoint_path: str, output_path: str) -> List[str]:
    """Write the student of a distillation checkpoint as a stock detectron2 checkpoint
    ({"model": state_dict}) loadable by DetectionCheckpointer into a GeneralizedRCNN / RetinaNet
    built from the student's config. Returns the exported keys."""
    data = read_checkpoint(checkpoint_path)
    weights = data.get("model", data) if isinstance(data, dict) else {}
    student = student_state_dict(weights)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with PathManager.open(output_path, "wb") as f:
        torch.save({"model": student, "__source__": os.path.basename(checkpoint_path)}, f)
    return list(student)


