"""start_train.sh without training: a stand-in PYTHON records the command the script would run
(and answers the GPU count probe), so every case takes milliseconds."""
import os
import shlex
import stat
import subprocess

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "start_train.sh")
NAME = "Distillation-FasterRCNN-R18-R50-dsig-1x"
CONFIG = f"projects/Distillation/configs/{NAME}.yaml"
OUT = f"./output/Distillation.configs.{NAME}"


@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON that logs its arguments one per line (a blank line after each call)."""
    log = tmp_path / "calls.log"
    exe = tmp_path / "python"
    exe.write_text("#!/usr/bin/env bash\n"
                   f"printf '%s\\n' \"$@\" '' >> {shlex.quote(str(log))}\n"
                   "[ \"$1\" = -c ] && echo 1\n"
                   "exit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe, log


def run(args, fake, cwd=ROOT, **env):
    exe, log = fake
    full_env = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "DSIG_DRY_RUN")}
    full_env.update(PYTHON=str(exe), **env)
    proc = subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=60)
    calls = log.read_text().split("\n\n")[:-1] if log.exists() else []
    return proc, [c.split("\n") for c in calls]


def train_call(calls):
    (call,) = [c for c in calls if c[0].endswith("train_net.py")]
    return call


def opt(call, key):
    """The last value given to a config KEY (detectron2 applies them in order)."""
    return [call[i + 1] for i, v in enumerate(call[:-1]) if v == key][-1]


def test_bad_mode_is_refused_before_anything_runs(fake_python):
    proc, calls = run(["trian", CONFIG], fake_python)
    assert proc.returncode == 2
    assert "unknown mode 'trian'; use train, eval, debugtrain, check or predict" in proc.stderr
    assert proc.stdout == "" and calls == []  # no banner, no torch import for the GPU count


@pytest.mark.parametrize("args, message", [
    (["train", "configs/nothere.yaml"], "config 'configs/nothere.yaml' not found"),
    (["train", CONFIG, "SOLVER.MAX_ITER"], "options must be KEY VALUE pairs"),
])
def test_other_refusals_come_first_too(fake_python, args, message):
    proc, calls = run(args, fake_python)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stdout == "" and calls == []


def test_config_path_relative_to_the_callers_directory(fake_python):
    proc, calls = run(["train", f"configs/{NAME}.yaml"], fake_python,
                      cwd=os.path.join(ROOT, "projects", "Distillation"), NUM_GPUS="1")
    assert proc.returncode == 0, proc.stderr
    call = train_call(calls)
    assert call[call.index("--config-file") + 1] == os.path.join(ROOT, CONFIG)
    assert opt(call, "OUTPUT_DIR") == OUT


@pytest.mark.parametrize("form", ["repo", "dot", "absolute", "from elsewhere"])
def test_every_form_of_the_path_names_the_same_folder(fake_python, tmp_path, form):
    config = {"repo": CONFIG, "dot": "./" + CONFIG, "absolute": os.path.join(ROOT, CONFIG),
              "from elsewhere": CONFIG}[form]
    cwd = str(tmp_path) if form == "from elsewhere" else ROOT  # the README's form, anywhere
    proc, calls = run(["train", config], fake_python, cwd=cwd, NUM_GPUS="1")
    assert proc.returncode == 0, proc.stderr
    assert opt(train_call(calls), "OUTPUT_DIR") == OUT


def test_config_outside_the_repository_is_named_by_its_file(fake_python, tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text(open(os.path.join(ROOT, CONFIG)).read())
    proc, calls = run(["train", "mine.yaml"], fake_python, cwd=tmp_path, NUM_GPUS="1")
    assert proc.returncode == 0, proc.stderr
    assert opt(train_call(calls), "OUTPUT_DIR") == "./output/mine"


@pytest.mark.parametrize("mode, extra, shown", [
    ("train", [], os.path.join(ROOT, OUT[2:])),
    ("debugtrain", [], os.path.join(ROOT, OUT[2:]) + ".debug"),
    ("eval", [], os.path.join(ROOT, OUT[2:]) + ".eval"),
    ("train", ["OUTPUT_DIR", "/tmp/elsewhere"], "/tmp/elsewhere"),
    ("debugtrain", ["OUTPUT_DIR", "runs/a", "OUTPUT_DIR", "runs/b"], os.path.join(ROOT, "runs/b")),
])
def test_banner_names_the_folder_the_run_writes(fake_python, mode, extra, shown):
    proc, calls = run([mode, CONFIG, *extra], fake_python, NUM_GPUS="1")
    assert proc.returncode == 0, proc.stderr
    banner = proc.stdout.splitlines()[0]
    assert banner.startswith(f"[start_train] {mode} {CONFIG} -> {shown} ("), banner
    # the same folder as the run's last OUTPUT_DIR, read from the repository root
    assert os.path.normpath(os.path.join(ROOT, opt(train_call(calls), "OUTPUT_DIR"))) == shown


def test_eval_banner_names_the_weights(fake_python):
    proc, _ = run(["eval", CONFIG, "MODEL.WEIGHTS", "/w/model.pth"], fake_python, NUM_GPUS="1")
    assert "(weights /w/model.pth)" in proc.stdout.splitlines()[0]


def test_dry_run_prints_the_command_and_runs_nothing(fake_python):
    proc, calls = run(["debugtrain", CONFIG, "SOLVER.MAX_ITER", "2"], fake_python,
                      NUM_GPUS="4", DSIG_DRY_RUN="1")
    assert proc.returncode == 0 and calls == []
    command = shlex.split(proc.stdout.splitlines()[-1])
    assert command[1:] == ["projects/Distillation/train_net.py", "--config-file",
                           os.path.join(ROOT, CONFIG), "--num-gpus", "1", "OUTPUT_DIR",
                           OUT + ".debug", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", "2"]


def test_check_mode_checks_for_the_processes_train_would_start(fake_python):
    """check runs train_net.py --check with the GPU count `train` would use (for the batch
    check), the options as given, and no OUTPUT_DIR: it writes no run folder."""
    proc, calls = run(["check", CONFIG, "SOLVER.MAX_ITER", "2"], fake_python, NUM_GPUS="4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(
        f"[start_train] check {CONFIG}: trains nothing, downloads nothing (the batch is checked for "
        "4 process(es))")
    assert train_call(calls)[1:] == ["--config-file", os.path.join(ROOT, CONFIG), "--check",
                                     "--num-gpus", "4", "SOLVER.MAX_ITER", "2"]


def test_predict_runs_the_predict_tool_on_the_runs_weights(fake_python, tmp_path):
    """predict: INPUT read from the caller's directory, the run's model_final.pth, output in
    the .predict folder; the tool's options pass through as pairs, --weights / --output named
    in the banner as the tool will read them; no GPU probe (one process)."""
    images = tmp_path / "images"
    images.mkdir()
    proc, calls = run(["predict", CONFIG, "images", "--score-threshold", "0.3"], fake_python,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls  # the tool alone: no `python -c` GPU count
    assert call[0].endswith("projects/Distillation/tools/predict.py")
    assert call[1:] == [str(images), "--config-file", os.path.join(ROOT, CONFIG), "--weights",
                        OUT + "/model_final.pth", "--output", OUT + ".predict",
                        "--score-threshold", "0.3"]
    assert proc.stdout.splitlines()[0].startswith(
        f"[start_train] predict {CONFIG} on images -> {os.path.join(ROOT, OUT[2:])}.predict "
        f"(weights {os.path.join(ROOT, OUT[2:])}/model_final.pth)")
    proc, calls = run(["predict", CONFIG, str(images), "--weights", "/w/student.pth",
                       "OUTPUT_DIR", "/tmp/p"], fake_python)
    assert "-> /tmp/p (weights /w/student.pth)" in proc.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["predict", CONFIG], "predict needs an INPUT after the config"),
    (["predict", CONFIG, "nothere"], "predict input 'nothere' not found"),
    (["predict", CONFIG, "projects", "--score-threshold"], "options must be KEY VALUE pairs"),
])
def test_predict_refusals_come_first(fake_python, args, message):
    proc, calls = run(args, fake_python)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == "" and calls == []
