"""The whole demo: check the choices, prepare the data of every seed, train the teachers, then
the students, and write the report with the instance-graph view."""
import json
import os
from typing import Dict, Optional, Sequence, Union

from ..errors import MissingFileError
from .console import say_stage
from .data import prepare_user_data
from .presets import CONFIG_DIR, MODEL_CONFIGS, PRESETS, TASKS, run_names, select_methods
from .report import write_report
from .runs import plan_seed, run_dir, run_jobs, run_tag


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
        from ..weights import resolve_weights

        if not os.path.isfile(resolve_weights(teacher_weights, "--teacher-weights")):
            raise MissingFileError(f"teacher weights {teacher_weights} not found")
        teacher = (teacher_config or os.path.join(CONFIG_DIR, MODEL_CONFIGS[task][0]),
                   teacher_weights)
    elif teacher_config:
        raise ValueError("--teacher-config needs --teacher-weights (the demo trains its own "
                         "teacher otherwise)")
    preset = PRESETS[preset_name]
    runs = run_names(methods)
    total = (1 + len(runs)) * len(seeds) + 1  # per seed: data, then each run; the report
    stage = iter(range(1, total + 1))

    def say(text):
        say_stage(next(stage), total, text)

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
    say_stage(total, total, "report and instance-graph view")
    graph_png = os.path.join(output, "graph.png")
    if "dsig" in methods and user_data is None and not os.path.isfile(graph_png):
        from ..graph_view import visualize

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
