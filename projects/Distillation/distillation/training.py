"""Trainer and set-up shared by train_net.py and the tests."""
import logging
import os
import time
import weakref

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, SimpleTrainer, default_setup, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import DistillationCheckpointer
from . import legacy
from .config import add_distillation_config
from .yaml_io import read_config

logger = logging.getLogger("distillation")


def load_config(config_file: str, opts=(), allow_unsafe_yaml: bool = False):
    """get_cfg -> add_distillation_config -> merge file (safe YAML, `_BASE_`; a config written
    for the original repository is translated) -> merge opts; relative teacher config paths
    resolve against the config file's folder; no GPU -> MODEL.DEVICE cpu. Not frozen."""
    cfg = get_cfg()
    add_distillation_config(cfg)
    data = read_config(config_file, allow_unsafe=allow_unsafe_yaml)
    if legacy.is_legacy(data):
        logger.warning("%s is written for the original DSIG repository: translating its keys "
                       "(see projects/Distillation/README.md)", config_file)
        data = legacy.translate_config(data, config_file)
    cfg.merge_from_other_cfg(CfgNode(data))
    cfg.merge_from_list(list(opts))
    teacher = cfg.DISTILL.TEACHER.CONFIG
    if teacher and not os.path.isabs(teacher):
        beside = os.path.join(os.path.dirname(os.path.abspath(config_file)), teacher)
        if os.path.isfile(beside):
            cfg.DISTILL.TEACHER.CONFIG = beside
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def datasets_from_env(value: str):
    """DSIG_COCO_DATASETS="name=ann.json,image_root;name2=..." -> [(name, json, root), ...]."""
    specs = []
    for item in filter(None, (v.strip() for v in value.split(";"))):
        name, _, rest = item.partition("=")
        json_file, _, image_root = rest.partition(",")
        if not (name and json_file and image_root):
            raise ValueError(f"DSIG_COCO_DATASETS entry {item!r} is not name=ann.json,image_root")
        specs.append((name, json_file, image_root))
    return specs


def register_datasets(specs):
    """Register user COCO-format datasets: each spec is (name, json_file, image_root); entries
    of the DSIG_COCO_DATASETS environment variable are added."""
    from detectron2.data import DatasetCatalog

    specs = list(specs or []) + datasets_from_env(os.environ.get("DSIG_COCO_DATASETS", ""))
    for name, json_file, image_root in specs:
        if name in DatasetCatalog.list():
            continue  # already registered (e.g. by both the flag and the environment)
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"dataset {name}: annotation file {json_file} not found")
        register_coco_instances(name, {}, json_file, image_root)


def student_of(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "student", model)


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
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = AutocastTrainer(model, data_loader, optimizer,
                                            cfg.MODEL.DEVICE.split(":")[0], amp_dtype(cfg))
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DistillationCheckpointer(model, cfg.OUTPUT_DIR,
                                                     trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        if (not getattr(model, "teacher_weights_loaded", True)
                and not self.cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT):
            raise RuntimeError(
                "the teacher has no weights: set DISTILL.TEACHER.WEIGHTS, or give MODEL.WEIGHTS "
                "a checkpoint with teacher.* keys (e.g. the original merged Student-Teacher file)")

    def build_hooks(self):
        return super().build_hooks() + [ExportStudent(self.cfg.OUTPUT_DIR)]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


def setup(args):
    cfg = load_config(args.config_file, args.opts,
                      allow_unsafe_yaml=getattr(args, "allow_unsafe_yaml", False))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
