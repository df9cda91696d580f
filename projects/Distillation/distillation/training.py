"""Trainer and set-up shared by train_net.py and the tests."""
import itertools
import logging
import os
import time
import warnings
import weakref
from typing import List

import torch
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, SimpleTrainer, default_setup, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from . import legacy
from .checkpoint import DistillationCheckpointer, TeacherWeightsError
from .config import add_distillation_config
from .data_checks import (USER_DATASETS, DataError, MissingDataError, check_run_datasets,
                          class_count_opts)
from .errors import ConfigError, MissingFileError
from .logs import held_logs, replay, setup_logs
from .random_init import calibrate_random_networks, frozen_bn_layers
from .weights import require_weights
from .yaml_io import merge_into, read_config

logger = logging.getLogger("distillation")


def load_config(config_file: str, opts=(), allow_unsafe_yaml: bool = False):
    """get_cfg -> add_distillation_config -> merge file (safe YAML, `_BASE_`; a config written
    for the original repository is translated) -> merge opts; relative teacher config paths
    resolve against the config file's folder; no GPU -> MODEL.DEVICE cpu. Not frozen."""
    if not os.path.isfile(config_file):
        raise MissingFileError(f"config file {config_file} not found")
    cfg = get_cfg()
    add_distillation_config(cfg)
    data = read_config(config_file, allow_unsafe=allow_unsafe_yaml)
    if legacy.is_legacy(data):
        logger.warning("%s is written for the original DSIG repository: translating its keys "
                       "(see projects/Distillation/README.md)", config_file)
        data = legacy.translate_config(data, config_file)
    merge_into(cfg, data, config_file)
    merge_options(cfg, opts)
    teacher = cfg.DISTILL.TEACHER.CONFIG
    if teacher and not os.path.isabs(teacher):
        beside = os.path.join(os.path.dirname(os.path.abspath(config_file)), teacher)
        if os.path.isfile(beside):
            cfg.DISTILL.TEACHER.CONFIG = beside
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def merge_options(cfg, opts) -> None:
    """cfg.merge_from_list(opts), with a ConfigError naming the bad option instead of yacs's
    bare assertion."""
    opts = list(opts)
    flags = [o for o in opts if str(o).startswith("--")]
    if flags:
        raise ConfigError(f"{flags[0]} is among the KEY VALUE config options: give flags before "
                          "them (with start_train.sh, datasets come from DSIG_COCO_DATASETS)")
    try:
        cfg.merge_from_list(opts)
    except (AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"config options {' '.join(map(str, opts))}: {e} (options are KEY "
                          "VALUE pairs of existing config keys)") from None


def datasets_from_env(value: str):
    """DSIG_COCO_DATASETS="name=ann.json,image_root;name2=..." -> [(name, json, root), ...]."""
    specs = []
    for item in filter(None, (v.strip() for v in value.split(";"))):
        name, _, rest = item.partition("=")
        json_file, _, image_root = rest.partition(",")
        if not (name and json_file and image_root):
            raise DataError(f"DSIG_COCO_DATASETS entry {item!r} is not name=ann.json,image_root")
        specs.append((name, json_file, image_root))
    return specs


def register_datasets(specs):
    """Register user COCO-format datasets: each spec is (name, json_file, image_root); entries
    of the DSIG_COCO_DATASETS environment variable are added. Their content is checked by
    data_checks (check_run_datasets), which knows them as the user's."""
    from detectron2.data import DatasetCatalog

    specs = list(specs or []) + datasets_from_env(os.environ.get("DSIG_COCO_DATASETS", ""))
    for name, json_file, image_root in specs:
        if name in DatasetCatalog.list():
            continue  # already registered (e.g. by both the flag and the environment)
        if not os.path.isfile(json_file):
            raise MissingDataError(f"dataset {name}: annotation file {json_file} not found (the "
                                   "JSON of --register-coco / DSIG_COCO_DATASETS)")
        register_coco_instances(name, {}, json_file, image_root)
        USER_DATASETS[name] = (json_file, image_root)


def uses_teacher(cfg) -> bool:
    """Whether the config's model is a distillation model (it builds and loads a teacher)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from .meta_arch import DistillationRCNN
    from .meta_arch_retinanet import DistillationRetinaNet

    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    return isinstance(arch, type) and issubclass(arch, (DistillationRCNN, DistillationRetinaNet))


def will_resume(cfg, resume: bool) -> bool:
    """Whether --resume finds a checkpoint in OUTPUT_DIR (MODEL.WEIGHTS is then not read)."""
    return resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def check_inputs(args) -> List[str]:
    """What train_net.py checks before any process starts or model is built: the datasets the
    run reads (data_checks.check_run_datasets: the user's read in full, image files included;
    detectron2's COCO splits must exist), the class count (from the data, for student and
    teacher), the weight files (fetched now, once, or an error naming the key). Returns the
    overrides to append to the options (the class count). Raises InputError subclasses."""
    register_datasets(args.register_coco)
    cfg = load_config(args.config_file, args.opts,
                      allow_unsafe_yaml=getattr(args, "allow_unsafe_yaml", False))
    infos = check_run_datasets(cfg, eval_only=args.eval_only)
    extra = class_count_opts(cfg, infos, args.config_file, args.opts,
                             getattr(args, "allow_unsafe_yaml", False))
    if cfg.MODEL.WEIGHTS and not will_resume(cfg, args.resume):
        require_weights(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    if uses_teacher(cfg):
        check_teacher_classes(cfg, extra)
        if cfg.DISTILL.TEACHER.WEIGHTS:
            require_weights(cfg.DISTILL.TEACHER.WEIGHTS, "DISTILL.TEACHER.WEIGHTS")
    return extra


def check_teacher_classes(cfg, extra=()) -> None:
    """The teacher's config is there and its class count is the student's (with the overrides
    `extra`), as the model's build would find; here before any process starts."""
    from .data_checks import class_count_key
    from .teacher import class_count_mismatch, config_value, teacher_config

    cfg = cfg.clone()
    cfg.merge_from_list(list(extra))
    key = class_count_key(cfg)
    student, teacher = config_value(cfg, key), config_value(teacher_config(cfg), key)
    if student != teacher:
        raise class_count_mismatch(key, student, teacher)


def student_of(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "student", model)


def has_random_frozen_bn(model, student: bool, teacher: bool) -> bool:
    """Whether a network that starts from random weights (the student or plain detector when
    `student`, the teacher when `teacher`) has FrozenBN layers to calibrate."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    nets = ([getattr(model, "student", model)] if student else []) + (
        [model.teacher] if teacher and hasattr(model, "teacher") else [])
    return any(frozen_bn_layers(net.backbone) for net in nets)


class ExportStudent(hooks.HookBase):
    """After training, write the student alone as a stock detectron2 checkpoint."""

    def __init__(self, output_dir):
        self.output_dir = output_dir

    def after_train(self):
        model = self.trainer.model
        model = model.module if isinstance(model, DistributedDataParallel) else model
        if not hasattr(model, "student"):  # a plain detector: model_final.pth is the export
            return
        if comm.is_main_process() and self.trainer.iter + 1 >= self.trainer.max_iter:
            path = os.path.join(self.output_dir, "model_final_student.pth")
            torch.save({"model": student_of(self.trainer.model).state_dict()}, path)
            logger.info("Exported the student to %s", path)


def amp_dtype(cfg) -> torch.dtype:
    """The autocast dtype of SOLVER.AMP.PRECISION on MODEL.DEVICE."""
    precision = cfg.SOLVER.AMP.PRECISION
    if precision == "auto":
        return torch.float16 if cfg.MODEL.DEVICE.startswith("cuda") else torch.bfloat16
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"SOLVER.AMP.PRECISION must be 'auto', 'float16' or 'bfloat16', got "
                         f"{precision!r}")
    return dtypes[precision]


class AutocastTrainer(SimpleTrainer):
    """detectron2's AMPTrainer step on any device: the forward (teacher included) under
    torch.autocast in `dtype`; float16 gradients go through a GradScaler, bfloat16 ones need
    none. The DSIG terms compute in float32 whatever the autocast dtype (losses.py)."""

    def __init__(self, model, data_loader, optimizer, device_type: str, dtype: torch.dtype):
        super().__init__(model, data_loader, optimizer)
        self.device_type, self.dtype = device_type, dtype
        self.grad_scaler = (torch.amp.GradScaler(device_type) if dtype == torch.float16
                            else None)

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The object that runs one training step as cfg asks (AutocastTrainer with
    SOLVER.AMP.ENABLED, else detectron2's SimpleTrainer); the check runs its iteration with it."""
    if cfg.SOLVER.AMP.ENABLED:
        return AutocastTrainer(model, data_loader, optimizer, cfg.MODEL.DEVICE.split(":")[0],
                               amp_dtype(cfg))
    return SimpleTrainer(model, data_loader, optimizer)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the distillation checkpointer, CPU DDP (gloo) support, COCO
    evaluation on the pycocotools path and the student export. Plain detectron2 models
    (GeneralizedRCNN, RetinaNet: baselines, exported students) train and resume through it too."""

    def __init__(self, cfg):  # DefaultTrainer's order, with our DDP and checkpointer
        super(DefaultTrainer, self).__init__()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        if comm.get_world_size() > 1:
            ids = [comm.get_local_rank()] if cfg.MODEL.DEVICE.startswith("cuda") else None
            model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        self._trainer = step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DistillationCheckpointer(model, cfg.OUTPUT_DIR,
                                                     trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        self.calibrated = []  # random FrozenBN networks calibrated on the first batch
        resumed = resume and self.checkpointer.has_checkpoint()
        super().resume_or_load(resume=resume)
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        if (not getattr(model, "teacher_weights_loaded", True)
                and not self.cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT):
            raise TeacherWeightsError(
                "the teacher has no weights: set DISTILL.TEACHER.WEIGHTS, or give MODEL.WEIGHTS "
                "a checkpoint with teacher.* keys (e.g. the original merged Student-Teacher file); "
                "for a smoke test only, DISTILL.TEACHER.ALLOW_RANDOM_INIT True")
        # networks that start from random weights: FrozenBN statistics from the first batch
        student = not resumed and not self.cfg.MODEL.WEIGHTS
        teacher = not getattr(model, "teacher_weights_loaded", True)
        if has_random_frozen_bn(model, student, teacher):
            batch = next(self._trainer._data_loader_iter)
            self._trainer._data_loader_iter = itertools.chain([batch],
                                                              self._trainer._data_loader_iter)
            self.calibrated = calibrate_random_networks(model, batch, student, teacher)

    def build_hooks(self):
        return super().build_hooks() + [ExportStudent(self.cfg.OUTPUT_DIR)]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


def explain_worker_count(cfg) -> None:
    """DATALOADER.NUM_WORKERS above the CPUs this process may use (the shipped configs' 4 on a
    small machine) is kept, with one line saying so instead of torch's warning at every loader:
    each worker draws its own random flips and sizes, so capping the count would change the
    training."""
    workers = cfg.DATALOADER.NUM_WORKERS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cpus or workers <= cpus:
        return
    logger.info("DATALOADER.NUM_WORKERS %d is above the %d CPU(s) this process may use: kept, "
                "as the worker count decides each image's random augmentation (set "
                "DATALOADER.NUM_WORKERS %d for fewer processes, a different data draw)",
                workers, cpus, cpus)
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes",
                            category=UserWarning)


def setup(args, held_records=None):
    """detectron2's set-up (get_cfg, the project's keys, the file, the options, freeze,
    default_setup) with the project's logs (logs.py), and the line on the worker count.
    `held_records`: what train_net's input checks logged before launch, logged here once the
    log files exist (this config load logs the same again, so it is dropped then)."""
    with held_logs() as own:
        cfg = load_config(args.config_file, args.opts,
                          allow_unsafe_yaml=getattr(args, "allow_unsafe_yaml", False))
    cfg.freeze()
    setup_logs(cfg.OUTPUT_DIR, comm.get_rank())  # first: default_setup logs the config
    default_setup(cfg, args)
    replay(own.records if held_records is None else held_records)
    explain_worker_count(cfg)
    return cfg
