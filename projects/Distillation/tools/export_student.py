#!/usr/bin/env python
"""Export the student of a distillation checkpoint as a stock detectron2 checkpoint.

Usage: python export_student.py output/.../model_final.pth student.pth
The result loads with DetectionCheckpointer into GeneralizedRCNN / RetinaNet built from the
student's config (META_ARCHITECTURE set to the stock one).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from distillation.checkpoint import export_student  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("output")
    a = p.parse_args()
    keys = export_student(a.checkpoint, a.output)
    print(f"wrote {len(keys)} student tensors to {a.output}")


if __name__ == "__main__":
    main()
