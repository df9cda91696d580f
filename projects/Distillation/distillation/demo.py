"""The offline demo: generated data -> teacher -> baseline student -> DSIG student -> COCO
evaluation of all three -> a report. Stages already done are skipped on re-run; the teacher is
cached per (preset, task, seed). Task "bbox": Faster R-CNN; "segm": Mask R-CNN (box and mask AP)."""
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import synthetic
from .data_checks import DataError, check_coco_detection, parse_split
from .errors import MissingFileError

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


_INPUT_160x224 = ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "224",
                  "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224"]

PRESETS = {
    # seconds-scale pipeline check (tests)
    "tiny": Preset(12, 6, [96, 128], 8, 6, batch=2,
                   extra=["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
                          "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
                          "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                          # a few iterations from scratch: keep every detection so AP is defined
                          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]),
    # meant to finish within 30 minutes on a 2-core CPU
    "quick": Preset(600, 150, [160, 224], 1000, 600, batch=2, extra=_INPUT_160x224),
    # firmer numbers: 2.5x the data, twice the schedule and the validation images of quick
    "full": Preset(1500, 300, [160, 224], 2000, 1200, batch=2, extra=_INPUT_160x224),
}

_DSIG_OFF = ["DISTILL.FG_NODE_LOSS_ON", "False", "DISTILL.BG_NODE_LOSS_ON", "False",
             "DISTILL.EDGE_LOSS_ON", "False"]
_FEATURE = ["DISTILL.FEATURE_LOSS_ON", "True", "DISTILL.FEATURE_LOSS_WEIGHT", "0.5"]
_LOGIT = ["DISTILL.ROI_CLS_KD_ON", "True", "DISTILL.ROI_CLS_KD_WEIGHT", "3.0",
          "DISTILL.ROI_REG_KD_ON", "True", "DISTILL.ROI_REG_KD_WEIGHT", "1.0"]
# Distilled students, each the demo's DSIG config (same student, teacher, data, schedule, seed)
# with these terms; feature and logit weights as in the original's R18 config.
METHODS = {
    "dsig": [],  # fg + bg nodes + edges: the paper's full graph
    "dsig-edges": ["DISTILL.FG_NODE_LOSS_ON", "False", "DISTILL.BG_NODE_LOSS_ON", "False"],
    "dsig-edges-fg": ["DISTILL.BG_NODE_LOSS_ON", "False"],
    "feature-mse": _DSIG_OFF + _FEATURE,  # full-map FPN imitation only
    "logit-kd": _DSIG_OFF + _LOGIT,  # RoI classification KL + RoI regression L1 only
    "dsig-all": _FEATURE + _LOGIT,  # DSIG plus both (the original's R18 configuration)
}
ABLATION = ["dsig-edges", "dsig-edges-fg"]  # the paper's order, then dsig

# COCO evaluation tasks -> what the report calls their AP
TASKS = {"bbox": "box", "segm": "mask"}
# the demo's models per task: (teacher, baseline student, distilled student) configs
MODEL_CONFIGS = {"bbox": ("teacher-R50.yaml", "student-R18.yaml", "dsig-R18-R50.yaml"),
                 "segm": ("teacher-R50-mask.yaml", "student-R18-mask.yaml",
                          "dsig-R18-R50-mask.yaml")}


_console = None  # the terminal while a run's stdout goes to its log.txt


def _print(text: str) -> None:
    print(text, file=_console or sys.stdout, flush=True)


def _say(stage: int, total: int, text: str) -> None:
    _print(f"[demo] stage {stage}/{total}: {text}")


def _solver(iters: int, batch: int) -> List[str]:
    steps = f"({int(iters * 0.75)},)"
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", steps, "SOLVER.IMS_PER_BATCH",
            str(batch), "SOLVER.WARMUP_ITERS", str(min(100, max(1, iters // 10)))]


def generate_data(root: str, preset: Preset, seed: int,
                  with_masks: bool = False) -> Dict[str, str]:
    """Generated train/val splits (with instance masks for Mask R-CNN), reused when present;
    registered with detectron2."""
    paths = {}
    for split, n in (("train", preset.train_images), ("val", preset.val_images)):
        json_file = os.path.join(root, f"{split}.json")
        if not os.path.isfile(json_file):
            def progress(i, total, split=split):
                if i == total or i % max(1, total // 10) == 0:
                    _print(f"[demo]   generating {split}: {i}/{total} images")
            synthetic.generate(root, split, n, tuple(preset.image_size), seed, progress,
                               with_masks)
        name = f"dsig_shapes_{os.path.basename(root)}_{split}"
        synthetic.register(name, json_file, os.path.join(root, split))
        paths[split] = name
    return paths


# --- the user's own COCO-format data ------------------------------------------------------------

@dataclass
class UserData:
    """A COCO detection dataset of the user's: train and val splits as (name, json, image root)."""
    train: Tuple[str, str, str]
    val: Tuple[str, str, str]
    num_classes: int = 0
    image_size: Tuple[int, int] = (0, 0)  # (short side, long side) of the inputs


def prepare_user_data(train_spec: str, val_spec: str,
                      image_size: Optional[Sequence[int]] = None,
                      task: str = "bbox") -> UserData:
    """Checks (data_checks.check_coco_detection: files, boxes, categories, every image file
    present) and registers the user's splits; the input size defaults to the median image,
    capped at 800 x 1333."""
    from .training import register_datasets

    train, val = parse_split(train_spec), parse_split(val_spec)
    masks = task == "segm"
    info = check_coco_detection(train[1], train[2], "train", need_masks=masks)
    val_info = check_coco_detection(val[1], val[2], "val", every_category_used=False,
                                    need_masks=masks)
    if val_info["categories"] != info["categories"]:
        raise DataError(f"the val categories {sorted(val_info['categories'].values())} differ "
                        f"from the train categories {sorted(info['categories'].values())}")
    register_datasets([train, val])
    short, long = image_size or (min(800, info["median_size"][0]),
                                 min(1333, info["median_size"][1]))
    if not 0 < short <= long:
        raise ValueError(f"image size must be SHORT LONG with 0 < SHORT <= LONG, got "
                         f"{short} {long}")
    return UserData(train, val, len(info["categories"]), (int(short), int(long)))


def _user_data_opts(data: UserData) -> List[str]:
    short, long = data.image_size
    k = data.num_classes
    # the teacher takes the student's class count (teacher.teacher_config)
    return ["DATASETS.TRAIN", f"('{data.train[0]}',)", "DATASETS.TEST", f"('{data.val[0]}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(k),
            "INPUT.MIN_SIZE_TRAIN", f"({short},)", "INPUT.MAX_SIZE_TRAIN", str(long),
            "INPUT.MIN_SIZE_TEST", str(short), "INPUT.MAX_SIZE_TEST", str(long)]


VERBOSE = False  # run_demo.py --verbose: detectron2's full log on the console too


class _RunLog:
    """For one run: detectron2's and this project's log, and what evaluation prints, go to
    OUTPUT_DIR/log.txt; the console shows only warnings (everything with VERBOSE)."""

    NAMES = ("detectron2", "fvcore", "distillation")

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "log.txt")

    def __enter__(self):
        global _console
        self.stream = open(self.path, "a")
        self.stdout = sys.stdout
        if not VERBOSE:  # pycocotools prints its evaluation tables
            _console, sys.stdout = sys.stdout, self.stream
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] "
                                                 "%(message)s"))
        self.saved = []
        for name in self.NAMES:
            log = logging.getLogger(name)
            log.addHandler(self.file)
            self.saved.append((log, log.level, [(h, h.level) for h in log.handlers
                                                if h is not self.file]))
            log.setLevel(logging.DEBUG if log.level == logging.NOTSET else
                         min(log.level, logging.INFO))
            if not VERBOSE:
                for h, _ in self.saved[-1][2]:
                    h.setLevel(max(h.level, logging.WARNING))
        return self

    def __exit__(self, *exc):
        global _console
        sys.stdout, _console = self.stdout, None
        self.stream.close()
        for log, level, handlers in self.saved:
            log.removeHandler(self.file)
            log.setLevel(level)
            for h, h_level in handlers:
                h.setLevel(h_level)
        self.file.close()


def _progress_hook(max_iter: int, label: str = ""):
    """One console line about every 10 % of a run: iteration, total loss, ETA."""
    from detectron2.engine import HookBase

    class Progress(HookBase):
        def before_train(self):
            self.start = time.time()

        def after_step(self):
            done = self.trainer.iter + 1
            if done % max(1, max_iter // 10) and done != max_iter:
                return
            losses = self.trainer.storage.latest()
            loss = sum(v[0] for k, v in losses.items() if k.startswith("loss"))
            eta = (time.time() - self.start) / done * (max_iter - done)
            _print(f"[demo]   {label + ': ' if label else ''}iter {done}/{max_iter}  "
                   f"loss {loss:.3f}  ETA {eta / 60:.1f} min")

    return Progress()


def _train(config: str, opts: List[str], output_dir: str, distill: bool,
           label: str = "") -> Dict:
    """Train (or reuse) one model; returns its evaluation and timing."""
    os.makedirs(output_dir, exist_ok=True)
    with _RunLog(output_dir):
        result = _train_logged(config, opts, output_dir, distill, label)
    # an evaluation with no detections at all has no metrics block: NaN, not a KeyError
    box_ap = result.get("bbox", {}).get("AP", float("nan"))
    mask = f", mask AP {result['segm']['AP']:.2f}" if "segm" in result else ""
    _print(f"[demo]   {label + ': ' if label else ''}AP {box_ap:.2f}{mask} "
           f"(log: {os.path.join(output_dir, 'log.txt')})")
    return result


def _train_logged(config: str, opts: List[str], output_dir: str, distill: bool,
                  label: str) -> Dict:
    import torch
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

    if cfg.SOLVER.MAX_ITER == 0:  # a given model (--teacher-weights): evaluated, not trained
        from .checkpoint import SafeDetectionCheckpointer

        model = StockTrainer.build_model(cfg)
        SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        metrics = StockTrainer.test(cfg, model)
        result = {**{t: metrics[t] for t in TASKS if t in metrics}, "train_seconds": 0.0,
                  "threads": torch.get_num_threads(), "seconds_per_iter": 0.0}
        with open(result_file, "w") as f:
            json.dump(result, f, indent=2)
        return result
    trainer = (Trainer if distill else StockTrainer)(cfg)
    trainer.register_hooks([_progress_hook(cfg.SOLVER.MAX_ITER, label)])
    trainer.resume_or_load(resume=True)
    start = time.time()
    metrics = trainer.train()  # detectron2 evaluates the final model on DATASETS.TEST
    train_seconds = time.time() - start
    if not metrics:
        metrics = trainer.test(cfg, trainer.model)
    result = {**{t: metrics[t] for t in TASKS if t in metrics}, "train_seconds": train_seconds,
              "threads": torch.get_num_threads(),
              "seconds_per_iter": seconds_per_iter(output_dir)
              or train_seconds / max(1, cfg.SOLVER.MAX_ITER)}
    graph = graph_sizes(output_dir)
    if graph:
        result["graph"] = graph
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


def graph_sizes(output_dir: str) -> Dict[str, float]:
    """Mean over the logged iterations of the DSIG graph metrics (nodes per image, fraction of
    the sampled bg RoIs mined into the edges); empty for runs without an edge loss."""
    path = os.path.join(output_dir, "metrics.json")
    values: Dict[str, List[float]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for r in map(json.loads, f):
                for k in ("dsig/graph_nodes", "dsig/mined_bg_fraction"):
                    if k in r:
                        values.setdefault(k.split("/", 1)[1], []).append(r[k])
    return {k: sum(v) / len(v) for k, v in values.items()}


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


def _run_names(methods: Sequence[str]) -> List[str]:
    return ["teacher", "baseline"] + list(methods)


def select_methods(methods: Optional[Sequence[str]] = None, ablation: bool = False) -> List[str]:
    """The distilled students to train: `methods` (default: dsig), plus the ablation's, in
    METHODS order without repeats."""
    chosen = set(methods or ["dsig"]) | (set(ABLATION) if ablation else set())
    unknown = sorted(chosen - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return [m for m in METHODS if m in chosen]


@dataclass
class Job:
    """One training run, self-contained so that a fresh process can execute it."""
    name: str
    seed: int
    config: str
    opts: List[str]
    output_dir: str
    distill: bool
    datasets: List[Tuple[str, str, str]]  # (name, json, image root) to register
    message: str
    verbose: bool = False


def run_tag(preset_name: str, task: str = "bbox") -> str:
    """The part of run and data folder names that says which preset and task they belong to."""
    return preset_name if task == "bbox" else f"{preset_name}-{task}"


def run_dir(output: str, name: str, tag: str, seed: int) -> str:
    """The folder of run (or data, name "data") `name` of one seed: <name>-<tag>-seed<seed>."""
    return os.path.join(output, f"{name}-{tag}-seed{seed}")


def plan_seed(output: str, preset_name: str, seed: int, methods: Sequence[str] = ("dsig",),
              backend: str = "fused", user_data: Optional[UserData] = None,
              teacher: Optional[Tuple[str, str]] = None, task: str = "bbox") -> List[Job]:
    """Data of one seed (generated here unless the user's), then its runs: the teacher first,
    the students after it (they read its weights)."""
    preset = PRESETS[preset_name]
    teacher_name, baseline_name, distilled_name = MODEL_CONFIGS[task]
    arch = "Mask R-CNN " if task == "segm" else ""
    preset_name = run_tag(preset_name, task)
    if user_data is None:
        root = run_dir(output, "data", preset_name, seed)
        data = generate_data(root, preset, seed, with_masks=task == "segm")
        datasets = [(data[split], os.path.join(root, f"{split}.json"), os.path.join(root, split))
                    for split in ("train", "val")]
        common = ["DATASETS.TRAIN", f"('{data['train']}',)", "DATASETS.TEST",
                  f"('{data['val']}',)"] + preset.extra
    else:
        datasets = [user_data.train, user_data.val]
        # the preset's model settings apply, its input sizes do not
        pairs = list(zip(preset.extra[::2], preset.extra[1::2]))
        common = _user_data_opts(user_data) + [x for k, v in pairs if not k.startswith("INPUT.")
                                               for x in (k, v)]
        preset_name = f"{preset_name}-{user_data.train[0]}"  # run folders of this dataset
    common += ["SEED", str(seed), "DISTILL.BACKEND", backend]
    teacher_dir = run_dir(output, "teacher", preset_name, seed)
    teacher_config = os.path.join(CONFIG_DIR, teacher_name)
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    if teacher is None:
        jobs = [Job("teacher", seed, teacher_config,
                    common + _solver(preset.teacher_iters, preset.batch), teacher_dir, False,
                    datasets, f"seed {seed}: teacher {arch}R50-FPN, {preset.teacher_iters} "
                    "iterations (cached)", VERBOSE)]
    else:  # the user's trained teacher: evaluated only
        teacher_config, teacher_weights = teacher
        jobs = [Job("teacher", seed, teacher_config,
                    common + ["SOLVER.MAX_ITER", "0", "MODEL.WEIGHTS", teacher_weights],
                    teacher_dir + "-given", False, datasets,
                    f"seed {seed}: your teacher {teacher_weights}, evaluated", VERBOSE)]
    student_opts = common + _solver(preset.student_iters, preset.batch)
    for name in _run_names(methods)[1:]:
        out = run_dir(output, name, preset_name, seed)
        if name == "baseline":
            jobs.append(Job(name, seed, os.path.join(CONFIG_DIR, baseline_name),
                            student_opts, out, False, datasets,
                            f"seed {seed}: baseline student {arch}R18-FPN, "
                            f"{preset.student_iters} iterations", VERBOSE))
        else:
            opts = (student_opts + ["DISTILL.TEACHER.WEIGHTS", teacher_weights,
                                    "DISTILL.TEACHER.CONFIG", teacher_config] + METHODS[name])
            jobs.append(Job(name, seed, os.path.join(CONFIG_DIR, distilled_name), opts, out,
                            True, datasets, f"seed {seed}: {name} student {arch}R18-FPN with "
                            f"the teacher, {preset.student_iters} iterations", VERBOSE))
    return jobs


def execute(job: Job, threads: Optional[int] = None) -> Dict:
    """Runs one job (in this process or a fresh one): its evaluation and loss curve."""
    global VERBOSE
    import torch

    from .training import register_datasets

    VERBOSE = job.verbose
    if threads:
        torch.set_num_threads(threads)
    register_datasets(job.datasets)
    result = _train(job.config, job.opts, job.output_dir, job.distill,
                    label=f"{job.name} seed {job.seed}")
    result["loss_curve"] = loss_curve(job.output_dir)
    return result


def run_jobs(jobs: List[Job], parallel: int, say) -> List[Dict]:
    """The jobs' results in order: one after the other, or `parallel` processes at a time with
    the torch threads split between them (on a 2-core CPU two 1-thread processes train ~28 %
    more per hour than one 2-thread process after the other)."""
    if parallel <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            say(job.message)
            results.append(execute(job))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ProcessPoolExecutor(max_workers=parallel,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = []
        for job in jobs:
            say(job.message + f" [{threads} thread(s), in parallel]")
            futures.append(pool.submit(execute, job, threads))
        return [f.result() for f in futures]


def run(output: str, preset_name: str = "quick", seeds: Union[int, Sequence[int]] = (0,),
        ablation: bool = False, backend: str = "fused",
        methods: Optional[Sequence[str]] = None, train: Optional[str] = None,
        val: Optional[str] = None, image_size: Optional[Sequence[int]] = None,
        jobs: int = 1, teacher_weights: Optional[str] = None,
        teacher_config: Optional[str] = None, task: str = "bbox") -> Dict:
    """The whole demo for one or more seeds; the report averages over the seeds. `methods`
    selects the distilled students (METHODS; default dsig), `ablation` adds the paper's.
    `train` / `val` ("NAME=ann.json,image_root") run it on a COCO dataset of your own instead
    of the generated shapes (`image_size`: short and long input side, default from the data).
    `jobs` runs that many trainings at a time (teachers first, then the students).
    `teacher_weights` (with `teacher_config`, default the demo's R50-FPN) replaces the teacher
    training by a given model, evaluated on the val split. `task` "segm" trains Mask R-CNN
    models (instance masks generated with the shapes) and reports box and mask AP."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if any(not isinstance(s, int) or s < 0 for s in seeds):
        # detectron2 reads a negative SEED as "random": the run would not be reproducible
        raise ValueError(f"seeds must be non-negative integers, got {seeds}")
    methods = select_methods(methods, ablation)
    if (train is None) != (val is None):
        raise ValueError("give both a train and a val split of your data, or neither")
    user_data = prepare_user_data(train, val, image_size, task) if train else None
    teacher = None
    if teacher_weights:
        from .weights import resolve_weights

        if not os.path.isfile(resolve_weights(teacher_weights, "--teacher-weights")):
            raise MissingFileError(f"teacher weights {teacher_weights} not found")
        teacher = (teacher_config or os.path.join(CONFIG_DIR, MODEL_CONFIGS[task][0]),
                   teacher_weights)
    elif teacher_config:
        raise ValueError("--teacher-config needs --teacher-weights (the demo trains its own "
                         "teacher otherwise)")
    preset = PRESETS[preset_name]
    runs = _run_names(methods)
    total = (1 + len(runs)) * len(seeds) + 1  # per seed: data, then each run; the report
    stage = iter(range(1, total + 1))

    def say(text):
        _say(next(stage), total, text)

    plans = {}
    for seed in seeds:
        if user_data is None:
            say(f"seed {seed}: procedural dataset ({preset.train_images} train / "
                f"{preset.val_images} val images of {preset.image_size[0]}x"
                f"{preset.image_size[1]})")
        else:
            say(f"seed {seed}: your data, {user_data.train[0]} / {user_data.val[0]}, "
                f"{user_data.num_classes} classes, inputs {user_data.image_size[0]} / "
                f"{user_data.image_size[1]} px")
        plans[seed] = plan_seed(output, preset_name, seed, methods, backend, user_data, teacher,
                                task)
    teachers = run_jobs([plans[s][0] for s in seeds], jobs, say)
    students = iter(run_jobs([j for s in seeds for j in plans[s][1:]], jobs, say))
    results = {}
    for seed, teacher in zip(seeds, teachers):
        results[seed] = {"teacher": teacher}
        for name in runs[1:]:
            results[seed][name] = next(students)
    _say(total, total, "report and instance-graph view")
    graph_png = os.path.join(output, "graph.png")
    if "dsig" in methods and user_data is None and not os.path.isfile(graph_png):
        from .graph_view import visualize

        seed, tag = seeds[0], run_tag(preset_name, task)
        root = run_dir(output, "data", tag, seed)
        val_json = os.path.join(root, "val.json")
        with open(val_json) as f:
            first = json.load(f)["images"][0]["file_name"]
        visualize(os.path.join(CONFIG_DIR, MODEL_CONFIGS[task][2]),
                  os.path.join(root, "val", first), val_json, graph_png,
                  weights=os.path.join(run_dir(output, "dsig", tag, seed), "model_final.pth"),
                  opts=preset.extra + ["DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True"])
    return write_report(output, preset_name, preset, results, user_data, task)


METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _mean(values: List[float]) -> float:
    values = [v for v in values if v == v]  # NaN: no object of that size in a split
    return sum(values) / len(values) if values else float("nan")


def tasks_of(results: Dict[int, Dict[str, Dict]]) -> List[str]:
    """The evaluation tasks present in the results (bbox always; segm for Mask R-CNN)."""
    runs = [run for r in results.values() for run in r.values()]
    return [t for t in TASKS if t == "bbox" or any(t in run for run in runs)]


def _suffix(task: str) -> str:
    """Report keys: the box keys keep their plain names, mask ones end in _segm."""
    return "" if task == "bbox" else f"_{task}"


def summarize(results: Dict[int, Dict[str, Dict]]) -> Dict:
    """Per-seed and seed-averaged metrics, and the gap each DSIG variant recovers, per task
    (box AP under the plain keys, mask AP under keys ending in _segm)."""
    names = list(next(iter(results.values())))
    tasks = tasks_of(results)
    nan = float("nan")

    def metric(run: Dict, task: str, k: str) -> float:
        return run.get(task, {}).get(k, nan)  # no detections: no segm block

    mean = {name: {**{t: {k: _mean([metric(r[name], t, k) for r in results.values()])
                          for k in METRICS} for t in tasks},
                   "seconds_per_iter": _mean([r[name]["seconds_per_iter"]
                                              for r in results.values()])}
            for name in names}
    variants = [n for n in names if n not in ("teacher", "baseline")]

    def gaps(ap: Dict[str, float]) -> Dict[str, Optional[float]]:
        return {n: gap_recovered(ap["teacher"], ap["baseline"], ap[n]) for n in variants}

    summary = {
        "tasks": tasks,
        "per_seed": {str(seed): {
            "results": {n: {**{t: v.get(t, {}) for t in tasks},
                            "seconds_per_iter": v["seconds_per_iter"],
                            "threads": v.get("threads"),
                            **({"graph": v["graph"]} if v.get("graph") else {})}
                        for n, v in r.items()},
            **{"gap_recovered" + _suffix(t): gaps({n: metric(v, t, "AP") for n, v in r.items()})
               for t in tasks}}
            for seed, r in results.items()},
        "mean": mean}
    for t in tasks:
        # from the seed-averaged APs: a per-seed ratio of small gaps is noisy
        summary["gap_recovered" + _suffix(t)] = gaps({n: v[t]["AP"] for n, v in mean.items()})
        # max - min AP over the seeds (0 with one seed)
        summary["spread" + _suffix(t)] = {
            n: max(metric(r[n], t, "AP") for r in results.values())
            - min(metric(r[n], t, "AP") for r in results.values()) for n in names}
    return summary


def compare_runs(report: Dict, name: str, reference: str, task: str = "bbox") -> str:
    """One sentence: the mean AP of run `name` against run `reference`'s, and whether the
    difference exceeds the seed spread (max - min over the seeds of either run)."""
    ap = report["mean"][name][task]["AP"]
    ref = report["mean"][reference][task]["AP"]
    spread = max(report["spread" + _suffix(task)][name],
                 report["spread" + _suffix(task)][reference])
    label = "the baseline" if reference == "baseline" else reference
    if ap != ap or ref != ref:  # NaN: a run without detections to evaluate
        verdict = "no AP to compare"
    elif abs(ap - ref) <= spread:
        verdict = f"within the seed spread: not distinguishable from {label}"
    else:
        verdict = f"{'above' if ap > ref else 'below'} {label} by more than the seed spread"
    return (f"- {name}: {ap:.2f} vs {reference} {ref:.2f} (difference {ap - ref:+.2f}, "
            f"seed spread {spread:.2f}): {verdict}.")


ONE_SEED = "One seed: no spread estimate, so no difference below is claimed as real."


def versus_baseline(report: Dict, task: str = "bbox") -> List[str]:
    """One sentence per distilled student against the baseline (compare_runs)."""
    if len(report["seeds"]) < 2:
        return [ONE_SEED]
    return [compare_runs(report, name, "baseline", task)
            for name in report["gap_recovered" + _suffix(task)]]


def dsig_versus_others(report: Dict, task: str = "bbox") -> List[str]:
    """DSIG against each other distilled student (KD baselines, ablations), a compare_runs
    sentence each; empty when DSIG or the others were not trained, or with one seed."""
    others = [n for n in report["gap_recovered" + _suffix(task)] if n != "dsig"]
    if "dsig" not in report["mean"] or not others or len(report["seeds"]) < 2:
        return []
    return [compare_runs(report, "dsig", other, task) for other in others]


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _run_threads(report: Dict, name: str) -> List[int]:
    """The torch thread counts run `name` trained with, over the seeds."""
    return sorted({r["results"][name]["threads"] for r in report["per_seed"].values()
                   if r["results"][name].get("threads")})


def write_report(output: str, preset_name: str, preset: Preset,
                 results: Dict[int, Dict[str, Dict]],
                 user_data: Optional[UserData] = None, task: str = "bbox") -> Dict:
    import torch

    seeds = list(results)
    report = {"preset": preset_name, "task": task, "seeds": seeds,
              "preset_settings": asdict(preset),
              "data": asdict(user_data) if user_data else "generated shapes",
              "machine": _machine(), "torch": torch.__version__, **summarize(results)}
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    seed_text = ", ".join(map(str, seeds))
    arch = "Mask R-CNN " if task == "segm" else ""
    threads = sorted(set().union(*(_run_threads(report, name) for name in report["mean"])))
    lines = [f"# DSIG demo report ({preset_name} preset{', Mask R-CNN' if arch else ''}, "
             f"seed{'s' if len(seeds) > 1 else ''} {seed_text})", "",
             f"- machine: {report['machine']}, torch {report['torch']}"
             + (f"; training ran with {'/'.join(map(str, threads))} torch thread(s) per run"
                if threads else "")
             + ("; s/iter marks each run's, compare it only between runs with the same"
                if len(threads) > 1 else ""),
             (f"- data per seed: {preset.train_images} train / {preset.val_images} val generated "
              f"images of {preset.image_size[0]}x{preset.image_size[1]}" if user_data is None
              else f"- data: {user_data.train[0]} ({user_data.train[1]}) / {user_data.val[0]} "
                   f"({user_data.val[1]}), {user_data.num_classes} classes, inputs "
                   f"{user_data.image_size[0]} / {user_data.image_size[1]} px"),
             f"- teacher {arch}R50-FPN {preset.teacher_iters} iterations, students {arch}R18-FPN "
             f"{preset.student_iters}, batch {preset.batch}", ""]
    if len(seeds) > 1:
        lines += [f"Mean over seeds {seed_text}; the last column lists AP per seed.", ""]

    def fmt(g: Optional[float]) -> str:
        return "n/a (no gap)" if g is None else f"{g:.2f}"

    for t in report["tasks"]:
        if len(report["tasks"]) > 1:
            lines += [f"## {TASKS[t].capitalize()} AP", ""]
        lines += ["| model | " + " | ".join(METRICS) + " | s/iter |"
                  + (" AP per seed |" if len(seeds) > 1 else ""),
                  "|---|" + "---:|" * (len(METRICS) + 1) + ("---|" if len(seeds) > 1 else "")]
        for name, v in report["mean"].items():
            row = " | ".join(f"{v[t][k]:.2f}" for k in METRICS)
            per_seed = " / ".join(f"{r['results'][name][t].get('AP', float('nan')):.2f}"
                                  for r in report["per_seed"].values())
            s_iter = f"{v['seconds_per_iter']:.3f}"
            if len(threads) > 1:  # runs trained with different thread counts
                s_iter += f" ({'/'.join(map(str, _run_threads(report, name)))} thr)"
            lines.append(f"| {name} | {row} | {s_iter} |"
                         + (f" {per_seed} |" if len(seeds) > 1 else ""))
        key = "gap_recovered" + _suffix(t)
        lines += ["", f"Fraction of the teacher-baseline {TASKS[t]} AP gap recovered"
                  + (" (from the seed-averaged AP; per seed in brackets):" if len(seeds) > 1
                     else ":"), ""]
        for name, g in report[key].items():
            per_seed = ", ".join(fmt(r[key][name]) for r in report["per_seed"].values())
            lines.append(f"- {name}: **{fmt(g)}**" + (f" ({per_seed})" if len(seeds) > 1 else ""))
        lines += ["", f"Against the baseline ({TASKS[t]} AP):", ""] + versus_baseline(report, t)
        against_others = dsig_versus_others(report, t)
        if against_others:
            lines += ["", f"DSIG against the other distilled students ({TASKS[t]} AP):", ""]
            lines += against_others
        lines += [""]
    lines += graph_lines(results)
    lines += ["![AP](ap.png)", "", "![training loss](loss.png)", ""]
    if os.path.isfile(os.path.join(output, "graph.png")):
        lines += [f"Instance graph of the DSIG student (seed {seeds[0]}) on a validation image "
                  "(nodes; teacher and student edge matrices; their difference):", "",
                  "![instance graph](graph.png)", ""]
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("\n".join(lines))
    _plots(output, report, results)
    return report


def graph_lines(results: Dict[int, Dict[str, Dict]]) -> List[str]:
    """How large the instance graphs were during training, per distilled student (mean over
    iterations and seeds); nothing for runs that logged none (no edge loss, older runs)."""
    from .meta_arch import describe_graph_sizes

    names = list(next(iter(results.values())))
    lines = []
    for name in names:
        graphs = [r[name]["graph"] for r in results.values() if r[name].get("graph")]
        if not graphs:
            continue
        mined = [g["mined_bg_fraction"] for g in graphs if "mined_bg_fraction" in g]
        lines.append(f"- {name}: " + describe_graph_sizes(
            _mean([g["graph_nodes"] for g in graphs]), _mean(mined) if mined else None))
    return (["Instance graphs during training (mean over iterations and seeds):", ""] + lines
            + [""]) if lines else []


def _plots(output: str, report: Dict, results: Dict[int, Dict[str, Dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(x: float) -> float:
        return 0.0 if x != x else x  # NaN (no object of a size) -> 0

    names = list(report["mean"])
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    tasks = report["tasks"]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 3.5 * len(tasks)), squeeze=False)
    width = 0.8 / len(names)
    for ax, t in zip(axes[:, 0], tasks):
        for i, name in enumerate(names):
            xs = [j + i * width for j in range(len(METRICS))]
            ax.bar(xs, [finite(report["mean"][name][t][k]) for k in METRICS], width,
                   label=name, color=colors[name])
            if len(results) > 1:  # each seed as a dot on its bar
                for r in report["per_seed"].values():
                    ax.plot(xs, [finite(r["results"][name][t].get(k, float("nan")))
                                 for k in METRICS], "k.", markersize=3)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))], METRICS)
        ax.set_ylabel(f"COCO {TASKS[t]} AP (%)"
                      + (", mean over seeds" if len(results) > 1 else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "ap.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (seed, runs) in enumerate(results.items()):
        for name, v in runs.items():
            curve = v.get("loss_curve") or []
            if curve:
                ax.plot([c["iteration"] for c in curve], [c["total_loss"] for c in curve],
                        color=colors[name], linestyle=["-", "--", ":", "-."][k % 4],
                        linewidth=1, label=name if len(results) == 1 else f"{name} (seed {seed})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss")
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "loss.png"), dpi=100)
    plt.close(fig)
