"""The original DSIG repository's MobileNetV2 / EfficientNet-B0 student layouts: its checkpoints'
names load completely and give the outputs of a reference forward of the same weights.

References: torchvision's mobilenet_v2 (the same network under other names) and torchvision's
efficientnet_b0 given the original's numerics by hand (norm eps 1e-3, the TensorFlow "same"
padding it fixed for a 224x224 input: (0, 1) for stride-2 3x3 convs, (1, 2) for stride-2 5x5)."""
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")
from distill_utils import LEGACY_BASE, make_coco_dataset, tiny_opts  # noqa: E402

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from distillation import add_distillation_config  # noqa: E402
from distillation.backbones import build_efficientnet_b0, build_mobilenetv2  # noqa: E402
from distillation.checkpoint import DistillationCheckpointer  # noqa: E402
from distillation.original_backbones import same_padding  # noqa: E402
from distillation.training import Trainer, load_config, register_datasets  # noqa: E402

DATASET = "dsig_tiny_original_backbones"
MNV2_ENDS = {"m2": 3, "m3": 6, "m4": 13, "m5": 17}  # torchvision `features` indices
EB0_GROUP_SIZES = [1, 2, 2, 3, 3, 4, 1]
EB0_ENDS = {"e2": (2, 1), "e3": (3, 1), "e4": (5, 2), "e5": (7, 0)}  # (stage, block) in torchvision


def backbone_cfg(arch, layout="original", norm="FrozenBN"):
    cfg = get_cfg()
    add_distillation_config(cfg)
    node = cfg.MODEL.MOBILENETV2 if arch == "mnv2" else cfg.MODEL.EFFICIENTNET
    node.LAYOUT, node.NORM = layout, norm
    return cfg


def randomize(module, seed=0):
    """Random weights and norm statistics (a loaded checkpoint, not an init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # norm scale
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (1.5 / fan_in) ** 0.5)
    return module


# --- MobileNetV2 ------------------------------------------------------------------------------

def tonylins_to_torchvision(key):
    """features.N.conv.J of the original -> torchvision's features.N.conv.* name."""
    m = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.*)", key)
    if not m:
        return key  # the stem: features.0.{0,1} in both
    block, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    table = ({0: "0.0", 1: "0.1", 3: "1", 4: "2"} if block == 1 else
             {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"})
    return f"features.{block}.conv.{table[j]}.{rest}"


def test_original_mobilenetv2_names_and_outputs_match_torchvision():
    from torchvision.models import mobilenet_v2

    ours = randomize(build_mobilenetv2(backbone_cfg("mnv2"))).eval()
    state = ours.state_dict()
    assert "features.1.conv.3.weight" in state and "features.17.conv.7.running_var" in state
    assert not any(k.startswith("features.18") for k in state)  # no 1280-channel head
    reference = mobilenet_v2(weights=None).eval()
    result = reference.load_state_dict({tonylins_to_torchvision(k): v for k, v in state.items()},
                                       strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") or k.startswith(("features.18", "classifier"))
               for k in result.missing_keys)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = ours(x)
        expected, h = {}, x
        for i, block in enumerate(reference.features[:18]):
            h = block(h)
            expected.update({n: h for n, end in MNV2_ENDS.items() if end == i})
    for name in MNV2_ENDS:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)


# --- EfficientNet-B0 --------------------------------------------------------------------------

def lukemelas_to_torchvision(key):
    """_conv_stem/_bn0/_blocks.N.* of the original -> torchvision's efficientnet_b0 names."""
    if key.startswith("_conv_stem."):
        return "features.0.0." + key[len("_conv_stem."):]
    if key.startswith("_bn0."):
        return "features.0.1." + key[len("_bn0."):]
    m = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.*)", key)
    n, module, rest = int(m.group(1)), m.group(2), m.group(3)
    stage, first = 1, 0
    while n >= first + EB0_GROUP_SIZES[stage - 1]:
        first += EB0_GROUP_SIZES[stage - 1]
        stage += 1
    if stage == 1:  # no expansion
        table = {"_depthwise_conv": "0.0", "_bn1": "0.1", "_se_reduce": "1.fc1",
                 "_se_expand": "1.fc2", "_project_conv": "2.0", "_bn2": "2.1"}
    else:
        table = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": "1.0", "_bn1": "1.1",
                 "_se_reduce": "2.fc1", "_se_expand": "2.fc2", "_project_conv": "3.0",
                 "_bn2": "3.1"}
    return f"features.{stage}.{n - first}.block.{table[module]}.{rest}"


def torchvision_efficientnet_with_original_numerics():
    """torchvision's B0 with eps 1e-3 and the original's fixed asymmetric padding on the stride-2
    convolutions (written out, not computed)."""
    from torchvision.models import efficientnet_b0

    net = efficientnet_b0(weights=None).eval()
    fixed_pad = {3: (0, 1, 0, 1), 5: (1, 2, 1, 2)}
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
        if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2):
            m.padding = (0, 0)
            pad = fixed_pad[m.kernel_size[0]]
            m.register_forward_pre_hook(lambda mod, args, pad=pad: (F.pad(args[0], pad),))
    return net


def test_static_same_padding_is_tensorflows():
    assert same_padding(224, 3, 2) == (0, 1) and same_padding(112, 5, 2) == (1, 2)
    assert same_padding(56, 3, 1) == (1, 1) and same_padding(14, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0) and same_padding(225, 3, 2) == (1, 1)


@pytest.mark.parametrize("size", [(96, 160), (100, 100)])  # odd sizes inside: still static pads
def test_original_efficientnet_names_and_outputs_match_reference(size):
    ours = randomize(build_efficientnet_b0(backbone_cfg("eb0")), seed=1).eval()
    state = ours.state_dict()
    assert "_blocks.15._project_conv.weight" in state and "_blocks.0._se_reduce.bias" in state
    assert "_blocks.0._expand_conv.weight" not in state and "_blocks.1._expand_conv.weight" in state
    assert all(m.eps == 1e-3 for n, m in ours.named_modules()
               if n.endswith(("_bn0", "_bn1", "_bn2")))
    reference = torchvision_efficientnet_with_original_numerics()
    result = reference.load_state_dict({lukemelas_to_torchvision(k): v for k, v in state.items()},
                                       strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") or k.startswith(("features.8", "classifier"))
               for k in result.missing_keys)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ours(x)
        expected, h = {}, reference.features[0](x)
        for stage in range(1, 8):
            for j, block in enumerate(reference.features[stage]):
                h = block(h)
                expected.update({n: h for n, end in EB0_ENDS.items() if end == (stage, j)})
    for name in EB0_ENDS:
        assert out[name].shape == expected[name].shape, name
        torch.testing.assert_close(out[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)


def test_original_efficientnet_drop_connect_and_freezing():
    cfg = backbone_cfg("eb0", norm="BN")
    net = build_efficientnet_b0(cfg)
    rates = [b.drop_connect for b in net._blocks]
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])
    assert [b.residual for b in net._blocks] == [False, False, True, False, True, False, True,
                                                 True, False, True, True, False, True, True, True,
                                                 False]
    assert net._bn0.momentum == pytest.approx(0.01) and net._bn0.eps == 1e-3
    net.train()
    x = torch.randn(8, 3, 64, 64)
    torch.manual_seed(0)
    a = net(x)["e5"]
    torch.manual_seed(1)
    b = net(x)["e5"]
    assert not torch.equal(a, b)  # residual branches dropped at random while training
    cfg.MODEL.EFFICIENTNET.FREEZE_AT = 2  # the stem and e2 (blocks 0-2)
    net = build_efficientnet_b0(cfg)
    frozen = {n.split(".")[0] + (("." + n.split(".")[1]) if n.startswith("_blocks") else "")
              for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"_conv_stem", "_blocks.0", "_blocks.1", "_blocks.2"}
    assert isinstance(net._bn0, FrozenBatchNorm2d) and isinstance(net._blocks[2]._bn2,
                                                                 FrozenBatchNorm2d)
    assert isinstance(net._blocks[3]._bn0, torch.nn.BatchNorm2d)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="MODEL.EFFICIENTNET.LAYOUT.*original"):
        build_efficientnet_b0(backbone_cfg("eb0", layout="lukemelas"))


# --- the original's configs and released detectors ---------------------------------------------

# Children of the original's base config (distill_utils.LEGACY_BASE: a MobileNetV2 student).
LEGACY_KD = """
  PIXEL_MEAN: [103.530, 116.280, 123.675]
  PIXEL_STD: [57.375, 57.120, 58.395]
KD:
  REGION_CORRELATION_LOSS_WEIGHT_POOL: 2.0
  REGION_CORRELATION_LOSS_USE_BG_FEATURE: True
  BG_FEATURE_MINING_ON: True
  FEATURE_ROIPOOL_BG_LOSS_ON: True
"""
LEGACY_MNV2 = '_BASE_: "Base-Distillation.yaml"\nMODEL:' + LEGACY_KD
LEGACY_EB0 = """_BASE_: "Base-Distillation.yaml"
MODEL:
  BACKBONE:
    NAME: "build_e0_fpn_backbone_kd"
  EFFICIENTNET:
    MODEL_NAME: "efficientnet-b0"
    OUT_FEATURES: ["e2", "e3", "e4", "e5"]
    NORM: "FrozenBN"
  FPN:
    IN_FEATURES: ["e2", "e3", "e4", "e5"]""" + LEGACY_KD


@pytest.fixture(scope="module")
def legacy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_layouts")
    json_file, image_root = make_coco_dataset(str(root / "data"))
    if DATASET not in DatasetCatalog.list():
        register_datasets([(DATASET, json_file, image_root)])
    (root / "Base-Distillation.yaml").write_text(LEGACY_BASE)
    (root / "eb0.yaml").write_text(LEGACY_EB0)
    (root / "mnv2.yaml").write_text(LEGACY_MNV2)
    return root


def released_checkpoint(model, path):
    """A trained model as the original saved it: the student's modules at the top level (its
    `Distillation` meta-architecture), the teacher under `teacher.`, pixel statistics included."""
    weights = {k: v.clone() for k, v in model.student.state_dict().items()}
    weights.update({"teacher." + k: v.clone() for k, v in model.teacher.state_dict().items()})
    weights["pixel_mean"] = model.student.pixel_mean.clone()
    weights["pixel_std"] = model.student.pixel_std.clone()
    torch.save({"model": weights, "iteration": 90000}, path)


@pytest.mark.parametrize("arch", ["eb0", "mnv2"])
def test_original_released_detector_loads_fully_and_evaluates(legacy_files, tmp_path, arch):
    opts = tiny_opts(DATASET, str(tmp_path)) + ["DATASETS.TEST", f"('{DATASET}',)"]
    cfg = load_config(str(legacy_files / f"{arch}.yaml"), opts)
    node = cfg.MODEL.EFFICIENTNET if arch == "eb0" else cfg.MODEL.MOBILENETV2
    assert node.LAYOUT == "original"
    assert node.FREEZE_AT == (0 if arch == "eb0" else 2)  # the original's semantics
    assert cfg.INPUT.FORMAT == "BGR" and list(cfg.MODEL.PIXEL_STD) == [57.375, 57.120, 58.395]
    cfg.freeze()
    source = randomize(build_model(cfg), seed=3).eval()
    path = str(tmp_path / "released.pth")
    released_checkpoint(source, path)

    target = build_model(cfg).eval()
    checkpointer = DistillationCheckpointer(target)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0, msg=k)

    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    inputs = [{"image": image, "height": 96, "width": 128}]
    with torch.no_grad():
        features = target.student.backbone(target.student.preprocess_image(inputs).tensor)
        expected = source.student.backbone(source.student.preprocess_image(inputs).tensor)
    for name in expected:
        torch.testing.assert_close(features[name], expected[name], rtol=0, atol=0, msg=name)
    results = Trainer.test(cfg, target)  # train_net.py --eval-only on the original's config
    assert "AP" in results["bbox"]


def test_weights_in_the_other_layout_are_refused(legacy_files, tmp_path):
    opts = tiny_opts(DATASET, str(tmp_path))
    legacy = load_config(str(legacy_files / "eb0.yaml"), opts)
    ours = legacy.clone()
    ours.MODEL.EFFICIENTNET.LAYOUT = "torchvision"
    original_model, torchvision_model = build_model(legacy), build_model(ours)
    path = str(tmp_path / "original.pth")
    released_checkpoint(original_model, path)
    checkpointer = DistillationCheckpointer(torchvision_model)
    with pytest.raises(ValueError, match=r"original DSIG repository's layout.*"
                                         r"MODEL.EFFICIENTNET.LAYOUT \"original\""):
        checkpointer._load_model(checkpointer._load_file(path))
    path = str(tmp_path / "torchvision.pth")
    released_checkpoint(torchvision_model, path)
    checkpointer = DistillationCheckpointer(original_model)
    with pytest.raises(ValueError, match="torchvision's layout"):
        checkpointer._load_model(checkpointer._load_file(path))


def test_original_imagenet_files_convert_and_fill_the_backbone(legacy_files, tmp_path):
    """The ImageNet files the original's students started from (tonylins / lukemelas layouts,
    with their heads) convert with the tool and fill the original-layout backbone exactly."""
    import subprocess
    import sys

    from distill_utils import PROJECT

    for arch, tool_arch, head in (
            ("eb0", "lukemelas_efficientnet_b0",
             {"_conv_head.weight": (1280, 320, 1, 1), "_bn1.weight": (1280,),
              "_bn1.running_var": (1280,), "_fc.weight": (1000, 1280), "_fc.bias": (1000,)}),
            ("mnv2", "tonylins_mobilenet_v2",
             {"features.18.0.weight": (1280, 320, 1, 1), "features.18.1.weight": (1280,),
              "classifier.1.weight": (1000, 1280)})):
        cfg = load_config(str(legacy_files / f"{arch}.yaml"), tiny_opts(DATASET, str(tmp_path)))
        cfg.freeze()
        model = build_model(cfg)
        prefix = "backbone.bottom_up."
        trunk = randomize(model.student.backbone.bottom_up, seed=5).state_dict()
        imagenet = {k: v.clone() for k, v in trunk.items()}
        imagenet.update({k: torch.randn(shape) for k, shape in head.items()})
        source, converted = str(tmp_path / f"{arch}-in.pth"), str(tmp_path / f"{arch}-out.pth")
        torch.save(imagenet, source)
        subprocess.run([sys.executable, f"{PROJECT}/tools/convert_torchvision_backbone.py",
                        tool_arch, source, converted], check=True, capture_output=True)
        target = build_model(cfg)
        DistillationCheckpointer(target).load(converted)
        student = target.student.state_dict()
        assert {k for k in student if k.startswith(prefix)} == {prefix + k for k in trunk}
        for k, v in trunk.items():
            torch.testing.assert_close(student[prefix + k], v, rtol=0, atol=0, msg=k)
