"""run_demo.py's command line: its options (each with its help and default), the presets and
methods explained in --help, and the report's path printed last."""
import argparse
import logging
import os
import textwrap
from typing import Dict, List, Optional

from ..errors import InputError
from . import console
from .pipeline import run
from .presets import METHOD_PURPOSE, METHODS, PRESETS, TASKS, describe_preset
from .report import rewrite_report

DESCRIPTION = """\
The offline DSIG demo: a teacher, a baseline student and distilled students
(DSIG by default) are trained on generated shapes or on your own COCO-format
data, evaluated with COCO metrics and compared in a report (report.md,
report.json, ap.png, loss.png, graph.png in --output). Runs already finished
there are reused when the command is repeated."""

EXAMPLES = """\
examples:
  run_demo.py --preset tiny --output /tmp/demo   # check the pipeline, minutes
  run_demo.py                                    # the quick demo, seed 0
  run_demo.py --seeds 0 1 2 --methods dsig feature-mse logit-kd --jobs 2
  run_demo.py --train mine=train.json,images --val mine_val=val.json,images"""

HELP_WIDTH = 79


def _table(title: str, rows: Dict[str, str]) -> str:
    """A titled two-column list, the text wrapped under itself."""
    indent = 2 + max(map(len, rows)) + 2
    lines = [f"{title}:"]
    for name, text in rows.items():
        lines += textwrap.wrap(text, HELP_WIDTH, initial_indent=f"  {name:<{indent - 2}}",
                               subsequent_indent=" " * indent, break_on_hyphens=False)
    return "\n".join(lines)


def _epilog() -> str:
    presets = _table("presets", {name: describe_preset(name) for name in PRESETS})
    return f"{presets}\n\n{_table('methods', METHOD_PURPOSE)}\n\n{EXAMPLES}"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's lines (the preset and method tables); wraps the
    option help without splitting a method name at its hyphen."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """The run_demo.py arguments; every option says what it does and its default."""
    p = argparse.ArgumentParser(prog="run_demo.py", description=DESCRIPTION, epilog=_epilog(),
                                formatter_class=_HelpFormatter)
    p.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="data size and schedules, see 'presets' below (default: quick)")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one or more seeds, each with its own data, teacher and students; the "
                        "report gives their mean and spread (default: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   metavar="METHOD",
                   help="distilled students to train beside the teacher and the baseline, see "
                        "'methods' below (default: dsig)")
    p.add_argument("--ablation", action="store_true",
                   help="also train the paper's ablation, dsig-edges and dsig-edges-fg")
    p.add_argument("--task", default="bbox", choices=sorted(TASKS),
                   help="bbox: Faster R-CNN models, box AP; segm: Mask R-CNN models, box and "
                        "mask AP (default: bbox)")
    p.add_argument("--train", default=None, metavar="NAME=ann.json,image_root",
                   help="your own COCO-format train split instead of the generated shapes "
                        "(with --val; classes read from the json, checked before training)")
    p.add_argument("--val", default=None, metavar="NAME=ann.json,image_root",
                   help="your own COCO-format val split, evaluated after each training "
                        "(with --train)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                   help="input size for your data (default: the median image's sides, at most "
                        "800 x 1333)")
    p.add_argument("--teacher-weights", default=None, metavar="FILE",
                   help="a trained teacher (e.g. on your data), evaluated instead of training "
                        "one (default: the demo trains its R50-FPN teacher)")
    p.add_argument("--teacher-config", default=None, metavar="CONFIG",
                   help="the detectron2 config of --teacher-weights (default: the demo's "
                        "R50-FPN teacher config of --task)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="trainings at a time, the torch threads split between them; the runs "
                        "and their results do not depend on it (default: 1)")
    p.add_argument("--output", default=os.path.join("output", "demo"), metavar="DIR",
                   help="folder of the runs, their logs and the report (default: "
                        "%(default)s)")
    p.add_argument("--backend", default="fused", choices=["fused", "reference"],
                   help="DSIG's ops: fused (dsig_ext's compiled kernels) or reference (plain "
                        "PyTorch, the same numbers, slower) (default: fused)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md, report.json and ap.png in --output from its "
                        "report.json in the current layout, training nothing (loss.png is "
                        "kept: report.json holds no loss curves)")
    p.add_argument("--verbose", action="store_true",
                   help="detectron2's full log on the console too (it is always in each run's "
                        "log.txt)")
    return p


def main(argv: Optional[List[str]] = None) -> Dict:
    """run_demo.py: parse the arguments, run the demo, print the report and where it is."""
    from detectron2.utils.logger import setup_logger

    p = build_parser()
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    setup_logger(name="detectron2").setLevel(logging.INFO)
    setup_logger(name="distillation")
    console.VERBOSE = a.verbose
    if a.report_only:
        if not os.path.isfile(os.path.join(a.output, "report.json")):
            p.exit(2, f"run_demo.py: --report-only: no report.json in {a.output}\n")
        report = rewrite_report(a.output)
        print(f"[demo] report: {os.path.abspath(os.path.join(a.output, 'report.md'))} "
              "(rewritten from its report.json)")
        return report
    try:
        report = run(a.output, a.preset, a.seeds, a.ablation, a.backend, a.methods,
                     a.train, a.val, a.image_size, a.jobs, a.teacher_weights,
                     a.teacher_config, a.task)
    except InputError as e:  # your data or weights: the message names the problem
        p.exit(2, f"run_demo.py: {type(e).__name__}: {e}\n")
    report_md = os.path.abspath(os.path.join(a.output, "report.md"))
    with open(report_md) as f:
        print(f.read())
    # last, after the report text: where it is, with its json and figures
    print(f"[demo] report: {report_md} (with report.json and the figures beside it)")
    return report
