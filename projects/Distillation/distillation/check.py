"""`train_net.py --check` (`./start_train.sh check CONFIG`): a config checked end to end before a
long or multi-GPU run, offline: it trains nothing, downloads nothing and writes no run folder (a
torchvision file already in the cache is converted, as training would).

In order: the config and its teacher config load; every weight file is located (here, in a
cache, or the URL it would be downloaded from and the path it would go to; nothing is
downloaded); every dataset the run reads is checked in full (data_checks: the json, boxes,
categories, every image file) and the class count is taken from it; the batch is checked against
the process count; student and teacher are built, random weights standing in for files that are
not here; one training iteration runs on one image of the training data (a generated image when
there is none) through the trainer's own step (losses, gradients, the optimizer step), then
inference on that image. A network that starts from random weights gets its FrozenBN statistics
from that image first, as training does (random_init.py), so the iteration's losses are the
usual first-step values rather than 1e6; a non-finite loss is reported as a finding.

It prints what it found, every problem with its fix, and the overrides that make the config run
here (random weights for the files that are not here, the data registered) as one command.
Exit status 0: the config runs here as it is; 1: it does not (the problems say why); 2: the
config cannot be read.
"""
import logging
import os
import shlex
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import InputError

RANDOM_FROZEN_BN_TRAINING = ["SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                             "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm"]
QUIET = ("detectron2", "fvcore", "distillation", "d2")


class Report:
    """The check's console output: sections, facts, and problems with their fixes."""

    def __init__(self):
        self.problems: List[Tuple[str, str, bool]] = []  # text, fix, solved by an override
        self.overrides: Dict[str, str] = {}  # KEY -> VALUE that make the config run here
        self.environment: List[str] = []  # VAR=value templates for the smoke-run command
        self.random_weights = False  # overrides put random weights in for missing files

    def section(self, title: str) -> None:
        print(f"[check] {title}", flush=True)

    def fact(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def problem(self, text: str, fix: str = "", overrides: Sequence[str] = ()) -> None:
        """A problem, its fix, and the KEY VALUE overrides that get around it here (none: it
        needs fixing)."""
        self.problems.append((text, fix, bool(overrides)))
        print(f"  PROBLEM: {text}" + (f"\n    fix: {fix}" if fix else ""), flush=True)
        self.override(*overrides)

    def override(self, *pairs: str) -> None:
        for key, value in zip(pairs[::2], pairs[1::2]):
            self.overrides[key] = value


def _mb(path: str) -> str:
    return f"{os.path.getsize(path) / 2 ** 20:.1f} MB"


def _check_weights(report: Report, key: str, form: str, smoke: List[str]) -> bool:
    """Reports where the weights of config key `key` are or would come from. Returns whether
    the file is here (False: random weights stand in for it in this check)."""
    from .weights import locate

    try:
        info = locate(form)
    except ValueError as e:  # a malformed torchvision:// form
        report.problem(f"{key} {form}: {e}", f"set {key} to a valid form (see the README)",
                       smoke)
        report.random_weights = True
        return False
    if info["kind"] == "none":
        return False
    if info["path"]:
        where = "a local file" if info["kind"] == "local" else "in the cache"
        report.fact(f"{key} {form}: {where}, {info['path']} ({_mb(info['path'])})")
        return True
    if info["kind"] == "local":
        report.problem(f"{key} {form}: file not found",
                       f"set {key} to the weights file; for a smoke test with random weights "
                       f"override {_quote(smoke)}", smoke)
        report.random_weights = True
        return False
    fetch = f"would download {info['url']}\n      to {info['cache']}"
    if info.get("converted"):
        fetch += f"\n      (and write the converted copy {info['converted']})"
    if info["reason"] is None:
        report.fact(f"{key} {form}: not here; the first run {fetch}; this check downloads "
                    "nothing, so random weights stand in for it below")
        return False
    report.problem(
        f"{key} {form}: not here, and it cannot be downloaded here ({info['reason']}); a run "
        f"{fetch}",
        f"download {info['url']} on a machine with internet access and copy it to "
        f"{info['cache']} (or set {key} to a local copy); for a smoke test with random weights "
        f"override {_quote(smoke)}", smoke)
    report.random_weights = True
    return False


def _describe_model(cfg) -> str:
    backbone = cfg.MODEL.BACKBONE.NAME
    if "resnet" in backbone:
        backbone += f" (R{cfg.MODEL.RESNETS.DEPTH}, {cfg.MODEL.RESNETS.NORM})"
    return f"{cfg.MODEL.META_ARCHITECTURE}, backbone {backbone}"


def _first_training_image(name: str) -> Optional[Dict]:
    """The first image of a registered dataset with a non-crowd instance, as detectron2 loads
    it for training."""
    from detectron2.data import DatasetCatalog

    for d in DatasetCatalog.get(name):
        if any(not a.get("iscrowd", 0) for a in d.get("annotations", [])):
            return d
    return None


def _generated_image(folder: str, num_classes: int, masks: bool) -> Dict:
    """A generated image (the demo's shapes) with its boxes as a detectron2 dataset dict;
    classes folded into the config's count; a box polygon as each mask."""
    from detectron2.structures import BoxMode
    from PIL import Image

    from .synthetic import render_image

    img, anns = render_image(np.random.default_rng(0), (480, 640))
    path = os.path.join(folder, "check.png")
    Image.fromarray(img).save(path)
    annotations = []
    for a in anns:
        x, y, w, h = a["bbox"]
        ann = {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 0,
               "category_id": (a["category_id"] - 1) % num_classes}
        if masks:
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        annotations.append(ann)
    return {"file_name": path, "height": 480, "width": 640, "image_id": 0,
            "annotations": annotations}


def _shell(word: str) -> str:
    """`word` for a POSIX shell, readably: "('NAME',)" rather than shlex's '('"'"'NAME'"'"',)'."""
    if "'" in word and not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def _quote(items: List[str]) -> str:
    return " ".join(_shell(str(x)) for x in items)


def _quiet_logs():
    saved = []
    for name in QUIET:
        log = logging.getLogger(name)
        saved.append((log, log.level))
        log.setLevel(logging.ERROR)
    return saved


def run_check(args) -> int:
    """train_net.py --check: prints the findings; returns the exit status (module docstring)."""
    saved = _quiet_logs()
    try:
        with tempfile.TemporaryDirectory(prefix="dsig-check-") as tmp:
            return _Check(args, tmp).run()
    finally:
        for log, level in saved:
            log.setLevel(level)


class _Check:
    """The check's sections in order; each reports to self.report."""

    def __init__(self, args, tmp: str):
        self.args, self.tmp, self.report = args, tmp, Report()
        self.unsafe = getattr(args, "allow_unsafe_yaml", False)
        self.processes = max(1, args.num_gpus) * max(1, args.num_machines)

    def run(self) -> int:
        if not self.config():
            return 2
        if self.distill and not self.teacher_config():
            return _summary(self.report, self.args)
        self.batch()
        self.weights()
        self.datasets()
        model = self.build()
        if model is not None:
            self.iteration(model)
        return _summary(self.report, self.args)

    def config(self) -> bool:
        from .training import load_config, register_datasets, uses_teacher

        args, report = self.args, self.report
        report.section(f"config {args.config_file}")
        try:
            register_datasets(args.register_coco)
        except InputError as e:
            report.problem(str(e), "give --register-coco / DSIG_COCO_DATASETS an existing json")
        try:
            self.cfg = load_config(args.config_file, args.opts, allow_unsafe_yaml=self.unsafe)
        except InputError as e:
            print(f"[check] the config cannot be read: {type(e).__name__}: {e}", flush=True)
            return False
        self.distill = uses_teacher(self.cfg)
        report.fact(f"student: {_describe_model(self.cfg)}; device {self.cfg.MODEL.DEVICE}")
        return True

    def teacher_config(self) -> bool:
        from .teacher import resolve_teacher_config_path

        try:
            self.report.fact(f"teacher: {resolve_teacher_config_path(self.cfg)}")
            return True
        except InputError as e:
            self.report.problem(str(e), "set DISTILL.TEACHER.CONFIG to the teacher's config file")
            return False

    def batch(self) -> None:
        from detectron2.engine import DefaultTrainer

        batch, n = self.cfg.SOLVER.IMS_PER_BATCH, self.processes
        reference = self.cfg.SOLVER.REFERENCE_WORLD_SIZE
        if reference and reference != n:  # the trainer rescales the schedule for n processes
            if batch % reference:
                self.report.problem(
                    f"SOLVER.IMS_PER_BATCH {batch} is not a multiple of "
                    f"SOLVER.REFERENCE_WORLD_SIZE {reference} (the trainer's auto-scaling "
                    "needs whole images per process)",
                    f"set SOLVER.IMS_PER_BATCH {max(reference, batch // reference * reference)}",
                    ["SOLVER.IMS_PER_BATCH", str(max(reference, batch // reference * reference))])
                return
            solver = DefaultTrainer.auto_scale_workers(self.cfg, n).SOLVER
            self.report.fact(
                f"schedule scaled from {reference} to {n} process(es) "
                f"(SOLVER.REFERENCE_WORLD_SIZE): IMS_PER_BATCH {batch} -> {solver.IMS_PER_BATCH}, "
                f"BASE_LR {self.cfg.SOLVER.BASE_LR:g} -> {solver.BASE_LR:g}, "
                f"MAX_ITER {self.cfg.SOLVER.MAX_ITER} -> {solver.MAX_ITER}")
            batch = solver.IMS_PER_BATCH
        if batch % n:
            fixed = max(n, batch // n * n)
            self.report.problem(f"SOLVER.IMS_PER_BATCH {batch} does not divide among {n} "
                                "processes", f"set SOLVER.IMS_PER_BATCH {fixed}",
                                ["SOLVER.IMS_PER_BATCH", str(fixed)])
        else:
            self.report.fact(f"batch: {batch} images per iteration, {batch // n} per process "
                             f"over {n} process(es)")

    def weights(self) -> None:
        cfg, report = self.cfg, self.report
        report.section("weights (nothing is downloaded)")
        self.student_here = _check_weights(report, "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS,
                                           ["MODEL.WEIGHTS", ""])
        if not cfg.MODEL.WEIGHTS:
            report.fact("MODEL.WEIGHTS is empty: the student starts from random weights")
        self.teacher_here = False
        if not self.distill:
            return
        form = cfg.DISTILL.TEACHER.WEIGHTS
        smoke = ["DISTILL.TEACHER.WEIGHTS", "", "DISTILL.TEACHER.ALLOW_RANDOM_INIT", "True"]
        self.teacher_here = _check_weights(report, "DISTILL.TEACHER.WEIGHTS", form, smoke)
        if form:
            return
        if cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT:
            report.fact("DISTILL.TEACHER.WEIGHTS is empty and ALLOW_RANDOM_INIT is set: a random "
                        "teacher (smoke tests only)")
        elif not self.student_here:
            report.problem("DISTILL.TEACHER.WEIGHTS is empty and MODEL.WEIGHTS brings no "
                           "teacher: training refuses a teacher without weights",
                           "set DISTILL.TEACHER.WEIGHTS; for a smoke test override "
                           + _quote(smoke), smoke)
            report.random_weights = True

    def datasets(self) -> None:
        """Every dataset in full; the class count from them; self.train_name: the first
        training set that passed (None: the iteration uses a generated image)."""
        from .data_checks import (MissingDataError, UnregisteredDatasetError, check_dataset,
                                  check_same_categories, class_count_key, class_count_opts)

        cfg, report = self.cfg, self.report
        report.section("datasets")
        infos, self.train_name = [], None
        for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN),
                           ("DATASETS.TEST", cfg.DATASETS.TEST)):
            train = key == "DATASETS.TRAIN"
            if not names:
                report.fact(f"{key} is empty")
            for name in names:
                try:
                    info = check_dataset(name, key, every_category_used=train,
                                         need_masks=bool(cfg.MODEL.MASK_ON) and train)
                except InputError as e:  # the message names the fix
                    missing = isinstance(e, (MissingDataError, UnregisteredDatasetError))
                    if missing and train:  # a template for the user's own data
                        report.environment = ["DSIG_COCO_DATASETS="
                                              + shlex.quote("NAME=ann.json,image_root")]
                    # bad data needs fixing; missing data can be swapped (or left out: test)
                    around = (("DATASETS.TRAIN", "('NAME',)") if train
                              else ("DATASETS.TEST", "()")) if missing else ()
                    report.problem(str(e), overrides=around)
                    continue
                infos.append(info)
                if not info["checked"]:
                    report.fact(f"{key} {name}: not a COCO-json dataset, not checked here")
                    continue
                report.fact(f"{key} {name}: {info['images']} images, {info['annotations']} "
                            f"boxes, {len(info['categories'])} categories ({info['json']}, "
                            f"images in {info['image_root']})")
                if train and self.train_name is None:
                    self.train_name = name
        try:
            check_same_categories(infos)
        except InputError as e:
            report.problem(str(e), "name datasets with one category list in DATASETS.TRAIN / "
                                   "DATASETS.TEST")
        try:
            extra = class_count_opts(cfg, infos, self.args.config_file, self.args.opts,
                                     self.unsafe)
        except InputError as e:
            read = [i for i in infos if "categories" in i]
            extra = [class_count_key(cfg), str(len(read[0]["categories"]))]
            report.problem(str(e), overrides=extra)
        else:
            if extra:
                report.fact(f"{extra[0]} {extra[1]}: the class count of the data, given to "
                            "student and teacher (the config leaves detectron2's default)")
        if extra:
            cfg.merge_from_list(extra)

    def build(self):
        """Student and teacher, random weights standing in for files that are not here; None
        when that fails."""
        from detectron2.modeling import build_model

        from .checkpoint import DistillationCheckpointer

        cfg, report = self.cfg.clone(), self.report
        report.section("student and teacher")
        if not self.student_here:
            cfg.MODEL.WEIGHTS = ""
        if self.distill and not self.teacher_here and cfg.DISTILL.TEACHER.WEIGHTS:
            cfg.DISTILL.TEACHER.WEIGHTS = ""
            cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT = True
        cfg.merge_from_list(["DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", self.tmp])
        self.run_cfg = cfg
        try:
            model = build_model(cfg)
            if cfg.MODEL.WEIGHTS:
                loaded = _load_student(DistillationCheckpointer, model, cfg.MODEL.WEIGHTS)
                report.fact(f"MODEL.WEIGHTS loaded; {loaded}")
        except Exception as e:  # the check reports whatever stops the build or the load
            report.problem(f"building the model failed: {type(e).__name__}: {e}")
            return None
        net = getattr(model, "student", model)
        params = sum(p.numel() for p in net.parameters())
        trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
        report.fact(f"student: {params / 1e6:.1f} M parameters, {trained / 1e6:.1f} M trained"
                    + ("" if cfg.MODEL.WEIGHTS else ", random weights"))
        self.teacher_random = self.distill and not getattr(model, "teacher_weights_loaded", True)
        if self.distill:
            teacher = sum(p.numel() for p in model.teacher.parameters())
            report.fact(f"teacher: {teacher / 1e6:.1f} M parameters, frozen"
                        + (", random weights" if self.teacher_random else ", weights loaded"))
            if self.teacher_random and not cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT:
                report.problem("the teacher has no weights (MODEL.WEIGHTS brings no teacher.* "
                               "keys)", "set DISTILL.TEACHER.WEIGHTS")
        return model

    def image(self) -> Tuple[Dict, str]:
        """The iteration's image (the first training image, else a generated one) and its
        description."""
        from .data_checks import class_count_key

        cfg = self.run_cfg
        if self.train_name is not None:
            try:
                image = _first_training_image(self.train_name)
            except Exception as e:  # detectron2 could not load what the check read
                self.report.problem(f"loading {self.train_name} failed: {type(e).__name__}: {e}")
                image = None
            if image is not None:
                return image, (f"the first image of {self.train_name} with instances "
                               f"({image['file_name']})")
        key = class_count_key(cfg)
        k = cfg.MODEL.RETINANET.NUM_CLASSES if "RETINANET" in key else \
            cfg.MODEL.ROI_HEADS.NUM_CLASSES
        return (_generated_image(self.tmp, k, bool(cfg.MODEL.MASK_ON)),
                "a generated image (no training data here)")

    def iteration(self, model) -> None:
        """One training step through the trainer's own step (random FrozenBN networks
        calibrated first, as training does), then inference on the same image."""
        from detectron2.data import DatasetMapper
        from detectron2.utils.events import EventStorage

        from .random_init import calibrate_random_networks, frozen_bn_layers
        from .training import Trainer, step_trainer

        cfg, report = self.run_cfg, self.report
        image, source = self.image()
        report.section(f"one training iteration on {source}")
        student_random = not cfg.MODEL.WEIGHTS
        random_frozen = any(frozen_bn_layers(n.backbone) for n in
                            ([getattr(model, "student", model)] if student_random else [])
                            + ([model.teacher] if self.teacher_random else []))
        try:
            inputs = [DatasetMapper(cfg, is_train=True)(dict(image))]
            for line in calibrate_random_networks(model, inputs, student_random,
                                                  self.teacher_random):
                report.fact(line)
            step = step_trainer(cfg, model, [inputs], Trainer.build_optimizer(cfg, model))
            with EventStorage(0) as storage:
                try:
                    step.run_step()
                except FloatingPointError as e:
                    report.problem(f"non-finite loss in the first iteration: {e}",
                                   "random networks were calibrated above, so a non-finite "
                                   "first loss comes from the inputs or the config "
                                   "(MODEL.PIXEL_MEAN / PIXEL_STD, INPUT.*, the boxes)")
                else:
                    _report_step(report, storage, model, self.processes)
            model.eval()
            with torch.no_grad():
                out = model([DatasetMapper(cfg, is_train=False)(dict(image))])[0]
            n = len(out["instances"]) if "instances" in out else 0
            report.fact(f"inference on the same image: {n} detections")
        except Exception as e:  # the check reports whatever stops the iteration
            report.problem(f"the iteration failed: {type(e).__name__}: {e}")
        # random FrozenBN networks: the smoke run needs clipped gradients (README)
        by_config = not self.cfg.MODEL.WEIGHTS or (self.distill
                                                   and not self.cfg.DISTILL.TEACHER.WEIGHTS)
        if random_frozen and by_config and not report.problems:
            report.fact("random networks with FrozenBN train for more than a few iterations "
                        "only with clipped gradients: " + _quote(RANDOM_FROZEN_BN_TRAINING))
        if random_frozen and report.random_weights:
            report.override(*RANDOM_FROZEN_BN_TRAINING)


def _load_student(checkpointer_cls, model, path: str) -> str:
    """Load MODEL.WEIGHTS as training does; a line on what the file left without a value."""

    class Recording(checkpointer_cls):
        incompatible = None

        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    c = Recording(model)
    c.load(path)
    missing = sorted(set(c.incompatible.missing_keys)) if c.incompatible is not None else []
    missing = [k for k in missing if not k.startswith("teacher.")]
    if not missing:
        return "it fills every student weight"
    parts = sorted({".".join(k.split(".")[:3 if k.startswith("student.") else 2])
                    for k in missing})
    return (f"{len(missing)} student weights keep their initialisation (not in the file): "
            f"{', '.join(parts[:6])}{' ...' if len(parts) > 6 else ''}")


def _report_step(report: Report, storage, model, processes: int) -> None:
    latest = storage.latest()
    losses = {k: v[0] for k, v in latest.items() if k.startswith("loss")}
    total = latest["total_loss"][0] if "total_loss" in latest else sum(losses.values())
    report.fact(f"total_loss {total:.4g} = " + " + ".join(f"{k} {v:.4g}"
                                                         for k, v in sorted(losses.items())))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trained if p.grad is None]
    bad = [n for n, p in trained if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        report.problem(f"non-finite gradients in {len(bad)} parameters, e.g. {', '.join(bad[:3])}")
    else:
        report.fact(f"gradients finite for all {len(trained) - len(no_grad)} trained parameter "
                    "tensors that got one; the optimizer step ran")
    if no_grad:
        text = (f"{len(no_grad)} trained parameter tensors got no gradient, e.g. "
                f"{', '.join(no_grad[:3])}")
        if processes > 1:
            report.problem(text + ": DistributedDataParallel stops on the second iteration",
                           "freeze them (requires_grad False) or make the model use them")
        else:
            report.fact(text + " (several processes would need every one)")


def _summary(report: Report, args) -> int:
    if not report.problems:
        report.section("OK: the config runs here as it is")
        return 0
    report.section(f"{len(report.problems)} problem(s): the config does not run here as it is")
    for i, (text, _, solved) in enumerate(report.problems, 1):
        report.fact(f"{i}. {text.splitlines()[0][:300]}"
                    + ("" if solved else "  [no override gets around this: fix it]"))
    if report.overrides:
        from .data_checks import USER_DATASETS

        opts = list(args.opts)
        kept = [x for k, v in zip(opts[::2], opts[1::2]) if k not in report.overrides
                for x in (k, v)]
        pairs = [x for k, v in report.overrides.items() for x in (k, v)]
        # the datasets this run registered, as start_train.sh takes them (or a template)
        env = report.environment or (
            ["DSIG_COCO_DATASETS=" + _shell(";".join(f"{n}={j},{r}" for n, (j, r)
                                                     in USER_DATASETS.items()))]
            if USER_DATASETS else [])
        notes = (["random weights stand in for the files that are not here: a smoke test"]
                 if report.random_weights else []) + (
            ["NAME, ann.json and image_root are your data's"] if report.environment else [])
        report.section("to run it here anyway"
                       + (f" ({'; '.join(notes)})" if notes else "") + ":")
        report.fact(f"overrides: {_quote(pairs)}")
        report.fact(" ".join(env + ["./start_train.sh", "debugtrain", _quote([args.config_file]
                                                                          + kept + pairs)]))
        if report.environment:
            report.fact("(with train_net.py: --register-coco NAME ann.json image_root; or "
                        "DETECTRON2_DATASETS for detectron2's COCO splits)")
    return 1
