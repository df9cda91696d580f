"""Multi-process training (2 CPU processes over gloo) and resuming after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, ROOT, make_coco_dataset, tiny_opts  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_stay_in_sync(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["changed"]
    assert report["max_rank_difference"] == 0.0


def _train_cmd(root, out, iters, resume):
    config = os.path.join(CONFIGS, "Distillation-FasterRCNN-MNV2-R50-dsig-1x.yaml")
    opts = tiny_opts("resume_tiny", out, iters=iters, stable=True)
    opts[opts.index("SOLVER.CHECKPOINT_PERIOD") + 1] = "2"
    cmd = [sys.executable, os.path.join(ROOT, "projects", "Distillation", "train_net.py"),
           "--config-file", config, "--register-coco", "resume_tiny",
           os.path.join(root, "train.json"), os.path.join(root, "images")]
    return cmd + (["--resume"] if resume else []) + opts


def test_resume_after_kill(tmp_path):
    root, out = str(tmp_path), str(tmp_path / "out")
    make_coco_dataset(root)
    iters = 16
    proc = subprocess.Popen(_train_cmd(root, out, iters, False), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = os.path.join(out, "model_0000003.pth")
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(checkpoint), proc.stderr.read()[-3000:] if proc.poll() else "timeout"
    time.sleep(0.5)  # let the checkpoint file finish
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = f.read().strip()
    done = int(last.split("_")[1].split(".")[0]) + 1  # model_000000k.pth saved after k + 1 iters
    resumed = subprocess.run(_train_cmd(root, out, iters, True), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {done}" in resumed.stdout + resumed.stderr
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert os.path.exists(os.path.join(out, "model_final_student.pth"))


def test_start_train_script_debugtrain(tmp_path):
    root = str(tmp_path)
    make_coco_dataset(root)
    config = "projects/Distillation/configs/Distillation-FasterRCNN-MNV2-R50-dsig-1x.yaml"
    out = os.path.join(ROOT, "output", "Distillation.configs.Distillation-FasterRCNN-MNV2-R50-dsig-1x.debug")
    env = dict(os.environ, PYTHON=sys.executable, NUM_GPUS="1",
               DSIG_COCO_DATASETS=f"script_tiny={root}/train.json,{root}/images")
    opts = tiny_opts("script_tiny", out, iters=2, stable=True)
    opts = opts[:opts.index("OUTPUT_DIR")]  # the script derives OUTPUT_DIR from the config path
    i = opts.index("SOLVER.IMS_PER_BATCH")
    del opts[i:i + 2]  # debugtrain sets it to 1
    proc = subprocess.run([os.path.join(ROOT, "start_train.sh"), "debugtrain", config] + opts,
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    import yaml

    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["SOLVER"]["IMS_PER_BATCH"] == 1
