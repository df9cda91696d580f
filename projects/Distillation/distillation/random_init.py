"""Networks that start from random weights with frozen batch norm (smoke tests, `check`).

A FrozenBatchNorm2d layer that no file filled keeps its identity statistics (mean 0, variance
1): it normalises nothing. Through a deep random network without normalisation the activations
grow layer after layer (a ResNet's residual sums add up, and the MSRA teachers see pixel values
in the hundreds: their PIXEL_STD is 1), so a random R50 teacher's FPN features reach ~1e3-1e4
and the node, feature and KD losses ~1e6 at the first step; one SGD step on them makes the
student non-finite a few iterations later (total_loss 1e7, then FloatingPointError).

Such a network is given the statistics a trained one would have, measured on its own random
weights and the run's data: one forward pass of the first training batch (normalised as that
network normalises its input) measures, in forward order, the per-channel mean and variance of
each FrozenBatchNorm2d's input; the standard deviation is folded into the convolution that
produced that input and the layer subtracts the mean. Every layer then outputs zero mean and
unit variance on the data, as trained batch norm would, and the losses start at their usual
values (RPN objectness ~ln 2, the classifier ~ln(K + 1); the distillation terms tens to
hundreds: they sum over the channels of two random FPNs, which have no norm to calibrate). In a
distributed run the moments are averaged over the processes, so every replica holds the same
values. Only the FrozenBatchNorm2d layers and the convolutions feeding them change; every other
weight and norm stays as it is. (Statistics measured on a noise image instead are not enough:
a real image's mean differs from the noise's, and that offset alone still grows to ~1e2 through
a random R50.)
"""
import logging
from typing import Dict, List

import torch
import torch.distributed as dist
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils import comm
from torch import nn

logger = logging.getLogger(__name__)


def frozen_bn_layers(module: nn.Module) -> List[FrozenBatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]


def _averaged(t: torch.Tensor) -> torch.Tensor:
    """`t` averaged over the processes of a distributed run (itself otherwise)."""
    if comm.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / comm.get_world_size()


def _producers(backbone: nn.Module) -> Dict[int, nn.Conv2d]:
    """FrozenBN layer id -> the convolution whose output it normalises, where the structure
    says so: detectron2's Conv2d(norm=...) (ResNets)."""
    return {id(m.norm): m for m in backbone.modules()
            if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "norm", None), FrozenBatchNorm2d)}


@torch.no_grad()
def calibrate_frozen_bn(backbone: nn.Module, images: torch.Tensor) -> int:
    """Normalise every FrozenBatchNorm2d of `backbone` on `images` ([N, 3, H, W], normalised as
    the backbone expects; in a distributed run every process calls this and the moments are
    averaged). In forward order, each layer's input moments are measured per channel; the
    standard deviation (at least the layer's mean one, so that quiet channels are not blown
    up) is folded into the convolution that produced the input (its output channels divided
    by it: the effective learning rate of a normalised layer stays that of its weights) and
    the layer keeps the mean to subtract; without such a convolution the layer itself takes
    both. Returns how many layers were set."""
    layers = frozen_bn_layers(backbone)
    producers = _producers(backbone)
    outputs = {}  # id(tensor) -> (conv, tensor): plain convolutions' outputs of this pass

    def record(conv, inputs, output):
        if getattr(conv, "norm", None) is None:
            outputs[id(output)] = (conv, output)

    def measure(layer, inputs):
        x = inputs[0]
        xf = x.float()
        moments = _averaged(torch.stack([xf.mean(dim=(0, 2, 3)), (xf * xf).mean(dim=(0, 2, 3))]))
        mean, var = moments[0], (moments[1] - moments[0] ** 2).clamp_(min=0)
        std = torch.maximum(var, var.mean()).add_(layer.eps).sqrt_()
        conv = producers.get(id(layer))
        if conv is None:
            found = outputs.get(id(x))
            conv = found[0] if found is not None and found[1] is x else None
        if conv is None:  # statistics only
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(std ** 2 - layer.eps)
            return None
        conv.weight.div_(std.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.div_(std.to(conv.bias.dtype))
        layer.running_mean.copy_(mean / std)
        layer.running_var.fill_(1.0 - layer.eps)  # scale exactly 1
        return (x / std.view(1, -1, 1, 1).to(x.dtype),)  # what the rescaled conv gives

    handles = [layer.register_forward_pre_hook(measure) for layer in layers]
    handles += [m.register_forward_hook(record) for m in backbone.modules()
                if isinstance(m, nn.Conv2d)]
    training = backbone.training
    backbone.eval()  # deterministic: no stochastic depth or dropout in the measured pass
    try:
        backbone(images)
    finally:
        backbone.train(training)
        for h in handles:
            h.remove()
    return len(layers)


def calibrate_random_networks(model: nn.Module, batched_inputs: List[Dict], student: bool,
                              teacher: bool) -> List[str]:
    """Calibrate the networks of `model` (a distillation model or a plain detector) that start
    from random weights on `batched_inputs` (detectron2's training inputs): the student (or the
    plain detector) when `student`, the teacher when `teacher`. Returns one line per network
    calibrated (for the log and the check)."""
    from .teacher import teacher_images

    model = getattr(model, "module", model)  # DistributedDataParallel
    distill = hasattr(model, "student")
    done = []

    def run(name, net, images):
        n = calibrate_frozen_bn(net.backbone, images)
        if n:
            done.append(f"{name}: random weights; its {n} FrozenBN layers had identity "
                        "statistics, now set from the first batch (random_init.py)")
            logger.warning("The %s starts from random weights: its %d FrozenBN layers had "
                           "identity statistics (activations would explode); set from the first "
                           "batch (distillation/random_init.py)", name, n)

    if student:
        net = model.student if distill else model
        if frozen_bn_layers(net.backbone):
            run("student" if distill else "model", net,
                net.preprocess_image(batched_inputs).tensor)
    if teacher and distill and frozen_bn_layers(model.teacher.backbone):
        images = teacher_images(model.teacher, batched_inputs, model.flip_teacher_input,
                                model.teacher.device)
        run("teacher", model.teacher, images.tensor)
    return done
