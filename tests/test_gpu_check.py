"""The GPU check script's machine-independent logic: arguments, arch detection, the sanitizer
probe, staging, the report, and the refusal on a machine without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CUDA, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402
import roofline  # noqa: E402


def test_arguments(tmp_path):
    args = gpu_check.parse_args([str(tmp_path / "out")])
    assert args.jobs == (os.cpu_count() or 1) and args.wheels is None and args.skip == []
    args = gpu_check.parse_args([str(tmp_path), "--jobs", "3", "--skip", "sanitize", "bench"])
    assert args.jobs == 3 and args.skip == ["sanitize", "bench"]
    for bad in (["--jobs", "0"], ["--wheels", str(tmp_path / "missing")], ["--skip", "lint"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args([str(tmp_path), *bad])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])


def test_arch_list_from_capability():
    assert gpu_check.arch_list((9, 0)) == "9.0"
    assert gpu_check.arch_list((8, 6)) == "8.6"
    assert gpu_check.arch_list((12, 0)) == "12.0"
    with pytest.raises(ValueError, match="older"):
        gpu_check.arch_list((3, 5))


def test_sanitizer_probe():
    assert gpu_check.sanitizer_usable(0, "========= ERROR SUMMARY: 0 errors\n") == (True, "")
    usable, reason = gpu_check.sanitizer_usable(
        1, "========= Error: Device not supported\n")
    assert not usable and "Device not supported" in reason
    usable, reason = gpu_check.sanitizer_usable(7, "something else")
    assert not usable and "exit 7" in reason


def test_staging_copies_sources_not_builds(tmp_path):
    gpu_check.stage(tmp_path)
    for name in ("setup.py", "csrc/ops/cuda/edge_loss_kernel.cu", "dsig_ext/ops.py",
                 "tests/test_cuda.py", "benchmarks/bench_ops.py",
                 "benchmarks/sanitizer_cases.py"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.rglob("*.so"))
    assert not (tmp_path / "benchmarks" / "results").exists()


def test_report_is_stamped(tmp_path):
    info = {"gpu": True, "gpu_name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
            "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda": "13.0",
            "torchvision": "0.26.0", "python": "3.12.3", "cores": 16}
    steps = [{"step": "build", "status": "passed", "seconds": 80.0, "detail": "9.0"},
             {"step": "sanitize", "status": "skipped", "seconds": 0, "detail": "not found"}]
    gpu_check.write_report(tmp_path, info, steps, "| kernel | time |\n")
    md = (tmp_path / "gpu_check.md").read_text()
    for text in ("NVIDIA H100 80GB HBM3", "driver 580.159.04", "torch 2.11.0+cu130",
                 "CUDA 13.0", "| build | passed |", "| sanitize | skipped |", "| kernel |"):
        assert text in md
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["info"]["driver"] == "580.159.04" and len(report["steps"]) == 2


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_refuses_cleanly_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)],
                         env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
    assert not out.exists()  # nothing built, nothing written


def test_roofline_floors_match_the_design_table():
    """KERNELS.md section 5: B=8, 512 RoIs/img; edge loss B=8, N=138, D=12544."""
    assert roofline.roi_align_forward_floor_us(8, 512, 2) == pytest.approx(139, rel=0.01)
    assert roofline.roi_align_forward_floor_us(8, 138, 2) == pytest.approx(90, rel=0.01)
    assert roofline.roi_align_backward_owner_floor_us(8, 512, 2) == pytest.approx(139, rel=0.01)
    assert roofline.roi_align_backward_owner_floor_us(8, 512, 4) == pytest.approx(278, rel=0.01)
    assert roofline.roi_align_backward_atomic_floor_us(8, 512, 4) == pytest.approx(712, rel=0.01)
    assert roofline.roi_align_backward_atomic_floor_us(8, 512, 2) == pytest.approx(1007, rel=0.01)
    assert roofline.edge_loss_floor_us(8, 138, 12544, 4) == pytest.approx(171, rel=0.01)
    assert roofline.edge_loss_floor_us(8, 138, 12544, 2, tensor_cores=True) == pytest.approx(
        33, rel=0.02)


def test_bench_kernel_rows_on_the_cpu():
    """The per-kernel timing and its floors run end to end (tiny sizes, CPU)."""
    import bench_ops

    rows = bench_ops.bench_kernels("cpu", 1, 4, 4, 0, 1, torch.float32)
    assert [r["kernel"] for r in rows] == ["roi_align forward", "roi_align backward, atomic",
                                           "roi_align backward, deterministic",
                                           "edge loss forward + backward"]
    assert all(r["time_us"] > 0 and r["floor_us"] >= 5 for r in rows)
    args = bench_ops.parse_args(["--device", "cuda"])
    assert args.batches == [2, 8] and args.dtypes == ["float32", "bfloat16"]
    args = bench_ops.parse_args(["--device", "cpu"])
    assert args.batches == [2] and args.dtypes == ["float32"]


def test_detectron2_wheel_commands(tmp_path):
    """install_detectron2.py --wheel-dir: the patched detectron2 as a wheel, the pure-Python
    requirements built as wheels, the compiled ones fetched for the target interpreter."""
    import importlib.util

    path = os.path.join(ROOT, "projects", "Distillation", "tools", "install_detectron2.py")
    spec = importlib.util.spec_from_file_location("install_detectron2", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source, out = tmp_path / "src", tmp_path / "wheels"
    own, pure, binary = tool.wheel_commands(source, out, "3.12")
    assert own[3:5] == ["wheel", "--quiet"] and own[-1] == str(source) and str(out) in own
    assert "fvcore>=0.1.5,<0.1.6" in pure and "--no-deps" in pure
    assert binary[binary.index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in binary and binary[-1].startswith("pycocotools")


def test_runner_logs_times_out_and_rewrites_the_report(tmp_path):
    info = {"gpu": True, "gpu_name": "test GPU", "torch": torch.__version__}
    r = gpu_check.Runner(tmp_path, info)
    rc, text, _ = r.run([sys.executable, "-c", "print('hello')"], tmp_path)
    assert rc == 0 and "hello" in text
    rc, text, secs = r.run([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path,
                           timeout=1)
    assert rc == 124 and "timed out" in text and secs < 20
    assert not r.record("tests", "failed", secs, "timed out")
    assert "| tests | failed |" in (tmp_path / "gpu_check.md").read_text()
    assert "hello" in (tmp_path / "logs.txt").read_text()


def _model_row(kernel, dtype, batch, rois=None, nodes=None, model_us=100.0):
    return {"kernel": kernel, "dtype": dtype, "batch": batch, "rois_per_image": rois,
            "nodes": nodes, "model_us": model_us, "main_kernel": "k", "main_bound": "issue"}


def test_report_puts_measured_next_to_model_and_floor(tmp_path):
    """The kernel rows of bench_ops' JSON joined with the committed model by (kernel, dtype,
    batch, size); the report shows measured, model and floor side by side."""
    bench = {"kernels": [
        {"kernel": "roi_align forward", "batch": 8, "dtype": "float32", "rois_per_image": 512,
         "nodes": None, "time_us": 250.0, "floor_us": 278.0, "ratio_to_floor": 0.9},
        {"kernel": "edge loss forward + backward", "batch": 8, "dtype": "bfloat16",
         "rois_per_image": None, "nodes": 300, "time_us": 900.0, "floor_us": 809.0,
         "ratio_to_floor": 1.1},
        {"kernel": "roi_align forward", "batch": 4, "dtype": "float32", "rois_per_image": 512,
         "nodes": None, "time_us": 120.0, "floor_us": 140.0, "ratio_to_floor": 0.9}]}
    model = {"revision": "abc1234", "ops": [
        _model_row("roi_align forward", "float32", 8, rois=512, model_us=500.0),
        _model_row("edge loss forward + backward", "bfloat16", 8, nodes=300, model_us=450.0)]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "model.json").write_text(json.dumps(model))
    rows = gpu_check.model_comparison(tmp_path / "bench.json", tmp_path / "model.json")
    assert [r["model_us"] for r in rows] == [500.0, 450.0, None]
    assert rows[0]["measured_to_model"] == pytest.approx(0.5)
    assert rows[1]["measured_to_model"] == pytest.approx(2.0)
    assert rows[2]["measured_to_model"] is None  # a workload the model has no row for
    info = {"gpu": True, "gpu_name": "NVIDIA H100 80GB HBM3"}
    gpu_check.write_report(tmp_path, info, [], "| bench |\n", rows)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| measured us | model us | floor us | measured / model | measured / floor |" in md
    assert "| roi_align forward | float32 | 8 | 512 | 250.0 | 500.0 (model) | 278.0 | 0.50 |" in md
    assert "no model" in md and "abc1234" in md
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["model_comparison"][1]["model_us"] == 450.0
    assert gpu_check.model_comparison(tmp_path / "missing.json", tmp_path / "model.json") is None


def test_committed_model_covers_what_the_gpu_bench_times():
    """Every kernel row bench_ops times on CUDA by default has a committed model row, each
    labelled a model, with the floor bench_ops uses."""
    import bench_ops

    model = json.loads(gpu_check.MODEL_JSON.read_text())
    assert "model" in model["model"] and "not a measurement" in model["model"]
    keys = {gpu_check._model_key(r) for r in model["ops"]}
    args = bench_ops.parse_args(["--device", "cuda"])
    names = ["roi_align forward", "roi_align backward, atomic",
             "roi_align backward, deterministic", "edge loss forward + backward"]
    for dtype in args.dtypes:
        for batch in args.batches:
            for rois, nodes in ((512, 300), (140, 140)):
                for name in names:
                    roi = "roi" in name
                    key = (name, dtype, batch, rois if roi else None, None if roi else nodes)
                    assert key in keys, key
    for r in model["ops"]:
        elem = 4 if r["dtype"] == "float32" else 2
        if r["kernel"] == "roi_align forward":
            assert r["floor_us"] == pytest.approx(roofline.roi_align_forward_floor_us(
                r["batch"], r["rois_per_image"], elem), abs=0.06)
        assert r["model_us"] > 0 and r["complete"], r
    assert "model" in (ROOT and open(os.path.join(
        ROOT, "benchmarks", "results", "kernel_model_after.md")).read().lower())
