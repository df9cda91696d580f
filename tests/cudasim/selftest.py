"""Runs planted-defect kernels of selftest.cu on the executor and prints what happened as JSON:
{case: {"schedule:seed:fill": {"out": [...]} or {"error": "..."}}} for each case, schedule and
fill mode asked.

  CUDASIM_LIB=<library> python tests/cudasim/selftest.py CASE[,CASE...] [schedule:seed:fill ...]

A memory or race defect ends the process with the sanitizer's report instead (that is the check).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402


def main(argv):
    runner.load(os.environ["CUDASIM_LIB"])
    runs = argv[2:] or ["forward:0:random"]
    result = {}
    for case in argv[1].split(","):
        result[case] = {}
        for run in runs:
            schedule, seed, fill = run.split(":")
            runner.configure(schedule, int(seed), fill)
            out = torch.zeros(128, dtype=torch.int32, device="cudasim")
            try:
                got = torch.ops.cudasim_selftest.run(case, out).cpu()
                result[case][run] = {"out": got.tolist()}
            except RuntimeError as e:
                result[case][run] = {"error": str(e).splitlines()[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
