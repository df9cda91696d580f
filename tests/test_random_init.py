"""Networks that start from random weights with FrozenBN (distillation/random_init.py): their
identity statistics let activations explode through a deep random network (a random R50
teacher's FPN features ~1e3, first losses ~1e6, non-finite a few steps later); calibrated on the
first batch they start at unit scale and the first losses are the usual ones. CPU."""
import json
import os

import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import CONFIGS, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.layers import Conv2d, FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from distillation.random_init import calibrate_frozen_bn, calibrate_random_networks  # noqa: E402
from distillation.training import Trainer, load_config, register_datasets  # noqa: E402

R18_R50 = os.path.join(CONFIGS, "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml")
DATASET = "random_init_tiny"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    json_file, image_root = make_coco_dataset(str(tmp_path_factory.mktemp("random_init")))
    register_datasets([(DATASET, json_file, image_root)])
    return DATASET


def _random_cfg(out, extra=()):
    """The shipped R18-R50 config with random student and teacher (FrozenBN in both)."""
    opts = tiny_opts(DATASET, out, iters=2, batch=1) + ["SOLVER.BASE_LR", "0.01",
                                                        "SOLVER.WARMUP_ITERS", "1000"]
    return load_config(R18_R50, opts + list(extra))


def _fpn_std(detector, images):
    with torch.no_grad():
        return max(float(f.std()) for f in detector.backbone(images).values())


def test_calibration_brings_random_networks_to_unit_scale(dataset, tmp_path):
    from distillation.teacher import teacher_images

    cfg = _random_cfg(str(tmp_path))
    model = build_model(cfg)
    batch = [DatasetMapper(cfg, is_train=True)(DatasetCatalog.get(dataset)[0])]
    t_images = teacher_images(model.teacher, batch, model.flip_teacher_input, "cpu").tensor
    assert _fpn_std(model.teacher, t_images) > 100  # what identity statistics give
    done = calibrate_random_networks(model, batch, student=True, teacher=True)
    assert [line.split(":")[0] for line in done] == ["student", "teacher"]
    assert "53 FrozenBN layers" in done[1]  # every norm of the R50
    assert _fpn_std(model.teacher, t_images) < 10
    assert _fpn_std(model.student, model.student.preprocess_image(batch).tensor) < 10
    # a network without FrozenBN (GroupNorm: the demo's) is left as it is
    demo = load_config(os.path.join(CONFIGS, "demo", "dsig-R18-R50.yaml"),
                       tiny_opts(dataset, str(tmp_path)))
    gn_model = build_model(demo)
    before = {k: v.clone() for k, v in gn_model.state_dict().items()}
    assert calibrate_random_networks(gn_model, batch, student=True, teacher=True) == []
    for k, v in gn_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_random_training_starts_with_the_usual_losses(dataset, tmp_path):
    """The trainer calibrates the networks that start from random weights: the first losses are
    tens to hundreds, not millions (the shipped R18-R50 config, random student and teacher, the
    config's learning rate). The distillation terms sum over the 256 channels of two random,
    unnormalised FPNs, so their size varies with the draw: 70-540 over seeds 0-5, 1.4e3 once
    unseeded in CI; hence a fixed draw and a bound far below the uncalibrated ~1e6."""
    torch.manual_seed(0)
    cfg = _random_cfg(str(tmp_path))
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    assert [line.split(":")[0] for line in trainer.calibrated] == ["student", "teacher"]
    trainer.train()
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert losses and all(0 < x < 1e4 for x in losses), losses


def _stack():
    """Convolutions with FrozenBN: detectron2's Conv2d(norm=...) and a plain conv + norm pair."""
    torch.manual_seed(0)  # the same random weights in every process
    return torch.nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8)), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8))


def _calibrate_in_process(root):
    """One of two gloo processes: the stack calibrated on its own images."""
    from detectron2.utils import comm

    net = _stack()
    torch.manual_seed(1 + comm.get_rank())  # different images
    calibrate_frozen_bn(net, torch.randn(2, 3, 16, 16) * (1 + comm.get_rank()))
    torch.save(net.state_dict(), os.path.join(root, f"rank{comm.get_rank()}.pth"))


def test_calibration_agrees_across_processes(tmp_path):
    from distillation.launch import launch

    launch(_calibrate_in_process, 2, dist_url="auto", args=(str(tmp_path),))
    a, b = (torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # the standard deviations were folded into both convolutions: each FrozenBN scales by 1
    fresh = _stack().state_dict()
    for conv, norm in (("0", "0.norm"), ("2", "3")):
        assert torch.allclose(a[f"{norm}.running_var"], torch.full((8,), 1 - 1e-5))
        assert not torch.allclose(a[f"{conv}.weight"], fresh[f"{conv}.weight"])


def test_calibration_is_deterministic_with_stochastic_depth(tmp_path):
    """EfficientNet-B0 drops residual branches at random while training: the calibration pass
    runs in eval mode, so the statistics do not depend on which branches a pass dropped, and
    the network goes back to training mode."""
    import copy

    from distillation.backbones import build_efficientnet_b0

    cfg = load_config(os.path.join(CONFIGS, "Distillation-FasterRCNN-EB0-R101-dsig-1x.yaml"),
                      tiny_opts("unused", str(tmp_path)))
    torch.manual_seed(0)
    net = build_efficientnet_b0(cfg).train()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    states = []
    for seed in (1, 2):
        copy_ = copy.deepcopy(net)
        torch.manual_seed(seed)  # the stochastic-depth draws of a training-mode pass
        calibrate_frozen_bn(copy_, images)
        assert copy_.training
        states.append(copy_.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], msg=k)
