"""What train_net.py and tools/visualize_graph.py say, and where (issue #22 items 8-11): the
project's own lines and Python warnings in the console and log.txt, no escape codes in files, no
upstream notices, one line on a worker count above the CPU count; bad input (a missing or
malformed config, a wrong weights path) as one message naming the file or key; help texts whole,
every option explained. Subprocesses on tiny generated data where the script itself is the
subject, in-process checks otherwise; CPU."""
import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, PROJECT, ROOT, make_coco_dataset, tiny_opts  # noqa: E402

from distillation.errors import InputError, MissingFileError  # noqa: E402

DATASET = "console_tiny"
R18_R50 = os.path.join(CONFIGS, "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml")
DSIG_DEMO = os.path.join(CONFIGS, "demo", "dsig-R18-R50.yaml")
VISUALIZE = os.path.join(PROJECT, "tools", "visualize_graph.py")
JIT_NOTICE = "`torch.jit.script` is deprecated"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_coco_dataset(str(tmp_path_factory.mktemp("console_data")))


def _run(cmd, cpus=None, cwd=ROOT, timeout=600):
    """`cmd` in a subprocess (on the first `cpus` CPUs this process may use); rc, output."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    limit = (lambda: os.sched_setaffinity(0, allowed[:cpus])) if cpus and allowed else None
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          preexec_fn=limit)
    return proc.returncode, proc.stdout + proc.stderr


def _without(opts, *keys):
    return [x for k, v in zip(opts[::2], opts[1::2]) if k not in keys for x in (k, v)]


def _one_message(rc, log, *phrases):
    assert rc == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    for phrase in phrases:
        assert phrase in log, log[-3000:]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_training_log_has_the_project_lines_and_no_noise(data, tmp_path):
    """One DSIG iteration on one CPU with two loader workers; the config leaves the class count
    to the data, so the input checks (before launch) log a line too."""
    out = str(tmp_path / "out")
    opts = _without(tiny_opts(DATASET, out), "MODEL.ROI_HEADS.NUM_CLASSES",
                    "MODEL.RETINANET.NUM_CLASSES", "DISTILL.TEACHER.OPTS", "DATALOADER.NUM_WORKERS")
    rc, console = _run([sys.executable, os.path.join(PROJECT, "train_net.py"), "--config-file",
                        R18_R50, "--register-coco", DATASET, *data, *opts,
                        "DATALOADER.NUM_WORKERS", "2"], cpus=1)
    assert rc == 0, console[-3000:]
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    for text in (console, log):
        # item 8: the project's logger, in both; the pre-launch checks' line once
        assert f"Exported the student to {out}/model_final_student.pth" in text
        assert text.count("MODEL.ROI_HEADS.NUM_CLASSES 3: the class count of") == 1, text[-3000:]
        # item 11: no escape codes off a terminal (detectron2 highlights the config it logs)
        assert "\x1b" not in text
        assert text.count("Rank of current process") == 1  # detectron2's handlers not doubled
        # item 11: one line instead of torch's warning per loader; the count is kept
        assert ("DATALOADER.NUM_WORKERS 2 is above the 1 CPU(s) this process may use: kept"
                in text)
        assert "This DataLoader will create" not in text
    assert JIT_NOTICE not in console and "torch.meshgrid" not in console


def test_python_warnings_go_to_the_log(tmp_path):
    """setup_logs routes Python warnings through logging, into log.txt, one line each."""
    from distillation.logs import WARNINGS_LOGGER, setup_logs

    saved = {name: logging.getLogger(name).handlers[:] for name in
             ("detectron2", "fvcore", "distillation", WARNINGS_LOGGER)}
    try:
        setup_logs(str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("the log keeps me", UserWarning)
    finally:
        logging.captureWarnings(False)
        for name, handlers in saved.items():
            logging.getLogger(name).handlers = handlers
    text = (tmp_path / "log.txt").read_text()
    assert "py.warnings WARNING: " in text and "UserWarning: the log keeps me" in text
    assert "\n\n" not in text


def test_upstream_notices_are_silenced_exactly():
    """quiet_upstream_notices ignores the listed notices and nothing else of their kind; the
    package's import-time silence leaves the warning filters as they were. (The scripts'
    consoles without the notice: the training and entry-point tests.)"""
    from distillation.upstream_warnings import importing_upstream, quiet_upstream_notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        with importing_upstream():
            warnings.warn(JIT_NOTICE + ". Please switch", FutureWarning)
        assert warnings.filters == before
        quiet_upstream_notices()
        warnings.warn(JIT_NOTICE + ". Please switch", FutureWarning)
        warnings.warn("torch.meshgrid: in an upcoming release", UserWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


@pytest.mark.parametrize("text, where, phrase", [
    ("MODEL:\n  WEIGHTS: [unclosed\n", ":3:1: not valid YAML", "flow sequence that starts at "
                                                             "line 2, column 12"),
    ("MODEL:\n\tMASK_ON: True\n", ":2:1: not valid YAML", "'\\t' that cannot start any token"),
    ("- MODEL\n", ": a config file is a mapping", "this one holds a list"),
    ("MODEL:\n  NO_SUCH_KEY: 1\n", ": Non-existent config key: MODEL.NO_SUCH_KEY", ""),
    ("_BASE_: nothere.yaml\n", "", "nothere.yaml not found (the _BASE_ of "),
])
def test_bad_config_files_name_the_file(tmp_path, text, where, phrase):
    from distillation.training import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_config(str(path))
    assert f"{path}{where}" in str(e.value) and phrase in str(e.value)


def test_wrong_teacher_weights_name_the_key(tmp_path):
    """Loading the teacher from a path that is not there (any caller: the demo, the graph
    view, a model built in Python) names DISTILL.TEACHER.WEIGHTS and the path."""
    from distillation.checkpoint import load_teacher_weights

    with pytest.raises(MissingFileError,
                       match="DISTILL.TEACHER.WEIGHTS /nope/teacher.pth: file not found"):
        load_teacher_weights(None, "/nope/teacher.pth")


def test_errors_through_each_entry_point(tmp_path, capsys):
    """A malformed config through start_train.sh (train_net) and train_net --check (in this
    process), a missing one through visualize_graph: one message naming the file, exit
    status 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  WEIGHTS: [unclosed\n")
    env_python = dict(os.environ, PYTHON=sys.executable, NUM_GPUS="1")
    proc = subprocess.run([os.path.join(ROOT, "start_train.sh"), "train", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, env=env_python, timeout=300)
    _one_message(proc.returncode, proc.stdout + proc.stderr,
                 f"train_net.py: YAMLSyntaxError: {bad}:3:1: not valid YAML")
    train_net = _load_script(os.path.join(PROJECT, "train_net.py"), "cli_train_net")
    assert train_net.run(train_net.parser().parse_args(["--config-file", str(bad),
                                                        "--check"])) == 2
    assert (f"the config cannot be read: YAMLSyntaxError: {bad}:3:1: not valid YAML"
            in capsys.readouterr().out)
    rc, log = _run([sys.executable, VISUALIZE, "--config", str(tmp_path / "nothere.yaml"),
                    "--json", "x.json", "--image", "x.png"])
    _one_message(rc, log, f"visualize_graph.py: MissingFileError: config file "
                          f"{tmp_path / 'nothere.yaml'} not found")
    assert JIT_NOTICE not in log


def test_visualize_graph_takes_the_teacher_from_weights(data, tmp_path, caplog):
    """--weights brings the teacher: no warning about empty teacher weights; without them (and
    without ALLOW_RANDOM_INIT) a random teacher's graph is refused, naming the fixes."""
    import torch
    from detectron2.modeling import build_model

    from distillation.checkpoint import DistillationCheckpointer, TeacherWeightsError
    from distillation.graph_view import visualize
    from distillation.training import load_config

    json_file, image_root = data
    opts = tiny_opts(DATASET, str(tmp_path))
    torch.manual_seed(0)
    DistillationCheckpointer(build_model(load_config(DSIG_DEMO, opts)),
                             save_dir=str(tmp_path)).save("model_final")
    strict = opts + ["DISTILL.TEACHER.ALLOW_RANDOM_INIT", "False"]
    image = os.path.join(image_root, "0000.png")
    with caplog.at_level(logging.WARNING, logger="distillation"):
        stats = visualize(DSIG_DEMO, image, json_file, str(tmp_path / "graph.png"),
                          weights=str(tmp_path / "model_final.pth"), opts=strict)
    assert stats["nodes"] >= 1
    assert "DISTILL.TEACHER.WEIGHTS is empty" not in caplog.text
    with pytest.raises(TeacherWeightsError, match="give --weights a distillation checkpoint"):
        visualize(DSIG_DEMO, image, json_file, os.devnull, opts=strict)
    with pytest.raises(MissingFileError, match=r"nothere.pth not found \(--weights\)"):
        visualize(DSIG_DEMO, image, json_file, os.devnull, weights="nothere.pth", opts=strict)


def _load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["train_net.py", "tools/visualize_graph.py"])
def test_help_explains_every_option_in_whole_sentences(script):
    module = _load_script(os.path.join(PROJECT, script), "cli_" + os.path.basename(script)[:-3])
    parser = module.parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.dest
        if action.default not in (None, False, "", [], argparse.SUPPRESS):
            assert "%(default)" in action.help or "default:" in action.help, action.dest
    text = parser.format_help()
    # the description is the docstring's whole first paragraph, not its first line
    summary = module.__doc__.split("\n\n")[0]
    assert summary.rstrip().endswith(".") and " ".join(summary.split()) in " ".join(text.split())
    assert f"python projects/Distillation/{script}" in text  # the script's own example
    assert "$ train_net.py --num-gpus 8" not in text  # not detectron2's generic one
