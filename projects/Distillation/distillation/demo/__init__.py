"""The offline demo: generated data -> teacher -> baseline student -> DSIG student -> COCO
evaluation of all three -> a report. Stages already done are skipped on re-run; the teacher is
cached per (preset, task, seed). Task "bbox": Faster R-CNN; "segm": Mask R-CNN (box and mask AP).

One concern per module: presets (what is trained), data (generated shapes or the user's checked
COCO splits), console (stage lines, progress, per-run logs), runs (planning, executing and
reading back trainings), stats (over seeds), report and plots, pipeline (run: all of it in
order), cli (run_demo.py's arguments).
"""
from .data import UserData, generate_data, prepare_user_data
from .pipeline import run
from .presets import (ABLATION, CONFIG_DIR, METHODS, MODEL_CONFIGS, PRESETS, TASKS, Preset,
                      select_methods)
from .report import graph_lines, write_report
from .runs import Job, execute, loss_curve, plan_seed, run_dir, run_jobs, run_tag
from .stats import compare_runs, gap_recovered, summarize, versus_baseline

__all__ = [
    "ABLATION", "CONFIG_DIR", "Job", "METHODS", "MODEL_CONFIGS", "PRESETS", "Preset", "TASKS",
    "UserData", "compare_runs", "execute", "gap_recovered", "generate_data", "graph_lines",
    "loss_curve", "plan_seed", "prepare_user_data", "run", "run_dir", "run_jobs", "run_tag",
    "select_methods", "summarize", "versus_baseline", "write_report",
]
