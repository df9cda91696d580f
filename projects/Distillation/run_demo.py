#!/usr/bin/env python
"""The offline DSIG demo (distillation/demo/): generated data, a teacher, a baseline and DSIG
students, COCO evaluation and a report. `run_demo.py --help` lists the options and presets."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the distillation package

# first: it imports detectron2 without the upstream notices (distillation/upstream_warnings.py);
# the worker processes of --jobs inherit the filter through PYTHONWARNINGS
from distillation.upstream_warnings import quiet_upstream_notices  # noqa: E402

quiet_upstream_notices(subprocesses=True)

from distillation.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
