"""The offline demo: generated data -> teacher -> baseline student -> DSIG student -> COCO
evaluation of all three -> a report. Stages already done are skipped on re-run; the teacher is
cached per (preset, seed)."""
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import synthetic

logger = logging.getLogger("distillation.demo")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "demo")


@dataclass
class Preset:
    train_images: int
    val_images: int
    image_size: List[int]
    teacher_iters: int
    student_iters: int
    batch: int = 4
    eval_period: int = 0
    extra: List[str] = field(default_factory=list)


PRESETS = {
    # seconds-scale pipeline check (tests)
    "tiny": Preset(12, 6, [96, 128], 8, 6, batch=2,
                   extra=["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
                          "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
                          "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                          # a few iterations from scratch: keep every detection so AP is defined
                          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]),
    # meant to finish within 30 minutes on a 2-core CPU
    "quick": Preset(600, 150, [160, 224], 1000, 600, batch=2,
                    extra=["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224",
                           "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224"]),
    # firmer numbers
    "full": Preset(3000, 500, [192, 256], 6000, 4000),
}

ABLATION = {  # the paper's order: edges only, + fg nodes, + bg nodes (= full DSIG)
    "dsig-edges": ["DISTILL.FG_NODE_LOSS_ON", "False", "DISTILL.BG_NODE_LOSS_ON", "False"],
    "dsig-edges-fg": ["DISTILL.BG_NODE_LOSS_ON", "False"],
}


def _say(stage: int, total: int, text: str) -> None:
    print(f"[demo] stage {stage}/{total}: {text}", flush=True)


def _solver(iters: int, batch: int) -> List[str]:
    steps = f"({int(iters * 0.75)},)"
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps, "SOLVER.IMS_PER_BATCH",
            str(batch), "SOLVER.WARMUP_ITERS", str(min(100, max(1, iters // 10)))]


def generate_data(root: str, preset: Preset, seed: int) -> Dict[str, str]:
    """Generated train/val splits, reused when present; registered with detectron2."""
    paths = {}
    for split, n in (("train", preset.train_images), ("val", preset.val_images)):
        json_file = os.path.join(root, f"{split}.json")
        if not os.path.isfile(json_file):
            def progress(i, total, split=split):
                if i == total or i % max(1, total // 10) == 0:
                    print(f"[demo]   generating {split}: {i}/{total} images", flush=True)
            synthetic.generate(root, split, n, tuple(preset.image_size), seed, progress)
        name = f"dsig_shapes_{os.path.basename(root)}_{split}"
        synthetic.register(name, json_file, os.path.join(root, split))
        paths[split] = name
    return paths


def _train(config: str, opts: List[str], output_dir: str, distill: bool) -> Dict:
    """Train (or reuse) one model; returns its evaluation and timing."""
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    from .training import Trainer, load_config

    result_file = os.path.join(output_dir, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return json.load(f)
    cfg = load_config(config, opts + ["OUTPUT_DIR", output_dir])
    cfg.freeze()
    os.makedirs(output_dir, exist_ok=True)

    class StockTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR,
                                                                        "inference"),
                                 use_fast_impl=False)

    trainer = (Trainer if distill else StockTrainer)(cfg)
    trainer.resume_or_load(resume=True)
    start = time.time()
    metrics = trainer.train()  # detectron2 evaluates the final model on DATASETS.TEST
    train_seconds = time.time() - start
    if not metrics:
        metrics = trainer.test(cfg, trainer.model)
    result = {"bbox": metrics["bbox"], "train_seconds": train_seconds,
              "seconds_per_iter": seconds_per_iter(output_dir)
              or train_seconds / max(1, cfg.SOLVER.MAX_ITER)}
    with open(result_file, "w") as f:
        json.dump(result, f, indent=2)
    return result


def seconds_per_iter(output_dir: str) -> Optional[float]:
    """Mean training-step time logged by detectron2 (evaluation excluded)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        times = [r["time"] for r in map(json.loads, f) if "time" in r]
    return sum(times) / len(times) if times else None


def loss_curve(output_dir: str) -> List[Dict]:
    path = os.path.join(output_dir, "metrics.json")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "total_loss" in r:
                    rows.append({"iteration": r["iteration"], "total_loss": r["total_loss"]})
    return rows


def gap_recovered(teacher_ap: float, baseline_ap: float, dsig_ap: float) -> Optional[float]:
    """Fraction of the teacher-baseline AP gap the DSIG student recovers."""
    gap = teacher_ap - baseline_ap
    return None if abs(gap) < 1e-9 else (dsig_ap - baseline_ap) / gap


def run(output: str, preset_name: str = "quick", seed: int = 0, ablation: bool = False,
        backend: str = "fused") -> Dict:
    if preset_name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    runs = ["teacher", "baseline", "dsig"] + (list(ABLATION) if ablation else [])
    total = 2 + len(runs)
    root = os.path.join(output, f"data-{preset_name}-seed{seed}")
    _say(1, total, f"procedural dataset ({preset.train_images} train / {preset.val_images} val "
                   f"images of {preset.image_size[0]}x{preset.image_size[1]})")
    data = generate_data(root, preset, seed)
    common = ["DATASETS.TRAIN", f"('{data['train']}',)", "DATASETS.TEST", f"('{data['val']}',)",
              "SEED", str(seed), "DISTILL.BACKEND", backend] + preset.extra
    teacher_dir = os.path.join(output, f"teacher-{preset_name}-seed{seed}")
    results = {}
    _say(2, total, f"teacher R50-FPN, {preset.teacher_iters} iterations (cached)")
    results["teacher"] = _train(os.path.join(CONFIG_DIR, "teacher-R50.yaml"),
                                common + _solver(preset.teacher_iters, preset.batch),
                                teacher_dir, distill=False)
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    student_opts = common + _solver(preset.student_iters, preset.batch)
    for k, name in enumerate(runs[1:], start=3):
        out = os.path.join(output, f"{name}-{preset_name}-seed{seed}")
        if name == "baseline":
            _say(k, total, f"baseline student R18-FPN, {preset.student_iters} iterations")
            results[name] = _train(os.path.join(CONFIG_DIR, "student-R18.yaml"), student_opts,
                                   out, distill=False)
        else:
            _say(k, total, f"{name} student R18-FPN with the teacher, "
                           f"{preset.student_iters} iterations")
            opts = student_opts + ["DISTILL.TEACHER.WEIGHTS", teacher_weights]
            results[name] = _train(os.path.join(CONFIG_DIR, "dsig-R18-R50.yaml"),
                                   opts + ABLATION.get(name, []), out, distill=True)
        results[name]["loss_curve"] = loss_curve(out)
    results["teacher"]["loss_curve"] = loss_curve(teacher_dir)
    _say(total, total, "report and instance-graph view")
    graph_png = os.path.join(output, "graph.png")
    if not os.path.isfile(graph_png):
        from .graph_view import visualize

        val_json = os.path.join(root, "val.json")
        first = json.load(open(val_json))["images"][0]["file_name"]
        visualize(os.path.join(CONFIG_DIR, "dsig-R18-R50.yaml"), os.path.join(root, "val", first),
                  val_json, graph_png,
                  weights=os.path.join(output, f"dsig-{preset_name}-seed{seed}", "model_final.pth"),
                  opts=student_opts + ["DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True"])
    report = write_report(output, preset_name, seed, preset, results)
    return report


def write_report(output: str, preset_name: str, seed: int, preset: Preset,
                 results: Dict) -> Dict:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    ap = {k: v["bbox"]["AP"] for k, v in results.items()}
    report = {"preset": preset_name, "seed": seed, "preset_settings": asdict(preset),
              "machine": (torch.cuda.get_device_name() if torch.cuda.is_available()
                          else f"{cpu}, {os.cpu_count()} cores"),
              "torch": torch.__version__,
              "results": {k: {"bbox": v["bbox"], "seconds_per_iter": v["seconds_per_iter"]}
                          for k, v in results.items()},
              "gap_recovered": gap_recovered(ap["teacher"], ap["baseline"], ap["dsig"])}
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    lines = [f"# DSIG demo report ({preset_name} preset, seed {seed})", "",
             f"- machine: {report['machine']}, torch {report['torch']}",
             f"- data: {preset.train_images} train / {preset.val_images} val generated images",
             f"- teacher {preset.teacher_iters} iterations, students {preset.student_iters}", "",
             "| model | " + " | ".join(keys) + " | s/iter |",
             "|---|" + "---:|" * (len(keys) + 1)]
    for name, v in results.items():
        row = " | ".join(f"{v['bbox'].get(k, float('nan')):.2f}" for k in keys)
        lines.append(f"| {name} | {row} | {v['seconds_per_iter']:.3f} |")
    g = report["gap_recovered"]
    lines += ["", "Fraction of the teacher-baseline AP gap recovered by DSIG: "
              + ("n/a (no gap)" if g is None else f"{g:.2f}"), "",
              "![AP](ap.png)", "", "![training loss](loss.png)", "",
              "Instance graph of the DSIG student on a validation image (nodes; teacher and "
              "student edge matrices; their difference):", "", "![instance graph](graph.png)", ""]
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("\n".join(lines))
    _plots(output, results)
    return report


def _plots(output: str, results: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(results)
    for i, (name, v) in enumerate(results.items()):
        vals = [v["bbox"].get(k, 0.0) for k in keys]
        vals = [0.0 if x != x else x for x in vals]  # NaN (no object of a size) -> 0
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    ax.set_ylabel("COCO AP (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "ap.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, v in results.items():
        curve = v.get("loss_curve") or []
        if curve:
            ax.plot([c["iteration"] for c in curve], [c["total_loss"] for c in curve],
                    label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss.png"), dpi=100)
    plt.close(fig)
