#!/usr/bin/env python
"""Convert a torchvision ImageNet checkpoint into a student initialisation file.

Supported: resnet18/50/101/152 (-> detectron2 ResNet names), mobilenet_v2, efficientnet_b0
(-> this project's backbones). The output holds {"model": {"backbone.bottom_up.*": tensor}} and
loads as MODEL.WEIGHTS of a student (or of a stock detectron2 model with that backbone).
torchvision weights expect RGB input with ImageNet statistics: set INPUT.FORMAT "RGB",
MODEL.PIXEL_MEAN [123.675, 116.28, 103.53], MODEL.PIXEL_STD [58.395, 57.12, 57.375].

Usage: python convert_torchvision_backbone.py ARCH INPUT.pth OUTPUT.pth
"""
import argparse
import re
from collections import OrderedDict

import torch

ARCHS = ("resnet18", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "efficientnet_b0")
# the last `features` block the detection backbones use (the 1280-channel head is dropped)
LAST_FEATURE_BLOCK = {"mobilenet_v2": 17, "efficientnet_b0": 7}


def _resnet_key(k: str):
    if k.startswith("fc.") or k.endswith("num_batches_tracked"):
        return None
    k = re.sub(r"^conv1\.", "stem.conv1.", k)
    k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
    if m:
        stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
        rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
        rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
        rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
        k = f"res{stage}.{block}.{rest}"
    return "backbone.bottom_up." + k


def _features_key(k: str, last_block: int):
    if k.endswith("num_batches_tracked"):
        return None
    m = re.match(r"^features\.(\d+)\.", k)
    if not m or int(m.group(1)) > last_block:
        return None  # classifier and the dropped head conv
    return "backbone.bottom_up." + k


def convert(arch: str, state_dict) -> "OrderedDict[str, torch.Tensor]":
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {ARCHS}")
    out = OrderedDict()
    for k, v in state_dict.items():
        new = (_resnet_key(k) if arch.startswith("resnet")
               else _features_key(k, LAST_FEATURE_BLOCK[arch]))
        if new is not None:
            out[new] = v.detach().clone()
    if not out:
        raise ValueError(f"no {arch} weights found in the checkpoint")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("input")
    p.add_argument("output")
    a = p.parse_args()
    state = torch.load(a.input, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state))
    weights = convert(a.arch, state)
    torch.save({"model": weights, "__author__": "torchvision", "__arch__": a.arch}, a.output)
    print(f"wrote {len(weights)} tensors to {a.output}")


if __name__ == "__main__":
    main()
