#!/usr/bin/env python
"""One-command validation and benchmark of dsig_ext's CUDA path on a machine with a GPU.

Needs torch >= 2.4 with CUDA, torchvision, pytest, hypothesis, a CUDA toolkit (nvcc) and ninja;
no network and no detectron2. Steps, each recorded in the report:

1. build   copies the sources into a work folder (an existing build is not touched) and builds
           the extension there for the local GPU only (TORCH_CUDA_ARCH_LIST from the device's
           compute capability, MAX_JOBS = cores); fails if the CUDA kernels are not in it;
2. tests   the CUDA tests and the op tests (on CUDA where a GPU is visible);
3. sanitize  where compute-sanitizer exists and works: memcheck and racecheck over small cases
           of every kernel (benchmarks/sanitizer_cases.py);
4. bench   benchmarks/bench_ops.py on CUDA: B = 2 and 8, fp32 and bf16, against per-level
           torchvision roi_align and the per-graph loop, each kernel next to its roofline floor;
5. train-step (with --wheels DIR): installs detectron2 and its pure-Python dependencies from the
           wheels in DIR, offline, and runs bench_train_step.py --device cuda.

Writes gpu_check.{json,md}, the benchmark's files and logs.txt into OUT, stamped with the GPU
name, driver, torch and CUDA versions. The report puts each kernel's measured time next to the
static cost model committed in benchmarks/results/kernel_model_after.json (made by
benchmarks/kernel_model.py; no nvcc needed here) and its roofline floor, so the first GPU run also
calibrates the model. Exit status: 0 all ran and passed, 1 a step failed,
2 nothing to do (no CUDA device visible).

Usage: benchmarks/gpu_check.sh OUT [--wheels DIR] [--work DIR] [--jobs N] [--skip STEP ...]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("build", "tests", "sanitize", "bench", "train-step")
OP_TESTS = ["tests/test_cuda.py", "tests/test_multilevel_roi_align.py", "tests/test_edge_loss.py",
            "tests/test_pooler.py", "tests/test_assign_fpn_levels.py", "tests/test_backend.py"]
STAGED = ["csrc", "dsig_ext", "tests", "benchmarks", "projects", "setup.py", "pyproject.toml"]
MODEL_JSON = ROOT / "benchmarks" / "results" / "kernel_model_after.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the report (created)")
    p.add_argument("--wheels", default=None,
                   help="folder of wheels (detectron2 and its pure-Python dependencies) for the "
                        "training-step benchmark")
    p.add_argument("--work", default=None, help="build folder (default: a new temporary one)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS of the build")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    p.add_argument("--bench-args", default="", help="extra arguments for bench_ops.py")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.wheels is not None and not Path(args.wheels).is_dir():
        p.error(f"--wheels {args.wheels}: no such folder")
    return args


def arch_list(capability):
    """TORCH_CUDA_ARCH_LIST for one device: (9, 0) -> '9.0'."""
    major, minor = capability
    if major < 5:
        raise ValueError(f"compute capability {major}.{minor} is older than any CUDA 12 target")
    return f"{major}.{minor}"


def gpu_info():
    """What the report is stamped with; gpu False when torch sees no CUDA device."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import versions

    gpu = torch.cuda.is_available()
    info = {"python": sys.version.split()[0], "cores": os.cpu_count()}
    info.update(versions("cuda" if gpu else "cpu"))
    info["gpu_name"] = info.pop("gpu", None)
    info["gpu"] = gpu
    if gpu:
        info["capability_tuple"] = list(torch.cuda.get_device_capability())
    return info


def sanitizer_usable(returncode, output):
    """(usable, reason) from a trial run of compute-sanitizer on a one-kernel program."""
    if returncode == 0 and "ERROR SUMMARY: 0 errors" in output:
        return True, ""
    for marker in ("Device not supported", "Unable to", "error 999", "not supported"):
        if marker in output:
            return False, f"compute-sanitizer does not work here ({marker!r})"
    return False, f"compute-sanitizer trial run failed (exit {returncode})"


# Seconds a step may take before it is stopped (the whole check is meant to end within 8 minutes
# on a 16-core machine with an H100; a hung step must not take the report with it).
TIMEOUTS = {"build": 420, "tests": 300, "sanitize": 240, "bench": 300, "train-step": 600}


class Runner:
    """Runs the steps' commands, appending their output to one log, and rewrites the report
    after every step."""

    def __init__(self, out: Path, info):
        self.out, self.info = out, info
        self.log = open(out / "logs.txt", "a")
        self.steps = []

    def run(self, cmd, cwd, env=None, timeout=None):
        self.log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        self.log.flush()
        t0 = time.time()
        try:
            proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, timeout=timeout,
                                  capture_output=True, text=True)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
        self.log.write(text)
        self.log.flush()
        print(text[-4000:], flush=True)
        return rc, text, time.time() - t0

    def record(self, name, status, seconds, detail=""):
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1),
                           "detail": detail})
        print(f"[gpu_check] {name}: {status} ({seconds:.0f} s) {detail}", flush=True)
        bench_md = self.out / "bench_ops_cuda.md"
        write_report(self.out, self.info, self.steps,
                     bench_md.read_text() if bench_md.exists() else None,
                     model_comparison(self.out / "bench_ops_cuda.json", MODEL_JSON))
        return status == "passed"


def stage(work: Path):
    """The sources, without build outputs or results, copied to `work`."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "results", "*.egg-info",
                                    "output", ".pytest_cache", ".hypothesis")
    for name in STAGED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, work / name)


def step_build(r: Runner, work: Path, info, jobs):
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list(info["capability_tuple"]),
               MAX_JOBS=str(jobs))
    env.pop("DSIG_CPU_ONLY", None)
    rc, text, secs = r.run([sys.executable, "setup.py", "build_ext", "--inplace"], work, env,
                           timeout=TIMEOUTS["build"])
    if rc != 0:
        return r.record("build", "failed", secs, "setup.py build_ext failed (see logs.txt)")
    probe = ("import torch, dsig_ext; assert dsig_ext.extension_available(), 'no _C'; "
             "assert dsig_ext.cuda_kernels_built(), 'built without its CUDA kernels'")
    rc, text, _ = r.run([sys.executable, "-c", probe], work)
    if rc != 0:
        return r.record("build", "failed", secs, "the build has no CUDA kernels (see logs.txt)")
    return r.record("build", "passed", secs, f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}")


def step_tests(r: Runner, work: Path, out: Path):
    rc, text, secs = r.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                            "no:cacheprovider", *OP_TESTS], work, timeout=TIMEOUTS["tests"])
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    return r.record("tests", "passed" if rc == 0 else "failed", secs, summary)


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]):
        path = Path(root) / "bin" / "compute-sanitizer"
        if path.exists():
            return str(path)
    return None


def step_sanitize(r: Runner, work: Path):
    tool = find_sanitizer()
    if tool is None:
        return r.record("sanitize", "skipped", 0, "compute-sanitizer not found")
    trial = [tool, "--tool", "memcheck", sys.executable, "-c",
             "import torch; torch.ones(4, device='cuda').sum().item()"]
    rc, text, _ = r.run(trial, work, timeout=120)
    usable, reason = sanitizer_usable(rc, text)
    if not usable:
        return r.record("sanitize", "skipped", 0, reason)
    ok, total = True, 0.0
    for tool_name in ("memcheck", "racecheck"):
        rc, text, secs = r.run([tool, "--tool", tool_name, "--error-exitcode", "3",
                                sys.executable, "benchmarks/sanitizer_cases.py"], work,
                               timeout=TIMEOUTS["sanitize"])
        total += secs
        ok &= rc == 0 and "ERROR SUMMARY: 0 errors" in text
    return r.record("sanitize", "passed" if ok else "failed", total,
                    "memcheck and racecheck over every kernel")


def step_bench(r: Runner, work: Path, out: Path, extra):
    rc, text, secs = r.run([sys.executable, "benchmarks/bench_ops.py", "--device", "cuda",
                            "--out", out, "--tag", "cuda", *extra.split()], work,
                           timeout=TIMEOUTS["bench"])
    return r.record("bench", "passed" if rc == 0 else "failed", secs,
                    "bench_ops_cuda.{json,md,png}" if rc == 0 else "see logs.txt")


def step_train_step(r: Runner, work: Path, out: Path, wheels: Path):
    site = work / "site"
    rc, text, secs = r.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                            "--no-deps", "--target", site,
                            *sorted(str(p) for p in Path(wheels).glob("*.whl"))], work)
    if rc != 0:
        return r.record("train-step", "failed", secs, "installing the wheels failed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(work)]))
    rc, text, secs2 = r.run([sys.executable, "benchmarks/bench_train_step.py", "--device", "cuda",
                             "--out", out], work, env, timeout=TIMEOUTS["train-step"])
    return r.record("train-step", "passed" if rc == 0 else "failed", secs + secs2,
                    "bench_train_step_cuda.{json,md}" if rc == 0 else "see logs.txt")


def _model_key(row):
    return (row["kernel"], row["dtype"], row["batch"], row.get("rois_per_image"),
            row.get("nodes"))


def model_comparison(bench_json: Path, model_json: Path):
    """Measured kernel rows of bench_ops' JSON next to the model's prediction and the floor:
    [{kernel, dtype, batch, rois_per_image, nodes, measured_us, model_us, floor_us, ...}], or
    None when either file is missing."""
    if not Path(bench_json).exists() or not Path(model_json).exists():
        return None
    kernels = json.loads(Path(bench_json).read_text()).get("kernels") or []
    model = json.loads(Path(model_json).read_text())
    by_key = {_model_key(r): r for r in model.get("ops", [])}
    rows = []
    for k in kernels:
        m = by_key.get(_model_key(k))
        row = {"kernel": k["kernel"], "dtype": k["dtype"], "batch": k["batch"],
               "rois_per_image": k.get("rois_per_image"), "nodes": k.get("nodes"),
               "measured_us": k["time_us"], "floor_us": k["floor_us"],
               "model_us": m["model_us"] if m else None,
               "model_bound": (f"{m.get('main_kernel')}: {m.get('main_bound')}"
                               if m and m.get("main_kernel") else None),
               "model_revision": model.get("revision")}
        row["measured_to_model"] = row["measured_us"] / row["model_us"] if m else None
        row["measured_to_floor"] = row["measured_us"] / row["floor_us"]
        rows.append(row)
    return rows


def comparison_markdown(rows):
    if not rows:
        return ""
    rev = rows[0].get("model_revision")
    lines = ["## Measured vs model vs floor", "",
             "Model: the static cost model of benchmarks/kernel_model.py "
             f"(benchmarks/results/kernel_model_after.json, kernels of {rev}; an H100 SXM "
             "model, not a measurement): a measured / model ratio far from 1 on an H100 "
             "calibrates it. Floor: benchmarks/roofline.py (H100 SXM).", "",
             "| kernel | dtype | B | RoIs/img or N | measured us | model us | floor us | "
             "measured / model | measured / floor | model bound by |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        size = r["rois_per_image"] if r["rois_per_image"] is not None else r["nodes"]
        model = f"{r['model_us']:.1f} (model)" if r["model_us"] is not None else "no model"
        ratio = f"{r['measured_to_model']:.2f}" if r["measured_to_model"] is not None else ""
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['batch']} | {size} | "
                     f"{r['measured_us']:.1f} | {model} | {r['floor_us']:.1f} | {ratio} | "
                     f"{r['measured_to_floor']:.2f} | {r['model_bound'] or ''} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, info, steps, bench=None, comparison=None):
    """gpu_check.json (everything) and gpu_check.md (steps, measured vs model vs floor per kernel,
    then the benchmark's tables)."""
    report = {"info": info, "steps": steps, "bench": bench, "model_comparison": comparison}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = ["# dsig_ext GPU check", "",
             f"- GPU: {info.get('gpu_name')}, compute capability "
             f"{info.get('capability', '?')}, driver {info.get('driver', '?')}",
             f"- torch {info.get('torch')}, CUDA {info.get('cuda')}, torchvision "
             f"{info.get('torchvision', '?')}, Python {info.get('python')}, "
             f"{info.get('cores')} cores", "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in steps]
    if comparison:
        lines += ["", comparison_markdown(comparison).strip()]
    if bench:
        lines += ["", bench.strip()]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    info = gpu_info()
    if not info["gpu"]:
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False, torch "
              f"{info['torch']}); nothing was built or run", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="dsig-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stage(work)
    r = Runner(out, info)
    built = "build" in args.skip or step_build(r, work, info, args.jobs)
    if built:
        if "tests" not in args.skip:
            step_tests(r, work, out)
        if "sanitize" not in args.skip:
            step_sanitize(r, work)
        if "bench" not in args.skip:
            step_bench(r, work, out, args.bench_args)
        if args.wheels and "train-step" not in args.skip:
            step_train_step(r, work, out, Path(args.wheels).resolve())
    if not r.steps:
        write_report(out, info, [])
    failed = [s["step"] for s in r.steps if s["status"] == "failed"]
    print(f"[gpu_check] report: {out / 'gpu_check.md'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
