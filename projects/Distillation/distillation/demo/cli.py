"""The offline DSIG demo: a teacher, a baseline student and a DSIG student trained on generated
shapes, evaluated with COCO metrics, and a report (report.md / report.json / plots).

Usage: python projects/Distillation/run_demo.py [--preset tiny|quick|full] [--seeds N [N ...]]
       [--methods M [M ...]] [--ablation] [--task bbox|segm] [--output DIR]
       [--train NAME=ann.json,image_root --val NAME=ann.json,image_root [--image-size S L]]

Methods (distilled students beside the teacher and the baseline, same schedule): dsig (default),
dsig-edges, dsig-edges-fg (the paper's ablation; --ablation adds both), feature-mse, logit-kd,
dsig-all. With --train/--val the same runs use a COCO detection dataset of your own (classes
read from the json; the preset sets the schedule). --task segm trains Mask R-CNN models instead
(instance masks generated with the shapes, or read from your json) and reports box and mask AP.

With several seeds the report gives each seed's numbers and their mean.
"""
import argparse
import logging
import os
from typing import Dict, List, Optional

from ..errors import InputError
from . import console
from .pipeline import run
from .presets import METHODS, PRESETS, TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                   help="one or more seeds (data and initialisation); the report averages them")
    p.add_argument("--ablation", action="store_true",
                   help="also train edges-only and edges+fg-nodes DSIG students")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="distilled students to train (default: dsig)")
    p.add_argument("--task", default="bbox", choices=sorted(TASKS),
                   help="bbox: Faster R-CNN (default); segm: Mask R-CNN, box and mask AP")
    p.add_argument("--train", default=None, metavar="NAME=ann.json,image_root",
                   help="your own COCO-format train split (with --val)")
    p.add_argument("--val", default=None, metavar="NAME=ann.json,image_root")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                   help="input size for your data (default: the median image, <= 800 x 1333)")
    p.add_argument("--teacher-weights", default=None,
                   help="a trained teacher (e.g. on your data) instead of training one")
    p.add_argument("--teacher-config", default=None,
                   help="its detectron2 config (default: the demo's R50-FPN teacher)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at a time, the torch threads split between them")
    p.add_argument("--verbose", action="store_true",
                   help="detectron2's full log on the console (always in each run's log.txt)")
    p.add_argument("--output", default=os.path.join("output", "demo"))
    p.add_argument("--backend", default="fused", choices=["fused", "reference"])
    return p


def main(argv: Optional[List[str]] = None) -> Dict:
    """run_demo.py: parse the arguments, run the demo, print the report."""
    from detectron2.utils.logger import setup_logger

    p = build_parser()
    a = p.parse_args(argv)
    setup_logger(name="detectron2").setLevel(logging.INFO)
    setup_logger(name="distillation")
    console.VERBOSE = a.verbose
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    try:
        report = run(a.output, a.preset, a.seeds, a.ablation, a.backend, a.methods,
                     a.train, a.val, a.image_size, a.jobs, a.teacher_weights,
                     a.teacher_config, a.task)
    except InputError as e:  # your data or weights: the message names the problem
        p.exit(2, f"run_demo.py: {type(e).__name__}: {e}\n")
    print(open(os.path.join(a.output, "report.md")).read())
    return report
