"""train_net.py and tools/visualize_graph.py on plain detectron2 models (a baseline, an exported
student). The scripts run in subprocesses on tiny generated images with random weights; CPU."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, PROJECT, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from distillation.checkpoint import DistillationCheckpointer, export_student  # noqa: E402
from distillation.training import load_config  # noqa: E402

DATASET = "train_net_tiny"
DEMO = os.path.join(CONFIGS, "demo")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_net_data"))
    json_file, image_root = make_coco_dataset(root)
    return json_file, image_root


def _run(script, args, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(PROJECT, script)] + args,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _train_net(data, config, out, extra=(), iters=1, flags=()):
    opts = tiny_opts(DATASET, out, iters=iters, stable=True) + list(extra)
    return _run("train_net.py", ["--config-file", config, "--register-coco", DATASET, *data,
                                 *flags, *opts])


@pytest.mark.parametrize("config, extra", [
    (os.path.join(DEMO, "student-R18.yaml"), []),
    (os.path.join(CONFIGS, "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml"),
     ["MODEL.META_ARCHITECTURE", "RetinaNet"]),
], ids=["GeneralizedRCNN", "RetinaNet"])
def test_plain_model_trains_resumes_and_evaluates(data, tmp_path, config, extra):
    out = str(tmp_path / "out")
    rc, log = _train_net(data, config, out, extra, iters=1)
    assert rc == 0, log[-3000:]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    # a plain model is its own export
    assert not os.path.exists(os.path.join(out, "model_final_student.pth"))
    # resume from model_final.pth, one more iteration, then detectron2's evaluation
    rc, log = _train_net(data, config, out, extra + ["DATASETS.TEST", f"('{DATASET}',)"],
                         iters=2, flags=["--resume"])
    assert rc == 0, log[-3000:]
    assert "Starting training from iteration 1" in log
    assert "Evaluation results for bbox" in log or "No predictions from the model" in log


def _distillation_checkpoint(tmp_path):
    """A DSIG model of the demo (R18 student, R50 teacher) saved as training saves it."""
    cfg = load_config(os.path.join(DEMO, "dsig-R18-R50.yaml"), tiny_opts(DATASET, str(tmp_path)))
    model = build_model(cfg)
    DistillationCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    return cfg, str(tmp_path / "model_final.pth")


def test_exported_student_evaluates_with_the_stock_config(data, tmp_path):
    _, checkpoint = _distillation_checkpoint(tmp_path)
    student = str(tmp_path / "student.pth")
    export_student(checkpoint, student)
    rc, log = _train_net(data, os.path.join(DEMO, "student-R18.yaml"), str(tmp_path / "eval"),
                         ["DATASETS.TEST", f"('{DATASET}',)", "MODEL.WEIGHTS", student],
                         flags=["--eval-only"])
    assert rc == 0, log[-3000:]
    assert "Evaluation results for bbox" in log or "No predictions from the model" in log


def test_visualize_graph_refuses_a_plain_config(data):
    json_file, image_root = data
    rc, log = _run(os.path.join("tools", "visualize_graph.py"), [
        "--config", os.path.join(DEMO, "student-R18.yaml"), "--json", json_file,
        "--image", os.path.join(image_root, "0000.png"), "--output", os.devnull])
    assert rc != 0 and "Traceback" not in log, log[-3000:]
    assert ("is not a DistillationRCNN config (MODEL.META_ARCHITECTURE is GeneralizedRCNN)"
            in log)
