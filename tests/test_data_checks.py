"""What train_net.py checks before any model is built (one implementation with the demo's
own-data mode, distillation/data_checks.py): the data (boxes, image files, registration, COCO's
location), the class count (from the data, for student and teacher), the weight files (offline:
the config key named). Bad input ends in one message naming the problem and the fix, exit status
2, no traceback. Subprocesses on tiny generated data, CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, PROJECT, make_coco_dataset, tiny_opts  # noqa: E402

DEMO = os.path.join(CONFIGS, "demo")
R18_R50 = os.path.join(CONFIGS, "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml")
DATASET = "checked_tiny"


@pytest.fixture
def data(tmp_path):
    """A fresh tiny dataset per test (tests damage it): 2 classes, 4 images of 96x128."""
    return make_coco_dataset(str(tmp_path / "data"), num_classes=2)


def _without(opts, *keys):
    """tiny_opts without the given keys (and their values)."""
    out = []
    for k, v in zip(opts[::2], opts[1::2]):
        if k not in keys:
            out += [k, v]
    return out


def _train_net(args, timeout=600, **env):
    full_env = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, os.path.join(PROJECT, "train_net.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc.returncode, proc.stdout + proc.stderr


def _run_with(data, tmp_path, config, extra=(), flags=(), **env):
    opts = tiny_opts(DATASET, str(tmp_path / "out"), num_classes=2) + list(extra)
    return _train_net(["--config-file", config, "--register-coco", DATASET, *data, *flags,
                       *opts], **env)


def _refused(rc, log, *phrases):
    """Exit status 2, one message, nothing built or trained."""
    assert rc == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    for phrase in phrases:
        assert phrase in log, log[-3000:]
    assert "Starting training" not in log and "Model:" not in log


def _rewrite(json_file, change):
    with open(json_file) as f:
        d = json.load(f)
    change(d)
    with open(json_file, "w") as f:
        json.dump(d, f)


def test_a_box_outside_its_image_is_refused(data, tmp_path):
    _rewrite(data[0], lambda d: d["annotations"][0].update(bbox=[100, 50, 60, 20]))
    rc, log = _run_with(data, tmp_path, os.path.join(DEMO, "student-R18.yaml"))
    _refused(rc, log, f"DataError: DATASETS.TRAIN {DATASET}: 1 box(es) in {data[0]} are empty "
                      "or outside their image, e.g. annotation 1 of image 1: bbox [100, 50, 60, "
                      "20] in a 128x96 image")


def test_a_missing_image_file_is_refused(data, tmp_path):
    os.remove(os.path.join(data[1], "0002.png"))
    rc, log = _run_with(data, tmp_path, os.path.join(DEMO, "student-R18.yaml"))
    _refused(rc, log, f"1 of the 4 images {data[0]} lists are not in {data[1]}, e.g. 0002.png")


def test_an_unregistered_dataset_names_the_options(data, tmp_path):
    rc, log = _run_with(data, tmp_path, os.path.join(DEMO, "student-R18.yaml"),
                        ["DATASETS.TRAIN", "('my_train',)"])
    _refused(rc, log, "DATASETS.TRAIN: dataset 'my_train' is not registered",
             "--register-coco NAME ann.json image_root", "DSIG_COCO_DATASETS=")


def test_missing_coco_names_detectron2_datasets(tmp_path):
    """The shipped config on a machine without COCO: the message says where detectron2 looked
    and how to point it elsewhere or use your own data (was a raw FileNotFoundError after the
    model was built)."""
    empty = tmp_path / "datasets"
    empty.mkdir()
    rc, log = _train_net(["--config-file", R18_R50, "MODEL.WEIGHTS", "",
                          "DISTILL.TEACHER.WEIGHTS", "", "DISTILL.TEACHER.ALLOW_RANDOM_INIT",
                          "True"], DETECTRON2_DATASETS=str(empty))
    _refused(rc, log, "DATASETS.TRAIN coco_2017_train: annotation file "
                      f"{empty}/coco/annotations/instances_train2017.json not found",
             f"DETECTRON2_DATASETS={empty}", "--register-coco", "DSIG_COCO_DATASETS")


def test_offline_weights_name_their_config_key(data, tmp_path):
    cache = {"DSIG_OFFLINE": "1", "FVCORE_CACHE": str(tmp_path / "iopath"),
             "TORCH_HOME": str(tmp_path / "torch")}
    # the teacher of the shipped config
    opts = _without(tiny_opts(DATASET, str(tmp_path / "out"), num_classes=2),
                    "DISTILL.TEACHER.WEIGHTS", "DISTILL.TEACHER.ALLOW_RANDOM_INIT")
    rc, log = _train_net(["--config-file", R18_R50, "--register-coco", DATASET, *data, *opts],
                         **cache)
    _refused(rc, log, "DISTILL.TEACHER.WEIGHTS detectron2://COCO-Detection/faster_rcnn_R_50_FPN_"
                      "3x/137849458/model_final_280758.pkl needs https://dl.fbaipublicfiles.com/",
             str(tmp_path / "iopath"), "set DISTILL.TEACHER.WEIGHTS to a local copy",
             "DISTILL.TEACHER.WEIGHTS '' DISTILL.TEACHER.ALLOW_RANDOM_INIT True",
             "./start_train.sh check CONFIG")
    # the student's initialisation
    rc, log = _train_net(["--config-file", R18_R50, "--register-coco", DATASET, *data,
                          *tiny_opts(DATASET, str(tmp_path / "out"), num_classes=2),
                          "MODEL.WEIGHTS", "torchvision://resnet18"], **cache)
    _refused(rc, log, "MODEL.WEIGHTS torchvision://resnet18 needs https://download.pytorch.org/"
                      "models/resnet18-f37072fd.pth", "override MODEL.WEIGHTS ''")
    for cache_dir in ("iopath", "torch"):  # nothing fetched or written
        assert not [f for _, _, files in os.walk(tmp_path / cache_dir) for f in files]


def test_class_count_comes_from_the_data_for_student_and_teacher(data, tmp_path):
    """A 2-class json on the shipped 80-class config: student and teacher get 2 classes, nobody
    sets NUM_CLASSES (the teacher's DISTILL.TEACHER.OPTS say nothing about it)."""
    out = tmp_path / "out"
    opts = _without(tiny_opts(DATASET, str(out)), "MODEL.ROI_HEADS.NUM_CLASSES",
                    "MODEL.RETINANET.NUM_CLASSES", "DISTILL.TEACHER.OPTS")
    rc, log = _train_net(["--config-file", R18_R50, "--register-coco", DATASET, *data, *opts])
    assert rc == 0, log[-3000:]
    with open(out / "config.yaml") as f:
        assert "NUM_CLASSES: 2" in f.read()
    weights = torch.load(out / "model_final.pth", weights_only=False)["model"]
    for net in ("student", "teacher"):
        assert weights[f"{net}.roi_heads.box_predictor.cls_score.weight"].shape[0] == 3, net


def test_a_class_count_set_otherwise_is_refused(data, tmp_path):
    rc, log = _run_with(data, tmp_path, os.path.join(DEMO, "student-R18.yaml"),
                        ["MODEL.ROI_HEADS.NUM_CLASSES", "5"])
    _refused(rc, log, f"MODEL.ROI_HEADS.NUM_CLASSES is 5 (on the command line) but "
                      f"DATASETS.TRAIN {DATASET} has 2 categories: set "
                      "MODEL.ROI_HEADS.NUM_CLASSES 2")
    # the demo's configs write 8 classes in the file
    opts = _without(tiny_opts(DATASET, str(tmp_path / "out")), "MODEL.ROI_HEADS.NUM_CLASSES")
    rc, log = _train_net(["--config-file", os.path.join(DEMO, "student-R18.yaml"),
                          "--register-coco", DATASET, *data, *opts])
    _refused(rc, log, "MODEL.ROI_HEADS.NUM_CLASSES is 8 (in "
                      f"{os.path.join(DEMO, 'student-R18.yaml')}) but")


def test_teacher_class_mismatch_names_the_override(data, tmp_path):
    rc, log = _run_with(data, tmp_path, os.path.join(DEMO, "dsig-R18-R50.yaml"),
                        ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "DISTILL.TEACHER.OPTS",
                         "['MODEL.ROI_HEADS.NUM_CLASSES', 5]"])
    _refused(rc, log, "MODEL.ROI_HEADS.NUM_CLASSES is 2 for the student and 5 for the teacher "
                      "(set by DISTILL.TEACHER.OPTS)",
             "drop it from DISTILL.TEACHER.OPTS, or set MODEL.ROI_HEADS.NUM_CLASSES 5")
    assert "Full config saved" not in log  # refused before any process started


def test_retinanet_teacher_class_mismatch_names_the_override(tmp_path):
    from detectron2.modeling import build_model

    from distillation.errors import ConfigError
    from distillation.training import load_config

    opts = tiny_opts("unused", str(tmp_path), num_classes=3)
    opts[opts.index("DISTILL.TEACHER.OPTS") + 1] = "['MODEL.RETINANET.NUM_CLASSES', 4]"
    cfg = load_config(os.path.join(CONFIGS, "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml"), opts)
    with pytest.raises(ConfigError, match=r"MODEL.RETINANET.NUM_CLASSES is 3 for the student and "
                                          r"4 for the teacher.*drop it from DISTILL.TEACHER.OPTS"):
        build_model(cfg)
    # without the teacher override the teacher takes the student's count
    opts[opts.index("DISTILL.TEACHER.OPTS") + 1] = "[]"
    model = build_model(load_config(os.path.join(CONFIGS,
                                                 "Distillation-RetinaNet-MNV2-R50-dsig-1x.yaml"),
                                    opts))
    assert model.teacher.num_classes == model.student.num_classes == 3


def test_a_flag_among_the_options_is_named(data, tmp_path):
    rc, log = _train_net(["--config-file", os.path.join(DEMO, "student-R18.yaml"),
                          "MODEL.DEVICE", "cpu", "--register-coco", DATASET, *data])
    _refused(rc, log, "--register-coco is among the KEY VALUE config options")


def test_demo_refuses_a_missing_image_file(tmp_path):
    from distillation import demo

    train = make_coco_dataset(str(tmp_path / "train"))
    val = make_coco_dataset(str(tmp_path / "val"), seed=1)
    os.remove(os.path.join(val[1], "0001.png"))
    with pytest.raises(FileNotFoundError, match=r"val: 1 of the 4 images .* are not in .*, "
                                                r"e\.g\. 0001\.png"):
        demo.prepare_user_data(f"t={train[0]},{train[1]}", f"v={val[0]},{val[1]}")
    proc = subprocess.run([sys.executable, os.path.join(PROJECT, "run_demo.py"), "--preset",
                           "tiny", "--output", str(tmp_path / "out"),
                           "--train", f"t={train[0]},{train[1]}",
                           "--val", f"v={val[0]},{val[1]}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "run_demo.py: MissingDataError: val: 1 of the 4 images" in proc.stderr
