"""Builds the cudasim executor: the project's CUDA sources (csrc/ops/cuda/*.cu, translated) and
the host code of its op library, compiled for the CPU with the executor runtime and a simulated
torch device, as one shared library per sanitizer variant.

  python tests/cudasim/build.py [--variant asan|tsan|plain] [--extra FILE.cu ...]

prints the library's path. Objects are cached by the hash of their text and flags, so a rebuild
after an edit compiles only what changed. Variants:
  asan   AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds global and shared accesses,
         use after free, misaligned or overflowing arithmetic (the default; run with libasan
         preloaded, see runner.py)
  tsan   ThreadSanitizer told CUDA's ordering rules: every CUDA thread is a TSan fiber, barriers
         and warp collectives are its only synchronisation, blocks are unordered
  plain  no sanitizer (fastest)
"""
import argparse
import collections
import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import translate  # noqa: E402

SANITIZE = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
    "plain": [],
}

# Limits of the launchers, lowered for the executor's small shapes (the sources default to their
# real values when these are not defined): grid caps, so that every grid-stride loop takes
# several strides,
SIM_DEFINES = ["-DDSIG_CUDA_MAX_GRID_BLOCKS=3",
               # and the forward's tap tables hold only small planes, so both of its paths run
               "-DDSIG_CUDA_MAX_TAP_OFFSET=2000"]


def torch_flags():
    import torch
    from torch.utils import cpp_extension

    inc = []
    for p in cpp_extension.include_paths():
        inc += ["-isystem", p]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return inc, [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"], lib


def sources(extra):
    """(path shown in diagnostics, text) of every translation unit."""
    units = []
    cu = sorted(glob.glob(os.path.join(ROOT, "csrc", "ops", "cuda", "*.cu")))
    for path in cu + [os.path.join(HERE, "selftest.cu")] + list(extra):
        rel = os.path.relpath(path, ROOT)
        units.append((rel, translate.translate(open(path).read(), rel, cuda=True)))
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp"))):
        rel = os.path.relpath(path, ROOT)
        units.append((rel, translate.translate(open(path).read(), rel, cuda=False)))
    for name in ("runtime.cpp", "device.cpp"):
        rel = os.path.relpath(os.path.join(HERE, name), ROOT)
        units.append((rel, open(os.path.join(HERE, name)).read()))
    return units


# The torch headers every unit includes first; a unit's preamble is what precedes its own text
# (the translation's prelude and macros for CUDA sources, nothing for host sources).
PCH_HEADERS = "#include <ATen/ATen.h>\n#include <torch/library.h>\n"


def preamble(text):
    head, sep, _ = text.partition("\n#line 1 ")
    return head + "\n" if sep else ""


def precompiled_headers(cxx, out_dir, pending, jobs, verbose):
    """{(flags, preamble): header path} for each group of >= 2 pending units with the same flags
    and preamble, its .gch built (in parallel) under out_dir/pch, which build() removes when the
    units are compiled (~0.5 GB each). Where gcc finds a .gch unusable it reads the header
    itself: slower, never different."""
    import torch

    units = collections.Counter((tuple(flags), preamble(text)) for _, text, _, _, flags in pending)
    todo = {}
    for (flags, pre), count in units.items():
        if count < 2:
            continue
        body = pre + PCH_HEADERS
        key = hashlib.sha256((cxx + " ".join(flags) + torch.__version__ + body).encode())
        d = os.path.join(out_dir, "pch", key.hexdigest()[:20])
        todo[(flags, pre)] = (d, body)

    def build_one(item):
        (flags, _), (d, body) = item
        header = os.path.join(d, "dsig_sim_pch.h")
        if not os.path.exists(header + ".gch"):
            os.makedirs(d, exist_ok=True)
            with open(header, "w") as f:
                f.write(body)
            cmd = [cxx] + list(flags) + ["-x", "c++-header", header, "-o", header + ".gch.tmp"]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cudasim: precompiling the torch headers failed:\n"
                                   f"{r.stderr[-6000:]}")
            os.replace(header + ".gch.tmp", header + ".gch")
        return header

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        headers = list(pool.map(build_one, todo.items()))
    return dict(zip(todo.keys(), headers))


def build(variant="asan", extra=(), jobs=2, verbose=False):
    inc, defs, torch_lib = torch_flags()
    out_dir = os.path.join(ROOT, "build", f"cudasim-{variant}")
    os.makedirs(os.path.join(out_dir, "gen"), exist_ok=True)
    cflags = (["-std=c++20", "-O1", "-g", "-fPIC", "-fno-omit-frame-pointer",
               "-fvisibility=hidden", "-Wno-unknown-pragmas"] + SANITIZE[variant] + SIM_DEFINES
              + defs + ["-I", os.path.join(HERE, "include"), "-I", os.path.join(ROOT, "csrc"),
                        "-I", os.path.join(ROOT, "csrc", "ops", "cuda"),
                        "-I", os.path.join(ROOT, "csrc", "ops")] + inc)
    cxx = os.environ.get("CXX", "g++")
    headers = "".join(open(h).read() for h in sorted(
        glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
        + glob.glob(os.path.join(HERE, "include", "**", "*.h"), recursive=True)))
    jobs_list = []
    for rel, text in sources(extra):
        flags = cflags
        if variant == "tsan" and not rel.endswith(".cu"):
            # only CUDA sources are instrumented: the scheduler's hand-offs (runtime.cpp) and
            # torch's inline code in the host files are not CUDA accesses
            flags = [f for f in cflags if f not in SANITIZE["tsan"]] + ["-DCUDASIM_TSAN=1"]
        key = hashlib.sha256((cxx + " ".join(flags) + headers + text).encode()).hexdigest()[:20]
        stem = rel.replace(os.sep, "_").replace(".", "_")
        src = os.path.join(out_dir, "gen", stem + ".cpp")
        obj = os.path.join(out_dir, f"{stem}-{key}.o")
        jobs_list.append((rel, text, src, obj, flags))

    pch = precompiled_headers(cxx, out_dir, [j for j in jobs_list if not os.path.exists(j[3])],
                              jobs, verbose)

    def compile_one(job):
        rel, text, src, obj, flags = job
        if os.path.exists(obj):
            return obj
        header = pch.get((tuple(flags), preamble(text)))
        if header:  # parsed once per variant: a unit's torch headers take ~35 s of its ~48 s
            flags = flags + ["-include", header, "-Winvalid-pch"]
        for stale in glob.glob(obj.rsplit("-", 1)[0] + "-*.o"):
            os.remove(stale)
        with open(src, "w") as f:
            f.write(text)
        cmd = [cxx] + flags + ["-c", src, "-o", obj + ".tmp"]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cudasim: compiling {rel} failed:\n{r.stderr[-6000:]}")
        os.replace(obj + ".tmp", obj)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(compile_one, jobs_list))
    shutil.rmtree(os.path.join(out_dir, "pch"), ignore_errors=True)
    key = hashlib.sha256(" ".join(objs).encode()).hexdigest()[:20]
    lib = os.path.join(out_dir, f"libdsig_cudasim-{key}.so")
    if not os.path.exists(lib):
        for stale in glob.glob(os.path.join(out_dir, "libdsig_cudasim-*.so")):
            os.remove(stale)
        cmd = ([cxx, "-shared", "-o", lib + ".tmp"] + objs + SANITIZE[variant]
               + ["-L", torch_lib, f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch"])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cudasim: linking failed:\n{r.stderr[-6000:]}")
        os.replace(lib + ".tmp", lib)
    return lib


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(SANITIZE), default="asan")
    ap.add_argument("--extra", nargs="*", default=[], help="more .cu files (the self-test)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    print(build(args.variant, args.extra, args.jobs, args.verbose))


if __name__ == "__main__":
    main()
