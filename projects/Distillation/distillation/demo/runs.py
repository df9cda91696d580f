"""The demo's trainings: each run planned as a self-contained Job (config, overrides, folder),
executed here or in a worker process, its result (evaluation, timing, graph sizes, loss curve)
saved in its folder and reused on a re-run."""
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import console
from .console import RunLog, progress_hook, say
from .data import UserData, generate_data, user_data_opts
from .presets import CONFIG_DIR, METHODS, MODEL_CONFIGS, PRESETS, TASKS, run_names, solver_opts


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

    @property
    def result_file(self) -> str:
        """Where the run's result is saved; a run that has one is reused, not trained."""
        return os.path.join(self.output_dir, "result.json")

    def announcement(self) -> str:
        """The stage line of this run: "(cached)" only when a saved result is reused."""
        if os.path.isfile(self.result_file):
            return f"{self.message} (cached: {self.result_file})"
        return self.message


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
    verbose = console.VERBOSE
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
        common = user_data_opts(user_data) + [x for k, v in pairs if not k.startswith("INPUT.")
                                              for x in (k, v)]
        preset_name = f"{preset_name}-{user_data.train[0]}"  # run folders of this dataset
    common += ["SEED", str(seed), "DISTILL.BACKEND", backend]
    teacher_dir = run_dir(output, "teacher", preset_name, seed)
    teacher_config = os.path.join(CONFIG_DIR, teacher_name)
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    if teacher is None:
        jobs = [Job("teacher", seed, teacher_config,
                    common + solver_opts(preset.teacher_iters, preset.batch), teacher_dir, False,
                    datasets, f"seed {seed}: teacher {arch}R50-FPN, {preset.teacher_iters} "
                    "iterations", verbose)]
    else:  # the user's trained teacher: evaluated only
        teacher_config, teacher_weights = teacher
        jobs = [Job("teacher", seed, teacher_config,
                    common + ["SOLVER.MAX_ITER", "0", "MODEL.WEIGHTS", teacher_weights],
                    teacher_dir + "-given", False, datasets,
                    f"seed {seed}: your teacher {teacher_weights}, evaluated", verbose)]
    student_opts = common + solver_opts(preset.student_iters, preset.batch)
    for name in run_names(methods)[1:]:
        out = run_dir(output, name, preset_name, seed)
        if name == "baseline":
            jobs.append(Job(name, seed, os.path.join(CONFIG_DIR, baseline_name),
                            student_opts, out, False, datasets,
                            f"seed {seed}: baseline student {arch}R18-FPN, "
                            f"{preset.student_iters} iterations", verbose))
        else:
            opts = (student_opts + ["DISTILL.TEACHER.WEIGHTS", teacher_weights,
                                    "DISTILL.TEACHER.CONFIG", teacher_config] + METHODS[name])
            jobs.append(Job(name, seed, os.path.join(CONFIG_DIR, distilled_name), opts, out,
                            True, datasets, f"seed {seed}: {name} student {arch}R18-FPN with "
                            f"the teacher, {preset.student_iters} iterations", verbose))
    return jobs


def execute(job: Job, threads: Optional[int] = None) -> Dict:
    """Runs one job (in this process or a fresh one): its evaluation and loss curve."""
    import torch

    from ..training import register_datasets

    console.VERBOSE = job.verbose
    if threads:
        torch.set_num_threads(threads)
    register_datasets(job.datasets)
    result = train(job.config, job.opts, job.output_dir, job.distill,
                   label=f"{job.name} seed {job.seed}")
    result["loss_curve"] = loss_curve(job.output_dir)
    return result


def run_jobs(jobs: List[Job], parallel: int, say_stage) -> List[Dict]:
    """The jobs' results in order: one after the other, or `parallel` processes at a time with
    the torch threads split between them (on a 2-core CPU two 1-thread processes train ~28 %
    more per hour than one 2-thread process after the other). `say_stage` announces each."""
    if parallel <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            say_stage(job.announcement())
            results.append(execute(job))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ProcessPoolExecutor(max_workers=parallel,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = []
        for job in jobs:
            say_stage(job.announcement() + f" [{threads} thread(s), in parallel]")
            futures.append(pool.submit(execute, job, threads))
        return [f.result() for f in futures]


def train(config: str, opts: List[str], output_dir: str, distill: bool,
          label: str = "") -> Dict:
    """Train (or reuse) one model; returns its evaluation and timing."""
    os.makedirs(output_dir, exist_ok=True)
    with RunLog(output_dir):
        result = _train_logged(config, opts, output_dir, distill, label)
    # an evaluation with no detections at all has no metrics block: NaN, not a KeyError
    box_ap = result.get("bbox", {}).get("AP", float("nan"))
    mask = f", mask AP {result['segm']['AP']:.2f}" if "segm" in result else ""
    say(f"[demo]   {label + ': ' if label else ''}AP {box_ap:.2f}{mask} "
        f"(log: {os.path.join(output_dir, 'log.txt')})")
    return result


def _train_logged(config: str, opts: List[str], output_dir: str, distill: bool,
                  label: str) -> Dict:
    import torch
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator

    from ..training import Trainer, load_config

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
        from ..checkpoint import SafeDetectionCheckpointer

        model = StockTrainer.build_model(cfg)
        SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        metrics = StockTrainer.test(cfg, model)
        result = {**{t: metrics[t] for t in TASKS if t in metrics}, "train_seconds": 0.0,
                  "threads": torch.get_num_threads(), "seconds_per_iter": float("nan"),
                  "timed_iters": 0}
        with open(result_file, "w") as f:
            json.dump(result, f, indent=2)
        return result
    trainer = (Trainer if distill else StockTrainer)(cfg)
    trainer.register_hooks([progress_hook(cfg.SOLVER.MAX_ITER, label)])
    trainer.resume_or_load(resume=True)
    start = time.time()
    metrics = trainer.train()  # detectron2 evaluates the final model on DATASETS.TEST
    train_seconds = time.time() - start
    if not metrics:
        metrics = trainer.test(cfg, trainer.model)
    steps = steady_step_seconds(trainer)
    result = {**{t: metrics[t] for t in TASKS if t in metrics}, "train_seconds": train_seconds,
              "threads": torch.get_num_threads(),
              "seconds_per_iter": statistics.median(steps) if steps else float("nan"),
              "timed_iters": len(steps)}
    graph = graph_sizes(output_dir)
    if graph:
        result["graph"] = graph
    with open(result_file, "w") as f:
        json.dump(result, f, indent=2)
    return result


def _metrics_rows(output_dir: str) -> List[Dict]:
    """The rows detectron2 wrote to OUTPUT_DIR/metrics.json (none when it is missing)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# The first steps of a run are several times slower than the rest (oneDNN kernels and memory
# set up per shape; 2-5x on a CPU): a run's s/iter leaves them out.
WARMUP_STEPS = 5


def steady_step_seconds(trainer) -> List[float]:
    """Wall-clock seconds of each training step after the first WARMUP_STEPS of this session,
    as detectron2's IterationTimer recorded them (forward, backward and update, the teacher's
    forward included; evaluation, checkpoints and the other hooks excluded)."""
    history = trainer.storage.histories().get("time")
    if history is None:
        return []
    return [t for t, it in history.values() if it - trainer.start_iter >= WARMUP_STEPS]


def graph_sizes(output_dir: str) -> Dict[str, float]:
    """Mean over the logged iterations of the DSIG graph metrics (nodes per image, fraction of
    the sampled bg RoIs mined into the edges); empty for runs without an edge loss."""
    values: Dict[str, List[float]] = {}
    for r in _metrics_rows(output_dir):
        for k in ("dsig/graph_nodes", "dsig/mined_bg_fraction"):
            if k in r:
                values.setdefault(k.split("/", 1)[1], []).append(r[k])
    return {k: sum(v) / len(v) for k, v in values.items()}


def loss_curve(output_dir: str) -> List[Dict]:
    """(iteration, total loss) of each row detectron2 logged."""
    return [{"iteration": r["iteration"], "total_loss": r["total_loss"]}
            for r in _metrics_rows(output_dir) if "total_loss" in r]
