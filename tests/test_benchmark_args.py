"""The benchmark scripts' arguments: results go to a git-ignored scratch folder unless --out
says otherwise (never over the committed benchmarks/results by default), and every value given
is honoured or refused, never replaced by the default (no benchmark is run here)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_ops  # noqa: E402
import bench_small_under_load  # noqa: E402
import bench_train_step  # noqa: E402
import common  # noqa: E402
import graph_sizes_demo  # noqa: E402
import profile_train_step  # noqa: E402

COMMITTED = os.path.join(ROOT, "benchmarks", "results")


def _parse(module, argv):
    args = module.parse_args(argv)
    return args[1] if isinstance(args, tuple) else args  # graph_sizes_demo returns the parser too


SCRIPTS = [(bench_ops, []), (bench_small_under_load, []), (bench_train_step, []),
           (profile_train_step, []), (graph_sizes_demo, ["--demo", "somewhere"])]


@pytest.mark.parametrize("module, argv", SCRIPTS, ids=lambda v: getattr(v, "__name__", ""))
def test_results_go_to_a_scratch_folder_by_default(module, argv, tmp_path):
    out = _parse(module, argv).out
    assert out == common.SCRATCH_OUT
    assert os.path.realpath(out) != os.path.realpath(COMMITTED)
    # git ignores the scratch folder: a trial run leaves the tree clean
    probe = os.path.relpath(os.path.join(out, "bench_ops_cpu.json"), ROOT)
    check = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert check.returncode == 0, f"{probe} is not ignored by git"
    assert _parse(module, argv + ["--out", str(tmp_path)]).out == str(tmp_path)


def test_bench_ops_honours_every_value():
    args = bench_ops.parse_args(["--device", "cpu", "--warmup", "0", "--repeat", "1",
                                 "--batches", "1"])
    assert (args.warmup, args.repeat, args.batches) == (0, 1, [1])
    args = bench_ops.parse_args(["--device", "cpu", "--batch", "3"])
    assert args.batches == [3]
    args = bench_ops.parse_args(["--device", "cpu"])
    assert (args.warmup, args.repeat) == (1, 5)
    args = bench_ops.parse_args(["--device", "cuda"])
    assert (args.warmup, args.repeat) == (5, 30)


@pytest.mark.parametrize("argv, message", [
    (["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
    (["--repeat", "0"], "--repeat: must be at least 1, got 0"),
    (["--batches", "2", "0"], "--batches: must be at least 1, got 0"),
    (["--warmup", "two"], "--warmup: 'two' is not an integer"),
])
def test_bench_ops_refuses_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_ops.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_bench_ops_writes_where_told_and_stamps_the_warmup(tmp_path, monkeypatch):
    """main() end to end with the timed work stubbed out: the files land in --out only."""
    monkeypatch.setattr(bench_ops, "bench_roi_align", lambda *a: [])
    monkeypatch.setattr(bench_ops, "bench_edge_loss", lambda *a: [])
    monkeypatch.setattr(bench_ops, "plot", lambda result, path: open(path, "w").close())
    result = bench_ops.main(["--device", "cpu", "--warmup", "0", "--repeat", "1",
                             "--out", str(tmp_path), "--tag", "t"])
    assert result["warmup"] == 0
    assert sorted(os.listdir(tmp_path)) == ["bench_ops_t.json", "bench_ops_t.md",
                                            "bench_ops_t.png"]
    assert "after 0 warm-up runs" in (tmp_path / "bench_ops_t.md").read_text()


def test_other_scripts_honour_zero_and_refuse_nonsense(capsys):
    args = bench_train_step.parse_args(["--warmup", "0", "--iters", "1"])
    assert (args.warmup, args.iters) == (0, 1)
    assert bench_small_under_load.parse_args(["--load", "0"]).load == 0
    for module, argv in [(bench_train_step, ["--iters", "0"]),  # used to become 5 or 20
                         (bench_train_step, ["--warmup", "-1"]),
                         (bench_small_under_load, ["--calls", "0"]),
                         (profile_train_step, ["--steps", "0"]),
                         (graph_sizes_demo, ["--demo", "x", "--iters", "0"])]:
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        assert "must be at least" in capsys.readouterr().err
