"""Random FPN pyramids and boxes covering the cases the ops must get right."""
import math

import torch

STRIDES = (4, 8, 16, 32)


def make_pyramid(batch, channels, image_hw, strides=STRIDES, dtype=torch.float32, device="cpu",
                 requires_grad=False, generator=None, channels_last=False):
    h, w = image_hw
    feats = []
    for s in strides:
        f = torch.randn(batch, channels, math.ceil(h / s), math.ceil(w / s), dtype=torch.float64,
                        generator=generator).to(dtype=dtype, device=device)
        if channels_last:
            f = f.to(memory_format=torch.channels_last)
        feats.append(f.requires_grad_(requires_grad))
    return feats


def _ulp_neighbours(side):
    side = torch.tensor(side, dtype=torch.float32)
    down = torch.nextafter(side, torch.tensor(0.0)).item()
    up = torch.nextafter(side, torch.tensor(1e9)).item()
    return [down, side.item(), up]


def make_boxes(n_random, image_hw, generator=None, special=True, dtype=torch.float32):
    """[n, 4] boxes: random ones plus outside-the-image, zero-area, tiny, huge, extreme aspect
    ratio and squares on the 112/224/448 level boundaries (+-1 ulp)."""
    h, w = image_hw
    g = generator
    xy = torch.rand(n_random, 2, generator=g) * torch.tensor([w, h])
    wh = torch.exp(torch.rand(n_random, 2, generator=g) * math.log(max(h, w))) + 0.5
    boxes = [torch.cat([xy, xy + wh], dim=1)]
    if special:
        extra = [
            [-50.0, -40.0, -10.0, -5.0],        # fully outside, top-left
            [w + 5.0, h + 5.0, w + 60.0, h + 90.0],  # fully outside, bottom-right
            [-30.0, -30.0, w + 30.0, h + 30.0],  # larger than the image
            [10.0, 12.0, 10.0, 40.0],           # zero width
            [15.0, 15.0, 15.0, 15.0],           # zero area point
            [20.0, 20.0, 20.3, 20.2],           # tiny
            [1.0, 30.0, w - 1.0, 31.0],         # extreme aspect (wide)
            [30.0, 1.0, 31.5, h - 1.0],         # extreme aspect (tall)
            [-5.0, 3.0, 2000.0, 2500.0],        # huge
            [w - 3.0, h - 3.0, w - 0.5, h - 0.2],  # at the far border
        ]
        for side in (112.0, 224.0, 448.0):
            for s in _ulp_neighbours(side):
                extra.append([3.0, 4.0, 3.0 + s, 4.0 + s])
        boxes.append(torch.tensor(extra))
    return torch.cat(boxes).to(dtype)


def split_boxes(boxes, batch, generator=None):
    """Deal boxes to `batch` images; returns the per-image list."""
    idx = torch.randint(0, batch, (boxes.shape[0],), generator=generator)
    return [boxes[idx == b] for b in range(batch)]


def rois_from_lists(box_lists):
    return torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], dim=1)
                      for i, b in enumerate(box_lists)])
