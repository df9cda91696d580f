"""Shared by the benchmark scripts: where results go, argument types, the machine's name for
the result stamps."""
import argparse
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run writes to a scratch folder (git-ignored) unless told otherwise, so that trying a
# benchmark never overwrites the committed results in benchmarks/results.
SCRATCH_OUT = os.path.join(ROOT, "output", "benchmarks")
COMMITTED_OUT = os.path.join(ROOT, "benchmarks", "results")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=SCRATCH_OUT,
                        help="folder for the results (default output/benchmarks/, git-ignored; "
                             "--out benchmarks/results rewrites the committed ones)")


def at_least(minimum: int):
    """argparse type: an int >= minimum (0 stays 0 where 0 is allowed)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"int >= {minimum}"  # argparse names the type in some messages
    return parse


def machine_name(device: str) -> str:
    """GPU name on CUDA; otherwise the CPU model and core count."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def versions(device: str) -> dict:
    """Versions a result depends on: torch, torchvision, and on CUDA the runtime and driver."""
    import torch

    out = {"torch": torch.__version__}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device == "cuda":
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["driver"] = gpu_driver_version()
    return out


def gpu_driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi, or 'unknown'."""
    import subprocess

    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return run.stdout.strip().splitlines()[0] if run.returncode == 0 else "unknown"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def write_results(out_dir: str, base_name: str, result: dict, markdown: str) -> str:
    """Writes <base_name>.json and .md into out_dir (created), prints the markdown; returns the
    path without extension (for a plot beside them)."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, base_name)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"[bench] wrote {base}.json and .md")
    return base
