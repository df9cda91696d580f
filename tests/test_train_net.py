"""train_net.py and tools/visualize_graph.py on plain detectron2 models (a baseline, an exported
student), and evaluation refusing checkpoints that leave weights unfilled. The scripts run in
subprocesses on tiny generated images with random weights; CPU."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, PROJECT, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from distillation.checkpoint import (  # noqa: E402
    DistillationCheckpointer, IncompleteCheckpointError, export_student)
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


def _other_architecture(tmp_path):
    """A detector of another depth (the demo's R50) saved as a student file."""
    path = str(tmp_path / "r50.pth")
    cfg = load_config(os.path.join(DEMO, "teacher-R50.yaml"), tiny_opts(DATASET, str(tmp_path)))
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


def test_exported_student_evaluates_with_the_stock_config(data, tmp_path):
    _, checkpoint = _distillation_checkpoint(tmp_path)
    student = str(tmp_path / "student.pth")
    export_student(checkpoint, student)
    rc, log = _train_net(data, os.path.join(DEMO, "student-R18.yaml"), str(tmp_path / "eval"),
                         ["DATASETS.TEST", f"('{DATASET}',)", "MODEL.WEIGHTS", student],
                         flags=["--eval-only"])
    assert rc == 0, log[-3000:]
    assert "Evaluation results for bbox" in log or "No predictions from the model" in log


def test_eval_only_refuses_a_student_of_another_architecture(data, tmp_path):
    wrong = _other_architecture(tmp_path)
    rc, log = _train_net(data, os.path.join(DEMO, "dsig-R18-R50.yaml"), str(tmp_path / "eval"),
                         ["DATASETS.TEST", f"('{DATASET}',)", "MODEL.WEIGHTS", wrong],
                         flags=["--eval-only"])
    assert rc != 0, log[-3000:]
    assert f"IncompleteCheckpointError: checkpoint {wrong} leaves" in log, log[-3000:]
    assert ("student.backbone.bottom_up.res3.0.conv1.weight: shape (128, 256, 1, 1) in the "
            "checkpoint, (128, 64, 3, 3) in the model") in log
    assert "copypaste" not in log  # no evaluation ran


def test_eval_loads_require_every_student_weight(data, tmp_path):
    """The checkpointer in evaluation mode: a complete student loads into the distillation model
    (its teacher exempt) and into a plain one (teacher keys dropped); a wrong-architecture or
    absent checkpoint is refused."""
    cfg, checkpoint = _distillation_checkpoint(tmp_path)
    DistillationCheckpointer(build_model(cfg), require_complete=True).load(checkpoint)
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    plain = build_model(plain_cfg)
    DistillationCheckpointer(plain, require_complete=True).load(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, saved["student." + k], msg=k)

    wrong = _other_architecture(tmp_path)
    for model in (build_model(cfg), build_model(plain_cfg)):
        with pytest.raises(IncompleteCheckpointError, match=f"checkpoint {re.escape(wrong)} leaves") as e:
            DistillationCheckpointer(model, require_complete=True).load(wrong)
        message = str(e.value)
        assert "res3.0.conv1.weight: shape (128, 256, 1, 1) in the checkpoint, (128, 64, 3, 3) " \
               "in the model" in message
        assert "teacher." not in message
    with pytest.raises(IncompleteCheckpointError, match="no checkpoint to evaluate"):
        DistillationCheckpointer(plain, require_complete=True).load("")
    # training still loads what fits and warns about the rest
    DistillationCheckpointer(build_model(plain_cfg)).load(wrong)


def test_bad_input_found_in_worker_processes_is_one_message(data, tmp_path):
    """Two processes (gloo on the CPU): a weights file that is no checkpoint, found only when the
    workers load it, ends the run with its one-line message and exit status 2, as in one
    process; no multiprocessing traceback."""
    notes = tmp_path / "notes.pth"
    notes.write_text("not a checkpoint")
    rc, log = _train_net(data, os.path.join(DEMO, "student-R18.yaml"), str(tmp_path / "out"),
                         ["MODEL.WEIGHTS", str(notes), "SOLVER.IMS_PER_BATCH", "2"],
                         flags=["--num-gpus", "2"])
    assert rc == 2, log[-3000:]
    assert re.search(r"train_net\.py \(process [01]\): NotACheckpointError: "
                     + re.escape(f"{notes} is not a PyTorch checkpoint"), log), log[-3000:]
    assert "Traceback" not in log and "ProcessExitedException" not in log, log[-3000:]


def test_visualize_graph_refuses_a_plain_config(data):
    json_file, image_root = data
    rc, log = _run(os.path.join("tools", "visualize_graph.py"), [
        "--config", os.path.join(DEMO, "student-R18.yaml"), "--json", json_file,
        "--image", os.path.join(image_root, "0000.png"), "--output", os.devnull])
    assert rc != 0 and "Traceback" not in log, log[-3000:]
    assert ("is not a DistillationRCNN config (MODEL.META_ARCHITECTURE is GeneralizedRCNN)"
            in log)
