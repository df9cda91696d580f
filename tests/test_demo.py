"""The demo pipeline end to end on the tiny preset: report files with numeric AP values, a\nreport and a console that say what they show."""
import argparse
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")
from distill_utils import PROJECT  # noqa: E402
from distillation import demo  # noqa: E402


def test_gap_recovered():
    assert demo.gap_recovered(40.0, 30.0, 35.0) == pytest.approx(0.5)
    assert demo.gap_recovered(30.0, 30.0, 31.0) is None


def _fake_results(ap_by_seed):
    return {seed: {name: {"bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap, "APs": float("nan"),
                                   "APm": ap, "APl": ap},
                          "seconds_per_iter": 0.5, "threads": 2}
                   for name, ap in aps.items()}
            for seed, aps in ap_by_seed.items()}


def test_summary_over_seeds():
    results = _fake_results({0: {"teacher": 10.0, "baseline": 6.0, "dsig": 9.0},
                             1: {"teacher": 12.0, "baseline": 6.0, "dsig": 8.0}})
    summary = demo.summarize(results)
    assert summary["mean"]["dsig"]["bbox"]["AP"] == pytest.approx(8.5)
    assert math.isnan(summary["mean"]["dsig"]["bbox"]["APs"])
    # gap from the mean APs (11 - 6 = 5, recovered 2.5), not the mean of per-seed ratios
    assert summary["gap_recovered"]["dsig"] == pytest.approx(0.5)
    assert summary["per_seed"]["0"]["gap_recovered"]["dsig"] == pytest.approx(0.75)
    assert summary["per_seed"]["1"]["gap_recovered"]["dsig"] == pytest.approx(1 / 3)


def test_graph_lines_average_the_logged_sizes():
    results = _fake_results({0: {"teacher": 10.0, "baseline": 6.0, "dsig": 9.0},
                             1: {"teacher": 12.0, "baseline": 6.0, "dsig": 8.0}})
    results[0]["dsig"]["graph"] = {"graph_nodes": 30.0, "mined_bg_fraction": 0.05}
    results[1]["dsig"]["graph"] = {"graph_nodes": 40.0, "mined_bg_fraction": 0.15}
    lines = demo.graph_lines(results)
    assert lines[2:] == ["- dsig: 35 nodes per image, 10 % of the sampled bg RoIs mined into "
                         "the edges", ""]
    results[1]["dsig"].pop("graph")
    del results[0]["dsig"]["graph"]["mined_bg_fraction"]  # a one-stage graph: no mining
    assert demo.graph_lines(results)[2] == "- dsig: 30 nodes per image"
    del results[0]["dsig"]["graph"]
    assert demo.graph_lines(results) == []


def test_report_over_seeds(tmp_path):
    results = _fake_results({3: {"teacher": 10.0, "baseline": 6.0, "dsig": 9.0},
                             4: {"teacher": 12.0, "baseline": 6.0, "dsig": 8.0}})
    report = demo.write_report(str(tmp_path), "quick", demo.PRESETS["quick"], results)
    assert report["seeds"] == [3, 4]
    text = (tmp_path / "report.md").read_text()
    assert "seeds 3, 4" in text and "9.00 / 8.00" in text and "**0.50** (0.75, 0.33)" in text
    # dsig 8.5 vs baseline 6.0, spread 1.0: a difference beyond the seed spread
    assert "- dsig: 8.50 vs baseline 6.00 (difference +2.50, seed spread 1.00): above" in text
    assert "DSIG against the other distilled students" not in text  # dsig alone
    methods = _fake_results({0: {"teacher": 10.0, "baseline": 6.0, "dsig": 9.0,
                                 "feature-mse": 8.0, "logit-kd": 6.5},
                             1: {"teacher": 12.0, "baseline": 6.0, "dsig": 8.0,
                                 "feature-mse": 9.5, "logit-kd": 7.0}})
    demo.write_report(str(tmp_path), "quick", demo.PRESETS["quick"], methods)
    text = (tmp_path / "report.md").read_text()
    # spread: the larger of the two runs' (feature-mse 1.5; dsig 1.0, logit-kd 0.5)
    assert ("- dsig: 8.50 vs feature-mse 8.75 (difference -0.25, seed spread 1.50): within the "
            "seed spread: not distinguishable from feature-mse.") in text
    assert ("- dsig: 8.50 vs logit-kd 6.75 (difference +1.75, seed spread 1.00): above "
            "logit-kd by more than the seed spread.") in text
    assert "thr)" not in text  # one thread count: no marks
    methods[0]["teacher"]["threads"] = methods[1]["teacher"]["threads"] = 1
    methods[1]["dsig"]["threads"] = 1
    demo.write_report(str(tmp_path), "quick", demo.PRESETS["quick"], methods)
    text = (tmp_path / "report.md").read_text()
    assert "training ran with 1/2 torch thread(s) per run; s/iter marks each run's" in text
    assert "| 0.500 (1 thr) |" in text and "| 0.500 (1/2 thr) |" in text
    assert "| 0.500 (2 thr) |" in text
    close = _fake_results({0: {"teacher": 10.0, "baseline": 6.0, "dsig": 6.5},
                           1: {"teacher": 12.0, "baseline": 7.0, "dsig": 6.0}})
    demo.write_report(str(tmp_path), "quick", demo.PRESETS["quick"], close)
    assert "not distinguishable from the baseline" in (tmp_path / "report.md").read_text()
    assert os.path.isfile(tmp_path / "ap.png") and os.path.isfile(tmp_path / "loss.png")
    with pytest.raises(ValueError, match="distinct"):
        demo.run(str(tmp_path), "tiny", seeds=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        demo.run(str(tmp_path), "tiny", seeds=[-1])


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One tiny demo (teacher, baseline, dsig and the ablation's students, seed 0) shared by the
    tests that read its folder, its report and what it printed."""
    out = tmp_path_factory.mktemp("tiny_demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = demo.run(str(out), "tiny", seeds=0, ablation=True)
    return out, report, printed.getvalue()


TINY_RUNS = ("teacher", "baseline", "dsig", "dsig-edges", "dsig-edges-fg")


def test_tiny_demo_pipeline(tiny_demo):
    tmp_path, report, printed = tiny_demo
    for name in ("report.md", "report.json", "ap.png", "loss.png", "graph.png"):
        assert os.path.isfile(tmp_path / name), name
    with open(tmp_path / "report.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    runs = saved["per_seed"]["0"]["results"]
    assert set(runs) == set(TINY_RUNS)
    assert set(saved["gap_recovered"]) == {"dsig", "dsig-edges", "dsig-edges-fg"}
    for r in runs.values():
        assert isinstance(r["bbox"]["AP"], float) and not math.isnan(r["bbox"]["AP"])
        assert r["seconds_per_iter"] > 0 and r["threads"] >= 1
    # the steps after the first 5 (warm-up) are timed: 8 - 5 for the teacher, 6 - 5 for students
    assert runs["teacher"]["timed_iters"] == 3
    assert all(runs[name]["timed_iters"] == 1 for name in TINY_RUNS[1:])
    for name in ("dsig", "dsig-edges", "dsig-edges-fg"):  # graph sizes logged in training
        graph = runs[name]["graph"]
        assert graph["graph_nodes"] >= 1 and 0 <= graph["mined_bg_fraction"] <= 1
    assert "graph" not in runs["baseline"] and "graph" not in runs["teacher"]
    assert "- dsig: " in (tmp_path / "report.md").read_text().split("Instance graphs")[1]
    # trained from scratch: no stage claims a cached result
    assert "stage 2/7: seed 0: teacher R50-FPN, 8 iterations\n" in printed
    assert "(cached" not in printed
    # a re-run skips every stage already done, and says so
    mtime = os.path.getmtime(tmp_path / "dsig-tiny-seed0" / "result.json")
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        demo.run(str(tmp_path), "tiny", seeds=[0], ablation=True)
    assert os.path.getmtime(tmp_path / "dsig-tiny-seed0" / "result.json") == mtime
    for name in TINY_RUNS:
        cached = f"(cached: {tmp_path / f'{name}-tiny-seed0' / 'result.json'})"
        assert cached in again.getvalue(), name

    # the graph view on its own: an image panel and three matrix panels
    from PIL import Image

    from distillation.graph_view import visualize

    data = tmp_path / "data-tiny-seed0"
    first = json.load(open(data / "val.json"))["images"][0]["file_name"]
    out = tmp_path / "graph2.png"
    stats = visualize(os.path.join(demo.CONFIG_DIR, "dsig-R18-R50.yaml"), str(data / "val" / first),
                      str(data / "val.json"), str(out),
                      weights=str(tmp_path / "dsig-tiny-seed0" / "model_final.pth"),
                      opts=demo.PRESETS["tiny"].extra + ["DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True"])
    assert stats["nodes"] >= stats["fg"] >= 1 and stats["edge_mse"] >= 0
    width, height = Image.open(out).size
    assert width > 3 * height  # four panels side by side


def test_tiny_report_is_readable(tiny_demo):
    """The tiny report says it is a pipeline check, what s/iter measures (and prints none for
    runs too short to time), and its figures show the numbers: AP on an axis of a few AP
    points from 0, one-point loss series as markers."""
    from distillation.demo import plots

    tmp_path, report, _ = tiny_demo
    text = (tmp_path / "report.md").read_text()
    assert text.splitlines()[2].startswith("**The tiny preset is a pipeline check only**")
    assert "median wall-clock time of a training step" in text and "after the first 5" in text
    for name in TINY_RUNS:  # 3 or 1 steps past the warm-up: too few to time
        assert re.search(rf"^\| {name} \|.* \| – \|$", text, re.M), name
    fig = plots.ap_figure(report)
    low, high = fig.axes[0].get_ylim()
    assert low == 0 and high >= plots.MIN_AP_SPAN
    results = {0: {name: {"loss_curve": demo.loss_curve(str(tmp_path / f"{name}-tiny-seed0"))}
                   for name in TINY_RUNS}}
    lines = plots.loss_figure(results, list(TINY_RUNS)).axes[0].lines
    assert len(lines) == len(TINY_RUNS)
    for line in lines:  # detectron2 logged one loss per tiny run: drawn as a marker
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "")
    # a long run keeps a plain line
    long = {0: {"dsig": {"loss_curve": [{"iteration": i, "total_loss": 1.0}
                                        for i in range(19, 600, 20)]}}}
    assert plots.loss_figure(long, ["dsig"]).axes[0].lines[0].get_marker() in (None, "None")


def test_steady_step_seconds_leave_out_the_warm_up():
    """s/iter is the median of the steps after the first WARMUP_STEPS of a session (the first
    steps set up kernels and memory and are several times slower)."""
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from distillation.demo import runs

    with EventStorage(start_iter=10) as storage:  # a resumed run: warm-up counted from 10
        for it, seconds in enumerate([9.0, 8.0, 7.0, 5.0, 3.0, 1.0, 1.2, 0.8], start=10):
            storage.iter = it
            storage.put_scalar("time", seconds)
    trainer = SimpleNamespace(storage=storage, start_iter=10)
    assert runs.WARMUP_STEPS == 5 and runs.steady_step_seconds(trainer) == [1.0, 1.2, 0.8]


def test_run_demo_prints_where_the_report_is(tiny_demo):
    """run_demo.py (a re-run: every stage reused) prints the report, then its path last."""
    tmp_path, _, _ = tiny_demo
    proc = subprocess.run([sys.executable, os.path.join(PROJECT, "run_demo.py"), "--preset",
                           "tiny", "--ablation", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.rstrip().splitlines()
    assert out[-1].startswith(f"[demo] report: {tmp_path / 'report.md'} ")
    assert "# DSIG demo report (tiny preset, seed 0)" in out
    assert sum("(cached: " in line for line in out) == len(TINY_RUNS)


def test_run_demo_help():
    """--help: the whole description, every option with its help and default, every preset and
    method explained."""
    from distillation.demo import cli
    from distillation.demo.presets import METHOD_PURPOSE, PRESETS, describe_preset

    proc = subprocess.run([sys.executable, os.path.join(PROJECT, "run_demo.py"), "--help"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    flat = " ".join(proc.stdout.split())
    assert " ".join(cli.DESCRIPTION.split()) in flat and cli.DESCRIPTION.endswith(".")
    for action in cli.build_parser()._actions:
        assert action.help, action.option_strings
        assert " ".join((action.help % {"default": action.default}).split()) in flat
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "(default: " in action.help, action.option_strings
    for name in PRESETS:
        assert f"{name} {describe_preset(name)}" in flat
    for name, text in METHOD_PURPOSE.items():
        assert f"{name} {text}" in flat
    assert max(map(len, proc.stdout.splitlines())) <= 80


def test_report_rewritten_from_its_json(tmp_path):
    """run_demo.py --report-only: a finished demo's report (here in the first layout, as the
    first committed report was) rewritten in the current layout from report.json, numbers and
    machine kept."""
    from dataclasses import asdict

    from distillation.demo import cli

    runs = _fake_results({0: {"teacher": 9.07, "baseline": 5.6, "dsig": 8.21}})[0]
    old = {"preset": "quick", "seed": 0, "preset_settings": asdict(demo.PRESETS["quick"]),
           "machine": "AMD EPYC, 2 cores", "torch": "2.14.1", "results": runs,
           "gap_recovered": 0.75}
    (tmp_path / "report.json").write_text(json.dumps(old))
    report = cli.main(["--report-only", "--output", str(tmp_path)])
    assert report["seeds"] == [0] and report["machine"] == old["machine"]
    assert report["mean"]["dsig"]["bbox"]["AP"] == 8.21
    text = (tmp_path / "report.md").read_text()
    assert "| dsig | 8.21 |" in text and "detectron2's logged training-step time" in text
    assert "- dsig: **0.75**" in text and "One seed: no spread estimate" in text
    assert os.path.isfile(tmp_path / "ap.png") and not os.path.exists(tmp_path / "loss.png")
    assert json.load(open(tmp_path / "report.json")) == json.loads(json.dumps(report))
    with pytest.raises(SystemExit):
        cli.main(["--report-only", "--output", str(tmp_path / "none")])


def test_tiny_demo_mask_rcnn(tmp_path, capsys):
    """--task segm: Mask R-CNN teacher, baseline and DSIG student on generated masks; box and
    mask AP, the gap recovered for each."""
    report = demo.run(str(tmp_path), "tiny", seeds=[0], task="segm")
    assert report["task"] == "segm" and report["tasks"] == ["bbox", "segm"]
    runs = report["per_seed"]["0"]["results"]
    assert set(runs) == {"teacher", "baseline", "dsig"}
    for r in runs.values():
        assert not math.isnan(r["bbox"]["AP"]) and not math.isnan(r["segm"]["AP"])
    assert set(report["gap_recovered"]) == set(report["gap_recovered_segm"]) == {"dsig"}
    text = open(tmp_path / "report.md").read()
    assert "## Box AP" in text and "## Mask AP" in text and "mask AP gap recovered" in text
    assert "Mask R-CNN R50-FPN" in text and os.path.isfile(tmp_path / "graph.png")
    data = json.load(open(tmp_path / "data-tiny-segm-seed0" / "train.json"))
    assert all("counts" in a["segmentation"] for a in data["annotations"])
    assert os.path.isdir(tmp_path / "dsig-tiny-segm-seed0")
    assert "mask AP" in capsys.readouterr().out  # each finished run's APs on the console
    with pytest.raises(ValueError, match="task must be one of"):
        demo.run(str(tmp_path), "tiny", task="keypoints")


def test_user_data_for_segm_needs_masks(tmp_path):
    from distill_utils import make_coco_dataset

    json_file, root = make_coco_dataset(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="no 'segmentation'.*--task segm"):
        demo.prepare_user_data(f"a={json_file},{root}", f"b={json_file},{root}", task="segm")


def test_method_selection():
    assert demo.select_methods() == ["dsig"]
    assert demo.select_methods(None, ablation=True) == ["dsig", "dsig-edges", "dsig-edges-fg"]
    assert demo.select_methods(["logit-kd", "dsig", "feature-mse"]) == [
        "dsig", "feature-mse", "logit-kd"]
    with pytest.raises(ValueError, match="unknown method.*'fitnet'"):
        demo.select_methods(["fitnet"])
    # each method switches on exactly its terms of the demo's DSIG config
    from distillation.training import load_config

    def terms(method):
        cfg = load_config(os.path.join(demo.CONFIG_DIR, "dsig-R18-R50.yaml"), demo.METHODS[method])
        d = cfg.DISTILL
        return {name for name, on in (("fg", d.FG_NODE_LOSS_ON), ("bg", d.BG_NODE_LOSS_ON),
                                      ("edge", d.EDGE_LOSS_ON), ("feature", d.FEATURE_LOSS_ON),
                                      ("roi_cls", d.ROI_CLS_KD_ON), ("roi_reg", d.ROI_REG_KD_ON))
                if on}

    assert terms("dsig") == {"fg", "bg", "edge"}
    assert terms("dsig-edges") == {"edge"} and terms("dsig-edges-fg") == {"fg", "edge"}
    assert terms("feature-mse") == {"feature"} and terms("logit-kd") == {"roi_cls", "roi_reg"}
    assert terms("dsig-all") == {"fg", "bg", "edge", "feature", "roi_cls", "roi_reg"}


def test_tiny_demo_baseline_methods(tmp_path):
    """KD baselines on the same harness, two trainings at a time: the report lists them with
    their gap recovered."""
    report = demo.run(str(tmp_path), "tiny", seeds=0, methods=["feature-mse", "logit-kd"],
                      jobs=2)
    assert set(report["per_seed"]["0"]["results"]) == {"teacher", "baseline", "feature-mse",
                                                       "logit-kd"}
    assert set(report["gap_recovered"]) == {"feature-mse", "logit-kd"}
    text = (tmp_path / "report.md").read_text()
    assert "| feature-mse |" in text and "| logit-kd |" in text and "graph.png" not in text
    assert "One seed: no spread estimate" in text
    runs = report["per_seed"]["0"]["results"]
    assert runs["feature-mse"]["threads"] == max(1, (os.cpu_count() or 1) // 2)


def _coco(tmp_path, name, seed=0, num_images=6):
    from distill_utils import make_coco_dataset

    json_file, image_root = make_coco_dataset(str(tmp_path / name), num_images=num_images,
                                              seed=seed)
    return json_file, image_root


def _rewrite(json_file, change):
    data = json.load(open(json_file))
    change(data)
    json.dump(data, open(json_file, "w"))


def test_user_data_is_checked(tmp_path):
    train_json, train_root = _coco(tmp_path, "train")
    val_json, val_root = _coco(tmp_path, "val", seed=1)
    ok = f"u_train={train_json},{train_root}"
    with pytest.raises(FileNotFoundError, match="annotation file .*missing.json not found"):
        demo.prepare_user_data(ok, f"u_val={tmp_path / 'missing.json'},{val_root}")
    with pytest.raises(ValueError, match="is not NAME=ann.json,image_root"):
        demo.prepare_user_data("u_train", ok)
    not_coco = tmp_path / "list.json"
    not_coco.write_text(json.dumps({"images": [], "info": {}}))
    with pytest.raises(ValueError, match="not a COCO detection json: no 'annotations', "
                                         "'categories'"):
        demo.prepare_user_data(f"u_train={not_coco},{train_root}", ok)
    _rewrite(val_json, lambda d: d["categories"].append({"id": 99, "name": "extra"}))
    with pytest.raises(ValueError, match="val categories .* differ"):
        demo.prepare_user_data(ok, f"u_val={val_json},{val_root}")
    _rewrite(train_json, lambda d: d["categories"].append({"id": 99, "name": "extra"}))
    with pytest.raises(ValueError, match=r"categories with no instance .*\['extra'\]"):
        demo.prepare_user_data(ok, f"u_val={val_json},{val_root}")
    _rewrite(train_json, lambda d: d["annotations"][0].update(bbox=[100, 50, 60, 20]))
    with pytest.raises(ValueError, match="outside their image, e.g. annotation 1 .*128x96"):
        demo.prepare_user_data(ok, f"u_val={val_json},{val_root}")


def test_tiny_demo_on_user_data(tmp_path, capsys):
    """The same pipeline on a COCO dataset the test writes: classes from the json, sizes from
    the images; a quiet console (stages, progress, AP) with each run's full log in its folder."""
    train_json, train_root = _coco(tmp_path, "train", num_images=8)
    val_json, val_root = _coco(tmp_path, "val", seed=1, num_images=4)
    report = demo.run(str(tmp_path / "out"), "tiny", seeds=0,
                      train=f"mine_train={train_json},{train_root}",
                      val=f"mine_val={val_json},{val_root}")
    assert report["data"]["num_classes"] == 3 and list(report["data"]["image_size"]) == [96, 128]
    assert set(report["per_seed"]["0"]["results"]) == {"teacher", "baseline", "dsig"}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "mine_train" in text and "3 classes" in text
    assert os.path.isdir(tmp_path / "out" / "dsig-tiny-mine_train-seed0")
    out = capsys.readouterr().out
    assert "[demo] stage 1/5" in out and "dsig seed 0: iter 6/6" in out and "dsig seed 0: AP " in out
    assert "GeneralizedRCNN(" not in out  # no model printout on the console
    log = (tmp_path / "out" / "dsig-tiny-mine_train-seed0" / "log.txt").read_text()
    assert "Starting training" in log or "iter" in log
    # a given teacher (here the one just trained) is evaluated, not trained again
    teacher = tmp_path / "out" / "teacher-tiny-mine_train-seed0" / "model_final.pth"
    again = demo.run(str(tmp_path / "out2"), "tiny", seeds=0, methods=["dsig-edges"],
                     train=f"mine_train={train_json},{train_root}",
                     val=f"mine_val={val_json},{val_root}", teacher_weights=str(teacher))
    assert again["mean"]["teacher"]["bbox"]["AP"] == pytest.approx(
        report["mean"]["teacher"]["bbox"]["AP"])
    assert not os.path.isdir(tmp_path / "out2" / "teacher-tiny-mine_train-seed0")
    with pytest.raises(FileNotFoundError, match="teacher weights"):
        demo.run(str(tmp_path / "out3"), "tiny", seeds=0, teacher_weights=str(tmp_path / "no.pth"))
