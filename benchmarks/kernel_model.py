#!/usr/bin/env python
"""Static cost model of dsig_ext's CUDA kernels on an H100 SXM, read from the compiled code.

Every time this script prints is a MODEL (no GPU runs here); the floors beside it are
benchmarks/roofline.py's. What it does:

1. compiles csrc/ops/cuda/*.cu for sm_90 to cubins with the flags and include paths of setup.py's
   CUDA build (plus torch's nvcc flags and -std=c++20, as torch's BuildExtension adds them, and
   -lineinfo, which leaves the SASS unchanged), with -Xptxas -v: registers, spills, static shared
   memory and barriers of every kernel instantiation;
2. occupancy of each instantiation on an H100 (65536 registers, 228 KB shared memory, 2048 threads,
   32 blocks, 4 schedulers per SM; 1 KB of shared memory reserved per block);
3. disassembles with cuobjdump -sass, finds the loops of each instantiation (backward branches),
   and counts each loop body's instructions by class;
4. per kernel family a short formula (a function, its docstring the assumptions) turns loop bodies
   and the workload's trip counts into warp-instructions, shared- and L1-wavefronts, L2 and DRAM
   bytes and atomic sector operations; per kernel the predicted time is the largest of
       issue   warp-instructions / (132 SMs x 4 schedulers x clock x issue efficiency)
       smem    shared wavefronts / (132 x 1 per clock)      (no bank conflicts assumed)
       L1      global-load wavefronts / (132 x 1 per clock)  (one 128-B line per wavefront)
       L2      L2->SM bytes / L2 bandwidth
       DRAM    DRAM bytes / (HBM bandwidth x efficiency)
       atomics L2 atomic sector operations / atomic rate
       tensor  tensor-core multiply-adds / (132 x 512 per clock: mma.sync, an assumption;
               TF32 counts double)
   and an op (what benchmarks/bench_ops.py times as one kernel row) is the sum of its kernels, plus
   a gap per launch, or its launches' CPU cost if that is larger.

The workload geometry (boxes, FPN levels, sampling grids, the lines each warp's loads touch) comes
from a seeded Monte Carlo draw of benchmarks/bench_ops.py's box distribution (sizes log-uniform in
16-600 px, aspect 1/3-3), so the first GPU run of gpu_check.sh calibrates the model on the very
workload it measures.

Usage: python benchmarks/kernel_model.py [--rev GITREV] [--out DIR] [--tag NAME] [--jobs N]
  --rev REV   model the kernel sources of a git revision (git archive REV csrc) instead of the
              working tree
Writes kernel_model_<tag>.{json,md} to --out (default output/benchmarks/, git-ignored).
"""
import argparse
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import roofline  # noqa: E402
from common import add_out_argument, at_least, write_results  # noqa: E402

# --- the machine ------------------------------------------------------------------------------

H100 = {
    "name": "H100 SXM 80 GB (modelled)",
    "sms": 132,
    "clock_hz": 1.755e9,          # sustained boost under load
    "schedulers": 4,              # per SM, 1 warp-instruction per clock each
    "regs_per_partition": 16384,  # 65536 per SM, in 4 partitions
    "reg_alloc_unit": 256,        # registers per warp, allocation granularity
    "max_warps": 64,
    "max_threads": 2048,
    "max_blocks": 32,
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_block": 1024,
    "smem_wavefronts_per_clock": 1,   # per SM: 128 B/clock
    "l1_wavefronts_per_clock": 1,     # per SM: one 128-B line's sectors per clock
    "l2_bytes_per_s": 5.5e12,         # L2 -> SM, assumption (microbenchmarks report 5.5-7 TB/s)
    "dram_bytes_per_s": roofline.HBM_BYTES_PER_S,
    "dram_efficiency": 0.85,          # KERNELS.md's planning figure for streaming
    "atomic_sector_ops_per_s": 96 * 1.755e9,  # assumption: 96 L2 slices, 1 sector atomic/clock
    # assumption: mma.sync (wmma) reaches ~half of the 1024 dense 16-bit FMA/clock/SM that
    # wgmma does on Hopper
    "mma_sync_fma_per_clock": 512,
    "issue_efficiency": 0.75,         # of the issue slots filled at >= 8 warps per scheduler
    "warps_for_full_issue": 8,        # fewer warps per scheduler scale the efficiency down
    "launch_cpu_us": 4.0,             # host cost of one launch (bounds tiny ops)
    "launch_gap_us": 1.0,             # GPU idle between dependent kernels
}


def issue_efficiency(warps_per_scheduler, m=H100):
    return m["issue_efficiency"] * min(1.0, warps_per_scheduler / m["warps_for_full_issue"])


def occupancy(regs, smem_bytes, threads, m=H100):
    """Resident blocks per SM and what limits them. Registers are allocated per warp in units
    of 256 (per-thread count rounded up to 8), warps per partition from its 16384 registers."""
    warps_per_block = max(1, math.ceil(threads / 32))
    regs_t = max(8, math.ceil(max(regs, 1) / 8) * 8)
    per_warp = math.ceil(regs_t * 32 / m["reg_alloc_unit"]) * m["reg_alloc_unit"]
    warps_by_regs = (m["regs_per_partition"] // per_warp) * 4
    limits = {
        "registers": warps_by_regs // warps_per_block,
        "shared memory": m["smem_per_sm"] // (smem_bytes + m["smem_reserved_per_block"]),
        "threads": m["max_threads"] // (warps_per_block * 32),
        "blocks": m["max_blocks"],
    }
    blocks = max(0, min(limits.values()))
    limiter = min(limits, key=lambda k: limits[k])
    warps = blocks * warps_per_block
    return {"blocks_per_sm": blocks, "warps_per_sm": warps, "occupancy": warps / m["max_warps"],
            "limiter": limiter, "threads": threads, "smem_bytes": smem_bytes,
            "warps_per_scheduler": warps / m["schedulers"]}


# --- toolchain ---------------------------------------------------------------------------------

def _setup_module():
    spec = importlib.util.spec_from_file_location("dsig_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_tool(name, toolkit=None):
    """name on PATH, in the toolkit's bin, or in the copy triton ships (cuobjdump, nvdisasm)."""
    found = shutil.which(name)
    if found:
        return found
    if toolkit and os.path.isfile(os.path.join(toolkit, "bin", name)):
        return os.path.join(toolkit, "bin", name)
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = os.path.join(loc, "backends", "nvidia", "bin", name)
            if os.path.isfile(path):
                return path
    return None


def toolchain():
    """{'nvcc', 'cuobjdump', 'demangler', 'toolkit'} or raises RuntimeError saying what lacks."""
    setup = _setup_module()
    toolkit = setup._find_cuda_toolkit()
    if toolkit is None:
        raise RuntimeError("no CUDA toolkit (bin/nvcc with lib64/libcudart) found; set CUDA_HOME")
    tools = {"toolkit": toolkit, "nvcc": os.path.join(toolkit, "bin", "nvcc"),
             "cuobjdump": find_tool("cuobjdump", toolkit),
             "demangler": find_tool("cu++filt", toolkit) or shutil.which("c++filt")}
    if tools["cuobjdump"] is None:
        raise RuntimeError("cuobjdump not found (toolkit bin, PATH, or triton's bundled copy)")
    return tools


def build_flags(toolkit, src_root):
    """nvcc flags and include dirs of setup.py's CUDA extension, with the source tree's csrc."""
    os.environ["CUDA_HOME"] = toolkit  # before torch.utils.cpp_extension reads it
    setup = _setup_module()
    import torch.utils.cpp_extension as cpp

    ext = setup.get_extension(True)
    flags = list(cpp.COMMON_NVCC_FLAGS) + list(ext.extra_compile_args["nvcc"])
    if not any(f.startswith("-std=") for f in flags):
        flags.append("-std=c++20")  # what BuildExtension adds
    flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    own = os.path.realpath(os.path.join(ROOT, "csrc"))
    includes = [os.path.join(src_root, "csrc") if os.path.realpath(d) == own else d
                for d in ext.include_dirs]
    return flags, includes


def compile_cubin(nvcc, cu, out_dir, flags, includes, arch="sm_90"):
    """(cubin path, ptxas -v text)."""
    base = os.path.splitext(os.path.basename(cu))[0]
    cubin = os.path.join(out_dir, base + ".cubin")
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-lineinfo", *flags, *[f"-I{d}" for d in includes],
           "-Xptxas", "-v", "-o", cubin, cu]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {cu}:\n{run.stdout}{run.stderr}")
    return cubin, run.stdout + run.stderr


def parse_ptxas(text):
    """{mangled name: {registers, spill_stores, spill_loads, stack, smem, barriers}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for", line)
        if m:
            cur = m.group(1)
            out[cur] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                        "smem": 0, "barriers": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                            spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            out[cur]["barriers"] = int(b.group(1)) if b else 0
            out[cur]["smem"] = int(s.group(1)) if s else 0
    return out


# --- SASS -----------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)"
                    r"\s*([^;]*);")


def parse_sass(text):
    """{mangled name: [(address, predicate, opcode, operands)]} from cuobjdump -sass."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                               m.group(4).strip()))
    return funcs


CLASSES = ("global_load", "global_store", "shared_load", "shared_store", "atomic", "local",
           "fp32", "fp64", "mufu", "convert", "tensor", "int", "control", "other")
_CLASS_OF = {
    "global_load": {"LDG", "LD", "LDGSTS"},
    "global_store": {"STG", "ST"},
    "shared_load": {"LDS", "LDSM"},
    "shared_store": {"STS"},
    "atomic": {"RED", "REDG", "ATOM", "ATOMG", "ATOMS", "REDUX"},
    "local": {"LDL", "STL"},
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "FSWZADD",
             "HFMA2", "HADD2", "HMUL2"},
    "fp64": {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX"},
    "mufu": {"MUFU"},
    "convert": {"F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "F2IP"},
    "tensor": {"HMMA", "IMMA", "HGMMA", "DMMA", "BMMA"},
    "control": {"BRA", "BRX", "JMP", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "BAR", "WARPSYNC",
                "BMOV", "YIELD", "NOP", "BPT", "KILL", "DEPBAR", "MEMBAR", "ERRBAR", "CCTL",
                "ACQBULK", "WARPGROUP"},
}
_OPCODE_CLASS = {op: cls for cls, ops in _CLASS_OF.items() for op in ops}
_INT_PREFIXES = ("I", "U", "LOP", "SHF", "LEA", "SEL", "MOV", "PRMT", "POPC", "FLO", "S2R", "S2UR",
                 "R2UR", "CS2R", "LDC", "ULDC", "VIADD", "VIMNMX", "PLOP3", "P2R", "R2P", "SHFL",
                 "VOTE", "MATCH", "ISETP", "IADD3", "IMAD", "IABS", "BREV", "SGXT", "BMSK")


def instr_class(opcode):
    base = opcode.split(".")[0]
    if base in _OPCODE_CLASS:
        return _OPCODE_CLASS[base]
    if base.startswith(_INT_PREFIXES):
        return "int"
    return "other"


def smem_wavefronts(opcode):
    """Shared-memory wavefronts of one warp-instruction: 1 for 32-bit accesses, 2 for .64,
    4 for .128 (no bank conflicts assumed)."""
    base = opcode.split(".")[0]
    if base not in ("LDS", "STS", "LDSM", "ATOMS"):
        return 0
    if ".128" in opcode:
        return 4
    if ".64" in opcode:
        return 2
    return 1


def counts_of(instrs):
    c = Counter()
    for _, _, op, _ in instrs:
        c[instr_class(op)] += 1
        c["total"] += 1
        c["smem_wf"] += smem_wavefronts(op)
        c["op:" + op.split(".")[0]] += 1
    return c


class Loop:
    """Instructions [start, end] closed by a backward branch at `end` to `start`."""

    def __init__(self, start, end, instrs):
        self.start, self.end = start, end
        self.instrs = [i for i in instrs if start <= i[0] <= end]
        self.children, self.parent = [], None
        self.counts = counts_of(self.instrs)

    @property
    def own(self):
        c = Counter(self.counts)
        for ch in self.children:
            c.subtract(ch.counts)
        return c

    def describe(self):
        return f"{self.start:#06x}-{self.end:#06x}"


def find_loops(instrs):
    """Loops of one function, nested: (top-level loops, all loops). A loop is the span from a
    backward branch's target to the last branch back to it; one-instruction self-loops (the
    trap at a function's end) are left out."""
    ends = {}
    for addr, _, op, args in instrs:
        if op.split(".")[0] in ("BRA", "JMP"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m:
                target = int(m.group(1), 16)
                if target < addr:
                    ends[target] = max(ends.get(target, 0), addr)
    loops = [Loop(s, e, instrs) for s, e in sorted(ends.items(), key=lambda se: (se[0], -se[1]))]
    top, stack = [], []
    for lp in loops:
        while stack and not (stack[-1].start <= lp.start and lp.end <= stack[-1].end):
            stack.pop()
        if stack:
            lp.parent = stack[-1]
            stack[-1].children.append(lp)
        else:
            top.append(lp)
        stack.append(lp)
    return top, loops


def demangle(names, demangler):
    if not names or not demangler:
        return {n: n for n in names}
    run = subprocess.run([demangler], input="\n".join(names), capture_output=True, text=True)
    out = run.stdout.splitlines() if run.returncode == 0 else []
    return {n: (out[i] if i < len(out) else n) for i, n in enumerate(names)}


class Kernel:
    """One compiled kernel instantiation: resources, instructions, loops."""

    def __init__(self, mangled, demangled, source, instrs, ptxas):
        self.mangled, self.demangled, self.source = mangled, demangled, source
        self.instrs = instrs
        self.ptxas = ptxas or {}
        self.top_loops, self.loops = find_loops(instrs)
        self.counts = counts_of(instrs)
        m = re.search(r"(\w+)<([^<>]*(?:<[^<>]*>[^<>]*)*)>\(", demangled)
        plain = re.match(r"(?:void )?[\w:]*?(\w+)\(",
                         demangled.replace("(anonymous namespace)", "anonymous"))
        self.name = m.group(1) if m else (plain.group(1) if plain else demangled)
        self.template = m.group(2) if m else ""
        self.dtype = _dtype_of(self.template)
        last = re.search(r",\s*(\d+)$", self.template)
        self.cpb = int(last.group(1)) if last else None  # a trailing int template argument

    def innermost(self):
        return [lp for lp in self.loops if not lp.children]


def _dtype_of(template):
    first = template.split(",")[0].strip() if template else ""
    return {"float": "float32", "c10::BFloat16": "bfloat16", "c10::Half": "float16",
            "double": "float64"}.get(first, first or None)


def compile_sources(src_root, jobs, tools, log=print):
    """Kernel objects of every csrc/ops/cuda/*.cu under src_root, compiled for sm_90."""
    cus = sorted(os.path.join(src_root, "csrc", "ops", "cuda", f)
                 for f in os.listdir(os.path.join(src_root, "csrc", "ops", "cuda"))
                 if f.endswith(".cu"))
    flags, includes = build_flags(tools["toolkit"], src_root)
    out_dir = tempfile.mkdtemp(prefix="dsig-kernel-model-")
    log(f"[kernel_model] compiling {len(cus)} files for sm_90 ({jobs} jobs)")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        built = list(pool.map(lambda cu: compile_cubin(tools["nvcc"], cu, out_dir, flags, includes),
                              cus))
    kernels = []
    for cu, (cubin, ptxas_text) in zip(cus, built):
        ptxas = parse_ptxas(ptxas_text)
        sass = subprocess.run([tools["cuobjdump"], "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
        funcs = parse_sass(sass)
        names = demangle(list(funcs), tools["demangler"])
        for mangled, instrs in funcs.items():
            kernels.append(Kernel(mangled, names[mangled], os.path.basename(cu), instrs,
                                  ptxas.get(mangled)))
    shutil.rmtree(out_dir, ignore_errors=True)
    return kernels


def source_tree(rev):
    """(folder with csrc/ of revision rev, temporary?) -- the working tree when rev is None."""
    if rev is None:
        return ROOT, False
    tmp = tempfile.mkdtemp(prefix="dsig-kernel-model-src-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "csrc"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return tmp, True


# --- workload geometry -------------------------------------------------------------------------

IMAGE_HW = (800, 1333)
CHANNELS = roofline.CHANNELS
POOLED = 7
BINS = POOLED * POOLED
LEVEL_HW = [(math.ceil(IMAGE_HW[0] / s), math.ceil(IMAGE_HW[1] / s)) for s in roofline.STRIDES]
NODE_DIM = CHANNELS * BINS  # DSIG's node features: the pooled 256x7x7 flattened (D = 12544)


def draw_boxes(n, rng):
    """bench_ops.make_boxes' distribution: sizes log-uniform 16-600 px, aspect 1/3-3 (w = s
    sqrt(a), h = s / sqrt(a)), placed inside the image where they fit."""
    h, w = IMAGE_HW
    size = np.exp(rng.uniform(math.log(16), math.log(600), n))
    aspect = np.exp(rng.uniform(math.log(1 / 3), math.log(3), n))
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    x1 = rng.random(n) * np.maximum(w - bw, 1)
    y1 = rng.random(n) * np.maximum(h - bh, 1)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)


def fpn_levels(boxes):
    """detectron2's rule, P2-P5: floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped, minus 2."""
    size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return np.clip(np.floor(4 + np.log2(size / 224 + 1e-8)), 2, 5).astype(int) - 2


def axis_taps(start, length, size):
    """Taps of one axis of a RoI (aligned, sampling_ratio 0): lo, hi, valid as [7, grid]."""
    bin_ = length / POOLED
    grid = max(1, math.ceil(length / POOLED))
    v = start + np.arange(POOLED)[:, None] * bin_ + (np.arange(grid)[None, :] + 0.5) * bin_ / grid
    valid = (v >= -1) & (v <= size)
    v = np.maximum(v, 0)
    lo = np.floor(v).astype(np.int64)
    edge = lo >= size - 1
    lo = np.where(edge, size - 1, lo)
    hi = np.where(edge, size - 1, lo + 1)
    return lo, hi, valid


def axis_reach(lo, hi, valid, first, last):
    """Per pixel of [first, last] along one axis, the bins from the first to the last whose
    samples tap it (reaching_bins' span, the trips of a pixel's loop over bins; 0: none)."""
    touch = np.zeros((POOLED, last - first + 1), bool)
    for p in range(POOLED):
        touch[p, lo[p][valid[p]] - first] = True
        touch[p, hi[p][valid[p]] - first] = True
    first_p = np.argmax(touch, axis=0)
    last_p = POOLED - 1 - np.argmax(touch[::-1], axis=0)
    return np.where(touch.any(axis=0), last_p - first_p + 1, 0)


class Roi:
    def __init__(self, image, box, level):
        self.image, self.level = image, level
        stride = roofline.STRIDES[level]
        self.H, self.W = LEVEL_HW[level]
        y0, x0 = box[1] / stride - 0.5, box[0] / stride - 0.5
        self.ylo, self.yhi, self.yv = axis_taps(y0, (box[3] - box[1]) / stride, self.H)
        self.xlo, self.xhi, self.xv = axis_taps(x0, (box[2] - box[0]) / stride, self.W)
        self.gh, self.gw = self.ylo.shape[1], self.xlo.shape[1]
        self.samples = self.gh * self.gw  # per output, executed whether valid or not
        vy, vx = self.yv.sum(axis=1), self.xv.sum(axis=1)
        self.valid_samples = float(vy.sum() * vx.sum())  # over the 49 bins
        self.extent = None
        if self.yv.any() and self.xv.any():
            self.extent = (int(self.ylo[self.yv].min()), int(self.yhi[self.yv].max()),
                           int(self.xlo[self.xv].min()), int(self.xhi[self.xv].max()))
            self.y_span = axis_reach(self.ylo, self.yhi, self.yv, *self.extent[:2])
            self.x_span = axis_reach(self.xlo, self.xhi, self.xv, *self.extent[2:])

    @property
    def footprint_px(self):
        if self.extent is None:
            return 0
        y_first, y_last, x_first, x_last = self.extent
        return (y_last - y_first + 1) * (x_last - x_first + 1)


_LANE = np.arange(32 * BINS).reshape(BINS, 32)  # 49 warps of one 32-channel group, 32 lanes


def _distinct_per_row(keys):
    """Distinct non-negative values in each row of a 2-D int array (-1 = inactive lane)."""
    s = np.sort(keys, axis=1)
    distinct = 1 + (np.diff(s, axis=1) != 0).sum(axis=1)
    distinct -= (s[:, 0] < 0)
    return distinct


def warp_traffic(roi, elem_bytes):
    """Memory requests of one 32-channel group of a RoI when each warp holds 32 consecutive
    outputs (c, bin) of an NCHW [K, C, 7, 7] result and gathers the 4 taps of each sample from
    its channel's plane (b = 0, planes at their true offsets): per warp-instruction the distinct
    128-B lines (L1 wavefronts) and 32-B sectors (atomic sector operations), and per warp-iteration
    over all its samples the distinct sectors (what reaches L2 when L1 keeps one output's taps)."""
    c, b = _LANE // BINS, _LANE % BINS
    p, q = b // POOLED, b % POOLED
    ys = np.stack([roi.ylo[p], roi.yhi[p]])  # [2, 49, 32, gh]
    xs = np.stack([roi.xlo[q], roi.xhi[q]])  # [2, 49, 32, gw]
    addr = ((c[None, None, :, :, None, None] * roi.H + ys[:, None, :, :, :, None]) * roi.W
            + xs[None, :, :, :, None, :])  # [ty, tx, w, lane, iy, ix]
    valid = roi.yv[p][:, :, :, None] & roi.xv[q][:, :, None, :]  # [w, lane, iy, ix]
    addr = np.where(valid[None, None], addr * elem_bytes, -1)
    per_instr = addr.transpose(2, 4, 5, 0, 1, 3).reshape(-1, 32)  # rows: (w, iy, ix, ty, tx)
    lines = np.where(per_instr >= 0, per_instr // 128, -1)
    sectors = np.where(per_instr >= 0, per_instr // 32, -1)
    per_warp = addr.transpose(2, 0, 1, 4, 5, 3).reshape(BINS, -1)
    return {"l1_wavefronts": float(_distinct_per_row(lines).sum()),
            "warp_loads": float(per_instr.shape[0]),
            "sector_ops": float(_distinct_per_row(sectors).sum()),
            "l2_sectors": float(_distinct_per_row(np.where(per_warp >= 0, per_warp // 32,
                                                            -1)).sum())}


class RoiWorkload:
    """B images of 800x1333, R RoIs per image drawn as bench_ops draws them (seeded)."""

    def __init__(self, batch, rois_per_image, seed=0, traffic_sample=160):
        rng = np.random.default_rng(seed)
        self.batch, self.rois_per_image = batch, rois_per_image
        self.rois = []
        for image in range(batch):
            boxes = draw_boxes(rois_per_image, rng)
            for box, level in zip(boxes, fpn_levels(boxes)):
                self.rois.append(Roi(image, box, int(level)))
        self.K = len(self.rois)
        self.level_share = [sum(r.level == l for r in self.rois) / self.K for l in range(4)]
        self.mean_samples = float(np.mean([r.samples for r in self.rois]))
        self.valid_fraction = (sum(r.valid_samples for r in self.rois)
                               / sum(r.samples * BINS for r in self.rois))
        self.footprint_px = float(sum(r.footprint_px for r in self.rois))
        step = max(1, self.K // traffic_sample)
        self._sample = self.rois[::step][:traffic_sample]
        self._traffic = {}

    def traffic(self, elem_bytes):
        """warp_traffic per 32-channel group, averaged over a sample of the RoIs."""
        if elem_bytes not in self._traffic:
            acc = Counter()
            for roi in self._sample:
                acc.update(warp_traffic(roi, elem_bytes))
            self._traffic[elem_bytes] = {k: v / len(self._sample) for k, v in acc.items()}
        return self._traffic[elem_bytes]

    def describe(self):
        return f"B={self.batch}, {self.rois_per_image} RoIs/img"

    def summary(self):
        return {"batch": self.batch, "rois_per_image": self.rois_per_image, "K": self.K,
                "level_share_P2_P5": [round(s, 3) for s in self.level_share],
                "mean_samples_per_bin": round(self.mean_samples, 2),
                "valid_sample_fraction": round(self.valid_fraction, 3),
                "mean_footprint_px": round(self.footprint_px / self.K, 1)}


class EdgeWorkload:
    """G graphs of n nodes each (one per image), D = 12544 (the pooled 256x7x7 flattened)."""

    def __init__(self, graphs, nodes, dim=NODE_DIM):
        self.graphs, self.nodes, self.dim = graphs, nodes, dim
        self.N = graphs * nodes
        self.offsets = [g * nodes for g in range(graphs + 1)]

    def graph_end(self, row):
        return (row // self.nodes + 1) * self.nodes

    def graph_start(self, row):
        return (row // self.nodes) * self.nodes

    def describe(self):
        return f"{self.graphs} graphs x N={self.nodes}, D={self.dim}"


# --- loop arithmetic ---------------------------------------------------------------------------

class NoModel(Exception):
    """The kernel's code is not shaped as its family's formula expects."""


def marker_count(counts, ops):
    return sum(counts.get("op:" + op, 0) for op in ops)


def unit_cost(loop, ops, per_unit):
    """Instructions per unit of work (a sample, a k-step...) of an innermost loop whose body
    holds `per_unit` instructions of `ops` per unit: an unrolled body is divided back."""
    units = marker_count(loop.counts, ops) / per_unit
    if units <= 0:
        raise NoModel(f"loop {loop.describe()} has no {'/'.join(ops)}")
    return Counter({k: v / units for k, v in loop.counts.items()})


def overhead(loop, unit, ops, per_unit):
    """Instructions of `loop` outside its nested loops, less the units unrolled into it (the
    remainder iterations of an unrolled inner loop): what one trip costs besides its units.
    Every straight-line instruction counts as executed (both sides of an if), an upper bound."""
    own = loop.own
    units = marker_count(own, ops) / per_unit
    return Counter({k: max(0.0, own.get(k, 0) - units * unit.get(k, 0))
                    for k in set(own) | set(unit)})


def scaled(counts, factor):
    return Counter({k: v * factor for k, v in counts.items()})


def add(*counters):
    out = Counter()
    for c in counters:
        for k, v in c.items():
            out[k] += v
    return out


def function_outside(kernel, loop):
    """Instructions of the kernel outside `loop` (prologue, epilogue, sibling loops)."""
    c = Counter(kernel.counts)
    c.subtract(loop.counts)
    return Counter({k: max(0, v) for k, v in c.items()})


def hottest(loops, ops):
    best = max(loops, key=lambda lp: marker_count(lp.counts, ops), default=None)
    if best is None or marker_count(best.counts, ops) == 0:
        raise NoModel(f"no loop with {'/'.join(ops)}")
    return best


def loop_summary(name, loop, unit):
    """What the table shows of a hot loop: instructions per unit, by class."""
    return {"loop": name, "address": loop.describe(),
            "unrolled_units": round(loop.counts["total"] / max(unit["total"], 1e-9), 2),
            "per_unit": {k: round(unit.get(k, 0), 2) for k in ("total", *CLASSES)
                         if unit.get(k, 0)}}


def warp_iters(n, threads):
    """Warp-iterations of `for (e = threadIdx.x; e < n; e += threads)` over a whole block."""
    n = int(n)
    return (n // threads) * (threads // 32) + math.ceil((n % threads) / 32)


class Cost:
    """Work of one kernel launch (or of a torch kernel), and its modelled time."""

    def __init__(self, name, kernel=None, occ=None):
        self.name, self.kernel, self.occ = name, kernel, occ
        self.instr = Counter()           # warp-instructions by class
        self.l1_wavefronts = 0.0          # global loads/atomics through L1TEX
        self.l2_bytes = 0.0
        self.dram_bytes = 0.0
        self.atomic_sector_ops = 0.0
        self.tensor_fma = 0.0                # multiply-adds on tensor cores
        self.critical_warp_instr = 0.0    # the longest block's warp-instructions
        self.blocks = None                # blocks doing work (a small grid leaves SMs idle)
        self.warps_per_block = 8
        self.hot_loops = []
        self.notes = []

    def terms_us(self, m=H100):
        sms, clk = m["sms"], m["clock_hz"]
        wps = self.occ["warps_per_scheduler"] if self.occ else m["warps_for_full_issue"]
        if self.blocks is not None:  # fewer blocks than resident slots: fewer SMs and warps
            used = max(1, min(sms, self.blocks))
            wps = min(wps, self.blocks * self.warps_per_block / (used * m["schedulers"]))
            sms = used
        eff = issue_efficiency(wps, m)
        t = {
            "issue": 1e6 * self.instr.get("total", 0) / (sms * m["schedulers"] * clk * eff),
            "smem": 1e6 * self.instr.get("smem_wf", 0) / (sms * m["smem_wavefronts_per_clock"]
                                                          * clk),
            "L1": 1e6 * self.l1_wavefronts / (sms * m["l1_wavefronts_per_clock"] * clk),
            "L2": 1e6 * self.l2_bytes / m["l2_bytes_per_s"],
            "DRAM": 1e6 * self.dram_bytes / (m["dram_bytes_per_s"] * m["dram_efficiency"]),
            "atomics": 1e6 * self.atomic_sector_ops / m["atomic_sector_ops_per_s"],
            "tensor": 1e6 * self.tensor_fma / (sms * m["mma_sync_fma_per_clock"] * clk),
        }
        if self.critical_warp_instr:
            # the longest block alone on its SM: 8 warps = 2 per scheduler
            t["longest block"] = 1e6 * self.critical_warp_instr / (
                m["schedulers"] * clk * issue_efficiency(2, m))
        return t

    def time_us(self, m=H100):
        return max(self.terms_us(m).values())

    def as_dict(self, m=H100):
        terms = self.terms_us(m)
        return {"name": self.name, "kernel": self.kernel.demangled if self.kernel else None,
                "model_us": round(self.time_us(m), 2),
                "bound": max(terms, key=terms.get),
                "terms_us": {k: round(v, 2) for k, v in terms.items()},
                "warp_instructions": {k: round(v) for k, v in self.instr.items()
                                      if not k.startswith("op:")},
                "l1_wavefronts": round(self.l1_wavefronts), "l2_bytes": round(self.l2_bytes),
                "dram_bytes": round(self.dram_bytes),
                "atomic_sector_ops": round(self.atomic_sector_ops),
                "blocks": self.blocks, "hot_loops": self.hot_loops, "notes": self.notes}


def streaming_cost(name, nbytes, note=""):
    """A torch kernel or a small elementwise one: its bytes at DRAM speed."""
    c = Cost(name)
    c.dram_bytes = nbytes
    if note:
        c.notes.append(note)
    return c


def kernel_occupancy(kernel, threads, dynamic_smem=0):
    return occupancy(kernel.ptxas.get("registers", 0), kernel.ptxas.get("smem", 0) + dynamic_smem,
                     threads)


# --- kernel families ---------------------------------------------------------------------------
# Each takes (kernel, workload, element bytes) and returns a Cost, or raises NoModel. Trip counts
# come from the workload; the instructions per trip from the kernel's own SASS.

LOADS, ATOMICS = ("LDG",), ("RED", "REDG", "ATOM", "ATOMG")
FMA = ("FFMA", "DFMA")
FORWARD_CHANNELS_PER_BLOCK = 32  # forward_channels_per_block() at these K (K*8 >= 4*132 blocks)


def forward_gather(kernel, wl, elem_bytes):
    """RoIAlign forward: one block per (RoI, 32 channels), 256 threads, grid-stride over RoIs.
    Per RoI the block writes the taps of its samples along y and x (16-byte PlaneTap: two int
    plane offsets and two weights) to shared memory; each thread then takes outputs (c, bin)
    along x (NCHW), so a warp holds 32 consecutive outputs, loops over the bin's sample rows (iy,
    gh trips, one LDS.128 of ty) and samples (ix, gw trips, one LDS.128 of tx) and loads 4 taps.
    - the sample loop is the innermost loop with LDG and LDS (the tabled path; the in-place path
      for planes whose offsets exceed int loads no taps from shared memory and does not run
      here), 4 LDG per sample; its parent is the row loop, whose parent is the output loop;
    - every sample's body is executed (the `lo < 0` skip is taken only outside the image, < 1 %
      of the samples here), trip counts are uniform over a warp (one RoI per block);
    - the output loop's own code counts once per output, as executed: it holds the in-place
      path's straight-line code too (its loops are left out);
    - what lies outside the output loop (geometry, the tap tables' fill loops, 2 barriers) counts
      once per warp and block per RoI: an upper bound, 7 (gh + gw) taps busy 1-2 of the 8 warps;
    - shared memory: 4 wavefronts per LDS.128 (no credit for broadcasts; far from binding);
    - memory: the lines and sectors of warp_traffic (NCHW), the output written once; DRAM reads
      the RoIs' tap footprints once each, capped at the pyramid (L2 keeps one RoI's reuse)."""
    tabled = [lp for lp in kernel.innermost()
              if marker_count(lp.counts, LOADS) and marker_count(lp.counts, ["LDS"])]
    sample = hottest(tabled, LOADS)
    row = sample.parent
    out = row.parent if row else None
    if out is None or out.parent is None:
        raise NoModel("expected the sample loop in a row loop in an output loop in a RoI loop")
    u = unit_cost(sample, LOADS, 4)
    ov_row, ov_out = overhead(row, u, LOADS, 4), overhead(out, u, LOADS, 4)
    outside = function_outside(kernel, out)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256))
    cost.blocks = wl.K * CHANNELS // FORWARD_CHANNELS_PER_BLOCK
    warp_iters_per_roi = CHANNELS * BINS / 32
    outside_warps_per_roi = CHANNELS / FORWARD_CHANNELS_PER_BLOCK * 8
    for roi in wl.rois:
        cost.instr.update(scaled(add(ov_out, scaled(ov_row, roi.gh), scaled(u, roi.samples)),
                                 warp_iters_per_roi))
        cost.instr.update(scaled(outside, outside_warps_per_roi))
    groups = wl.K * CHANNELS / 32
    tr = wl.traffic(elem_bytes)
    out_bytes = wl.K * CHANNELS * BINS * elem_bytes
    touched = min(wl.footprint_px * CHANNELS, wl.batch * roofline.pyramid_elements())
    cost.l1_wavefronts = tr["l1_wavefronts"] * groups + wl.K * warp_iters_per_roi
    cost.l2_bytes = tr["l2_sectors"] * groups * 32 + out_bytes
    cost.dram_bytes = out_bytes + touched * elem_bytes
    cost.hot_loops = [loop_summary("per sample", sample, u),
                      {"loop": "per sample row", "address": row.describe(),
                       "total": round(ov_row["total"], 1)},
                      {"loop": "per output", "address": out.describe(),
                       "total": round(ov_out["total"], 1)},
                      {"loop": "outside the output loop, per warp and block",
                       "total": round(outside["total"], 1)}]
    cost.notes.append(f"block per (RoI, 32 channels); {tr['l1_wavefronts'] / tr['warp_loads']:.1f}"
                      " L1 wavefronts (128-B lines) per warp-load of a tap")
    return cost


# --- the backward kernels' tile steps ---

TILE = 32                  # kTile: tile edge in pixels
WARPS = 8                  # 256 threads
TILE_ROWS = TILE // WARPS  # rows each thread owns
OWNER_LIST_BYTES = 8 * 256  # the owner kernel's RoI list (one int64 per thread)
FOOTPRINT_BYTES = {4: 44, 8: 64}  # sizeof(RoiFootprint<acc_t>)


def tile_smem_bytes(acc_bytes, cpb, ph=POOLED, pw=POOLED):
    """tile_smem_bytes(): wy [ph][32], wx [pw][32], gs [cpb][ph][pw], t1 [cpb][ph][32]."""
    return acc_bytes * ((ph + pw) * TILE + cpb * ph * pw + cpb * ph * TILE)


def tile_channels(acc_bytes, extra=0, ph=POOLED, pw=POOLED):
    """channels_per_block(): the widest channel group (16, 8, 1; fp64 8, 4, 1) whose dynamic
    shared memory (extra + the tile steps') fits 46 KB, and that memory (else 1, opted in)."""
    wide = 8 if acc_bytes > 4 else 16
    for cpb in (wide, wide // 2, 1):
        smem = extra + tile_smem_bytes(acc_bytes, cpb, ph, pw)
        if smem <= 46 * 1024:
            return cpb, smem
    return 1, extra + tile_smem_bytes(acc_bytes, 1, ph, pw)


def run_units(nbytes, unit, elem):
    """Expected `unit`-byte blocks (sectors, lines) that nbytes of consecutive elem-byte values
    touch when their start is uniform over the elem-aligned offsets of a block: row pitches of
    the levels (W x 4 B = 1336, 668, 336, 168 B) are not multiples of 32 B."""
    return 0.0 if nbytes <= 0 else 1 + (nbytes - elem) / unit


def _holds(lp, *groups, lacks=()):
    """Whether loop lp holds an op of every group (an opcode or a tuple of them), none of lacks."""
    return (all(marker_count(lp.counts, [g] if isinstance(g, str) else list(g)) for g in groups)
            and not marker_count(lp.counts, list(lacks)))


def guarded_blocks(loop, ops):
    """Blocks of loop's own straight-line code that a predicated forward branch skips, each
    ending in one of `ops` (an atomic behind its `if`): (their instructions summed, how many)."""
    own = [i for i in loop.instrs if not any(ch.start <= i[0] <= ch.end for ch in loop.children)]
    total, n = Counter(), 0
    for j, (addr, _, op, _) in enumerate(own):
        if op.split(".")[0] not in ops:
            continue
        for b in range(j - 1, -1, -1):
            _, pred, op_b, args_b = own[b]
            if op_b.split(".")[0] in ops:
                break
            target = re.search(r"0x([0-9a-f]+)", args_b)
            if op_b.split(".")[0] == "BRA" and pred and target and int(target.group(1), 16) > addr:
                total.update(counts_of(own[b + 1:j + 1]))
                n += 1
                break
    return total, n


def _ancestors(lp):
    out = []
    while lp.parent is not None:
        lp = lp.parent
        out.append(lp)
    return out


class TileSteps:
    """Loops of the tile steps both backward kernels share (tile_weights, stage_upstream,
    reaching_bins, column_sums, add_rows in multilevel_roi_align_kernel.cu), found by content:
    - step: the loop that runs them once per RoI and tile, the lowest loop holding every
      innermost FMA + LDS loop (the owner's per-RoI loop, the atomic kernel's per-tile loop);
    - rows: its innermost FMA + LDS children, add_rows' loop over the bins reaching an owned row,
      CPB FMA (+ CPB LDS of t1) per bin; the compiler also emits copies for ph <= 0 that never
      run, so only the unit is taken from them;
    - column: its child holding an FMA + LDS loop (q: 1 FMA per bin), column_sums' loop over the
      group's nc x ph rows of t1, one warp per row;
    - reaching: its innermost children with LDS and no FMA, STS, MUFU or LDG: reaching_bins (1 LDS
      per bin), 1 + 4 per RoI and tile (the column's, one per owned row) over 7 bins each, as
      loops unrolled x16 and/or x4 (each runs whole bodies) and straight-line remainders; the
      remainder blocks that 7 bins skip (the x8 block after an x16 loop) are taken out of the
      step's straight-line code, found by the unit's SEL (2 per bin);
    - weights: its child whose children are per-sample loops with MUFU (sample_coord's IEEE
      division, 1 per sample) that also zero-fills a row of wy or wx (STS): one thread per bin and
      axis, so warp 0 alone runs gh samples (y) and then gw samples (x); of the compiler's copies
      (one for grid_w <= 0) the one with sample loops on both axes;
    - upstream: the kernel's innermost loop with LDG and STS: stage_upstream, 1 LDG per element of
      the group's nc x 7 x 7 gradient, 256 threads striding over them.
    - atomics (the atomic kernel): the blocks of the step's straight-line code that a branch
      skips, each ending in a RED (guarded_blocks), run once per tile row < th and channel; the
      guards themselves count with the straight-line code.
    A loop body holding u units runs n // u times for n units; the remainders, which the compiler
    peels into straight-line code, are counted with the enclosing loop's own code, as executed."""

    def __init__(self, kernel, cpb, nc, atomics=False):
        fma = [lp for lp in kernel.innermost()
               if _holds(lp, FMA, "LDS", lacks=("STS", "LDG", "MUFU"))]
        chains = [_ancestors(lp) for lp in fma]
        step = next((a for a in (chains[0] if chains else [])
                     if all(any(a is b for b in ch) for ch in chains[1:])), None)
        if step is None:
            raise NoModel("no loop around column_sums' and add_rows' FMA + LDS loops")
        rows = [lp for lp in fma if lp.parent is step]
        q = [lp for lp in fma if lp.parent not in (None, step) and lp.parent.parent is step]
        reach = [lp for lp in step.children if not lp.children
                 and _holds(lp, "LDS", lacks=FMA + ("STS", "MUFU", "LDG"))]
        weights = [lp for lp in step.children if marker_count(lp.own, ["STS"])
                   and any(marker_count(ch.counts, ["MUFU"]) for ch in lp.children)]
        upstream = [lp for lp in kernel.innermost() if _holds(lp, "LDG", "STS")]
        if not (rows and q and reach and weights and upstream):
            raise NoModel("expected add_rows (FMA), column_sums (FMA in a loop), reaching_bins "
                          "(LDS), tile_weights (MUFU) and stage_upstream (LDG + STS) loops")
        self.step, self.nc = step, nc
        self.instances = 1 + TILE_ROWS  # reaching_bins calls: column_sums' and add_rows' rows
        self.rows = hottest(rows, FMA)
        self.q = hottest(q, FMA)
        self.column = self.q.parent
        self.weights = max(weights, key=lambda lp: len(lp.children))
        self.samples = sorted((ch for ch in self.weights.children
                               if marker_count(ch.counts, ["MUFU"])), key=lambda lp: lp.start)
        self.upstream = hottest(upstream, ["LDG"])
        self.reach = reach
        self.upstream_in_step = step.start <= self.upstream.start <= step.end
        self.row_units = marker_count(self.rows.counts, FMA) / cpb
        self.q_units = marker_count(self.q.counts, FMA)
        self.sample_units = [marker_count(lp.counts, ["MUFU"]) for lp in self.samples]
        # per RoI and tile, independent of the RoI: every warp's reaching_bins over 7 bins
        self.reach_cost = Counter()
        left, by_units = POOLED, {}
        for lp in reach:
            by_units.setdefault(marker_count(lp.counts, ["LDS"]), []).append(lp)
        for units in sorted(by_units, reverse=True):
            trips = left // units
            left -= trips * units
            for lp in by_units[units]:
                self.reach_cost.update(scaled(lp.counts, trips * WARPS))
        unit = unit_cost(by_units[max(by_units)][0], ["LDS"], 1)
        in_code = marker_count(step.own, ["SEL"]) / max(unit.get("op:SEL", 0), 1e-9)
        skipped = max(0.0, in_code - self.instances * left) if unit.get("op:SEL") else 0.0
        self.step_code = Counter({op: max(0.0, v - skipped * unit.get(op, 0))
                                  for op, v in step.own.items()})
        red, self.reds = guarded_blocks(step, ATOMICS) if atomics else (Counter(), 0)
        if atomics and not self.reds:
            raise NoModel("expected guarded atomics in the per-tile code")
        self.step_code.subtract(red)
        # stage_upstream: each warp runs its busiest lane's whole bodies
        n = nc * BINS
        per_body = marker_count(self.upstream.counts, ["LDG"])
        self.upstream_trips = sum(
            max(len(range(t, n, 256)) for t in range(32 * w, 32 * w + 32)) // per_body
            for w in range(WARPS))
        self.units = {
            "RoI-and-tile code": scaled(self.step_code, WARPS),
            "reaching_bins": self.reach_cost,
            "column_sums": scaled(self.column.own, nc * POOLED),
            "column_sums bins": self.q.counts,
            "add_rows": self.rows.counts,
            "tile_weights": self.weights.own,
            "tile_weights y": self.samples[0].counts,
            "tile_weights x": self.samples[-1].counts,
            "stage_upstream": scaled(self.upstream.counts, self.upstream_trips),
            "atomics": scaled(red, 1 / max(self.reds, 1)),
        }

    def trips(self, gh, gw, q_max, row_spans, th=0):
        """Multipliers of self.units for one RoI on one tile: gh, gw samples per bin, q_max the
        most bins reaching one of the tile's columns (the trips of the warps' q loop), row_spans
        the bins reaching each of the tile's 32 rows, th its rows (the atomics' guard)."""
        uy, ux = self.sample_units[0], self.sample_units[-1]
        return {"RoI-and-tile code": 1, "reaching_bins": 1, "column_sums": 1, "tile_weights": 1,
                "stage_upstream": int(self.upstream_in_step),
                "column_sums bins": self.nc * POOLED * (q_max // self.q_units),
                "add_rows": float(np.sum(row_spans // self.row_units)),
                "atomics": th * self.nc if self.reds else 0,
                "tile_weights y": gh // uy, "tile_weights x": gw // ux}

    def hot_loops(self, cpb):
        return [loop_summary(f"add_rows: per bin reaching a row ({cpb} channels)", self.rows,
                             unit_cost(self.rows, FMA, cpb)),
                loop_summary("column_sums: per bin reaching a column", self.q,
                             unit_cost(self.q, FMA, 1)),
                loop_summary("reaching_bins: per bin", self.reach[0],
                             unit_cost(self.reach[0], ["LDS"], 1)),
                loop_summary("tile_weights: per grid sample", self.samples[0],
                             unit_cost(self.samples[0], ["MUFU"], 1)),
                loop_summary("stage_upstream: per element", self.upstream,
                             unit_cost(self.upstream, ["LDG"], 1)),
                {"loop": "column_sums: per (c, p) row, besides its bins",
                 "address": self.column.describe(), "total": round(self.column.own["total"], 1)},
                {"loop": "per RoI and tile, straight-line, per warp", "address":
                 self.step.describe(), "total": round(self.step_code["total"], 1)}]


class StepTally:
    """Sums of TileSteps multipliers (the whole grid, and per block for the longest one)."""

    def __init__(self, steps):
        self.steps, self.total, self.block = steps, Counter(), Counter()
        self.unit_total = {k: v["total"] for k, v in steps.units.items()}

    def add_pair(self, gh, gw, q_max, row_spans, groups, th=0):
        for k, v in self.steps.trips(gh, gw, q_max, row_spans, th).items():
            self.total[k] += v * groups
            self.block[k] += v

    def end_block(self):
        t = sum(v * self.unit_total[k] for k, v in self.block.items())
        self.block = Counter()
        return t

    def instr(self):
        return add(*(scaled(self.steps.units[k], v) for k, v in self.total.items()))

    def shares(self):
        out = Counter()
        for k, v in self.total.items():
            out[k.split(" ")[0] if k != "RoI-and-tile code" else k] += v * self.unit_total[k]
        return out


def _spans(span, first, lo, n):
    """Spans of pixels [lo, lo + n) of an axis whose footprint starts at `first` (0 outside)."""
    out = np.zeros(n, int)
    a, b = max(lo, first), min(lo + n, first + len(span))
    if a < b:
        out[a - lo:b - lo] = span[a - first:b - first]
    return out


def _shares_note(shares, total):
    return "warp-instructions: " + ", ".join(
        f"{k} {v / total:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v)


def owner_backward(kernel, wl, elem_bytes):
    """Deterministic backward: one block per (32x32 tile of a level of an image, CPB channels),
    256 threads; thread (lane, warp) owns column x = lane and rows warp + 8 r (r < 4) of the
    tile for CPB channels in registers over all RoIs, and writes them once.
    - CPB: the instantiation the launcher picks for 7x7 (tile_channels with the 2 KB RoI list):
      16, fp64 8; 256 / CPB channel groups;
    - per block: the code outside the chunk loop (tile lookup, write-out: 4 x CPB STG per thread)
      once per warp; the chunk loop's own code (compaction of the bucket's RoIs that touch the
      tile: ballot, prefix sum) once per warp per 256 RoIs of the bucket (image, level);
    - per RoI whose tap extent overlaps the tile (the Monte Carlo's RoIs, exactly): TileSteps
      with stage_upstream inside the per-RoI loop; trips from the RoI's samples per bin and, on
      the tile, the bins reaching each row (add_rows) and the most reaching a column (the warps'
      q loop of column_sums), 7 x 7 bins per reaching_bins;
    - barriers: 3 per RoI and tile and 3 per chunk, no cost of their own (the model has no
      latency term: tile_weights runs in warp 0 alone while 7 warps wait);
    - memory: per RoI and tile, the grad slice of the group (nc x 49 elements, lines of 32
      consecutive per warp-load) and every warp's uniform loads of the RoI's geometry (1
      wavefront each); per chunk each warp reads 32 order entries (8 B) and the footprints'
      extents (the 4 int loads of 44-B records: 1 sector per RoI in L2); the tile written once
      (a warp-store per owned row and channel); DRAM: the pyramid written, grad read once."""
    acc_bytes = 8 if elem_bytes > 4 else 4
    cpb, smem = tile_channels(acc_bytes, OWNER_LIST_BYTES)
    if kernel.cpb not in (None, cpb):
        raise NoModel(f"instantiation for {kernel.cpb} channels, the launcher picks {cpb}")
    nc = min(cpb, CHANNELS)
    steps = TileSteps(kernel, cpb, nc)
    chunk = steps.step.parent
    if chunk is None or chunk.parent is not None:
        raise NoModel("expected the per-RoI loop inside the chunk loop (top level)")
    outside = function_outside(kernel, chunk)
    groups = math.ceil(CHANNELS / cpb)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256, smem))
    tally, blocks, pairs = StepTally(steps), [], 0
    per_level = [[0, 0, 0] for _ in LEVEL_HW]  # tiles, RoI-tile pairs, most RoIs on a tile
    tile_code, chunk_code, loads_l1, loads_l2, l1_store = 0, 0, 0.0, 0.0, 0.0
    rec = FOOTPRINT_BYTES[acc_bytes]
    for image in range(wl.batch):
        for level, (H, W) in enumerate(LEVEL_HW):
            bucket = [r for r in wl.rois if r.image == image and r.level == level
                      and r.extent is not None]
            ext = np.array([r.extent for r in bucket]).reshape(-1, 4)
            chunks = math.ceil(len(bucket) / 256)
            full, part = divmod(len(bucket), 32)
            lanes = [32] * full + ([part] if part else [])
            chunk_l1 = sum(run_units(8 * a, 128, 8)
                           + (marker_count(chunk.own, LOADS) - 1) * (1 + rec * (a - 1) / 128)
                           for a in lanes)
            for y0 in range(0, H, TILE):
                for x0 in range(0, W, TILE):
                    th, tw = min(TILE, H - y0), min(TILE, W - x0)
                    tile_code += 1
                    chunk_code += chunks
                    loads_l1 += chunk_l1
                    loads_l2 += 40 * len(bucket)
                    l1_store += th * nc * run_units(tw * elem_bytes, 128, elem_bytes)
                    hit = ((ext[:, 0] < y0 + th) & (ext[:, 1] >= y0) & (ext[:, 2] < x0 + tw)
                           & (ext[:, 3] >= x0))
                    per_level[level][0] += 1
                    per_level[level][1] += int(hit.sum())
                    per_level[level][2] = max(per_level[level][2], int(hit.sum()))
                    for i in np.nonzero(hit)[0]:
                        r = bucket[i]
                        q_max = int(_spans(r.x_span, r.extent[2], x0, tw).max())
                        tally.add_pair(r.gh, r.gw, q_max, _spans(r.y_span, r.extent[0], y0, th),
                                       groups)
                        pairs += 1
                    blocks.append(tally.end_block() + WARPS * (
                        outside["total"] + chunks * chunk.own["total"]))
    cost.instr = add(tally.instr(), scaled(outside, WARPS * tile_code * groups),
                     scaled(chunk.own, WARPS * chunk_code * groups))
    cost.blocks = len(blocks) * groups
    cost.critical_warp_instr = max(blocks)
    grad_elems = nc * BINS
    warp_loads = warp_iters(grad_elems, 256)
    per_pair_l1 = (warp_loads * run_units(32 * elem_bytes, 128, elem_bytes)
                   + WARPS * marker_count(steps.step.own, LOADS))
    cost.l1_wavefronts = (pairs * per_pair_l1 + loads_l1 + l1_store) * groups
    grad_bytes = wl.K * CHANNELS * BINS * elem_bytes
    pyramid_bytes = wl.batch * roofline.pyramid_elements() * elem_bytes
    cost.l2_bytes = pairs * groups * grad_elems * elem_bytes + loads_l2 * groups + pyramid_bytes
    cost.dram_bytes = pyramid_bytes + grad_bytes
    cost.hot_loops = steps.hot_loops(cpb) + [
        {"loop": "per chunk of 256 RoIs (compaction), per warp", "address": chunk.describe(),
         "total": round(chunk.own["total"], 1)},
        {"loop": "per block outside the chunk loop (tile lookup, write-out), per warp",
         "total": round(outside["total"], 1)}]
    shares = tally.shares()
    shares["tile and chunk code"] = (cost.instr["total"] - sum(shares.values()))
    cost.notes.append(_shares_note(shares, cost.instr["total"]))
    cost.notes.append("RoIs per tile on P2-P5, mean (most): " + ", ".join(
        f"{n / max(t, 1):.2f} ({most})" for t, n, most in per_level))
    cost.notes.append(f"{cpb} channels/block, {smem} B dynamic shared memory, {cost.blocks} "
                      f"blocks, {pairs / wl.K:.2f} tiles per RoI, barriers not modelled "
                      f"({3 * pairs * groups} per-RoI barriers in all)")
    return cost


def atomic_backward(kernel, wl, elem_bytes):
    """Atomic backward: one block per (RoI, CPB channels), 256 threads, grid-stride over RoIs;
    the RoI's footprint gradient is formed 32x32 pixels at a time (thread (lane, warp): column x
    = lane, rows warp + 8 r, CPB channels in fresh registers) and each footprint pixel and
    channel is added to the fp32 (fp64) buffer with one atomic.
    - CPB: the instantiation the launcher picks for 7x7 (tile_channels): 16, fp64 8;
    - per RoI (one block each here: K < the grid cap): the code outside the RoI loop and the RoI
      loop's own code once per warp; axis_extent: thread 0 (warp 0) runs 7 x gh samples along
      y, thread 32 (warp 1) 7 x gw along x (per-bin loops around sample loops with MUFU and no
      loads: the extent is kept in shared memory); stage_upstream (TileSteps) once;
    - per tile of the footprint (tiles start at its first row and column, th x tw clipped to
      it): TileSteps, the per-tile loop's own code once per warp; the 4 x CPB guarded RED blocks
      it holds per thread (~11 instructions each: 64-bit address, RED) once per row < th and
      channel (a warp runs one if any lane's sum is non-zero: every row of the extent);
    - barriers: 2 per RoI and 3 per tile, no cost of their own (no latency term);
    - atomics: one per footprint pixel and channel (every pixel of the extent has a non-zero sum:
      samples are at most 1 px apart); a warp-RED covers tw consecutive floats of one row: the
      L2 sector operations and L1 wavefronts are the 32-B sectors and 128-B lines they span;
    - memory: grad read once per block (nc x 49, 32 consecutive per warp-load) and the RoI's
      fields as uniform loads (1 wavefront each); DRAM: grad, and the touched fp32 buffer read
      and written once (the RoIs' footprints, capped at the pyramid); the zero-fill before and
      the cast after (16-bit dtypes) are torch passes of the op."""
    acc_bytes = 8 if elem_bytes > 4 else 4
    cpb, smem = tile_channels(acc_bytes)
    if kernel.cpb not in (None, cpb):
        raise NoModel(f"instantiation for {kernel.cpb} channels, the launcher picks {cpb}")
    nc = min(cpb, CHANNELS)
    steps = TileSteps(kernel, cpb, nc, atomics=True)
    y_loop = steps.step.parent
    per_roi = y_loop.parent if y_loop is not None else None
    if per_roi is None or per_roi.parent is not None:
        raise NoModel("expected the tile loop in a row-of-tiles loop in the RoI loop (top level)")
    extent = sorted((lp for lp in per_roi.children if lp.children
                     and not marker_count(lp.counts, ["LDS", "LDG"])
                     and any(marker_count(ch.counts, ["MUFU"]) for ch in lp.children)),
                    key=lambda lp: lp.start)
    if not extent:
        raise NoModel("expected axis_extent's per-bin loops (samples with MUFU)")
    ext_samples = [hottest(lp.children, ["MUFU"]) for lp in extent]
    per_block = add(scaled(function_outside(kernel, per_roi), WARPS),
                    scaled(per_roi.own, WARPS), steps.units["stage_upstream"])
    groups = math.ceil(CHANNELS / cpb)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256, smem))
    tally, blocks, extent_code = StepTally(steps), [], Counter()
    y_rows = tiles = reds = sectors = lines = 0
    for roi in wl.rois:
        e = Counter()
        for lp, sample, g in zip(extent, ext_samples, (roi.gh, roi.gw)):
            e.update(scaled(add(lp.own, scaled(sample.counts,
                                               g // marker_count(sample.counts, ["MUFU"]))),
                            POOLED))
        extent_code.update(e)
        block = e["total"] + per_block["total"]
        if roi.extent is not None:
            y_first, y_last, x_first, x_last = roi.extent
            for y0 in range(y_first, y_last + 1, TILE):
                y_rows += 1
                block += WARPS * y_loop.own["total"]
                th = min(TILE, y_last - y0 + 1)
                rows = _spans(roi.y_span, y_first, y0, TILE)
                for x0 in range(x_first, x_last + 1, TILE):
                    tw = min(TILE, x_last - x0 + 1)
                    tally.add_pair(roi.gh, roi.gw, int(_spans(roi.x_span, x_first, x0, tw).max()),
                                   rows, groups, th)
                    tiles += 1
                    reds += th * tw * CHANNELS
                    sectors += th * CHANNELS * run_units(tw * acc_bytes, 32, acc_bytes)
                    lines += th * CHANNELS * run_units(tw * acc_bytes, 128, acc_bytes)
        blocks.append(block + tally.end_block())
    cost.instr = add(tally.instr(), scaled(per_block, wl.K * groups),
                     scaled(extent_code, groups), scaled(y_loop.own, WARPS * y_rows * groups))
    cost.blocks = min(wl.K, 1 << 20) * groups
    cost.critical_warp_instr = max(blocks)
    cost.atomic_sector_ops = sectors
    grad_bytes = wl.K * CHANNELS * BINS * elem_bytes
    cost.l1_wavefronts = lines + wl.K * groups * (
        warp_iters(nc * BINS, 256) * run_units(32 * elem_bytes, 128, elem_bytes)
        + WARPS * marker_count(per_roi.own, LOADS))
    cost.l2_bytes = grad_bytes
    touched = min(wl.footprint_px * CHANNELS, wl.batch * roofline.pyramid_elements())
    cost.dram_bytes = grad_bytes + 2 * touched * acc_bytes
    cost.hot_loops = steps.hot_loops(cpb) + [
        loop_summary("axis_extent: per sample", ext_samples[0],
                     unit_cost(ext_samples[0], ["MUFU"], 1)),
        {"loop": "per RoI, straight-line, per warp", "address": per_roi.describe(),
         "total": round(per_roi.own["total"], 1)}]
    shares = tally.shares()
    shares["axis_extent"] = extent_code["total"] * groups
    shares["stage_upstream"] = steps.units["stage_upstream"]["total"] * wl.K * groups
    shares["RoI and row-of-tiles code"] = cost.instr["total"] - sum(shares.values())
    cost.notes.append(_shares_note(shares, cost.instr["total"]))
    cost.notes.append(f"{cpb} channels/block, {smem} B dynamic shared memory, {cost.blocks} "
                      f"blocks, {tiles / wl.K:.2f} tiles per RoI, {reds / 1e6:.0f} M atomics in "
                      f"{sectors / 1e6:.0f} M sector operations, barriers not modelled")
    return cost


GEMM_TILE, GEMM_STEP = 64, 16
GEMM_THREADS = 64                        # GemmShape<float>: 8 x 8 outputs per thread
GEMM_WARPS = GEMM_THREADS // 32


def live_gram_tiles(ew):
    """edge_loss_kernel.cu's live_gram_tiles() from host offsets: tiles ti <= tj holding a
    same-graph pair."""
    tiles = math.ceil(ew.N / GEMM_TILE)
    return sum(1 for ti in range(tiles) for tj in range(ti, tiles)
               if tj * GEMM_TILE < ew.graph_end(min((ti + 1) * GEMM_TILE, ew.N) - 1))


def gram_splits(plane, D, live, sides, elem_size, sms=H100["sms"]):
    """edge_loss_kernel.cu's gram_splits() on 132 SMs (plane: entries of one side's partial,
    Sum_g n_g^2 for the loss's packed buffers)."""
    blocks = live * sides
    s = (2 * sms + blocks - 1) // blocks
    s = min(s, max(1, D // 512))
    budget = (256 << 20) // max(1, sides * plane * elem_size)
    return max(1, min(s, budget, 32))


def gram_chunks(ew, sides=2):
    """(k_chunk, used splits) of the edge loss's Gram launch (k_chunks() in the .cu)."""
    D = ew.dim
    splits = gram_splits(ew.graphs * ew.nodes ** 2, D, live_gram_tiles(ew), sides, 4)
    k_chunk = max(GEMM_STEP, math.ceil(math.ceil(D / splits) / GEMM_STEP) * GEMM_STEP)
    return k_chunk, math.ceil(D / k_chunk)


def k_steps(D, k_chunk, step):
    """Steps of `step` columns over D, each K split of k_chunk columns stepping on its own."""
    return sum(math.ceil((min(k0 + k_chunk, D) - k0) / step) for k0 in range(0, D, k_chunk))


def graph_column_steps(ew, step):
    """Steps of `step` columns of the M X kernels, over all 64-row blocks: a block steps over
    the columns of its rows' graphs."""
    steps = 0
    for r0 in range(0, ew.N, GEMM_TILE):
        r_last = min(r0 + GEMM_TILE, ew.N) - 1
        steps += math.ceil((ew.graph_end(r_last) - ew.graph_start(r0)) / step)
    return steps


def _gemm_loop(kernel):
    loop = hottest(kernel.loops, ["FFMA", "HMMA"])
    per_step = GEMM_TILE * GEMM_TILE * GEMM_STEP // GEMM_THREADS  # FMAs/thread per 16-wide step
    if marker_count(loop.counts, ["HMMA"]):
        raise NoModel("tensor-core GEMM: no formula yet")
    return loop, unit_cost(loop, ["FFMA"], per_step)


def block_gram(kernel, ew, elem_bytes, sides=2):
    """Block-diagonal Grams X X^T of both sides (student, teacher) in one launch: 64x64 tiles
    (tj >= ti) that hold a same-graph pair, split-K as gram_splits() picks; 64 threads, per 16-wide
    k-step each does 1024 FFMA (the unit of the k loop). Blocks that exit at once cost 16
    warp-instructions per warp. Loads: 2 L1 wavefronts per LDG (half-warps read 16 consecutive k
    of two rows); L2 traffic: both 64-row tiles per k-step; DRAM: X read once, the packed
    partials (same-graph entries only) written once per split."""
    loop, u = _gemm_loop(kernel)
    outside = function_outside(kernel, loop)
    N, D = ew.N, ew.dim
    tiles = math.ceil(N / GEMM_TILE)
    k_chunk, used = gram_chunks(ew, sides)
    live = live_gram_tiles(ew)
    steps = k_steps(D, k_chunk, GEMM_STEP)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, GEMM_THREADS))
    cost.blocks = live * used * sides
    w = GEMM_WARPS
    cost.instr = add(scaled(u, live * steps * w * sides),
                     scaled(outside, live * used * w * sides),
                     Counter({"total": (tiles * tiles - live) * used * sides * w * 16}))
    cost.l1_wavefronts = 2 * cost.instr.get("op:LDG", 0)
    cost.l2_bytes = live * steps * sides * 2 * GEMM_TILE * GEMM_STEP * elem_bytes
    cost.dram_bytes = sides * (N * D * elem_bytes + used * ew.graphs * ew.nodes ** 2 * 4)
    cost.hot_loops = [loop_summary("per 16-wide k-step", loop, u)]
    cost.notes.append(f"{sides} sides x {live} live tiles of {tiles * (tiles + 1) // 2}, "
                      f"{used} K-splits")
    return cost


MMA_THREADS, MMA_STEP = 128, 32          # block_gram_mma_kernel: 4 warps, 32-wide k-steps
HMMA_PER_WARP_STEP = 16                   # 2 x 2 fragments x 2 k-halves x 2 HMMA.16816
HMMA_FMA = 16 * 8 * 16                    # multiply-adds of one HMMA.16816


def block_gram_mma(kernel, ew, elem_bytes, sides=2):
    """Tensor-core Grams of 16-bit features in one launch: the tiles, splits and exits of
    block_gram; per 32-wide k-step each of the 4 warps issues 16 HMMA.16816 (the unit of the k
    loop) on fragments loaded from shared memory. Loads: 16-byte chunks, a warp's LDG.128 over
    8 rows' 64 bytes (8 L1 wavefronts); L2: both 64-row tiles per k-step; DRAM: X read once,
    the packed partials written once per split."""
    loop = hottest(kernel.loops, ["HMMA"])
    u = unit_cost(loop, ["HMMA"], HMMA_PER_WARP_STEP)
    outside = function_outside(kernel, loop)
    N, D = ew.N, ew.dim
    tiles = math.ceil(N / GEMM_TILE)
    k_chunk, used = gram_chunks(ew, sides)
    live = live_gram_tiles(ew)
    steps = k_steps(D, k_chunk, MMA_STEP)
    w = MMA_THREADS // 32
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, MMA_THREADS))
    cost.blocks, cost.warps_per_block = live * used * sides, w
    cost.instr = add(scaled(u, live * steps * w * sides),
                     scaled(outside, live * used * w * sides),
                     Counter({"total": (tiles * tiles - live) * used * sides * w * 16}))
    cost.tensor_fma = cost.instr.get("op:HMMA", 0) * HMMA_FMA
    cost.l1_wavefronts = 8 * cost.instr.get("op:LDG", 0)
    cost.l2_bytes = live * steps * sides * 2 * GEMM_TILE * MMA_STEP * elem_bytes
    cost.dram_bytes = sides * (N * D * elem_bytes + used * ew.graphs * ew.nodes ** 2 * 4)
    cost.hot_loops = [loop_summary("per 32-wide k-step and warp", loop, u)]
    cost.notes.append(f"{sides} sides x {live} live tiles of {tiles * (tiles + 1) // 2}, "
                      f"{used} K-splits, {cost.tensor_fma / 1e9:.1f} G tensor multiply-adds")
    return cost


def factor_matmul(kernel, ew, elem_bytes):
    """dX = M X on the diagonal blocks: one block per (64 rows, 64 feature columns), the rows'
    graph columns in 16-wide steps (64 threads, 1024 FFMA per thread per step). 2 L1 wavefronts
    per LDG; L2: the M (fp32) and X tiles per step; DRAM: X read, dX written, M's blocks read
    once."""
    loop, u = _gemm_loop(kernel)
    outside = function_outside(kernel, loop)
    N, D = ew.N, ew.dim
    col_blocks = math.ceil(D / GEMM_TILE)
    steps = graph_column_steps(ew, GEMM_STEP)
    blocks = col_blocks * math.ceil(N / GEMM_TILE)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, GEMM_THREADS))
    cost.blocks = blocks
    cost.instr = add(scaled(u, steps * col_blocks * GEMM_WARPS),
                     scaled(outside, blocks * GEMM_WARPS))
    cost.l1_wavefronts = 2 * cost.instr.get("op:LDG", 0)
    cost.l2_bytes = steps * col_blocks * GEMM_STEP * GEMM_TILE * (4 + elem_bytes)
    cost.dram_bytes = 2 * N * D * elem_bytes + ew.graphs * ew.nodes ** 2 * 4
    cost.hot_loops = [loop_summary("per 16-wide step over the graph's columns", loop, u)]
    cost.notes.append(f"{blocks} blocks")
    return cost


TF32_STEP = 32                            # block_factor_matmul_tf32_kernel's column steps
HMMA_TF32_PER_WARP_STEP = 64              # 2 x 2 fragments x 4 k-eighths x 4 HMMA.1684
HMMA_TF32_FMA = 16 * 8 * 4 * 2            # m16n8k4 at half the 16-bit rate: 16-bit equivalents


def factor_matmul_tf32(kernel, ew, elem_bytes):
    """dX = M X for 16-bit features on tensor cores: the blocks and column steps of
    factor_matmul in 32-wide steps; per step each of the 4 warps issues 64 HMMA.1684.TF32 (the
    unit of the loop), TF32 at half the 16-bit tensor rate. Loads: a warp's M loads touch 32
    rows (2 L1 wavefronts per LDG as in factor_matmul), X's 32 consecutive values one line; L2:
    the M (fp32) and X tiles per step; DRAM: X read, dX written, M's blocks read once."""
    loop = hottest(kernel.loops, ["HMMA"])
    u = unit_cost(loop, ["HMMA"], HMMA_TF32_PER_WARP_STEP)
    outside = function_outside(kernel, loop)
    N, D = ew.N, ew.dim
    col_blocks = math.ceil(D / GEMM_TILE)
    steps = graph_column_steps(ew, TF32_STEP)
    blocks = col_blocks * math.ceil(N / GEMM_TILE)
    w = MMA_THREADS // 32
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, MMA_THREADS))
    cost.blocks, cost.warps_per_block = blocks, w
    cost.instr = add(scaled(u, steps * col_blocks * w), scaled(outside, blocks * w))
    cost.tensor_fma = cost.instr.get("op:HMMA", 0) * HMMA_TF32_FMA
    cost.l1_wavefronts = 2 * cost.instr.get("op:LDG", 0)
    cost.l2_bytes = steps * col_blocks * TF32_STEP * GEMM_TILE * (4 + elem_bytes)
    cost.dram_bytes = 2 * N * D * elem_bytes + ew.graphs * ew.nodes ** 2 * 4
    cost.hot_loops = [loop_summary("per 32-wide step and warp", loop, u)]
    cost.notes.append(f"{blocks} blocks, {cost.tensor_fma / 1e9:.1f} G 16-bit-equivalent tensor "
                      f"multiply-adds")
    return cost


def elementwise(nbytes_fn, what):
    """Edge-loss epilogues and layout kernels: memory-bound elementwise passes over the
    diagonal blocks, modelled by the bytes they move (nbytes_fn(workload))."""
    def model(kernel, ew, elem_bytes):
        cost = streaming_cost(kernel.name, nbytes_fn(ew), what)
        cost.kernel, cost.occ = kernel, kernel_occupancy(kernel, 128)
        return cost
    model.__doc__ = f"Elementwise: {what}"
    model.__name__ = "elementwise"
    return model


def cast_levels(kernel, wl, elem_bytes):
    """Elementwise: the fp32 workspace read, every level gradient written in its dtype."""
    cost = streaming_cost(kernel.name, wl.batch * roofline.pyramid_elements() * (4 + elem_bytes),
                          "fp32 workspace read, level gradients written")
    cost.kernel, cost.occ = kernel, kernel_occupancy(kernel, 128)
    return cost


def _blocks_bytes(per_entry):
    return lambda ew: ew.graphs * ew.nodes ** 2 * per_entry


FAMILIES = [
    # (name pattern, formula, dtype the instantiation is picked by: 'T' features, 'acc' float)
    (r"^forward_kernel$", forward_gather, "T"),
    (r"^backward_atomic_kernel$", atomic_backward, "T"),
    (r"^backward_owner_kernel$", owner_backward, "T"),
    (r"^footprint_kernel$", elementwise(lambda wl: wl.K * 64, "one thread per RoI (64 B)"), "acc"),
    (r"^zero_levels_kernel$", elementwise(lambda wl: wl.batch * roofline.pyramid_elements() * 4,
                                          "every level gradient written once"), "acc"),
    (r"^cast_levels_kernel$", cast_levels, "T"),
    (r"^block_gram_kernel$", block_gram, "T"),
    (r"^block_gram_mma_kernel$", block_gram_mma, "T"),
    (r"^block_factor_matmul_kernel$", factor_matmul, "T"),
    (r"^block_factor_matmul_tf32_kernel$", factor_matmul_tf32, "T"),
    (r"^sum_splits_kernel$", elementwise(_blocks_bytes(3 * 4), "2 partials read, 1 written"),
     "acc"),
    (r"^norms_kernel$", elementwise(lambda ew: ew.N * 37, "diagonal read, norms written"), "acc"),
    (r"^normalize_kernel$", elementwise(_blocks_bytes(8), "G read and written"), "acc"),
    (r"^edge_loss_rows_kernel$", elementwise(
        lambda ew: ew.graphs * ew.nodes ** 2 * (8 * gram_chunks(ew)[1] + 12),
        "both sides' packed Gram partials read, S written and reread, M written"), "acc"),
    (r"^sum_rows_kernel$", elementwise(lambda ew: ew.N * 4, "row losses read"), "acc"),
    (r"^factor_kernel$", elementwise(_blocks_bytes(16), "S, E read, S read and written"), "acc"),
    (r"^symmetrize_kernel$", elementwise(_blocks_bytes(12), "G, G^T read, S written"), "acc"),
    (r"^ranges_from_(host|device)_offsets_kernel$", elementwise(lambda ew: ew.N * 24,
                                                                "ranges, row bases written"),
     None),
]


def family_of(kernel):
    for pattern, fn, pick in FAMILIES:
        if re.match(pattern, kernel.name):
            return fn, pick
    return None, None


# --- ops: what bench_ops.bench_kernels times as one row ---------------------------------------

class Kernels:
    """The compiled instantiations, looked up by family and dtype."""

    def __init__(self, kernels):
        self.all = kernels

    def find(self, pattern, dtype, cpb=None, variant=None):
        """The instantiation for dtype (and, for the backward kernels, channel group cpb; for
        others a `variant` text of the demangled name, e.g. a bool template argument)."""
        for k in self.all:
            if (re.match(pattern, k.name) and (dtype is None or k.dtype == dtype)
                    and (cpb is None or k.cpb == cpb)
                    and (variant is None or variant in (k.demangled or ""))):
                return k
        return None


def torch_pass(name, nbytes, launches=1):
    c = streaming_cost(name, nbytes, "torch kernel, modelled by its bytes")
    c.launches = launches
    return c


def _model_part(kernels, pattern, dtype, wl, elem_bytes, parts, missing, cpb=None,
                variant=None):
    k = kernels.find(pattern, dtype, cpb, variant)
    if k is None:
        missing.append(f"no kernel matches {pattern} ({dtype}"
                       + (f", {cpb} channels" if cpb else "")
                       + (f", {variant}" if variant else "") + ")")
        return
    fn, _ = family_of(k)
    try:
        parts.append(fn(k, wl, elem_bytes))
    except NoModel as e:
        missing.append(f"{k.name}: no model ({e})")


def op_roi_forward(kernels, wl, dtype, eb):
    parts, missing = [], []
    if dtype != "float32":  # bench_ops passes rois in the features' dtype: prepare_rois converts
        parts.append(torch_pass("rois to float32", wl.K * 5 * 6))
    _model_part(kernels, r"^forward_kernel$", dtype, wl, eb, parts, missing)
    return parts, missing


def op_roi_backward_atomic(kernels, wl, dtype, eb):
    parts, missing = [], []
    pyr = wl.batch * roofline.pyramid_elements()
    if dtype != "float32":
        parts.append(torch_pass("rois to float32", wl.K * 5 * 6))
    if eb == 4:  # the outputs are the accumulation buffers: one fill kernel for all levels
        _model_part(kernels, r"^zero_levels_kernel$", "float32", wl, eb, parts, missing)
    else:        # one zeroed fp32 workspace for all levels, one cast kernel at the end
        parts.append(torch_pass("zero-fill of the fp32 workspace", pyr * 4))
    _model_part(kernels, r"^backward_atomic_kernel$", dtype, wl, eb, parts, missing,
                cpb=tile_channels(8 if eb > 4 else 4)[0])
    if eb != 4:
        _model_part(kernels, r"^cast_levels_kernel$", dtype, wl, eb, parts, missing)
    return parts, missing


def op_roi_backward_owner(kernels, wl, dtype, eb):
    parts, missing = [], []
    if dtype != "float32":
        parts.append(torch_pass("rois to float32", wl.K * 5 * 6))
    _model_part(kernels, r"^footprint_kernel$", "float32", wl, eb, parts, missing)
    parts.append(torch_pass("stable argsort of the bucket keys", wl.K * 8 * 8, launches=4))
    parts.append(torch_pass("index_select, arange, searchsorted", wl.K * 8 * 4, launches=3))
    _model_part(kernels, r"^backward_owner_kernel$", dtype, wl, eb, parts, missing,
                cpb=tile_channels(8 if eb > 4 else 4, OWNER_LIST_BYTES)[0])
    return parts, missing


def op_edge_loss(kernels, ew, dtype, eb):
    """_edge_mse_loss_forward (student needs grad, teacher not) + _edge_factor_matmul, as
    edge_loss_kernel.cu drives them: layout, both Grams in one launch, the row kernel (every
    epilogue), the row losses summed; then layout and M X."""
    parts, missing = [], []
    _model_part(kernels, r"^ranges_from_host_offsets_kernel$", None, ew, eb, parts, missing)
    if eb >= 4:
        _model_part(kernels, r"^block_gram_kernel$", dtype, ew, eb, parts, missing)
    else:  # tensor cores; D = 12544: the 16-byte staging
        _model_part(kernels, r"^block_gram_mma_kernel$", dtype, ew, eb, parts, missing,
                    variant="true>")
    _model_part(kernels, r"^edge_loss_rows_kernel$", "float32", ew, eb, parts, missing)
    _model_part(kernels, r"^sum_rows_kernel$", "float32", ew, eb, parts, missing)
    _model_part(kernels, r"^ranges_from_host_offsets_kernel$", None, ew, eb, parts, missing)
    matmul = r"^block_factor_matmul_kernel$" if eb >= 4 else r"^block_factor_matmul_tf32_kernel$"
    _model_part(kernels, matmul, dtype, ew, eb, parts, missing)
    return parts, missing


OPS = [
    ("roi_align forward", "roi", op_roi_forward, roofline.roi_align_forward_floor_us),
    ("roi_align backward, atomic", "roi", op_roi_backward_atomic,
     roofline.roi_align_backward_atomic_floor_us),
    ("roi_align backward, deterministic", "roi", op_roi_backward_owner,
     roofline.roi_align_backward_owner_floor_us),
    ("edge loss forward + backward", "edge", op_edge_loss, None),
]
# bench_ops.bench_kernels' workloads: per batch (2 and 8) 512 RoIs/img with N = 300, and 140
# RoIs/img with N = 140; one graph per image, D = 12544
WORKLOADS = [(8, 512, 300), (2, 140, 140), (8, 140, 140), (2, 512, 300)]
DTYPES = {"float32": 4, "bfloat16": 2}


def op_time_us(parts, m=H100):
    """Kernels run back to back (a gap each); the host's launch cost bounds tiny ops."""
    launches = sum(getattr(p, "launches", 1) for p in parts)
    gpu = sum(p.time_us(m) + m["launch_gap_us"] * getattr(p, "launches", 1) for p in parts)
    return max(gpu, launches * m["launch_cpu_us"]), launches


def model_ops(kernels, log=print):
    rows = []
    for batch, rois, nodes in WORKLOADS:
        wl = RoiWorkload(batch, rois)
        ew = EdgeWorkload(batch, nodes)
        for dtype, eb in DTYPES.items():
            for op, kind, fn, floor_fn in OPS:
                w = wl if kind == "roi" else ew
                parts, missing = fn(kernels, w, dtype, eb)
                t, launches = op_time_us(parts)
                floor = (floor_fn(batch, rois, eb) if kind == "roi"
                         else roofline.edge_loss_floor_us(batch, nodes, ew.dim, eb,
                                                          tensor_cores=eb < 4))
                main = max((p for p in parts if p.kernel is not None), default=None,
                           key=lambda p: p.time_us())
                row = {"kernel": op, "dtype": dtype, "batch": batch,
                       "rois_per_image": rois if kind == "roi" else None,
                       "nodes": nodes if kind == "edge" else None,
                       "workload": w.describe(), "model_us": round(t, 1),
                       "floor_us": round(floor, 1), "model_to_floor": round(t / floor, 2),
                       "launches": launches, "complete": not missing, "missing": missing,
                       "parts": [p.as_dict() for p in parts]}
                if main is not None:
                    row["main_kernel"] = main.kernel.name
                    row["main_bound"] = main.as_dict()["bound"]
                    row["occupancy"] = main.occ
                    row["registers"] = main.kernel.ptxas.get("registers")
                    row["hot_loops"] = main.hot_loops
                if kind == "roi":
                    row["geometry"] = wl.summary()
                rows.append(row)
                log(f"[kernel_model] {op}, {w.describe()}, {dtype}: model {t:.0f} us, "
                    f"floor {floor:.0f} us" + (f" (incomplete: {missing})" if missing else ""))
    return rows


def kernel_rows(kernels):
    out = []
    for k in kernels.all:
        fn, _ = family_of(k)
        occ = kernel_occupancy(k, 256 if k.counts and "gram" not in k.name else 256)
        out.append({"kernel": k.name, "template": k.template, "source": k.source,
                    "dtype": k.dtype, "registers": k.ptxas.get("registers"),
                    "spill_stores": k.ptxas.get("spill_stores"),
                    "spill_loads": k.ptxas.get("spill_loads"),
                    "static_smem": k.ptxas.get("smem"), "barriers": k.ptxas.get("barriers"),
                    "instructions": k.counts["total"], "loops": len(k.loops),
                    "family": None if fn is None else fn.__name__,
                    "picked": picked_by_launcher(k), "mangled": k.mangled})
    return out


def picked_by_launcher(k):
    """For a backward instantiation, whether the launcher picks its channel group for 7x7
    (only that one is modelled); None for kernels without one."""
    if k.cpb is None or k.name not in ("backward_owner_kernel", "backward_atomic_kernel"):
        return None
    extra = OWNER_LIST_BYTES if k.name == "backward_owner_kernel" else 0
    return tile_channels(8 if k.dtype == "float64" else 4, extra)[0] == k.cpb


def kernel_threads(k):
    if k.source.startswith("multilevel") or "matmul" in k.name or "gram" in k.name:
        return 256
    return 128


def dynamic_smem(k):
    """Dynamic shared memory of a backward instantiation (its channel group's tile steps)."""
    acc = 8 if k.dtype == "float64" else 4
    if k.name == "backward_owner_kernel" and k.cpb:
        return OWNER_LIST_BYTES + tile_smem_bytes(acc, k.cpb)
    if k.name == "backward_atomic_kernel" and k.cpb:
        return tile_smem_bytes(acc, k.cpb)
    return 0


# --- report -------------------------------------------------------------------------------------

def _fmt_loops(loops):
    out = []
    for lp in loops or []:
        if "per_unit" in lp:
            pu = lp["per_unit"]
            parts = [f"{pu['total']:.0f} instr"]
            for cls, short in (("global_load", "LDG"), ("atomic", "RED"), ("shared_load", "LDS"),
                               ("shared_store", "STS"), ("fp32", "FP32"), ("mufu", "MUFU"),
                               ("convert", "CVT"), ("int", "INT"), ("control", "CTRL")):
                if pu.get(cls):
                    parts.append(f"{pu[cls]:.1f} {short}")
            out.append(f"{lp['loop']}: " + ", ".join(parts)
                       + (f" (x{lp['unrolled_units']:g} unrolled)"
                          if lp["unrolled_units"] > 1.01 else ""))
        else:
            out.append(f"{lp['loop']}: {lp['total']:.0f} instr")
    return "; ".join(out)


def markdown(result):
    m = result["machine"]
    lines = [f"# dsig_ext CUDA kernels: static cost model ({result['revision']})", "",
             "**Every time below is a model, not a measurement**: "
             f"{m['name']}, from the sm_90 SASS of `{result['revision']}` "
             f"(nvcc {result['nvcc']}), no GPU ran. Floors: benchmarks/roofline.py. "
             "Written by `benchmarks/kernel_model.py`; its docstrings state every assumption.", "",
             f"- machine: {m['sms']} SMs x {m['schedulers']} schedulers at "
             f"{m['clock_hz'] / 1e9:.3f} GHz, issue efficiency {m['issue_efficiency']} at >= "
             f"{m['warps_for_full_issue']} warps/scheduler (less below), 1 shared and 1 L1 "
             f"wavefront per SM-clock, L2 {m['l2_bytes_per_s'] / 1e12:.1f} TB/s, HBM "
             f"{m['dram_bytes_per_s'] / 1e12:.2f} TB/s x {m['dram_efficiency']}, atomics "
             f"{m['atomic_sector_ops_per_s'] / 1e9:.0f} G sector-ops/s, launches "
             f"{m['launch_cpu_us']} us (host) / {m['launch_gap_us']} us (gap)",
             "- kernel time = max(issue, smem, L1, L2, DRAM, atomics[, longest block]); op = sum "
             "of its kernels and torch passes",
             "", "## Ops (the rows bench_ops.py times), model vs floor", "",
             "| kernel | dtype | workload | model us | floor us | model / floor | bound by | "
             "main kernel regs | occupancy | launches |",
             "|---|---|---|---:|---:|---:|---|---:|---|---:|"]
    for r in result["ops"]:
        occ = r.get("occupancy") or {}
        occ_s = (f"{occ['warps_per_sm']} warps ({occ['occupancy']:.0%}, {occ['limiter']})"
                 if occ else "")
        bound = f"{r.get('main_kernel', '')}: {r.get('main_bound', '')}"
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['workload']} | "
                     f"{r['model_us']:.0f} (model) | {r['floor_us']:.0f} | "
                     f"{r['model_to_floor']:.1f} | {bound} | {r.get('registers', '')} | "
                     f"{occ_s} | {r['launches']} |"
                     + ("" if r["complete"] else " incomplete: " + "; ".join(r["missing"])))
    lines += ["", "## Hot loops (SASS instructions per unit of work, per thread)", "",
              "| kernel | dtype | loops |", "|---|---|---|"]
    seen = set()
    for r in result["ops"]:
        key = (r["kernel"], r["dtype"])
        if key in seen or not r.get("hot_loops"):
            continue
        seen.add(key)
        lines.append(f"| {r['kernel']} ({r.get('main_kernel')}) | {r['dtype']} | "
                     f"{_fmt_loops(r['hot_loops'])} |")
    lines += ["", "## Terms of the main kernels (model us)", "",
              "| kernel | dtype | workload | " + " | ".join(TERMS) + " |",
              "|---|---|---|" + "---:|" * len(TERMS)]
    for r in result["ops"]:
        for p in r["parts"]:
            if p["kernel"] and p["model_us"] >= 20:
                t = p["terms_us"]
                lines.append(f"| {p['name']} | {r['dtype']} | {r['workload']} | "
                             + " | ".join(f"{t[k]:.0f}" if k in t else "" for k in TERMS) + " |")
    lines += ["", "## Kernel instantiations (ptxas, sm_90)", "",
              "| kernel | template | regs | spills (st/ld B) | static smem B | threads | "
              "occupancy | SASS instr | loops | model |",
              "|---|---|---:|---|---:|---:|---|---:|---:|---|"]
    for k in result["kernels"]:
        occ = k["occupancy"]
        lines.append(f"| {k['kernel']} | {k['template']} | {k['registers']} | "
                     f"{k['spill_stores']}/{k['spill_loads']} | {k['static_smem']} | "
                     f"{occ['threads']} | {occ['warps_per_sm']} warps ({occ['occupancy']:.0%}, "
                     f"{occ['limiter']}) | {k['instructions']} | {k['loops']} | "
                     f"{k['family'] or 'no model'}"
                     + (" (group not picked for 7x7)" if k.get("picked") is False else "")
                     + " |")
    lines += ["", "Workload geometry (Monte Carlo of bench_ops' boxes, seed 0):", ""]
    seen = set()
    for r in result["ops"]:
        g = r.get("geometry")
        if g and (g["batch"], g["rois_per_image"]) not in seen:
            seen.add((g["batch"], g["rois_per_image"]))
            lines.append(f"- B={g['batch']}, {g['rois_per_image']} RoIs/img: RoIs on P2-P5 "
                         f"{g['level_share_P2_P5']}, {g['mean_samples_per_bin']} samples per bin "
                         f"(mean), {g['valid_sample_fraction']:.1%} valid, tap footprint "
                         f"{g['mean_footprint_px']} px per RoI and channel")
    return "\n".join(lines) + "\n"


TERMS = ("issue", "smem", "L1", "L2", "DRAM", "atomics", "tensor", "longest block")


def nvcc_version(nvcc):
    run = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    m = re.search(r"release ([\d.]+), V([\d.]+)", run.stdout)
    return m.group(2) if m else "unknown"


def revision_name(rev):
    if rev is None:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "csrc"],
                               capture_output=True, text=True).stdout.strip()
        return f"working tree at {head}" + (" (csrc modified)" if dirty else "")
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], capture_output=True,
                         text=True, check=True).stdout.strip()
    return f"{rev} ({sha})" if sha != rev and not rev.startswith("HEAD") else sha


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default=None,
                   help="git revision whose csrc/ to model (default: the working tree)")
    add_out_argument(p)
    p.add_argument("--tag", default=None,
                   help="file name suffix: kernel_model_<tag>.{json,md} (default: the revision, "
                        "or 'worktree')")
    p.add_argument("--jobs", type=at_least(1), default=min(2, os.cpu_count() or 1),
                   help="nvcc processes in parallel")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tools = toolchain()
    src, temporary = source_tree(args.rev)
    try:
        kernels = Kernels(compile_sources(src, args.jobs, tools))
    finally:
        if temporary:
            shutil.rmtree(src, ignore_errors=True)
    ops = model_ops(kernels)
    krows = kernel_rows(kernels)
    for k, row in zip(kernels.all, krows):
        row["occupancy"] = kernel_occupancy(k, kernel_threads(k), dynamic_smem(k))
    result = {"model": "static cost model (not a measurement)", "revision": revision_name(args.rev),
              "nvcc": nvcc_version(tools["nvcc"]), "machine": H100, "ops": ops, "kernels": krows}
    tag = args.tag or (re.sub(r"[^\w.-]", "_", args.rev) if args.rev else "worktree")
    write_results(args.out, f"kernel_model_{tag}", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
