"""tools/predict.py and tools/export_student.py (--format torchscript / onnx), end to end on tiny
generated images with a random-weight demo student (R18) and its DSIG model; the converter's
architecture check. The scripts run in subprocesses; CPU."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, PROJECT, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402

from distillation.checkpoint import DistillationCheckpointer, export_student  # noqa: E402
from distillation.training import load_config  # noqa: E402

DEMO = os.path.join(CONFIGS, "demo")
STUDENT_CONFIG = os.path.join(DEMO, "student-R18.yaml")
DSIG_CONFIG = os.path.join(DEMO, "dsig-R18-R50.yaml")
# the tiny test size and few detections keep each run to seconds (drawing is the slow part)
OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", "TEST.DETECTIONS_PER_IMAGE", "4"]
# non-contiguous category ids and image ids, so that the mapping back to the json's is tested
CATEGORY_IDS = {1: 5, 2: 9, 3: 12}
CATEGORY_NAMES = {5: "circle", 9: "square", 12: "star"}
IMAGE_IDS = {1: 101, 2: 102}


def _script(name, args, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(PROJECT, "tools", name)] + args,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _tool(name):
    """A tools/ script imported as a module (its main(argv) runs in this process)."""
    path = os.path.join(PROJECT, "tools", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two generated images with a COCO json of renumbered ids, a DSIG checkpoint of the demo
    (random weights, seeded) and its exported student."""
    root = tmp_path_factory.mktemp("predict")
    json_file, image_root = make_coco_dataset(str(root), num_images=2, size=(64, 80))
    with open(json_file) as f:
        data = json.load(f)
    for im in data["images"]:
        im["id"] = IMAGE_IDS[im["id"]]
    for ann in data["annotations"]:
        ann["image_id"] = IMAGE_IDS[ann["image_id"]]
        ann["category_id"] = CATEGORY_IDS[ann["category_id"]]
    data["categories"] = [{"id": i, "name": n} for i, n in CATEGORY_NAMES.items()]
    with open(json_file, "w") as f:
        json.dump(data, f)
    torch.manual_seed(0)
    cfg = load_config(DSIG_CONFIG, tiny_opts("unused", str(root)))
    DistillationCheckpointer(build_model(cfg), save_dir=str(root)).save("model_final")
    checkpoint, student = str(root / "model_final.pth"), str(root / "student.pth")
    export_student(checkpoint, student)
    return {"root": root, "json": json_file, "images": image_root, "checkpoint": checkpoint,
            "student": student}


@pytest.fixture(scope="module")
def student(files):
    """The exported student built from the student's config, as predict.py and the exporter
    build it (cfg, eval-mode model)."""
    from distillation.deploy import load_detector

    return load_detector(STUDENT_CONFIG, files["student"], OPTS, "cpu", score_threshold=0.0)


def _reference(files, student):
    """The detections of the eager student on each image, at threshold 0: {file name:
    [(category id, score, [x, y, w, h]), ...]}."""
    from distillation.prediction import Categories, Predictor, coco_results, read_rgb

    cfg, model = student
    categories = Categories(list(CATEGORY_NAMES.values()), list(CATEGORY_NAMES), "test")
    out = {}
    for name in sorted(os.listdir(files["images"])):
        image, _ = read_rgb(os.path.join(files["images"], name), cfg.INPUT.FORMAT)
        out[name] = [(r["category_id"], r["score"], r["bbox"]) for r in
                     coco_results(Predictor(cfg, model, 0.0)(image), 0, categories)]
    return out


def _by_image(results, name_of):
    got = {}
    for r in results:
        got.setdefault(name_of(r), []).append((r["category_id"], r["score"], r["bbox"]))
    return got


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for (c, s, box), (c2, s2, box2) in zip(got[name], want[name]):
            assert c == c2 and s == pytest.approx(s2, abs=1e-4), name
            np.testing.assert_allclose(box, box2, atol=0.02)


def test_predict_with_the_exported_student_and_with_the_distillation_checkpoint(files, student):
    """The exported student (student config, a folder) and the DSIG checkpoint (DSIG config, the
    COCO json) give the eager student's detections above the threshold, with the json's ids and
    names, drawn once per input."""
    want = _reference(files, student)
    total = sum(map(len, want.values()))
    assert all(len(dets) >= 2 for dets in want.values())
    # every image keeps its best detection, one at least loses its second
    threshold = min((dets[0][1] + dets[1][1]) / 2 for dets in want.values())
    want = {n: [d for d in dets if d[1] >= threshold] for n, dets in want.items()}
    assert all(want.values()) and sum(map(len, want.values())) < total

    folder_out, json_out = str(files["root"] / "pred_folder"), str(files["root"] / "pred_json")
    common = ["--score-threshold", str(threshold), "--device", "cpu"]
    rc, out, err = _script("predict.py", [
        files["images"], "--config-file", STUDENT_CONFIG, "--weights", files["student"],
        "--categories", files["json"], "--output", folder_out, *common, *OPTS])
    assert rc == 0, err[-3000:]
    assert "class names from " + files["json"] in out
    assert any(n in out for n in CATEGORY_NAMES.values())  # names, not indices, in the summary
    with open(os.path.join(folder_out, "coco_instances_results.json")) as f:
        results = json.load(f)
    names = sorted(os.listdir(files["images"]))
    assert {r["image_id"] for r in results} <= {1, 2}
    assert all(names[r["image_id"] - 1] == r["file_name"] for r in results)
    _assert_same(_by_image(results, lambda r: r["file_name"]), want)

    rc, out, err = _script("predict.py", [
        files["json"], "--image-root", files["images"], "--config-file", DSIG_CONFIG,
        "--weights", files["checkpoint"], "--output", json_out, *common, *OPTS])
    assert rc == 0, err[-3000:]
    assert "class names from " + files["json"] in out
    with open(os.path.join(json_out, "coco_instances_results.json")) as f:
        results = json.load(f)
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["category_id"] for r in results} <= set(CATEGORY_NAMES)
    by_id = {IMAGE_IDS[i + 1]: n for i, n in enumerate(names)}
    _assert_same(_by_image(results, lambda r: by_id[r["image_id"]]), want)

    from PIL import Image
    for out_dir in (folder_out, json_out):
        for name in names:
            source = np.asarray(Image.open(os.path.join(files["images"], name)).convert("RGB"))
            drawn = np.asarray(Image.open(os.path.join(out_dir, name)).convert("RGB"))
            assert drawn.shape == source.shape
            assert (drawn != source).any(axis=2).mean() > 0.01  # boxes and labels drawn


def test_class_names_from_the_config_datasets_or_indices():
    """Without a json: detectron2's metadata of the config's dataset (COCO's names, ids mapped
    back to COCO's), else "class N" with the class index; a mismatching count falls back too."""
    from distillation.deploy import detector_config
    from distillation.prediction import choose_categories

    def categories(*opts):
        # (weights: any existing file passes; none is loaded here)
        cfg = detector_config(STUDENT_CONFIG, STUDENT_CONFIG, list(opts), "cpu")
        return choose_categories(cfg)

    coco = categories("DATASETS.TEST", "('coco_2017_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "80")
    assert coco.source == "dataset coco_2017_val"
    assert (coco.names[0], coco.ids[0]) == ("person", 1)
    assert (coco.names[-1], coco.ids[-1]) == ("toothbrush", 90)
    for opts in ([], ["DATASETS.TEST", "('coco_2017_val',)"]):  # 8 classes: not COCO's 80
        plain = categories(*opts)
        assert plain.names == [f"class {i}" for i in range(8)] and plain.ids == list(range(8))


def test_predict_input_errors(files, tmp_path, capsys):
    """Bad input: one message naming it, exit status 2 (tools/predict.py's main, in this
    process): a missing input, a folder without images, an unreadable image, a json's images
    not under the image root, a weights file that is no checkpoint (not torch's advice to load
    it unsafely), weights of another architecture (the unfilled weights listed, as train_net's
    --eval-only lists them), a category count that is not the model's class count."""
    predict = _tool("predict")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not a png")
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint")
    wrong = str(tmp_path / "r50.pth")  # the demo's teacher-sized R50 as student weights
    torch.save({"model": build_model(load_config(os.path.join(DEMO, "teacher-R50.yaml"),
                                                 OPTS)).state_dict()}, wrong)
    base = ["--config-file", STUDENT_CONFIG, "--weights", files["student"],
            "--output", str(tmp_path / "out"), *OPTS]
    cases = [
        ([str(tmp_path / "nothere"), *base], "input " + str(tmp_path / "nothere") +
         ": no such file or folder"),
        ([str(empty), *base], f"input folder {empty} holds no images"),
        ([str(broken), *base], f"ImageError: cannot read image {broken / 'a.png'}"),
        ([files["json"], *base], "2 of the 2 images of " + files["json"] + " are not under"),
        ([files["images"], *base[:3], str(text), *base[4:]],
         f"{text} is not a PyTorch checkpoint"),
        ([files["images"], *base[:3], wrong, *base[4:]],
         f"IncompleteCheckpointError: checkpoint {wrong} leaves"),
        ([files["images"], *base, "MODEL.ROI_HEADS.NUM_CLASSES", "4", "--categories",
          files["json"]], "has 3 categories but the model predicts 4 classes "
                          "(MODEL.ROI_HEADS.NUM_CLASSES)"),
    ]
    for argv, message in cases:
        assert predict.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert "weights_only" not in err
        if "IncompleteCheckpointError" in message:  # the list of unfilled weights follows
            assert ("backbone.bottom_up.res3.0.conv1.weight: shape (128, 256, 1, 1) in the "
                    "checkpoint") in err
        else:
            assert len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(str(tmp_path / "out"))


def _detections(boxes, classes, scores, *rest):
    """(boxes, classes, scores) as tensors in canonical order (ties of scores are ordered
    arbitrarily by the model)."""
    from distillation.deploy import canonical_order

    boxes, classes, scores = (torch.as_tensor(x).detach() for x in (boxes, classes, scores))
    order = torch.as_tensor(canonical_order(scores, classes, boxes))
    return boxes[order], classes[order], scores[order]


def test_torchscript_export_equals_eager(files, student, tmp_path):
    """export_student.py --format torchscript of the exported student with the student's
    config: the saved module, reloaded here, gives the eager student's detections on an image of
    another size than the one traced."""
    from distillation.deploy import METADATA_FILE, ExportMismatchError, compare, eager_detections

    path = str(tmp_path / "student.ts")
    rc, out, err = _script("export_student.py", [
        files["student"], path, "--format", "torchscript", "--config-file", STUDENT_CONFIG,
        *OPTS])
    assert rc == 0, err[-3000:]
    assert "outputs pred_boxes, pred_classes, scores, image_size" in out
    extra = {METADATA_FILE: ""}
    traced = torch.jit.load(path, _extra_files=extra)
    metadata = json.loads(extra[METADATA_FILE])
    assert metadata["outputs"] == ["pred_boxes", "pred_classes", "scores", "image_size"]
    assert metadata["input_format"] == "RGB" and metadata["num_classes"] == 3

    _, model = student
    image = torch.rand(3, 56, 88, generator=torch.Generator().manual_seed(3)) * 255
    expected = eager_detections(model, image)
    assert len(expected) > 0
    boxes, classes, scores = _detections(*traced(image))
    want_boxes, want_classes, want_scores = _detections(
        expected.pred_boxes.tensor, expected.pred_classes, expected.scores)
    torch.testing.assert_close(boxes, want_boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)
    assert torch.equal(classes, want_classes)
    # the exporter's own check (run before it reported success) sees a shifted box
    outputs = [o.detach().clone() for o in traced(image)]
    assert compare("traced", outputs, expected) < 1e-4
    outputs[0][0, 0] += 0.01
    with pytest.raises(ExportMismatchError, match="pred_boxes differs from eager by 0.01"):
        compare("traced", outputs, expected)


def test_onnx_export_equals_eager(student, tmp_path):
    """The ONNX file (torch's TorchScript-based exporter) run by ONNX Runtime on an image of
    another size than the one traced gives the eager detections."""
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from distillation.deploy import eager_detections, export_onnx, sample_image

    cfg, model = student
    path = str(tmp_path / "student.onnx")
    names, worst = export_onnx(cfg, model, sample_image(cfg), path)
    assert names == ["pred_boxes", "pred_classes", "scores", "image_size"] and worst is not None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    image = torch.rand(3, 56, 88, generator=torch.Generator().manual_seed(4)) * 255
    boxes, classes, scores = _detections(*session.run(None, {"image": image.numpy()}))
    expected = eager_detections(model, image)
    assert len(expected) > 0
    want_boxes, want_classes, want_scores = _detections(
        expected.pred_boxes.tensor, expected.pred_classes, expected.scores)
    torch.testing.assert_close(boxes, want_boxes, rtol=0, atol=1e-3)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)
    assert torch.equal(classes, want_classes)


def test_export_student_refuses_files_that_are_not_distillation_checkpoints(files, tmp_path,
                                                                           capsys):
    """A text file: one line, exit 2, and no advice to load it with weights_only=False; a
    pickled object is named; an exported student asked for --format checkpoint is explained."""
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    out = str(tmp_path / "s.pth")
    export = _tool("export_student")
    assert export.main([str(text), out]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"export_student.py: {text} is not a PyTorch checkpoint "
                           "(torch.load cannot read it as a torch.save file)"), err
    pickled = tmp_path / "object.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": argparse_namespace()}, pickled)
    assert export.main([str(pickled), out]) == 2
    err = capsys.readouterr().err
    assert "holds Python objects (argparse.Namespace)" in err and "weights_only" not in err
    assert export.main([files["student"], out]) == 2
    assert "not a distillation checkpoint" in capsys.readouterr().err
    assert export.main([files["student"], out, "--format", "torchscript"]) == 2
    assert "needs --config-file" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_training_weights_that_are_not_a_checkpoint(tmp_path):
    """MODEL.WEIGHTS (or a resume file) that is no checkpoint: the trainer's checkpointer gives
    the same one line as the tools (an InputError: train_net prints it without a traceback)."""
    from distillation.checkpoint import DistillationCheckpointer, NotACheckpointError
    from distillation.errors import InputError

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(NotACheckpointError) as info:
        DistillationCheckpointer(torch.nn.Linear(2, 2)).load(str(text))
    assert isinstance(info.value, InputError)
    assert str(info.value) == (f"{text} is not a PyTorch checkpoint (torch.load cannot read it "
                               "as a torch.save file)")


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)


def test_converter_checks_the_architecture(tmp_path, capsys, monkeypatch):
    """resnet18 weights named resnet50: refused, naming resnet18, nothing written; named
    resnet18 they convert."""
    import torchvision

    convert = _tool("convert_torchvision_backbone")
    source, out = str(tmp_path / "r18.pth"), str(tmp_path / "out.pth")
    torch.save(torchvision.models.resnet18().state_dict(), source)
    monkeypatch.setattr(sys, "argv", ["convert_torchvision_backbone.py", "resnet50", source, out])
    with pytest.raises(SystemExit) as exit_:
        convert.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.strip() == (f"convert_torchvision_backbone.py: {source}: the file holds resnet18 "
                           "weights, not resnet50: convert it as resnet18; nothing written")
    assert not os.path.exists(out)
    monkeypatch.setattr(sys, "argv", ["convert_torchvision_backbone.py", "resnet18", source, out])
    convert.main()
    assert len(torch.load(out, weights_only=True)["model"]) == 100
