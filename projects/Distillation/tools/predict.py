#!/usr/bin/env python
"""Run a trained detector on images: draw its detections, write a COCO results json.

Inputs: an image, a folder of images, or a COCO json's images.

The detector: --config-file with --weights, either the student's config (e.g.
configs/demo/student-R18.yaml) with the exported student file (tools/export_student.py), or the
distillation config with a distillation checkpoint (its student runs; the teacher is not built).
Weights that leave any of the model's weights without a value are refused, as train_net.py's
--eval-only refuses them.

Writes into --output: each input's image with its detections drawn (detectron2's Visualizer,
class names and scores; the input's file name, or the json's file_name) and
coco_instances_results.json: [{image_id, category_id, bbox [x, y, w, h], score}, ...] in the
original images' pixels. For a COCO json input, image_id and category_id are the json's; for an
image or a folder, image_id counts the images from 1 in name order and each entry also has its
file_name.

Class names (and the category ids written): --categories JSON (e.g. the training json), else the
input json's, else the config's datasets' (detectron2's metadata, DSIG_COCO_DATASETS), else
"class N" with the model's class index.

Examples:
  python predict.py --config-file configs/demo/student-R18.yaml --weights student.pth \\
      --categories data/train.json images/ --output predictions
  python predict.py --config-file configs/demo/dsig-R18-R50.yaml --weights model_final.pth \\
      data/val.json --image-root data/images --score-threshold 0.3
Config overrides (KEY VALUE pairs, as train_net.py takes them) may follow the input.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# first: it imports detectron2 without the upstream notices (distillation/upstream_warnings.py)
from distillation.upstream_warnings import quiet_upstream_notices  # noqa: E402

quiet_upstream_notices()

from distillation.errors import InputError  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(
        __doc__.splitlines()[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="an image, a folder of images or a COCO json (its images)")
    p.add_argument("--config-file", required=True,
                   help="the student's config or the distillation config")
    p.add_argument("--weights", default="",
                   help="the exported student file or a distillation checkpoint (default: the "
                        "config's MODEL.WEIGHTS)")
    p.add_argument("--output", default="output/predict",
                   help="folder for the drawn images and the results json (default: %(default)s)")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="keep detections scoring at least this, in the drawings and the json "
                        "(default: %(default)s; lower it, e.g. 0.05, for a COCO evaluation)")
    p.add_argument("--image-root", default="",
                   help="COCO json input: the folder its file_names are under (default: the "
                        "json's folder)")
    p.add_argument("--categories", default="",
                   help="a COCO json whose categories name the model's classes (e.g. the "
                        "training json)")
    p.add_argument("--device", default="",
                   help="cpu, cuda, cuda:1, ... (default: cuda when a GPU is there, else cpu)")
    p.add_argument("--allow-unsafe-yaml", action="store_true",
                   help="let the config use Python YAML tags (they execute code)")
    return p


def parse_args(argv=None):
    """The options, and the config overrides (KEY VALUE pairs, after the input, or anywhere)."""
    from distillation.deploy import parse_args_with_overrides

    return parse_args_with_overrides(parser(), argv)


def run(args) -> None:
    """Predict as `args` say; raises InputError subclasses on bad input."""
    from distillation.deploy import build_detector, detector_config
    from distillation.prediction import (check_readable, choose_categories, collect_inputs,
                                         predict)

    # the input first: a wrong path should not wait for a model to be built
    items = collect_inputs(args.input, args.image_root)
    check_readable(items)
    is_json = args.input.lower().endswith(".json") and os.path.isfile(args.input)
    cfg = detector_config(args.config_file, args.weights, args.opts, args.device or None,
                          args.allow_unsafe_yaml, score_threshold=args.score_threshold)
    categories = choose_categories(cfg, args.categories, args.input if is_json else "")
    model = build_detector(cfg)
    print(f"predict: {len(items)} image(s) from {args.input}; {cfg.MODEL.META_ARCHITECTURE} on "
          f"{cfg.MODEL.DEVICE}; weights {cfg.MODEL.WEIGHTS}; class names from "
          f"{categories.source}; score threshold {args.score_threshold}")
    start = time.perf_counter()
    summary = predict(cfg, model, items, categories, args.output, args.score_threshold,
                      with_file_names=not is_json)
    print(f"predict: {summary['detections']} detection(s) on {summary['images']} image(s) in "
          f"{time.perf_counter() - start:.1f} s; drawn images in {args.output}, results in "
          f"{summary['results']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:  # bad input: one line naming the problem and the fix
        print(f"predict.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
