"""Weight forms in configs: detectron2:// (model zoo) and torchvision:// (converted ImageNet
backbones), their caches, the offline error, and strict loading of a converted backbone."""
import glob
import os
import time

import pytest
import torch

pytest.importorskip("detectron2")
from distill_utils import (CONFIGS, FASTER_RCNN_CONFIGS, MASK_RCNN_CONFIGS,  # noqa: E402
                          RETINANET_CONFIGS)

from distillation import weights as W  # noqa: E402
from distillation.checkpoint import DistillationCheckpointer  # noqa: E402
from distillation.training import load_config  # noqa: E402


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and iopath caches, no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath"))
    monkeypatch.setenv("DSIG_OFFLINE", "1")
    return tmp_path


def test_torchvision_forms_resolve_to_torchvision_weights():
    arch, w = W.torchvision_weights("resnet18")
    assert arch == "resnet18" and w.url.endswith("/resnet18-f37072fd.pth")
    assert W.torchvision_weights("resnet50/IMAGENET1K_V2")[1].name == "IMAGENET1K_V2"
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'.*resnet18"):
        W.torchvision_weights("vgg16")
    with pytest.raises(ValueError, match="has weights IMAGENET1K_V1"):
        W.torchvision_weights("resnet18/IMAGENET1K_V9")
    assert W.resolve_weights("/some/local.pth") == "/some/local.pth"


def test_offline_forms_fail_at_once_naming_url_and_path(caches):
    t0 = time.time()
    with pytest.raises(W.WeightsUnavailableError) as err:
        W.resolve_weights("torchvision://resnet18")
    msg = str(err.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert os.path.join(str(caches), "torch", "hub", "checkpoints", "resnet18-f37072fd.pth") in msg
    form = "detectron2://COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl"
    with pytest.raises(W.WeightsUnavailableError) as err:
        W.resolve_weights(form)
    assert ("https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_3x/"
            "137849458/model_final_280758.pkl") in str(err.value)
    assert W.zoo_cache_path(form) in str(err.value)
    assert time.time() - t0 < 5


def test_cached_torchvision_backbone_converts_and_loads_strictly(caches, tmp_path):
    import torchvision
    from distill_utils import tiny_opts
    from detectron2.modeling import build_model

    net = torchvision.models.resnet18(weights=None)
    source = os.path.join(str(caches), "torch", "hub", "checkpoints", "resnet18-f37072fd.pth")
    os.makedirs(os.path.dirname(source))
    torch.save(net.state_dict(), source)  # as torchvision's download leaves it
    path = W.resolve_weights("torchvision://resnet18")
    assert path.endswith("resnet18-IMAGENET1K_V1-detectron2.pth") and os.path.isfile(path)
    cfg = load_config(os.path.join(CONFIGS, FASTER_RCNN_CONFIGS[0]),
                      tiny_opts("unused", str(tmp_path)))
    cfg.freeze()
    model = build_model(cfg)
    DistillationCheckpointer(model).load("torchvision://resnet18")  # the config's own form
    student = model.student.state_dict()
    torch.testing.assert_close(student["backbone.bottom_up.stem.conv1.weight"],
                               net.state_dict()["conv1.weight"])
    torch.testing.assert_close(student["backbone.bottom_up.res5.1.conv2.norm.running_var"],
                               net.state_dict()["layer4.1.bn2.running_var"])
    # a converted backbone of another architecture is refused, not half-loaded
    other = os.path.join(str(caches), "torch", "hub", "checkpoints", "mobilenet_v2-b0353104.pth")
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="do not fit the student's backbone"):
        DistillationCheckpointer(build_model(cfg)).load("torchvision://mobilenet_v2")


def test_cached_zoo_file_needs_no_network(caches):
    form = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    cached = W.zoo_cache_path(form)
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(b"weights")
    assert os.path.samefile(W.resolve_weights(form), cached)


def test_shipped_configs_name_downloadable_weights():
    """Every teacher comes from the detectron2 zoo except the R152 one (not in the zoo); every
    student from torchvision or detectron2's MSRA ImageNet backbones."""
    for name in FASTER_RCNN_CONFIGS + RETINANET_CONFIGS + MASK_RCNN_CONFIGS:
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.MODEL.WEIGHTS.startswith(("torchvision://",
                                             "detectron2://ImageNetPretrained/MSRA/")), name
        zoo = "COCO-InstanceSegmentation" if cfg.MODEL.MASK_ON else "COCO-Detection"
        if "R152" in name:
            assert not cfg.DISTILL.TEACHER.WEIGHTS.startswith("detectron2://")
        else:
            assert cfg.DISTILL.TEACHER.WEIGHTS.startswith(f"detectron2://{zoo}/"), name
    assert len(glob.glob(os.path.join(CONFIGS, "Distillation-*.yaml"))) == 10
