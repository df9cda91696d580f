"""Loading the cudasim executor into a Python process.

A sanitizer build must be loaded into a process started with its runtime preloaded:
`env(variant)` gives that environment (for a subprocess), `load(lib)` loads the library there
and registers the simulated device as torch device "cudasim".
"""
import os
import subprocess
import types

import torch

_loaded = None


def _runtime(name):
    cxx = os.environ.get("CXX", "g++")
    return subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()


def env(variant, base=None):
    """Environment for a subprocess that loads the `variant` build."""
    e = dict(os.environ if base is None else base)
    if variant == "asan":
        # libstdc++ too: the Python binary does not link it, and ASan must find __cxa_throw
        e["LD_PRELOAD"] = f"{_runtime('libasan.so')} {_runtime('libstdc++.so')}"
        e["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
        e["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    elif variant == "tsan":
        e["LD_PRELOAD"] = f"{_runtime('libtsan.so')} {_runtime('libstdc++.so')}"
        supp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tsan.supp")
        e["TSAN_OPTIONS"] = f"halt_on_error=1:report_signal_unsafe=0:exitcode=66:suppressions={supp}"
    e["OMP_NUM_THREADS"] = "1"  # the executor is single-threaded; torch's CPU ops need no more
    return e


def load(lib):
    """Loads the executor library once and makes torch.device("cudasim") usable."""
    global _loaded
    if _loaded is not None:
        if _loaded != lib:
            raise RuntimeError(f"cudasim: {_loaded} is loaded already, cannot load {lib}")
        return
    torch.utils.rename_privateuse1_backend("cudasim")
    torch.ops.load_library(lib)
    torch.utils.generate_methods_for_privateuse1_backend()
    module = types.ModuleType("cudasim")
    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: 0
    module.is_initialized = lambda: True
    module._lazy_init = lambda: None
    module._is_in_bad_fork = lambda: False
    module.manual_seed_all = lambda seed: None
    torch._register_device_module("cudasim", module)
    _loaded = lib


def configure(schedule="forward", seed=0, fill="random"):
    """Thread and block order (forward, reverse, random) and what fresh memory holds."""
    torch.ops.cudasim.configure(schedule, seed, fill)
