"""benchmarks/kernel_model.py: ptxas and SASS parsing, loop finding, the loop arithmetic,
occupancy and the time terms on known cases; with nvcc, a tiny kernel compiled for sm_90."""
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import kernel_model as km  # noqa: E402

PTXAS = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z6gatherPKfPfii' for 'sm_90'
ptxas info    : Function properties for _Z6gatherPKfPfii
    8 bytes stack frame, 8 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 16384 bytes smem
ptxas info    : Compiling entry function '_Z4tinyPf' for 'sm_90'
ptxas info    : Function properties for _Z4tinyPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""

# An outer loop (0x0040-0x0110) around an inner loop unrolled twice (0x0060-0x00d0: two
# samples of 2 LDG each), one remainder sample (0x00e0-0x00f0) after it; a trap self-loop.
SASS = """\
\t\tFunction : _Z6gatherPKfPfii
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/               @P0 EXIT ;
        /*0040*/                   IMAD R2, R0, 0x4, RZ ;
        /*0050*/                   MOV R3, RZ ;
        /*0060*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0070*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0080*/                   FFMA R3, R4, R5, R3 ;
        /*0090*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;
        /*00a0*/                   LDG.E R7, desc[UR4][R2.64+0xc] ;
        /*00b0*/                   FFMA R3, R6, R7, R3 ;
        /*00c0*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;
        /*00d0*/               @P1 BRA 0x60 ;
        /*00e0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00f0*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0100*/                   STS.128 [R0], R4 ;
        /*0110*/               @!P0 BRA 0x40 ;
        /*0120*/                   EXIT ;
        /*0130*/                   BRA 0x130;
\t\t..........
\t\tFunction : _Z4tinyPf
        /*0000*/                   EXIT ;
"""


def test_ptxas_resources():
    res = km.parse_ptxas(PTXAS)
    assert res["_Z6gatherPKfPfii"] == {"registers": 64, "spill_stores": 8, "spill_loads": 16,
                                       "stack": 8, "smem": 16384, "barriers": 1}
    assert res["_Z4tinyPf"]["registers"] == 12 and res["_Z4tinyPf"]["smem"] == 0


def test_sass_loops_and_counts():
    funcs = km.parse_sass(SASS)
    assert list(funcs) == ["_Z6gatherPKfPfii", "_Z4tinyPf"]
    instrs = funcs["_Z6gatherPKfPfii"]
    assert len(instrs) == 20 and instrs[3][1] == "@P0" and instrs[3][2] == "EXIT"
    top, loops = km.find_loops(instrs)
    assert [(lp.start, lp.end) for lp in loops] == [(0x40, 0x110), (0x60, 0xd0)]  # no self-loop
    outer, inner = loops
    assert top == [outer] and inner.parent is outer and outer.children == [inner]
    assert inner.counts["global_load"] == 4 and inner.counts["fp32"] == 2
    assert inner.counts["control"] == 1 and inner.counts["total"] == 8
    assert outer.own["global_load"] == 2 and outer.own["smem_wf"] == 4  # STS.128: 4 wavefronts
    # per sample (2 LDG): the x2-unrolled body halved; the outer trip less its remainder sample
    unit = km.unit_cost(inner, ["LDG"], 2)
    assert unit["total"] == 4 and unit["global_load"] == 2
    ov = km.overhead(outer, unit, ["LDG"], 2)
    assert ov["total"] == pytest.approx(6 - 4) and ov["global_load"] == 0
    assert km.hottest(km.find_loops(instrs)[1], ["LDG"]) is not None
    with pytest.raises(km.NoModel):
        km.unit_cost(inner, ["RED"], 4)


def test_instruction_classes():
    assert km.instr_class("LDG.E.64.CONSTANT") == "global_load"
    assert km.instr_class("REDG.E.ADD.F32.FTZ.RN.STRONG.GPU") == "atomic"
    assert km.instr_class("IMAD.WIDE.U32") == "int" and km.instr_class("ULDC.64") == "int"
    assert km.instr_class("MUFU.RCP") == "mufu" and km.instr_class("I2FP.F32.S32") == "convert"
    assert km.instr_class("BSSY") == "control" and km.instr_class("FSETP.GE.AND") == "fp32"
    assert km.smem_wavefronts("LDS.64") == 2 and km.smem_wavefronts("LDG.E") == 0


def test_occupancy_on_an_h100():
    # 48 registers: 1536 per warp, 10 warps per partition -> 40 warps, 5 blocks of 256
    occ = km.occupancy(48, 10240, 256)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["limiter"]) == (5, 40, "registers")
    assert km.occupancy(54, 0, 256)["warps_per_sm"] == 32  # rounded to 56 registers
    assert km.occupancy(80, 8320, 256)["warps_per_sm"] == 24
    occ = km.occupancy(32, 48000, 256)  # 48 KB + 1 KB reserved per block: 4 in 228 KB
    assert occ["blocks_per_sm"] == 4 and occ["limiter"] == "shared memory"
    assert km.occupancy(16, 0, 128)["limiter"] == "threads"


def test_time_terms_on_a_known_case():
    m = km.H100
    c = km.Cost("k", occ={"warps_per_scheduler": 8})
    rate = m["sms"] * m["schedulers"] * m["clock_hz"] * m["issue_efficiency"]
    c.instr = Counter({"total": rate * 1e-3, "smem_wf": 0})  # 1 ms of issue
    c.dram_bytes = m["dram_bytes_per_s"] * m["dram_efficiency"] * 2e-3  # 2 ms of DRAM
    t = c.terms_us()
    assert t["issue"] == pytest.approx(1000) and t["DRAM"] == pytest.approx(2000)
    assert c.time_us() == pytest.approx(2000) and c.as_dict()["bound"] == "DRAM"
    c.occ = {"warps_per_scheduler": 4}  # half the warps: half the issue efficiency
    assert c.terms_us()["issue"] == pytest.approx(2000)
    c.blocks, c.occ = 66, {"warps_per_scheduler": 8}  # 66 blocks of 8 warps: half the SMs, 2 warps
    assert c.terms_us()["issue"] == pytest.approx(1000 * 2 * 4)
    parts = [km.torch_pass("a", 0, launches=3), km.torch_pass("b", 0)]
    t, launches = km.op_time_us(parts)
    assert launches == 4 and t == pytest.approx(4 * m["launch_cpu_us"])
    assert km.warp_iters(256, 256) == 8 and km.warp_iters(300, 256) == 10
    assert km.warp_iters(33, 256) == 2


def test_workload_geometry():
    wl = km.RoiWorkload(2, 64, traffic_sample=4)
    assert wl.K == 128 and abs(sum(wl.level_share) - 1) < 1e-9
    # detectron2's rule: 112 px boxes and smaller on P2, 448 px and larger on P5
    import numpy as np
    assert list(km.fpn_levels(np.array([[0, 0, 100, 100], [0, 0, 150, 150], [0, 0, 300, 300],
                                        [0, 0, 500, 500]], float))) == [0, 1, 2, 3]
    lo, hi, valid = km.axis_taps(-0.5, 14.0, 50)  # 14 px: 2 samples per bin
    assert lo.shape == (7, 2) and valid.all() and lo.min() == 0 and hi.max() <= 14
    tr = wl.traffic(4)
    assert 0 < tr["l1_wavefronts"] <= tr["sector_ops"]
    assert wl.summary()["K"] == 128 and 1 <= wl.mean_samples


def test_gram_splits_and_channel_groups():
    # both sides' live tiles against two waves of 132 SMs, >= 512 columns per split, the packed
    # partials (plane = Sum_g n_g^2 entries per side and split) <= 256 MB
    assert km.gram_splits(8 * 300 ** 2, 12544, 143, 2, 4) == 1      # 286 blocks fill them
    assert km.gram_splits(2 * 140 ** 2, 12544, 11, 2, 4) == 12
    assert km.gram_splits(2 * 140 ** 2, 1000, 11, 2, 4) == 1         # D // 512
    assert km.gram_splits(1 << 24, 12544, 1, 2, 4) == 2              # 2 x 128 MB
    # live tiles: tile pairs (ti <= tj) holding a row and a column of one graph, brute force
    for graphs, nodes in ((2, 140), (3, 64), (2, 300)):
        ew = km.EdgeWorkload(graphs, nodes)
        tiles = -(-ew.N // 64)
        graph = [r // nodes for r in range(ew.N)]
        want = sum(1 for ti in range(tiles) for tj in range(ti, tiles)
                   if {graph[r] for r in range(ti * 64, min(ti * 64 + 64, ew.N))}
                   & {graph[c] for c in range(tj * 64, min(tj * 64 + 64, ew.N))})
        assert km.live_gram_tiles(ew) == want, (graphs, nodes)
    # channels_per_block() for 7x7: 16 channels (fp64 8); the owner adds its 2 KB RoI list
    assert km.tile_channels(4) == (16, 4 * (14 * 32 + 16 * 49 + 16 * 7 * 32))
    assert km.tile_channels(4, km.OWNER_LIST_BYTES) == (16, 21312)
    assert km.tile_channels(8, km.OWNER_LIST_BYTES) == (8, 23104)
    assert km.tile_channels(4, 0, 14, 14)[0] == 16 and km.tile_channels(4, 0, 20, 20)[0] == 8
    assert km.tile_channels(4, 0, 28, 28)[0] == 1


def test_run_units_and_reaching_bins():
    # 32 floats from a uniform 4-B offset: 4 sectors at offset 0, 5 at the 7 others
    assert km.run_units(128, 32, 4) == pytest.approx((4 + 7 * 5) / 8)
    assert km.run_units(4, 128, 4) == 1 and km.run_units(0, 32, 4) == 0
    import numpy as np
    # 14 px along an axis, 2 samples per bin: every pixel reached by 1 or 2 consecutive bins
    lo, hi, valid = km.axis_taps(-0.5, 14.0, 50)
    first, last = int(lo[valid].min()), int(hi[valid].max())
    span = km.axis_reach(lo, hi, valid, first, last)
    assert len(span) == last - first + 1 and set(np.unique(span)) <= {1, 2} and span.min() >= 1
    assert list(km._spans(np.array([1, 2, 3]), 10, 8, 4)) == [0, 0, 1, 2]


def _assemble(rows, name="_Z1kv"):
    """SASS text from (label, opcode, operands) rows; '@NAME' in operands is a label's address."""
    addr = {lab: 16 * i for i, (lab, _, _) in enumerate(rows) if lab}
    out = [f"\t\tFunction : {name}"]
    for i, (_, op, args) in enumerate(rows):
        args = re.sub(r"@([A-Z]\w*)", lambda m: hex(addr[m.group(1)]), args)
        out.append(f"        /*{16 * i:04x}*/                   {op} {args} ;")
    return "\n".join(out) + "\n"


def _ops(*names):
    return [(None, n, "R0, R1") for n in names]


def _loop(label, body):
    """A loop: its counter, the body, a predicated branch back."""
    return [(label, "IADD3", "R9, R9, 0x1, RZ")] + body + [(None, "@P0 BRA", "@" + label)]


def _owner_like(with_column=True):
    """A kernel shaped as the owner backward with CPB = 2: chunk > per-RoI > {weights (y, x
    sample loops), upstream (x2), reaching (x4), column (q), rows}."""
    sample = _ops("MUFU.RCP", "FFMA", "LDS", "STS")
    weights = _loop("W", _ops("STS.128") + _loop("Y", sample) + _loop("X", sample))
    upstream = _loop("U", _ops("LDG.E", "STS", "LDG.E", "STS"))
    reach = _loop("R", _ops(*(["LDS", "FSETP.NEU.AND", "SEL", "SEL"] * 4)))
    column = _loop("C", _loop("Q", _ops("LDS", "LDS", "FFMA")) + _ops("STS"))
    rows = _loop("P", _ops("LDS", "FFMA", "LDS", "FFMA"))
    roi = _loop("K", _ops("LDG.E.CONSTANT") + weights + upstream + _ops("BAR.SYNC") + reach
                + (column if with_column else []) + _ops("BAR.SYNC") + rows + _ops("SEL", "SEL"))
    return (_ops("S2R") + _loop("H", _ops("LDG.E", "VOTE.ANY", "BAR.SYNC") + roi)
            + _ops("STG.E") + [(None, "EXIT", "")])


def _kernel(rows, demangled):
    (instrs,) = km.parse_sass(_assemble(rows)).values()
    return km.Kernel("_Z1kv", demangled, "x.cu", instrs, {"registers": 64})


def test_tile_steps_found_by_content():
    k = _kernel(_owner_like(), "void ns::backward_owner_kernel<float, float, 2>(int)")
    assert (k.name, k.dtype, k.cpb) == ("backward_owner_kernel", "float32", 2)
    s = km.TileSteps(k, 2, 2)
    by_start = {lp.start: lp for lp in k.loops}
    assert s.step.parent is not None and s.step.parent.parent is None  # per-RoI in chunk
    assert s.rows.counts["op:FFMA"] == 2 and s.row_units == 1
    assert s.q.parent is s.column and s.q_units == 1 and s.column.own["op:STS"] == 1
    assert len(s.samples) == 2 and s.sample_units == [1, 1] and s.weights in by_start.values()
    assert s.upstream.counts["op:LDG"] == 2 and s.upstream_in_step
    # 2 x 49 elements: lanes 0-97 load 1, the rest 0: whole x2 bodies run by no warp
    assert s.upstream_trips == 0
    # reaching_bins x4 over 7 bins: 1 trip per instance (one instance here), 3 bins left over
    assert s.reach_cost["total"] == 8 * s.reach[0].counts["total"]
    # 2 SEL in the step's own code = 1 bin of reaching_bins' remainder: 5 instances x 3 bins
    # expected, so nothing is taken out
    assert s.step_code["total"] == s.step.own["total"]
    t = s.trips(3, 2, 2, np.array([0, 1, 2, 2, 1] + [0] * 27), th=5)
    assert t["tile_weights y"] == 3 and t["tile_weights x"] == 2 and t["add_rows"] == 6
    assert t["column_sums bins"] == 2 * 7 * 2 and t["atomics"] == 0


def test_guarded_atomics():
    lines = [("L", "IMAD", "R0, R1, R2, RZ"),
             (None, "ISETP.GE.AND", "P1, PT, R0, R3, PT"),
             (None, "@P1 BRA", "@E"),
             (None, "IMAD.WIDE.U32", "R4, R0, 0x4, R6"),
             (None, "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU", "desc[UR4][R4.64], R8"),
             ("E", "BSYNC", "B0"),
             (None, "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU", "desc[UR4][R4.64], R9"),  # unguarded
             (None, "@P0 BRA", "@L"),
             (None, "EXIT", "")]
    (instrs,) = km.parse_sass(_assemble(lines)).values()
    (loop,) = km.find_loops(instrs)[1]
    total, n = km.guarded_blocks(loop, km.ATOMICS)
    assert n == 1 and total["total"] == 2 and total["op:REDG"] == 1


def test_no_model_when_a_step_is_missing():
    """A kernel without column_sums' loop is reported as 'no model', not a crash."""
    k = _kernel(_owner_like(with_column=False),
                "void ns::backward_owner_kernel<float, float, 16>(int)")
    with pytest.raises(km.NoModel):
        km.TileSteps(k, 16, 16)
    wl = km.RoiWorkload(1, 8, traffic_sample=2)
    parts, missing = km.op_roi_backward_owner(km.Kernels([k]), wl, "float32", 4)
    assert any("no model" in m for m in missing) and any("footprint_kernel" in m for m in missing)
    parts, missing = km.op_roi_backward_owner(km.Kernels([k]), wl, "bfloat16", 2)
    assert any("no kernel matches" in m and "16 channels" in m for m in missing)


def _toolchain():
    try:
        return km.toolchain()
    except RuntimeError as e:
        pytest.skip(f"kernel_model needs nvcc and cuobjdump: {e}")


TINY_CU = r"""
__global__ void gather(const float* __restrict__ x, float* __restrict__ out, int n, int taps) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int t = 0; t < taps; ++t) s += x[(i + 7 * t) % n] * x[(3 * i + t) % n];
  out[i] = s;
}
"""


def test_tiny_kernel_compiled_for_sm90(tmp_path):
    """nvcc -cubin for sm_90 with -Xptxas -v, cuobjdump -sass, demangling, the loop found with
    its two loads per trip (no torch headers: a few seconds)."""
    tools = _toolchain()
    cu = tmp_path / "tiny.cu"
    cu.write_text(TINY_CU)
    cubin, log = km.compile_cubin(tools["nvcc"], str(cu), str(tmp_path), ["-O3"], [])
    res = km.parse_ptxas(log)
    (name,) = [n for n in res if "gather" in n]
    assert 0 < res[name]["registers"] <= 255 and res[name]["spill_stores"] == 0
    sass = subprocess.run([tools["cuobjdump"], "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    funcs = km.parse_sass(sass)
    k = km.Kernel(name, km.demangle([name], tools["demangler"])[name], "tiny.cu", funcs[name],
                  res[name])
    assert k.name == "gather"
    loop = km.hottest(k.innermost(), ["LDG"])
    unit = km.unit_cost(loop, ["LDG"], 2)
    assert unit["global_load"] == 2 and unit["fp32"] >= 1 and unit["total"] > 4


def test_arguments():
    import common

    args = km.parse_args([])
    assert args.out == common.SCRATCH_OUT and args.rev is None and args.jobs >= 1
    args = km.parse_args(["--rev", "HEAD", "--tag", "after", "--jobs", "3", "--out", "x"])
    assert (args.rev, args.tag, args.jobs, args.out) == ("HEAD", "after", 3, "x")
    with pytest.raises(SystemExit):
        km.parse_args(["--jobs", "0"])
