"""`./start_train.sh check CONFIG` (train_net.py --check): a config checked end to end before a
long run, offline, training and downloading nothing; then the smoke run its output spells
out. The real scripts in subprocesses (an in-process run for the findings), tiny inputs, CPU,
no network (DSIG_OFFLINE=1, empty caches)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, PROJECT, ROOT, make_coco_dataset  # noqa: E402

SCRIPT = os.path.join(ROOT, "start_train.sh")
R18_R50 = "projects/Distillation/configs/Distillation-FasterRCNN-R18-R50-dsig-1x.yaml"
DSIG_DEMO = os.path.join(CONFIGS, "demo", "dsig-R18-R50.yaml")
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
         "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"]


@pytest.fixture
def offline(tmp_path):
    """No network, empty weight caches, no COCO: a fresh machine without internet."""
    env = {k: v for k, v in os.environ.items() if k not in ("DSIG_COCO_DATASETS", "NUM_GPUS")}
    env.update(DSIG_OFFLINE="1", FVCORE_CACHE=str(tmp_path / "iopath"),
               TORCH_HOME=str(tmp_path / "torch"), DETECTRON2_DATASETS=str(tmp_path / "none"),
               PYTHON=sys.executable, NUM_GPUS="1")
    return env


def _run(cmd, env, timeout=900):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _total_loss(log):
    m = re.search(r"total_loss (\S+) = ", log)
    assert m, log[-3000:]
    return float(m.group(1))


def _no_files_under(*folders):
    return not [f for folder in folders for _, _, files in os.walk(folder) for f in files]


def test_check_offline_lists_what_is_missing_and_the_overrides(offline, tmp_path):
    """The shipped R18-R50 config on a machine with nothing: both weight files reported (URL and
    cache path, nothing fetched), COCO's absence with DETECTRON2_DATASETS, one iteration on a
    generated image with random (calibrated) networks, and the smoke-run command."""
    output = os.path.join(ROOT, "output")
    before = sorted(os.listdir(output)) if os.path.isdir(output) else []
    rc, log = _run([SCRIPT, "check", R18_R50, *SMALL], offline)
    assert rc == 1 and "Traceback" not in log, log[-4000:]
    assert ("MODEL.WEIGHTS torchvision://resnet18: not here, and it cannot be downloaded here "
            "(DSIG_OFFLINE=1); a run would download "
            "https://download.pytorch.org/models/resnet18-f37072fd.pth") in log
    assert os.path.join(offline["TORCH_HOME"], "hub", "checkpoints", "resnet18-f37072fd.pth") in log
    assert ("DISTILL.TEACHER.WEIGHTS detectron2://COCO-Detection/faster_rcnn_R_50_FPN_3x/"
            "137849458/model_final_280758.pkl: not here") in log
    assert os.path.join(offline["FVCORE_CACHE"], "detectron2", "COCO-Detection") in log
    assert ("DATASETS.TRAIN coco_2017_train: annotation file "
            f"{offline['DETECTRON2_DATASETS']}/coco/annotations/instances_train2017.json not "
            "found") in log
    assert re.search(r"student: [\d.]+ M parameters, [\d.]+ M trained, random weights", log)
    assert "one training iteration on a generated image" in log
    assert "teacher: random weights; its 53 FrozenBN layers had identity statistics" in log
    assert 0 < _total_loss(log) < 1e3  # calibrated; identity statistics gave ~1e7
    assert "gradients finite" in log and "inference on the same image" in log
    assert "4 problem(s): the config does not run here as it is" in log
    assert ("overrides: MODEL.WEIGHTS '' DISTILL.TEACHER.WEIGHTS '' "
            "DISTILL.TEACHER.ALLOW_RANDOM_INIT True DATASETS.TRAIN \"('NAME',)\" DATASETS.TEST "
            "'()' SOLVER.CLIP_GRADIENTS.ENABLED True SOLVER.CLIP_GRADIENTS.CLIP_TYPE norm") in log
    assert "DSIG_COCO_DATASETS=NAME=ann.json,image_root ./start_train.sh debugtrain" in log
    # nothing fetched, nothing written
    assert _no_files_under(offline["FVCORE_CACHE"], offline["TORCH_HOME"])
    assert (sorted(os.listdir(output)) if os.path.isdir(output) else []) == before


def test_check_then_the_smoke_run_it_prints(offline, tmp_path):
    """Your data registered, no weights: the check takes the class count from the data, runs its
    iteration on your first image and prints one command; that command trains (offline, random
    calibrated networks, clipped gradients) with losses of the usual size."""
    json_file, image_root = make_coco_dataset(str(tmp_path / "data"), num_classes=2)
    offline["DSIG_COCO_DATASETS"] = f"ck={json_file},{image_root}"
    rc, log = _run([SCRIPT, "check", R18_R50, "DATASETS.TRAIN", "('ck',)", "DATASETS.TEST",
                    "('ck',)", *SMALL], offline)
    assert rc == 1 and "Traceback" not in log, log[-4000:]
    assert "DATASETS.TRAIN ck: 4 images, " in log and "2 categories" in log
    assert "MODEL.ROI_HEADS.NUM_CLASSES 2: the class count of the data" in log
    assert f"one training iteration on the first image of ck with instances ({image_root}" in log
    assert 0 < _total_loss(log) < 1e3
    assert "2 problem(s)" in log  # the two weight files
    command = [line.strip() for line in log.splitlines()
               if "./start_train.sh debugtrain" in line][-1]
    assert command.startswith(f"DSIG_COCO_DATASETS=ck={json_file},{image_root} ./start_train.sh "
                              f"debugtrain {os.path.join(ROOT, R18_R50)} DATASETS.TRAIN"), command
    out = tmp_path / "smoke"
    # 12 iterations: without clipped gradients this run diverged at iteration 10
    rc, log = _run(["bash", "-c", f"{command} SOLVER.MAX_ITER 12 OUTPUT_DIR {out}"], offline)
    assert rc == 0, log[-4000:]
    with open(out / "metrics.json") as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert losses and all(math.isfinite(x) and 0 < x < 1e3 for x in losses), losses
    assert os.path.isfile(out / "model_final.pth")
    assert _no_files_under(offline["FVCORE_CACHE"], offline["TORCH_HOME"])


def test_check_passes_a_config_that_runs_here(offline, tmp_path):
    json_file, image_root = make_coco_dataset(str(tmp_path / "data"))
    rc, log = _run([sys.executable, os.path.join(PROJECT, "train_net.py"), "--config-file",
                    DSIG_DEMO, "--check", "--register-coco", "ok_tiny", json_file, image_root,
                    "DATASETS.TRAIN", "('ok_tiny',)", "DATASETS.TEST", "('ok_tiny',)",
                    "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DISTILL.TEACHER.ALLOW_RANDOM_INIT",
                    "True", *SMALL], offline)
    assert rc == 0, log[-4000:]
    assert "MODEL.WEIGHTS is empty: the student starts from random weights" in log
    assert "a random teacher (smoke tests only)" in log
    assert "DATASETS.TEST ok_tiny: 4 images" in log
    assert "FrozenBN" not in log.split("[check] one training iteration")[1]  # GN: nothing to set
    assert "[check] OK: the config runs here as it is" in log


def test_findings_instead_of_crashes(offline, tmp_path, monkeypatch, capsys):
    """A batch that does not divide among the processes and a non-finite first loss are
    findings (with their fixes), not tracebacks."""
    import train_net

    for k in ("DSIG_OFFLINE", "FVCORE_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(k, offline[k])
    json_file, image_root = make_coco_dataset(str(tmp_path / "data"))
    args = train_net.parser().parse_args([
        "--config-file", DSIG_DEMO, "--check", "--num-gpus", "3",
        "--register-coco", "nan_tiny", json_file, image_root,
        "DATASETS.TRAIN", "('nan_tiny',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3", "DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True",
        "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", *SMALL])
    from distillation.check import run_check

    assert run_check(args) == 1
    log = capsys.readouterr().out
    assert ("PROBLEM: SOLVER.IMS_PER_BATCH 4 does not divide among 3 processes\n"
            "    fix: set SOLVER.IMS_PER_BATCH 3") in log
    assert "PROBLEM: non-finite loss in the first iteration" in log
    assert "2 problem(s)" in log


def test_check_loads_the_weights_that_are_here(offline, tmp_path, monkeypatch, capsys):
    """A torchvision file already in torch hub's cache: reported as there, converted and loaded
    into the student (the check lists what it leaves at its initialisation); the teacher's file
    is still missing."""
    import torch
    import torchvision

    import train_net
    from distillation.check import run_check

    for k in ("DSIG_OFFLINE", "FVCORE_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(k, offline[k])
    source = os.path.join(offline["TORCH_HOME"], "hub", "checkpoints", "resnet18-f37072fd.pth")
    os.makedirs(os.path.dirname(source))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), source)
    json_file, image_root = make_coco_dataset(str(tmp_path / "data"))
    args = train_net.parser().parse_args([
        "--config-file", os.path.join(ROOT, R18_R50), "--check",
        "--register-coco", "here_tiny", json_file, image_root,
        "DATASETS.TRAIN", "('here_tiny',)", "DATASETS.TEST", "()", *SMALL])
    assert run_check(args) == 1
    log = capsys.readouterr().out
    assert f"MODEL.WEIGHTS torchvision://resnet18: in the cache, {source}" in log
    assert re.search(r"MODEL.WEIGHTS loaded; \d+ student weights keep their initialisation "
                     r"\(not in the file\): student.backbone.fpn_lateral2, ", log), log
    assert "teacher: random weights" in log and "student: random weights" not in log
    assert "1 problem(s)" in log  # the teacher's file
    assert "overrides: DISTILL.TEACHER.WEIGHTS '' DISTILL.TEACHER.ALLOW_RANDOM_INIT True " \
           "SOLVER.CLIP_GRADIENTS.ENABLED True SOLVER.CLIP_GRADIENTS.CLIP_TYPE norm" in log


def test_batch_with_reference_world_size(capsys):
    """SOLVER.REFERENCE_WORLD_SIZE: the check reports the schedule the trainer will scale to (the
    README's table), and a batch auto-scaling cannot split is a finding, not the trainer's bare
    assertion."""
    import types

    from distillation.check import Report, _Check
    from distillation.training import load_config

    def batch_check(gpus, opts):
        check = _Check(types.SimpleNamespace(num_gpus=gpus, num_machines=1), "")
        config = os.path.join(CONFIGS, "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml")
        check.cfg = load_config(config, opts)
        check.report = Report()
        check.batch()
        return check.report, capsys.readouterr().out

    report, text = batch_check(8, ["SOLVER.REFERENCE_WORLD_SIZE", "4"])
    assert not report.problems, text
    assert "IMS_PER_BATCH 8 -> 16, BASE_LR 0.01 -> 0.02, MAX_ITER 180000 -> 90000" in text, text
    assert "16 images per iteration, 2 per process over 8 process(es)" in text, text
    report, text = batch_check(2, ["SOLVER.REFERENCE_WORLD_SIZE", "3"])
    assert "is not a multiple of SOLVER.REFERENCE_WORLD_SIZE 3" in text and report.problems
