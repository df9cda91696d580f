"""A procedural detection dataset: generated, never downloaded.

Eight shape classes with intra-class variation (size over the COCO small/medium/large ranges,
aspect ratio, rotation, colour, texture, class-specific shape parameters), several objects per
image with partial occlusion, unannotated clutter (distractor blobs and strokes) on textured
backgrounds. Deterministic for a seed: image i is drawn from its own generator seeded by
(seed, split, i). Writes PNG images and a COCO-format json; with masks, each annotation also
holds its visible pixels (after occlusion) as an uncompressed COCO RLE.
"""
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["disc", "ring", "square", "triangle", "star", "cross", "crescent", "arrow"]
SPLITS = {"train": 0, "val": 1}
MIN_VISIBLE = 0.35  # objects hidden more than this by later ones are not annotated


def _polygon(points: np.ndarray, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    return mask


def _shape_mask(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An upright binary mask of one object of class `cls` in a size x size canvas."""
    s, c = size, size / 2.0
    r = s * 0.48
    draw_mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(draw_mask)
    if cls == "disc":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif cls == "ring":
        inner = r * rng.uniform(0.45, 0.7)
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        d.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
    elif cls == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=255)
    elif cls == "triangle":
        apex = rng.uniform(-0.4, 0.4) * r
        return _polygon(np.array([[c + apex, c - r], [c - r, c + r], [c + r, c + r]]), s)
    elif cls == "star":
        points = int(rng.integers(5, 7))
        inner = rng.uniform(0.35, 0.55)
        ang = np.arange(2 * points) * math.pi / points - math.pi / 2
        rad = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
        return _polygon(np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1), s)
    elif cls == "cross":
        w = r * rng.uniform(0.25, 0.42)
        d.rectangle([c - w, c - r, c + w, c + r], fill=255)
        d.rectangle([c - r, c - w, c + r, c + w], fill=255)
    elif cls == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        off = r * rng.uniform(0.35, 0.6)
        d.ellipse([c - r + off, c - r - off * 0.3, c + r + off, c + r - off * 0.3], fill=0)
    elif cls == "arrow":
        shaft = r * rng.uniform(0.2, 0.35)
        head = r * rng.uniform(0.7, 1.0)
        neck = c + r * rng.uniform(-0.1, 0.3)
        return _polygon(np.array([[c - r, c - shaft], [neck, c - shaft], [neck, c - head],
                                  [c + r, c], [neck, c + head], [neck, c + shaft],
                                  [c - r, c + shaft]]), s)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return draw_mask


def _texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An h x w x 3 float texture: a random colour, solid, striped, checkered or mottled."""
    base = rng.uniform(30, 255, 3)
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        mod = np.ones((h, w), np.float32)
    elif kind == 1:  # stripes at a random angle
        a, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
        mod = 0.65 + 0.35 * np.sign(np.sin((xx * math.cos(a) + yy * math.sin(a)) / period * 6.28))
    elif kind == 2:  # checker
        cell = rng.uniform(3, 10)
        mod = 0.7 + 0.3 * ((np.floor(xx / cell) + np.floor(yy / cell)) % 2)
    else:  # mottled
        mod = 0.75 + 0.25 * rng.standard_normal((h, w)).astype(np.float32).clip(-1, 1)
    second = rng.uniform(30, 255, 3)
    mix = (mod - mod.min()) / max(float(mod.max() - mod.min()), 1e-6)
    return base * mix[..., None] + second * (1 - mix[..., None]) * 0.25


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 200, 3), rng.uniform(0, 200, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 * t[..., None] + c1 * (1 - t[..., None])
    img += rng.normal(0, rng.uniform(5, 25), (h, w, 3))
    # low-frequency blotches
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, max(h, w) / 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad ** 2))
        img += blob[..., None] * rng.uniform(-60, 60, 3)
    return img


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Unannotated distractors: strokes and irregular blobs (drawn under the objects)."""
    h, w, _ = img.shape
    layer = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(2, 7))):
        pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(int(rng.integers(2, 5)))]
        d.line(pts, fill=255, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = rng.uniform(3, max(6, min(h, w) / 10), n)
        d.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(ang, rad)],
                  fill=255)
    m = np.asarray(layer, np.float32)[..., None] / 255
    img[:] = img * (1 - m) + _texture(h, w, rng) * m


def _object_size(rng: np.random.Generator, image_size: Tuple[int, int]) -> int:
    """Side of the object's canvas, log-uniform so COCO small (< 32^2), medium and large
    (> 96^2) areas all occur."""
    hi = min(max(image_size) * 0.7, 220)
    return int(round(math.exp(rng.uniform(math.log(14), math.log(hi)))))


def mask_to_rle(mask: np.ndarray) -> Dict:
    """COCO uncompressed RLE of a binary h x w mask: run lengths over the pixels in
    column-major order, starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def render_image(rng: np.random.Generator, image_size: Tuple[int, int],
                 max_objects: int = 7, with_masks: bool = False) -> Tuple[np.ndarray, List[Dict]]:
    h, w = image_size
    img = _background(h, w, rng)
    _clutter(img, rng)
    owner = np.full((h, w), -1, np.int32)  # which object a pixel shows, after occlusion
    objects = []
    for k in range(int(rng.integers(2, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        side = _object_size(rng, image_size)
        mask = _shape_mask(CLASSES[cls], side, rng)
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        mask = mask.resize((max(4, int(side * aspect ** 0.5)), max(4, int(side / aspect ** 0.5))))
        mask = mask.rotate(float(rng.uniform(0, 360)), expand=True)
        m = np.asarray(mask) > 127
        mh, mw = m.shape
        x0, y0 = int(rng.integers(-mw // 3, w - mw // 3)), int(rng.integers(-mh // 3, h - mh // 3))
        ys, xs = slice(max(y0, 0), min(y0 + mh, h)), slice(max(x0, 0), min(x0 + mw, w))
        crop = m[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        if crop.sum() < 20:
            continue
        tex = _texture(ys.stop - ys.start, xs.stop - xs.start, rng)
        region = img[ys, xs]
        region[crop] = tex[crop]
        owner[ys, xs][crop] = k
        objects.append({"id": k, "class": cls, "pixels": int(crop.sum())})
    annotations = []
    for obj in objects:
        vis = owner == obj["id"]
        n = int(vis.sum())
        if n < MIN_VISIBLE * obj["pixels"] or n < 16:
            continue
        yy, xx = np.nonzero(vis)
        x1, y1, x2, y2 = int(xx.min()), int(yy.min()), int(xx.max()) + 1, int(yy.max()) + 1
        annotations.append({"category_id": obj["class"] + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": float(n), "iscrowd": 0})
        if with_masks:
            annotations[-1]["segmentation"] = mask_to_rle(vis)
    return np.clip(img, 0, 255).astype(np.uint8), annotations


def generate(out_dir: str, split: str, num_images: int, image_size=(192, 256), seed: int = 0,
             progress=None, with_masks: bool = False) -> str:
    """Write `num_images` images and `<split>.json` (COCO format; instance masks as RLE with
    `with_masks`) under out_dir; returns the json path. The same arguments always give the same
    files (the images and boxes do not depend on `with_masks`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}")
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        img, anns = render_image(rng, tuple(image_size), with_masks=with_masks)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(os.path.join(image_dir, name))
        images.append({"id": i + 1, "file_name": name, "height": int(image_size[0]),
                       "width": int(image_size[1])})
        for a in anns:
            a.update(id=len(annotations) + 1, image_id=i + 1)
            annotations.append(a)
        if progress is not None:
            progress(i + 1, num_images)
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"}
                  for k, n in enumerate(CLASSES)]
    path = os.path.join(out_dir, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories,
                   "info": {"description": "dsig procedural shapes", "seed": seed}}, f)
    return path


def register(name: str, json_file: str, image_root: str) -> None:
    """Register a generated split with detectron2 (as any COCO-format dataset)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, json_file, image_root)
