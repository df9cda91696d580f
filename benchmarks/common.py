"""Shared by the benchmark scripts: the machine's name for the result stamps."""
import os
import platform


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
