#!/usr/bin/env python
r"""DSIG distillation training and evaluation (detectron2 projects/ convention); plain
detectron2 models (a baseline, an exported student) train, resume and evaluate the same way.

Examples:
  python projects/Distillation/train_net.py --config-file \
      projects/Distillation/configs/Distillation-FasterRCNN-R18-R50-dsig-1x.yaml --num-gpus 4
  python projects/Distillation/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth
  python projects/Distillation/train_net.py --config-file CFG \
      --register-coco my_train data/train.json data/images DATASETS.TRAIN '("my_train",)'
  python projects/Distillation/train_net.py --config-file CFG --check     # before a long run
  python projects/Distillation/train_net.py --config-file CFG --num-gpus 8 --num-machines 2 \
      --machine-rank R --dist-url tcp://HOST:PORT    # on each machine, R = 0, 1
Without a GPU it runs on the CPU; --num-gpus N then starts N CPU processes (gloo).

Before any process starts or model is built, the datasets the run reads, the class count (from
the data) and the weight files are checked; bad input ends with one message naming the problem
and the fix (exit status 2). --check goes further and trains nothing (distillation/check.py).
The log (detectron2's and the project's lines, Python warnings) goes to the console and to
OUTPUT_DIR/log.txt.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the distillation package

# first: it imports detectron2 without the upstream notices (distillation/upstream_warnings.py)
from distillation.upstream_warnings import quiet_upstream_notices  # noqa: E402

quiet_upstream_notices()

from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from distillation.checkpoint import DistillationCheckpointer  # noqa: E402
from distillation.errors import InputError  # noqa: E402
from distillation.launch import launch  # noqa: E402
from distillation.logs import held_logs  # noqa: E402
from distillation.training import Trainer, check_inputs, register_datasets, setup  # noqa: E402

DESCRIPTION, _, EXAMPLES = __doc__.partition("\nExamples:\n")


def main(args, held_records=None):
    register_datasets(args.register_coco)
    cfg = setup(args, held_records)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # a checkpoint that leaves weights unfilled is an error here, not a random model's AP
        DistillationCheckpointer(model, save_dir=cfg.OUTPUT_DIR,
                                 require_complete=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parser():
    """detectron2's default_argument_parser with this script's description, examples and
    options; every option's default in its help."""
    p = default_argument_parser(epilog="Examples:\n" + EXAMPLES)
    p.description = DESCRIPTION
    p.add_argument("--allow-unsafe-yaml", action="store_true",
                   help="let config files use Python YAML tags (they execute code; the "
                        "original RetinaNet configs use one for anchor sizes)")
    p.add_argument("--register-coco", nargs=3, action="append", default=[],
                   metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a COCO-format dataset of your own (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="check the config end to end and train nothing: build student and "
                        "teacher, locate every weight file (nothing is downloaded), check the "
                        "datasets, run one iteration on one image; prints what it found and the "
                        "overrides that make the config run here (exit status 1 if it does not, "
                        "2 if the config cannot be read)")
    for action in p._actions:
        if action.dest == "opts":  # detectron2's text also describes LazyConfig, not used here
            action.help = ("config overrides at the end of the command: KEY VALUE pairs, e.g. "
                           "SOLVER.BASE_LR 0.001 OUTPUT_DIR out/run1")
        # the defaults detectron2's help texts leave out (a flag's False, an empty value: none)
        shown = not (action.default is None or action.default is False
                     or action.default in ("", [], argparse.SUPPRESS))
        if shown and action.help and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return p


def run(args) -> int:
    if args.check:
        from distillation.check import run_check

        return run_check(args)
    # checked once, before processes start: the workers get the data's class count; what the
    # checks log is logged by each process once its log files exist (training.setup)
    with held_logs() as held:
        args.opts = list(args.opts) + check_inputs(args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args, held.records))
    return 0


if __name__ == "__main__":
    args = parser().parse_args()
    print("Command Line Args:", args)
    try:
        sys.exit(run(args))
    except InputError as e:  # bad input: the message names the fix, a traceback adds nothing
        print(f"train_net.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
