"""Run by test_distributed: 2 CPU processes (gloo) train a few iterations, then every rank
reports a checksum of its student parameters."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_utils import CONFIGS, make_coco_dataset, tiny_opts  # noqa: E402


def worker(root):
    import torch
    from detectron2.utils import comm

    from distillation.training import Trainer, load_config, register_datasets

    json_file, image_root = os.path.join(root, "train.json"), os.path.join(root, "images")
    register_datasets([("ddp_tiny", json_file, image_root)])
    cfg = load_config(os.path.join(CONFIGS, "Distillation-FasterRCNN-MNV2-R50-dsig-1x.yaml"),
                      tiny_opts("ddp_tiny", os.path.join(root, "out"), iters=3, batch=4,
                                stable=True))
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    student = trainer.model.module.student
    before = sum(float(p.double().sum()) for p in student.parameters())
    trainer.train()
    params = torch.cat([p.detach().flatten() for p in student.parameters()])
    all_params = comm.all_gather(params)
    if comm.is_main_process():
        report = {"world_size": comm.get_world_size(),
                  "max_rank_difference": max(float((p - all_params[0]).abs().max())
                                             for p in all_params),
                  "changed": abs(float(params.double().sum()) - before) > 0}
        with open(os.path.join(root, "report.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    root = sys.argv[1]
    make_coco_dataset(root, num_images=8)
    from distillation.launch import launch

    launch(worker, 2, dist_url="auto", args=(root,))
