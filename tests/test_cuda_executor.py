"""The project's CUDA kernels executed on the CPU by its own executor (tests/cudasim/README.md).

No GPU is needed: csrc/ops/cuda/*.cu is translated, compiled with AddressSanitizer and
UndefinedBehaviorSanitizer (and with ThreadSanitizer for the race checks) and run with CUDA's
thread/block semantics on a simulated torch device. First the executor proves it can fail (each
planted defect of tests/cudasim/selftest.cu is caught), then every kernel runs the adversarial
cases of tests/cudasim/cases.py under three schedules against the CPU ops.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

CUDASIM = os.path.join(ROOT, "tests", "cudasim")
sys.path.insert(0, CUDASIM)
import build as cudasim_build  # noqa: E402
import runner  # noqa: E402

# thread/block orders; the last also fills fresh memory with NaN bytes instead of random ones
SCHEDULES = "forward:0,reverse:0,random:7,random:3:nan"
SELFTEST = os.path.join(CUDASIM, "selftest.cu")


def selftest_line(text):
    """Line of selftest.cu holding `text` (the planted defect)."""
    with open(SELFTEST) as f:
        for i, line in enumerate(f, 1):
            if text in line:
                return i
    raise AssertionError(f"{text!r} not in selftest.cu")


@pytest.fixture(scope="module")
def asan_lib():
    return cudasim_build.build("asan")


@pytest.fixture(scope="module")
def tsan_lib():
    return cudasim_build.build("tsan")


def run(lib, variant, args, timeout=600):
    env = runner.env(variant)
    env["CUDASIM_LIB"] = lib
    env["CUDASIM_SCHEDULES"] = SCHEDULES
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


THREE = ("forward:0:random", "reverse:0:random", "random:7:random")
# planted defects the executor reports as errors (one process runs them all; the opt-in case
# last: cudaFuncSetAttribute lasts for the process)
REPORTED = ["exit_before_barrier", "divergent_barriers", "ballot_exited_lane", "too_many_threads",
            "launch_bounds", "grid_y", "empty_grid", "dynamic_smem_48k", "dynamic_smem_opt_in"]


def selftest(lib, cases, runs=THREE, variant="asan"):
    r = run(lib, variant, [os.path.join(CUDASIM, "selftest.py"), ",".join(cases), *runs])
    assert r.returncode == 0, f"{cases}: exit {r.returncode}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reported(asan_lib):
    return selftest(asan_lib, REPORTED)


# --- the executor can fail ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ran(asan_lib):
    res = selftest(asan_lib, ["neighbour", "warp_ops", "missing_barrier"])
    res.update(selftest(asan_lib, ["uninitialised_shared"],
                        ["forward:0:nan", "forward:1:random", "forward:2:random"]))
    return res


def test_correct_kernels_pass_under_every_schedule(ran):
    expected = [(t + 1) % 64 for t in range(64)]
    for run_, res in ran["neighbour"].items():
        assert res["out"][:64] == expected, run_
    for run_, res in ran["warp_ops"].items():
        out = res["out"]
        assert out[0] == 0x49249249 and out[1] == 496, run_  # ballot, shuffle sum
        assert out[2:32] == [11] * 30, run_  # popc of the ballot
        for t in range(64):  # shuffle up by 3 (own value below 3), xor 5 within groups of 8
            lane = t % 32
            up = lane - 3 if lane >= 3 else lane
            x8 = lane ^ 5 if (lane ^ 5) // 8 <= lane // 8 else lane
            assert out[64 + t] == up * 100 + x8, (run_, t)


def test_missing_barrier_is_caught(ran):
    """Threads read their neighbour's shared word with no barrier between write and read: under
    some schedule a reader runs before the writer and sees garbage."""
    expected = [(t + 1) % 64 for t in range(64)]
    results = ran["missing_barrier"]
    assert any(res["out"][:64] != expected for res in results.values()), results


def test_uninitialised_shared_memory_is_caught(ran):
    """Shared memory is garbage at every block's start: all -1 (NaN bytes) in fill mode nan,
    different random words for different seeds."""
    res = ran["uninitialised_shared"]
    assert res["forward:0:nan"]["out"][:64] == [-1] * 64
    assert res["forward:1:random"]["out"][:64] != res["forward:2:random"]["out"][:64]


@pytest.mark.parametrize("case,message", [
    ("exit_before_barrier", r"barrier divergence: 63 threads wait at __syncthreads\(\) "
     r"\(tests/cudasim/selftest.cu:{}\) while 1 threads of the block have exited"),
    ("divergent_barriers", r"threads wait at different __syncthreads\(\): 32 at "
     r"tests/cudasim/selftest.cu:{}"),
    ("ballot_exited_lane", r"__ballot_sync at tests/cudasim/selftest.cu:{} with mask 0xffffffff: "
     r"lane 5 of the mask is exited"),
])
def test_divergence_is_caught(reported, case, message):
    line = selftest_line("planted: " + case.replace("_", " ").replace("ballot ", ""))
    for run_, res in reported[case].items():
        assert "error" in res, f"{case} under {run_} was not caught"
        assert re.search(message.format(line), res["error"]), res["error"]


@pytest.mark.parametrize("case,message", [
    ("too_many_threads", r"block \(2048, 1, 1\) exceeds the limits"),
    ("launch_bounds", r"block of 256 threads exceeds __launch_bounds__\(128\)"),
    ("grid_y", r"grid \(1, 70000, 1\) exceeds the limits"),
    ("empty_grid", r"invalid configuration: empty grid \(0, 1, 1\)"),
    ("dynamic_smem_48k", r"65536 bytes of dynamic shared memory exceed the 49152 bytes allowed "
     r"without cudaFuncSetAttribute opt-in"),
])
def test_launch_limits_are_caught(reported, case, message):
    for res in reported[case].values():
        assert "error" in res and re.search(message, res["error"]), res


def test_opted_in_dynamic_shared_memory_runs(reported):
    for res in reported["dynamic_smem_opt_in"].values():
        assert res.get("out", [])[:64] == [1] * 64, res


@pytest.mark.parametrize("case,where,report", [
    ("global_out_of_bounds", "out[n] = 1;", "AddressSanitizer: heap-buffer-overflow"),
    # UBSan sees the typed shared array's bound before ASan sees its allocation's end
    ("shared_out_of_bounds", "buf[threadIdx.x + 1] = 1;",
     "runtime error: index 64 out of bounds for type 'int [64]'"),
    # dynamic shared memory is exactly the launch's size
    ("dynamic_shared_out_of_bounds", "planted: past the launch's dynamic shared memory",
     "AddressSanitizer: heap-buffer-overflow"),
])
def test_out_of_bounds_access_is_caught(asan_lib, case, where, report):
    r = run(asan_lib, "asan", [os.path.join(CUDASIM, "selftest.py"), case])
    assert r.returncode != 0, f"{case} was not caught:\n{r.stdout}"
    assert report in r.stderr, r.stderr[-3000:]
    assert f"tests/cudasim/selftest.cu:{selftest_line(where)}" in r.stderr, r.stderr[-3000:]


def test_race_is_caught(tsan_lib):
    """Two threads write one shared word between the same barriers: same result under every
    schedule, so only the race detector (ThreadSanitizer, told CUDA's ordering) sees it; a read
    of a neighbour's word without the barrier too."""
    for case, line in [("shared_race", "flag = 7"),
                       ("missing_barrier", "out[blockIdx.x * kBlock + threadIdx.x] = buf["),
                       ("race_between_barriers", "planted: race between barriers")]:
        r = run(tsan_lib, "tsan", [os.path.join(CUDASIM, "selftest.py"), case])
        assert r.returncode != 0 and "ThreadSanitizer: data race" in r.stderr, r.stderr[-3000:]
        assert f"tests/cudasim/selftest.cu:{selftest_line(line)}" in r.stderr, r.stderr[-3000:]
    # correct kernels (barrier-separated accesses, warp collectives) are race free
    selftest(tsan_lib, ["neighbour", "warp_ops"], ["forward:0:random"], variant="tsan")


# --- the project's kernels ----------------------------------------------------------------------

def test_cuda_kernels_on_the_executor(asan_lib):
    """Every kernel of csrc/ops/cuda on the adversarial cases, three schedules, ASan + UBSan."""
    # -s: a sanitizer report ends the process; uncaptured, it reaches the output checked here
    r = run(asan_lib, "asan", ["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--tb=short",
                               os.path.join(CUDASIM, "cases.py")], timeout=1500)
    assert r.returncode == 0, (r.stdout[-8000:] + r.stderr[-4000:])
    assert re.search(r"\d+ passed", r.stdout) and " failed" not in r.stdout, r.stdout[-3000:]


def test_cuda_kernels_race_free(tsan_lib):
    """The same cases (one schedule: TSan sees the unordered pairs whatever the order) with
    ThreadSanitizer: no two threads of a launch touch one address without a barrier, warp
    collective or atomic between them."""
    env = runner.env("tsan")
    env.update(CUDASIM_LIB=tsan_lib, CUDASIM_SCHEDULES="forward:0",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    # the dtype variants run the same code: float64 and the half types' paths are enough here;
    # the autograd case runs kernels from torch's engine thread, whose own (uninstrumented)
    # locking ThreadSanitizer misreads
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                        "--tb=short", os.path.join(CUDASIM, "cases.py"), "-k",
                        "not dtype1 and not test_edges_dtypes and not autograd"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-6000:] + r.stderr[-6000:])
