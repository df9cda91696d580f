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
import json
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
FORWARD_CHANNELS_PER_BLOCK = 32  # forward_channels_per_block() at these K (K*8 >= 4*132 blocks)


def per_output_gather(kernel, wl, elem_bytes, scatter=False):
    """RoIAlign forward or atomic backward: a warp holds 32 consecutive outputs (c, bin) of one
    RoI, loops over the bin's sample rows (iy, gh trips) and samples (ix, gw trips), and per
    sample loads (forward) or atomically adds (backward) 4 taps.
    - the sample loop is the innermost loop with the most LDG (RED for the backward), 4 per
      sample; its parent is the row loop, whose parent is the output loop;
    - every sample's body is executed (the `valid` skip is taken only outside the image, < 1 %
      of the samples here), trip counts are uniform over a warp (one RoI per warp);
    - a design with a loop above the output loop is the block-per-(RoI, 32 channels) forward:
      what lies outside the output loop (geometry, tap tables) runs once per warp per block;
      otherwise one thread per output: it runs once per warp;
    - memory: the lines and sectors of warp_traffic (NCHW), the output written once; DRAM reads
      the RoIs' tap footprints once each, capped at the pyramid (L2 keeps one RoI's reuse); the
      atomic buffer is read and written once per touched fp32 element."""
    ops = ATOMICS if scatter else LOADS
    sample = hottest(kernel.innermost(), ops)
    row = sample.parent
    out = row.parent if row else None
    if out is None:
        raise NoModel("expected the sample loop inside a row loop inside an output loop")
    u = unit_cost(sample, ops, 4)
    ov_row, ov_out = overhead(row, u, ops, 4), overhead(out, u, ops, 4)
    outside = function_outside(kernel, out)
    per_block = out.parent is not None
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256))
    cost.blocks = (wl.K * CHANNELS // FORWARD_CHANNELS_PER_BLOCK if per_block
                   else math.ceil(wl.K * CHANNELS * BINS / 256))
    warp_iters_per_roi = CHANNELS * BINS / 32
    outside_warps_per_roi = (CHANNELS / FORWARD_CHANNELS_PER_BLOCK * 8 if per_block
                             else warp_iters_per_roi)
    for roi in wl.rois:
        cost.instr.update(scaled(add(ov_out, scaled(ov_row, roi.gh), scaled(u, roi.samples)),
                                 warp_iters_per_roi))
        cost.instr.update(scaled(outside, outside_warps_per_roi))
    groups = wl.K * CHANNELS / 32
    tr = wl.traffic(4 if scatter else elem_bytes)
    out_bytes = wl.K * CHANNELS * BINS * elem_bytes
    touched = min(wl.footprint_px * CHANNELS, wl.batch * roofline.pyramid_elements())
    if scatter:
        cost.l1_wavefronts = tr["l1_wavefronts"] * groups + wl.K * warp_iters_per_roi
        cost.atomic_sector_ops = tr["sector_ops"] * groups  # their L2 traffic is this term
        cost.l2_bytes = out_bytes
        cost.dram_bytes = out_bytes + 2 * touched * 4
    else:
        cost.l1_wavefronts = tr["l1_wavefronts"] * groups + wl.K * warp_iters_per_roi
        cost.l2_bytes = tr["l2_sectors"] * groups * 32 + out_bytes
        cost.dram_bytes = out_bytes + touched * elem_bytes
    cost.hot_loops = [loop_summary("per sample", sample, u),
                      {"loop": "per sample row", "address": row.describe(),
                       "total": round(ov_row["total"], 1)},
                      {"loop": "per output", "address": out.describe(),
                       "total": round(ov_out["total"], 1)},
                      {"loop": "outside the output loop, per warp and "
                               + ("block" if per_block else "thread"),
                       "total": round(outside["total"], 1)}]
    cost.notes.append("block per (RoI, 32 channels)" if per_block else "thread per output")
    return cost


OWNER_TILE = 32


def owner_channels(acc_bytes, ph=POOLED, pw=POOLED, threads=256):
    """owner_channels_per_block(): channels and dynamic shared memory per block."""
    for cpb in (8, 4, 2, 1):
        nbytes = (acc_bytes * (cpb * OWNER_TILE ** 2 + (ph + pw) * OWNER_TILE
                               + cpb * ph * OWNER_TILE) + 8 * threads)
        if nbytes <= 46 * 1024:
            return cpb, nbytes
    return 0, 0


def owner_backward(kernel, wl, elem_bytes):
    """Deterministic owner-computes backward: one block per (32x32 tile of a level of an image,
    8 channels), 256 threads. Loops, found by their content:
    - weight loops (wy, wx): parents of the innermost loops with MUFU (one IEEE division, one
      MUFU.RCP, per grid sample of axis_pixel_weight); 7 x hh (7 x ww) entries, gh (gw) samples;
    - t1 loop: parent of the innermost loop with LDG (one grad load per bin column q, 7 trips),
      8 x 7 x ww entries; acc loop: parent of the innermost loop with LDS + FFMA and no LDG
      (one FFMA per bin row p, 7 trips), 8 x hh x ww entries; their parent is the per-RoI loop
      (8 warps each run its own code), whose parent walks the bucket in chunks of 256 RoIs;
    - zero-fill (STS) and write-out (STG) loops over the tile, once per block;
    - each tile sees exactly the RoIs of the workload whose tap extents overlap it (hh x ww the
      overlap); global loads of grad: 2 L1 wavefronts each (lanes along x share (c, p));
    - DRAM: the pyramid gradient written once in the features' dtype, grad read once."""
    inner = kernel.innermost()
    w_inner = [lp for lp in inner if marker_count(lp.counts, ["MUFU"])
               and marker_count(lp.counts, ["FFMA"]) and lp.parent
               and not marker_count(lp.counts, ["LDG", "LDS", "STS"])]
    q_inner = [lp for lp in inner if marker_count(lp.counts, ["LDG"])
               and marker_count(lp.counts, ["FFMA"]) and lp.parent]
    p_inner = [lp for lp in inner if marker_count(lp.counts, ["LDS"])
               and marker_count(lp.counts, ["FFMA"]) and not marker_count(lp.counts, ["LDG"])
               and not marker_count(lp.counts, ["MUFU"]) and lp.parent]
    if not (w_inner and q_inner and p_inner):
        raise NoModel("expected weight (MUFU), t1 (LDG+FFMA) and acc (LDS+FFMA) loops")
    weights = sorted({id(lp.parent): lp.parent for lp in w_inner}.values(), key=lambda lp: lp.start)
    t1 = hottest(q_inner, ["LDG"]).parent
    acc = hottest(p_inner, ["FFMA"]).parent
    per_roi = t1.parent
    if len(weights) != 2 or per_roi is None or acc.parent is not per_roi or any(
            w.parent is not per_roi for w in weights) or per_roi.parent is None:
        raise NoModel("weight, t1 and acc loops are not siblings inside a per-RoI loop")
    chunk = per_roi.parent
    u_s = unit_cost(hottest(w_inner, ["MUFU"]), ["MUFU"], 1)
    u_q = unit_cost(hottest(q_inner, ["LDG"]), ["LDG"], 1)
    u_p = unit_cost(hottest(p_inner, ["FFMA"]), ["FFMA"], 1)
    ov_wy, ov_wx = (overhead(w, u_s, ["MUFU"], 1) for w in weights)
    ov_t1, ov_acc = overhead(t1, u_q, ["LDG"], 1), overhead(acc, u_p, ["FFMA"], 1)
    ov_roi, ov_chunk = per_roi.own, chunk.own
    outer = [lp for lp in kernel.loops if not (chunk.start <= lp.start <= chunk.end)]
    zero = [lp for lp in outer if not lp.children and marker_count(lp.counts, ["STS"])
            and not marker_count(lp.counts, ["LDS", "LDG"])]
    write = [lp for lp in outer if not lp.children and marker_count(lp.counts, ["STG"])]
    if not zero or not write:
        raise NoModel("expected a zero-fill (STS) and a write-out (STG) loop")
    u_zero = unit_cost(hottest(zero, ["STS"]), ["STS"], 1)
    u_write = unit_cost(hottest(write, ["STG"]), ["STG"], 1)
    outside = function_outside(kernel, chunk)
    for lp in outer:
        if lp.parent is None:
            outside.subtract(lp.counts)
    cpb, smem = owner_channels(4 if elem_bytes <= 4 else 8)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256, smem))
    groups = math.ceil(CHANNELS / cpb)
    E = OWNER_TILE
    block_costs, shares = [], Counter()
    for image in range(wl.batch):
        for level, (H, W) in enumerate(LEVEL_HW):
            bucket = [r for r in wl.rois if r.image == image and r.level == level
                      and r.extent is not None]
            ext = np.array([r.extent for r in bucket]).reshape(-1, 4)
            for y0 in range(0, H, E):
                for x0 in range(0, W, E):
                    th, tw = min(E, H - y0), min(E, W - x0)
                    c = add(scaled(outside, 8), scaled(u_zero, math.ceil(cpb * E * E / 32)),
                            scaled(u_write, math.ceil(cpb * th * tw / 32)),
                            scaled(ov_chunk, 8 * math.ceil(len(bucket) / 256)))
                    if len(bucket):
                        hh = np.minimum(ext[:, 1], y0 + th - 1) - np.maximum(ext[:, 0], y0) + 1
                        ww = np.minimum(ext[:, 3], x0 + tw - 1) - np.maximum(ext[:, 2], x0) + 1
                        for i in np.nonzero((hh > 0) & (ww > 0))[0]:
                            r, h, w = bucket[i], int(hh[i]), int(ww[i])
                            split = {
                                "per-RoI code": scaled(ov_roi, 8),
                                "weights": add(
                                    scaled(add(ov_wy, scaled(u_s, r.gh)),
                                           warp_iters(POOLED * h, 256)),
                                    scaled(add(ov_wx, scaled(u_s, r.gw)),
                                           warp_iters(POOLED * w, 256))),
                                "t1": scaled(add(ov_t1, scaled(u_q, POOLED)),
                                             warp_iters(cpb * POOLED * w, 256)),
                                "acc": scaled(add(ov_acc, scaled(u_p, POOLED)),
                                              warp_iters(cpb * h * w, 256))}
                            for part, cc in split.items():
                                c.update(cc)
                                shares[part] += cc["total"] * groups
                    block_costs.append(c)
    for c in block_costs:
        cost.instr.update(scaled(c, groups))
    cost.critical_warp_instr = max(c["total"] for c in block_costs)
    cost.blocks = len(block_costs) * groups
    total = cost.instr["total"]
    shares["tile (zero, write, chunks)"] = total - sum(
        v for k, v in shares.items() if k != "tile (zero, write, chunks)")
    cost.notes.append("warp-instructions: " + ", ".join(
        f"{k} {v / total:.0%}" for k, v in shares.items()))
    grad_bytes = wl.K * CHANNELS * BINS * elem_bytes
    pyramid_bytes = wl.batch * roofline.pyramid_elements() * elem_bytes
    cost.l1_wavefronts = 2 * cost.instr.get("op:LDG", 0) + cost.instr.get("op:STG", 0)
    cost.l2_bytes = 32 * cost.instr.get("op:LDG", 0) + pyramid_bytes
    cost.dram_bytes = pyramid_bytes + grad_bytes
    cost.hot_loops = [loop_summary("acc: per bin row p", acc.children[0] if acc.children else acc,
                                   u_p),
                      loop_summary("t1: per bin column q", t1.children[0] if t1.children else t1,
                                   u_q),
                      loop_summary("weights: per grid sample", hottest(w_inner, ["MUFU"]), u_s),
                      {"loop": "per RoI and tile", "address": per_roi.describe(),
                       "total": round(ov_roi["total"], 1)}]
    cost.notes.append(f"{cpb} channels/block, {smem} B dynamic shared memory, "
                      f"{len(block_costs) * groups} blocks")
    return cost


GEMM_TILE, GEMM_STEP = 64, 16


def gram_splits(N, D, G, elem_size, sms=H100["sms"]):
    """edge_loss_kernel.cu's gram_splits() on 132 SMs."""
    mean = N // max(G, 1)
    t = (mean + GEMM_TILE - 1) // GEMM_TILE + 1
    tiles_all = (N + GEMM_TILE - 1) // GEMM_TILE
    live = max(1, min(max(G, 1) * t * (t + 1) // 2, tiles_all * (tiles_all + 1) // 2))
    s = (2 * sms + live - 1) // live
    s = min(s, max(1, D // 512))
    budget = (256 << 20) // max(1, N * N * elem_size)
    return max(1, min(s, budget, 32))


def _gemm_loop(kernel):
    loop = hottest(kernel.loops, ["FFMA", "HMMA"])
    per_step = GEMM_TILE * GEMM_TILE * GEMM_STEP // 256  # FMAs per thread per 16-wide k-step
    if marker_count(loop.counts, ["HMMA"]):
        raise NoModel("tensor-core GEMM: no formula yet")
    return loop, unit_cost(loop, ["FFMA"], per_step)


def block_gram(kernel, ew, elem_bytes):
    """Block-diagonal Gram X X^T: 64x64 tiles (tj >= ti) that hold a same-graph pair, split-K as
    gram_splits() picks; per 16-wide k-step each thread does 256 FFMA (the unit of the k loop).
    Blocks that exit at once cost 16 warp-instructions per warp. Loads: 2 L1 wavefronts per LDG
    (half-warps read 16 consecutive k of two rows); L2 traffic: both 64-row tiles per k-step;
    DRAM: X read once, the partial tiles written (mirrored) once."""
    loop, u = _gemm_loop(kernel)
    outside = function_outside(kernel, loop)
    N, D = ew.N, ew.dim
    tiles = math.ceil(N / GEMM_TILE)
    splits = gram_splits(N, D, ew.graphs, 4)
    k_chunk = max(GEMM_STEP, math.ceil(math.ceil(D / splits) / GEMM_STEP) * GEMM_STEP)
    used = math.ceil(D / k_chunk)
    live = sum(1 for ti in range(tiles) for tj in range(ti, tiles)
               if tj * GEMM_TILE < ew.graph_end(min((ti + 1) * GEMM_TILE, N) - 1))
    steps = sum(math.ceil((min(k0 + k_chunk, D) - k0) / GEMM_STEP) for k0 in range(0, D, k_chunk))
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256))
    cost.blocks = live * used
    cost.instr = add(scaled(u, live * steps * 8), scaled(outside, live * used * 8),
                     Counter({"total": (tiles * tiles * used - live * used) * 8 * 16}))
    cost.l1_wavefronts = 2 * cost.instr.get("op:LDG", 0)
    cost.l2_bytes = live * steps * 2 * GEMM_TILE * GEMM_STEP * elem_bytes
    cost.dram_bytes = N * D * elem_bytes + live * used * 2 * GEMM_TILE ** 2 * 4
    cost.hot_loops = [loop_summary("per 16-wide k-step", loop, u)]
    cost.notes.append(f"{live} live tiles of {tiles * (tiles + 1) // 2}, {used} K-splits")
    return cost


def factor_matmul(kernel, ew, elem_bytes):
    """dX = M X on the diagonal blocks: one block per (64 rows, 64 feature columns), the rows'
    graph columns in 16-wide steps (256 FFMA per thread per step). 2 L1 wavefronts per LDG;
    L2: the M (fp32) and X tiles per step; DRAM: X read, dX written, M's blocks read once."""
    loop, u = _gemm_loop(kernel)
    outside = function_outside(kernel, loop)
    N, D = ew.N, ew.dim
    col_blocks = math.ceil(D / GEMM_TILE)
    steps = 0
    for r0 in range(0, N, GEMM_TILE):
        r_last = min(r0 + GEMM_TILE, N) - 1
        steps += math.ceil((ew.graph_end(r_last) - ew.graph_start(r0)) / GEMM_STEP)
    blocks = col_blocks * math.ceil(N / GEMM_TILE)
    cost = Cost(kernel.name, kernel, kernel_occupancy(kernel, 256))
    cost.blocks = blocks
    cost.instr = add(scaled(u, steps * col_blocks * 8), scaled(outside, blocks * 8))
    cost.l1_wavefronts = 2 * cost.instr.get("op:LDG", 0)
    cost.l2_bytes = steps * col_blocks * GEMM_STEP * GEMM_TILE * (4 + elem_bytes)
    cost.dram_bytes = 2 * N * D * elem_bytes + ew.graphs * ew.nodes ** 2 * 4
    cost.hot_loops = [loop_summary("per 16-wide step over the graph's columns", loop, u)]
    cost.notes.append(f"{blocks} blocks")
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


def _blocks_bytes(per_entry):
    return lambda ew: ew.graphs * ew.nodes ** 2 * per_entry


FAMILIES = [
    # (name pattern, formula, dtype the instantiation is picked by: 'T' features, 'acc' float)
    (r"^forward_kernel$", lambda k, w, b: per_output_gather(k, w, b), "T"),
    (r"^backward_atomic_kernel$", lambda k, w, b: per_output_gather(k, w, b, scatter=True), "T"),
    (r"^backward_owner_kernel$", owner_backward, "T"),
    (r"^footprint_kernel$", elementwise(lambda wl: wl.K * 64, "one thread per RoI (64 B)"), "acc"),
    (r"^block_gram_kernel$", block_gram, "T"),
    (r"^block_factor_matmul_kernel$", factor_matmul, "T"),
    (r"^sum_splits_kernel$", elementwise(_blocks_bytes(3 * 4), "2 partials read, 1 written"),
     "acc"),
    (r"^norms_kernel$", elementwise(lambda ew: ew.N * 37, "diagonal read, norms written"), "acc"),
    (r"^normalize_kernel$", elementwise(_blocks_bytes(8), "G read and written"), "acc"),
    (r"^loss_and_grads_kernel$", elementwise(_blocks_bytes(12), "E_s, E_t read, S_s written"),
     "acc"),
    (r"^factor_kernel$", elementwise(_blocks_bytes(16), "S, E read, S read and written"), "acc"),
    (r"^symmetrize_kernel$", elementwise(_blocks_bytes(12), "G, G^T read, S written"), "acc"),
    (r"^ranges_from_(host|device)_offsets_kernel$", elementwise(lambda ew: ew.N * 16,
                                                                "ranges written"), None),
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

    def find(self, pattern, dtype):
        for k in self.all:
            if re.match(pattern, k.name) and (dtype is None or k.dtype == dtype):
                return k
        return None


def torch_pass(name, nbytes, launches=1):
    c = streaming_cost(name, nbytes, "torch kernel, modelled by its bytes")
    c.launches = launches
    return c


def _model_part(kernels, pattern, dtype, wl, elem_bytes, parts, missing):
    k = kernels.find(pattern, dtype)
    if k is None:
        missing.append(f"no kernel matches {pattern} ({dtype})")
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
    parts.append(torch_pass("zero-fill of the fp32 level buffers", pyr * 4, launches=4))
    _model_part(kernels, r"^backward_atomic_kernel$", dtype, wl, eb, parts, missing)
    if eb != 4:
        parts.append(torch_pass("cast of the level buffers", pyr * (4 + eb), launches=4))
    return parts, missing


def op_roi_backward_owner(kernels, wl, dtype, eb):
    parts, missing = [], []
    if dtype != "float32":
        parts.append(torch_pass("rois to float32", wl.K * 5 * 6))
    _model_part(kernels, r"^footprint_kernel$", "float32", wl, eb, parts, missing)
    parts.append(torch_pass("stable argsort of the bucket keys", wl.K * 8 * 8, launches=4))
    parts.append(torch_pass("index_select, arange, searchsorted", wl.K * 8 * 4, launches=3))
    _model_part(kernels, r"^backward_owner_kernel$", dtype, wl, eb, parts, missing)
    return parts, missing


def op_edge_loss(kernels, ew, dtype, eb):
    """_edge_mse_loss_forward (student needs grad, teacher not) + _edge_factor_matmul, as
    edge_loss.cpp drives them: layout, per side a zeroed [N, N] Gram, the Gram (+ split sum),
    norms and normalize; the loss with S_s zeroed first, the factor; then layout and M X."""
    parts, missing = [], []
    nn4 = ew.N * ew.N * 4
    _model_part(kernels, r"^ranges_from_host_offsets_kernel$", None, ew, eb, parts, missing)
    for _ in range(2):  # student, teacher
        parts.append(torch_pass("zeros [N, N] for the Gram", nn4))
        _model_part(kernels, r"^block_gram_kernel$", dtype, ew, eb, parts, missing)
        if gram_splits(ew.N, ew.dim, ew.graphs, 4) > 1:
            _model_part(kernels, r"^sum_splits_kernel$", "float32", ew, eb, parts, missing)
    for _ in range(2):
        _model_part(kernels, r"^norms_kernel$", "float32", ew, eb, parts, missing)
        _model_part(kernels, r"^normalize_kernel$", "float32", ew, eb, parts, missing)
    parts.append(torch_pass("zeros [N] + S_s.zero_()", nn4 + ew.N * 4, launches=2))
    _model_part(kernels, r"^loss_and_grads_kernel$", "float32", ew, eb, parts, missing)
    parts.append(torch_pass("row losses summed", ew.N * 4))
    _model_part(kernels, r"^factor_kernel$", "float32", ew, eb, parts, missing)
    if dtype != "float32":
        parts.append(torch_pass("loss to the features' dtype", 8))
    _model_part(kernels, r"^ranges_from_host_offsets_kernel$", None, ew, eb, parts, missing)
    _model_part(kernels, r"^block_factor_matmul_kernel$", dtype, ew, eb, parts, missing)
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
                         else roofline.edge_loss_floor_us(batch, nodes, ew.dim, eb))
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
                    "family": None if fn is None else (
                        "per_output_gather" if fn.__name__ == "<lambda>" else fn.__name__),
                    "mangled": k.mangled})
    return out


def kernel_threads(k):
    if k.source.startswith("multilevel") or "matmul" in k.name or "gram" in k.name:
        return 256
    return 128


def dynamic_smem(k):
    if k.name == "backward_owner_kernel":
        return owner_channels(8 if k.dtype == "float64" else 4)[1]
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
                     f"{k['family'] or 'no model'} |")
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


TERMS = ("issue", "smem", "L1", "L2", "DRAM", "atomics", "longest block")


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
    return f"{rev} ({sha})" if sha != rev else sha


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
