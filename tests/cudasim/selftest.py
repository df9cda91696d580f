"""Runs one planted-defect kernel of selftest.cu on the executor and prints what happened as JSON:
{"schedule:seed": {"out": [...]} or {"error": "..."}} for each schedule and fill mode asked.

  CUDASIM_LIB=<library> python tests/cudasim/selftest.py CASE [schedule:seed:fill ...]

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
    case = argv[1]
    runs = argv[2:] or ["forward:0:random"]
    result = {}
    for run in runs:
        schedule, seed, fill = run.split(":")
        runner.configure(schedule, int(seed), fill)
        out = torch.zeros(128, dtype=torch.int32, device="cudasim")
        try:
            got = torch.ops.cudasim_selftest.run(case, out).cpu()
            result[run] = {"out": got[:64].tolist()}
        except RuntimeError as e:
            result[run] = {"error": str(e).splitlines()[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
