#!/usr/bin/env python
"""The offline DSIG demo (distillation/demo/): generated data, a teacher, a baseline and DSIG
students, COCO evaluation and a report. `run_demo.py --help` lists the options and presets."""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Upstream deprecation notices printed by every process at import (detectron2's use of
# torch.jit.script and of torch.meshgrid) say nothing about the run: kept off the console here
# and, through the environment, in the worker processes of --jobs.
QUIET_WARNINGS = [("`torch.jit.script` is deprecated", FutureWarning),
                  ("torch.meshgrid", UserWarning)]
for _message, _category in QUIET_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, category=_category)
os.environ["PYTHONWARNINGS"] = ",".join(
    filter(None, [os.environ.get("PYTHONWARNINGS", "")]
           + [f"ignore:{m}:{c.__name__}" for m, c in QUIET_WARNINGS]))

from distillation.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
