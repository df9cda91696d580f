#!/usr/bin/env python
"""Export a distillation checkpoint's student: a detectron2 checkpoint, TorchScript or ONNX.

  --format checkpoint (default): the student's weights with stock detectron2 names; they load with
      DetectionCheckpointer into GeneralizedRCNN / RetinaNet built from the student's config
      (META_ARCHITECTURE the stock one).
  --format torchscript: the student traced through detectron2's TracingAdapter (torch.jit.trace);
      needs --config-file (the student's or the distillation config). CHECKPOINT may be a
      distillation checkpoint or an exported student file. The saved file is reloaded and checked
      against the eager model on two image sizes before this tool reports success.
  --format onnx: the same trace through torch.onnx.export (needs the onnx package; checked
      against eager with onnxruntime when it is installed).

The traced model takes one float32 [3, H, W] image in the config's INPUT.FORMAT (values 0-255)
and returns the detections' tensors in the image's pixels; the names and order are printed and
stored in the TorchScript file (torch.jit.load(path, _extra_files={"dsig_export.json": ""})).

Config overrides (KEY VALUE pairs, as train_net.py takes them) may follow the files.

Examples:
  python export_student.py output/X/model_final.pth student.pth
  python export_student.py student.pth student.ts --format torchscript \\
      --config-file configs/demo/student-R18.yaml --sample-image some.jpg
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# first: it imports detectron2 without the upstream notices (distillation/upstream_warnings.py)
from distillation.upstream_warnings import quiet_upstream_notices  # noqa: E402

quiet_upstream_notices()

from distillation.checkpoint import NotACheckpointError, export_student  # noqa: E402
from distillation.errors import ConfigError, InputError  # noqa: E402

FORMATS = ("checkpoint", "torchscript", "onnx")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(
        __doc__.splitlines()[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a distillation checkpoint (e.g. model_final.pth); for "
                                      "torchscript/onnx also an exported student file")
    p.add_argument("output", help="the file to write")
    p.add_argument("--format", choices=FORMATS, default="checkpoint",
                   help="what to write (default: %(default)s)")
    p.add_argument("--config-file", default="",
                   help="torchscript/onnx: the student's config or the distillation config")
    p.add_argument("--sample-image", default="",
                   help="torchscript/onnx: an image to trace with (default: random pixels of the "
                        "config's test size; a real image exercises the detection branches)")
    p.add_argument("--device", default="cpu", help="torchscript/onnx: where to trace "
                                                   "(default: %(default)s)")
    p.add_argument("--allow-unsafe-yaml", action="store_true",
                   help="let the config use Python YAML tags (they execute code)")
    return p


def parse_args(argv=None):
    """The options, and the config overrides (KEY VALUE pairs, after the files or anywhere)."""
    from distillation.deploy import parse_args_with_overrides

    return parse_args_with_overrides(parser(), argv)


def export_checkpoint(args) -> str:
    try:
        keys = export_student(args.checkpoint, args.output)
    except NotACheckpointError:
        raise
    except ValueError as e:  # not a distillation checkpoint
        raise InputError(f"{args.checkpoint} is {e}; an exported student is already a stock "
                         "checkpoint (--format torchscript/onnx take it as it is)") from None
    return f"wrote {len(keys)} student tensors to {args.output}"


def export_traced(args) -> str:
    from distillation.deploy import export_onnx, export_torchscript, load_detector, sample_image

    if not args.config_file:
        raise ConfigError(f"--format {args.format} needs --config-file (the student's config or "
                          "the distillation config)")
    cfg, model = load_detector(args.config_file, args.checkpoint, args.opts, args.device,
                               args.allow_unsafe_yaml)
    image = sample_image(cfg, args.sample_image).to(model.device)
    export = export_torchscript if args.format == "torchscript" else export_onnx
    names, worst = export(cfg, model, image, args.output)
    checked = ("not checked (onnxruntime is not installed)" if worst is None else
               f"outputs equal eager on two image sizes (largest difference {worst:.2g})")
    return (f"wrote {args.format} {args.output}: input image float32 [3, H, W] "
            f"{cfg.INPUT.FORMAT} 0-255; outputs {', '.join(names)}; {checked}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(export_checkpoint(args) if args.format == "checkpoint" else export_traced(args))
    except InputError as e:  # bad input: one line naming the problem
        print(f"export_student.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
