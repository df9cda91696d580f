#!/usr/bin/env python
"""Draw DSIG's instance graph for one image: the nodes (fg RoIs, mined bg RoIs) on the image and
the teacher's and student's edge matrices (cosine similarities) side by side with their
difference.

Usage: python visualize_graph.py --config CFG --weights CKPT --json ann.json --image img.png
       --output graph.png [KEY VALUE ...]
CFG is a DistillationRCNN config; CKPT a distillation checkpoint (student.* and teacher.*), or
leave --weights empty and set DISTILL.TEACHER.WEIGHTS / MODEL.WEIGHTS in the options. The image's
annotations come from the COCO json (its file_name must match).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from distillation.graph_view import GraphConfigError, visualize  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--weights", default="")
    p.add_argument("--json", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--output", default="graph.png")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    a = p.parse_args()
    try:
        print(visualize(a.config, a.image, a.json, a.output, a.weights, a.opts))
    except GraphConfigError as e:  # one line, no traceback
        sys.exit(f"visualize_graph.py: error: {e}")


if __name__ == "__main__":
    main()
