"""The demo pipeline end to end on the tiny preset: report files with numeric AP values."""
import json
import math
import os

import pytest

pytest.importorskip("detectron2")
import distill_utils  # noqa: E402,F401
from distillation import demo  # noqa: E402


def test_gap_recovered():
    assert demo.gap_recovered(40.0, 30.0, 35.0) == pytest.approx(0.5)
    assert demo.gap_recovered(30.0, 30.0, 31.0) is None


def test_tiny_demo_pipeline(tmp_path):
    report = demo.run(str(tmp_path), "tiny", seed=0, ablation=True)
    for name in ("report.md", "report.json", "ap.png", "loss.png", "graph.png"):
        assert os.path.isfile(tmp_path / name), name
    with open(tmp_path / "report.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    assert set(saved["results"]) == {"teacher", "baseline", "dsig", "dsig-edges", "dsig-edges-fg"}
    for r in saved["results"].values():
        assert isinstance(r["bbox"]["AP"], float) and not math.isnan(r["bbox"]["AP"])
        assert r["seconds_per_iter"] > 0
    # a re-run skips every stage already done
    mtime = os.path.getmtime(tmp_path / "dsig-tiny-seed0" / "result.json")
    demo.run(str(tmp_path), "tiny", seed=0, ablation=True)
    assert os.path.getmtime(tmp_path / "dsig-tiny-seed0" / "result.json") == mtime

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
