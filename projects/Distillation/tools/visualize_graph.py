#!/usr/bin/env python
r"""Draw DSIG's instance graph for one image: the nodes (fg RoIs, mined bg RoIs) on the image and
the teacher's and student's edge matrices (cosine similarities) side by side with their
difference.

Example:
  python projects/Distillation/tools/visualize_graph.py --config CFG --weights CKPT \
      --json ann.json --image images/0001.png --output graph.png [KEY VALUE ...]

CFG is a DistillationRCNN config; CKPT a distillation checkpoint (student.* and teacher.*, e.g.
OUTPUT_DIR/model_final.pth of a training), or leave --weights out and set
DISTILL.TEACHER.WEIGHTS / MODEL.WEIGHTS in the options. The image's annotations come from the
COCO json (its file_name must match). Bad input is one message (exit status 2).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# first: it imports detectron2 without the upstream notices (distillation/upstream_warnings.py)
from distillation.upstream_warnings import quiet_upstream_notices  # noqa: E402

quiet_upstream_notices()

from distillation.errors import InputError  # noqa: E402
from distillation.graph_view import visualize  # noqa: E402
from distillation.logs import setup_logs  # noqa: E402


def parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="CFG",
                   help="a DistillationRCNN config file (a two-stage distillation model)")
    p.add_argument("--weights", default="", metavar="CKPT",
                   help="a distillation checkpoint with student and teacher weights (default: "
                        "none: MODEL.WEIGHTS and DISTILL.TEACHER.WEIGHTS of the config)")
    p.add_argument("--json", required=True, help="the COCO json that annotates the image")
    p.add_argument("--image", required=True,
                   help="the image to draw; its file name must be one of the json's images")
    p.add_argument("--output", default="graph.png",
                   help="the PNG to write (default: %(default)s)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides, e.g. MODEL.DEVICE cpu")
    return p


def main() -> int:
    args = parser().parse_args()
    setup_logs(capture_warnings=False)  # the project's lines on the console, formatted
    try:
        print(visualize(args.config, args.image, args.json, args.output, args.weights,
                        args.opts))
    except InputError as e:  # the message names the fix, a traceback adds nothing
        print(f"visualize_graph.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
