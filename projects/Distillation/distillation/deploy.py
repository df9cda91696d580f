"""The student as a deployable detector: built alone from its config, loaded strictly, and traced
into TorchScript (or ONNX) through detectron2's own TracingAdapter.

- A distillation config (DistillationRCNN / DistillationRetinaNet) builds only its student, as the
  stock GeneralizedRCNN / RetinaNet: no teacher config or weights are read.
- Weights are an exported student file (tools/export_student.py) or a distillation checkpoint
  (its student part; the teacher keys are dropped); a file that leaves any weight of the model
  without a value is an error listing them (what train_net's --eval-only refuses too).
- The traced model takes one image, a float32 [3, H, W] tensor in the config's INPUT.FORMAT with
  pixel values 0-255 (any size; resize it as the config's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST for
  the accuracy the model was trained for) and returns the tensors of detectron2's Instances in
  that image's pixels, in OUTPUT_NAMES order (the export's metadata records them).
"""
import json
import logging
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet, build_model
from detectron2.structures import Instances

from .errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)

# the metadata file inside an exported TorchScript archive (torch.jit.load(..., _extra_files))
METADATA_FILE = "dsig_export.json"
ONNX_OPSET = 17  # RoIAlign with aligned (half-pixel) coordinates needs opset >= 16
# largest differences from eager accepted (box pixels, scores): TorchScript runs the same kernels;
# ONNX Runtime its own (2e-5 px seen on the tests' images)
TORCHSCRIPT_ATOL = 1e-4
ONNX_ATOL = 1e-3


class ExportMismatchError(RuntimeError):
    """The traced model disagrees with the eager one (a bug, not bad input)."""


def parse_args_with_overrides(parser, argv=None):
    """`parser`'s options, plus config overrides as `args.opts`: the KEY VALUE pairs it does not
    know, after the positional arguments or anywhere; an unknown --flag is still an error."""
    args, args.opts = parser.parse_known_args(argv)
    flags = [o for o in args.opts if o.startswith("--")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    return args


def student_architecture(cfg) -> str:
    """The stock META_ARCHITECTURE of a config's detector: the student's for a distillation
    config, the config's own otherwise."""
    from .meta_arch import DistillationRCNN
    from .meta_arch_retinanet import DistillationRetinaNet

    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if isinstance(arch, type) and issubclass(arch, DistillationRCNN):
        return "GeneralizedRCNN"
    if isinstance(arch, type) and issubclass(arch, DistillationRetinaNet):
        return "RetinaNet"
    return cfg.MODEL.META_ARCHITECTURE


def resolve_device(device: Optional[str]) -> str:
    """`device`, or cuda when a GPU is there and cpu otherwise; a CUDA device without a GPU is
    an error."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return device


def detector_config(config_file: str, weights: str = "", opts=(), device: Optional[str] = None,
                    allow_unsafe_yaml: bool = False, score_threshold: Optional[float] = None):
    """The frozen config of the detector to deploy: the student of a distillation config, on
    `device`, MODEL.WEIGHTS = `weights` (default: the config's), `score_threshold` as its
    test-time score thresholds. Raises InputError subclasses on bad input."""
    from .training import load_config

    cfg = load_config(config_file, opts, allow_unsafe_yaml=allow_unsafe_yaml)
    cfg.MODEL.META_ARCHITECTURE = student_architecture(cfg)
    cfg.MODEL.DEVICE = resolve_device(device)
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights:
        raise ConfigError("no weights: give the exported student file or a distillation "
                          "checkpoint (--weights; or MODEL.WEIGHTS in the config)")
    if "://" not in weights and not os.path.isfile(weights):
        raise MissingFileError(f"weights {weights}: file not found")
    cfg.MODEL.WEIGHTS = weights
    if score_threshold is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_threshold
    cfg.freeze()
    return cfg


def build_detector(cfg):
    """The detector of `cfg` (detector_config) in eval mode, with every weight from
    MODEL.WEIGHTS: a file that leaves any without a value, or is no checkpoint, is an error."""
    from .checkpoint import DistillationCheckpointer

    model = build_model(cfg)
    model.eval()
    # every weight filled or an error listing the rest (a partly random model is no detector);
    # a file that is no checkpoint is one line (checkpoint.read_checkpoint)
    DistillationCheckpointer(model, require_complete=True).load(cfg.MODEL.WEIGHTS)
    return model


def load_detector(config_file: str, weights: str = "", opts=(), device: Optional[str] = None,
                  allow_unsafe_yaml: bool = False, score_threshold: Optional[float] = None):
    """(cfg, model): detector_config and build_detector in one."""
    cfg = detector_config(config_file, weights, opts, device, allow_unsafe_yaml, score_threshold)
    return cfg, build_detector(cfg)


# --- tracing --------------------------------------------------------------------------------

def detection_function(model) -> Optional[Callable]:
    """How the adapter calls the model: GeneralizedRCNN without its post-processing (detectron2's
    own export recipe: boxes stay in the input image's pixels, masks as 28x28 RoI masks); RetinaNet
    through its forward (no height/width given: the input image's pixels too)."""
    if isinstance(model, GeneralizedRCNN):
        def detect(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
        return detect
    if isinstance(model, RetinaNet):
        return None
    raise ConfigError(f"exporting a {type(model).__name__} is not supported (GeneralizedRCNN and "
                      "RetinaNet students are)")


def eager_detections(model, image: torch.Tensor) -> Instances:
    """What the traced model computes, run eagerly: the detections of one [3, H, W] image."""
    function = detection_function(model)
    with torch.no_grad():
        inputs = [{"image": image}]
        outputs = function(model, inputs) if function else model(inputs)
    return outputs[0]["instances"]


def output_names(instances: Instances) -> List[str]:
    """The order of the traced model's outputs: TracingAdapter flattens Instances as its fields
    sorted by name, then the image size."""
    return sorted(instances.get_fields()) + ["image_size"]


def tracing_adapter(model, image: torch.Tensor):
    """detectron2's TracingAdapter of `model` for one [3, H, W] image: tensors in and out."""
    from detectron2.export import TracingAdapter

    adapter = TracingAdapter(model, [{"image": image}], detection_function(model))
    adapter.eval()  # a new module is in training mode; exporters switch its children to match
    return adapter


def trace(model, image: torch.Tensor):
    """(traced TorchScript module, TracingAdapter) of `model` on the sample `image`."""
    adapter = tracing_adapter(model, image)
    with warnings.catch_warnings():
        # the TracerWarnings name detectron2's shape asserts and size checks, constant for a
        # given model; the traced model is compared with the eager one below instead
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    return traced, adapter


def sample_image(cfg, path: str = "", seed: int = 0) -> torch.Tensor:
    """The image to trace with: `path` read as the model reads images, or a generated one of the
    config's test size (random pixels)."""
    if path:
        from detectron2.data.detection_utils import read_image

        array = read_image(path, format=cfg.INPUT.FORMAT)
    else:
        short = cfg.INPUT.MIN_SIZE_TEST
        long = min(cfg.INPUT.MAX_SIZE_TEST, int(short * 4 / 3))
        array = np.random.default_rng(seed).integers(0, 256, (short, long, 3)).astype(np.uint8)
    return torch.as_tensor(np.ascontiguousarray(array.transpose(2, 0, 1)), dtype=torch.float32)


def check_images(image: torch.Tensor) -> List[torch.Tensor]:
    """The images the export is checked on: the sample and a transposed copy (another size, so
    that shape-dependent constants baked into the trace would show)."""
    return [image, image.transpose(1, 2).contiguous()]


def canonical_order(scores, classes, boxes) -> np.ndarray:
    """Detection indices by score (descending), then class and box: the order of detections
    whose scores tie (near-uniform scores of an untrained head) is arbitrary in the model, and
    may differ between eager and traced runs."""
    scores, classes, boxes = (np.asarray(torch.as_tensor(x).detach().cpu())
                              for x in (scores, classes, boxes))
    keys = [np.round(boxes[:, i], 2) for i in reversed(range(4))]
    return np.lexsort(keys + [classes, -np.round(scores, 4)])


def compare(name: str, outputs, expected: Instances, atol: float = 1e-4) -> float:
    """Largest difference of `outputs` (tensors in output_names order) from the eager detections,
    both in canonical_order; ExportMismatchError when counts, classes or values differ beyond
    `atol` (pixels/scores)."""
    names = output_names(expected)
    got = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else
                              v.detach().cpu()) for k, v in zip(names, outputs)}
    want = {k: getattr(v, "tensor", v).detach().cpu() for k, v in expected.get_fields().items()}
    want["image_size"] = torch.tensor(expected.image_size)
    for key in names:
        if tuple(got[key].shape) != tuple(want[key].shape):
            raise ExportMismatchError(f"{name}: {key} has shape {tuple(got[key].shape)}, eager "
                                      f"{tuple(want[key].shape)}")
    detections = [k for k in names if k != "image_size"]
    for fields in (got, want):
        order = torch.as_tensor(canonical_order(fields["scores"], fields["pred_classes"],
                                                fields["pred_boxes"]))
        fields.update({k: fields[k][order] for k in detections})
    worst = 0.0
    for key in names:
        if got[key].is_floating_point():
            diff = (float((got[key].float() - want[key].float()).abs().max())
                    if got[key].numel() else 0.0)
            worst = max(worst, diff)
            if diff > atol:
                raise ExportMismatchError(f"{name}: {key} differs from eager by {diff:g}")
        elif not torch.equal(got[key], want[key].to(got[key].dtype)):
            raise ExportMismatchError(f"{name}: {key} differs from eager")
    return worst


def export_metadata(cfg, names: List[str]) -> Dict:
    """What a user of the exported file needs to feed it and read its outputs."""
    return {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "input": "image: float32 [3, H, W], channels in input_format, values 0-255",
        "input_format": cfg.INPUT.FORMAT,
        "resize_shortest_edge": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
        "outputs": names,
        "boxes": "pred_boxes XYXY in the pixels of the image given",
        "num_classes": int(cfg.MODEL.RETINANET.NUM_CLASSES if cfg.MODEL.META_ARCHITECTURE ==
                           "RetinaNet" else cfg.MODEL.ROI_HEADS.NUM_CLASSES),
    }


def export_torchscript(cfg, model, image: torch.Tensor, path: str) -> Tuple[List[str], float]:
    """Trace `model` on `image` and save it to `path` (metadata as METADATA_FILE); the saved file
    is reloaded and checked against eager on check_images. Returns (output names, the largest
    difference found)."""
    traced, _ = trace(model, image)
    checks = [(x, eager_detections(model, x)) for x in check_images(image)]
    names = output_names(checks[0][1])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = json.dumps(export_metadata(cfg, names), indent=1)
    with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, path, _extra_files={METADATA_FILE: metadata})
        loaded = torch.jit.load(path, map_location=image.device)
    worst = max(compare(f"TorchScript on a {tuple(x.shape)} image", loaded(x), expected,
                        atol=TORCHSCRIPT_ATOL) for x, expected in checks)
    return names, worst


def export_onnx(cfg, model, image: torch.Tensor, path: str) -> Tuple[List[str], Optional[float]]:
    """Export the traced model to ONNX (torch's TorchScript-based exporter; image height and
    width dynamic) at `path`. Checked against eager with onnxruntime when it is installed.
    Returns (output names, the largest difference found, or None when not checked)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("ONNX export needs the onnx package: pip install onnx (and onnxruntime "
                          "to check the exported model)")
    adapter = tracing_adapter(model, image)
    checks = [(x, eager_detections(model, x)) for x in check_images(image)]
    names = output_names(checks[0][1])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices, as in trace()
        # dynamo=False: torch.export (the default exporter) cannot capture detectron2's
        # data-dependent detection code (an AssertionError in its step 1/3)
        torch.onnx.export(adapter, (image,), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names,
                          dynamic_axes={"image": {1: "height", 2: "width"},
                                        **{n: {0: "detections"} for n in names[:-1]}})
    if importlib.util.find_spec("onnxruntime") is None:
        logger.warning("onnxruntime is not installed: the ONNX file was not checked against eager")
        return names, None
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = max(compare(f"ONNX Runtime on a {tuple(x.shape)} image",
                        session.run(None, {"image": x.cpu().numpy()}), expected, atol=ONNX_ATOL)
                for x, expected in checks)
    return names, worst
