"""Detections of a trained detector on images of one's own: the inputs (an image, a folder of
images, a COCO json's images), the class names, the drawn images and a COCO results json
(tools/predict.py).

Class names and the category ids written come from, in this order: a COCO json given with
--categories (e.g. the training data's), the input COCO json, the config's datasets (detectron2's
built-in metadata, or the json of a DSIG_COCO_DATASETS entry); else "class N" and the model's
class index. A json whose category count differs from the model's class count is refused (its
ids could not be mapped).
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import ConfigError, InputError, MissingFileError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RESULTS_FILE = "coco_instances_results.json"  # the name detectron2's COCOEvaluator writes


class ImageError(InputError, ValueError):
    """An input image that cannot be read."""


@dataclass
class ImageInput:
    path: str  # the file read
    name: str  # the drawn image's path under the output folder
    image_id: int  # the results' image_id: the json's, else the position (1-based)


@dataclass
class Categories:
    names: List[str]  # class index -> name
    ids: List[int]  # class index -> the category id written to the results
    source: str  # where they come from, for the log


def _read_json(path: str, what: str) -> Dict:
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not a JSON file: {e}") from None


def json_categories(path: str, what: str) -> Categories:
    """The categories of a COCO json, in detectron2's class order (sorted by id)."""
    data = _read_json(path, what)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats:
        raise InputError(f"{what} {path} has no 'categories' (a COCO json lists them)")
    cats = sorted(cats, key=lambda c: c["id"])
    return Categories([str(c.get("name", c["id"])) for c in cats], [int(c["id"]) for c in cats],
                      path)


def coco_inputs(json_file: str, image_root: str) -> List[ImageInput]:
    """The images of a COCO json (its `images` list; annotations are not needed), every file
    present under `image_root`."""
    data = _read_json(json_file, "input json")
    images = data.get("images") if isinstance(data, dict) else None
    if not images:
        raise InputError(f"input json {json_file} lists no images (a COCO json has 'images': "
                         "[{id, file_name, ...}])")
    items = [ImageInput(os.path.join(image_root, im["file_name"]), im["file_name"], int(im["id"]))
             for im in images]
    missing = [i.path for i in items if not os.path.isfile(i.path)]
    if missing:
        raise MissingFileError(
            f"{len(missing)} of the {len(items)} images of {json_file} are not under "
            f"{image_root}, e.g. {missing[0]} (the json's file_name is read under --image-root, "
            "default the json's folder)")
    return items


def collect_inputs(source: str, image_root: str = "") -> List[ImageInput]:
    """The images of `source`: an image file, a folder (its image files, not its subfolders,
    sorted by name) or a COCO json (with `image_root`, default the json's folder)."""
    if not os.path.exists(source):
        raise MissingFileError(f"input {source}: no such file or folder")
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(source, n)))
        if not names:
            raise InputError(f"input folder {source} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}; subfolders are not searched)")
        return [ImageInput(os.path.join(source, n), n, i + 1) for i, n in enumerate(names)]
    if source.lower().endswith(".json"):
        return coco_inputs(source, image_root or os.path.dirname(os.path.abspath(source)))
    return [ImageInput(source, os.path.basename(source), 1)]


def check_readable(items: Sequence[ImageInput]) -> None:
    """Every input opens as an image (headers only: cheap, before the model is built)."""
    from PIL import Image

    for item in items:
        try:
            with Image.open(item.path) as image:
                image.size
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read image {item.path}: {e}") from None


def config_categories(cfg) -> Optional[Categories]:
    """Categories of the config's datasets (test first): detectron2's metadata of a built-in
    dataset, or the json of a dataset registered from DSIG_COCO_DATASETS."""
    from detectron2.data import MetadataCatalog

    from .data_checks import USER_DATASETS
    from .training import register_datasets

    register_datasets([])  # DSIG_COCO_DATASETS entries
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name in USER_DATASETS:
            return json_categories(USER_DATASETS[name][0], f"dataset {name}'s json")
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes", None)
        if classes:
            to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None)
            ids = ({v: k for k, v in to_contiguous.items()} if to_contiguous else {})
            return Categories(list(classes), [ids.get(i, i) for i in range(len(classes))],
                              f"dataset {name}")
    return None


def class_count(cfg) -> Tuple[str, int]:
    """(config key, value) of the model's class count."""
    from .data_checks import class_count_key

    key = class_count_key(cfg)
    node = cfg
    for part in key.split("."):
        node = node[part]
    return key, int(node)


def choose_categories(cfg, categories_json: str = "", input_json: str = "") -> Categories:
    """The model's class names and result ids (see the module docstring)."""
    key, count = class_count(cfg)
    for path, what in ((categories_json, "--categories"), (input_json, "input json")):
        if path:
            cats = json_categories(path, what)
            if len(cats.names) != count:
                raise ConfigError(
                    f"{what} {path} has {len(cats.names)} categories but the model predicts "
                    f"{count} classes ({key}); give --categories with the json of the data the "
                    "model was trained on")
            return cats
    cats = config_categories(cfg)
    if cats is not None and len(cats.names) == count:
        return cats
    if cats is not None:
        logger.warning("%s has %d classes, the model %d: classes named by index", cats.source,
                       len(cats.names), count)
    return Categories([f"class {i}" for i in range(count)], list(range(count)), "class indices")


def read_rgb(path: str, input_format: str) -> Tuple[np.ndarray, np.ndarray]:
    """(the image in the model's input format, the same in RGB for drawing)."""
    from detectron2.data.detection_utils import convert_image_to_rgb, read_image

    try:
        image = read_image(path, format=input_format)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    return image, convert_image_to_rgb(image, input_format)


class Predictor:
    """One image at a time, as detectron2's DefaultPredictor: resized as the config's test
    size, boxes back in the original image's pixels; detections below `score_threshold` dropped."""

    def __init__(self, cfg, model, score_threshold: float):
        from detectron2.data import transforms as T

        self.cfg, self.model, self.score_threshold = cfg, model, score_threshold
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    @torch.no_grad()
    def __call__(self, image: np.ndarray):
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        instances = self.model([{"image": tensor, "height": height, "width": width}])[0]
        instances = instances["instances"].to("cpu")
        return instances[instances.scores >= self.score_threshold]


def coco_results(instances, image_id: int, categories: Categories) -> List[Dict]:
    """COCO results entries ([x, y, w, h] boxes) of one image's detections."""
    boxes = instances.pred_boxes.tensor.numpy().astype(float)
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": image_id, "category_id": categories.ids[int(c)],
             "bbox": [round(float(v), 2) for v in box], "score": round(float(s), 5)}
            for box, c, s in zip(boxes, instances.pred_classes.tolist(),
                                 instances.scores.tolist())]


def draw(rgb: np.ndarray, instances, categories: Categories) -> np.ndarray:
    """The detections drawn with class names and scores by detectron2's Visualizer."""
    from detectron2.data import Metadata
    from detectron2.utils.visualizer import Visualizer

    visualizer = Visualizer(rgb, Metadata(thing_classes=categories.names))
    return visualizer.draw_instance_predictions(instances).get_image()


def output_path(output_dir: str, item: ImageInput) -> str:
    """Where an input's drawn image goes; never over the input itself."""
    path = os.path.join(output_dir, item.name)
    if os.path.exists(path) and os.path.samefile(path, item.path):
        raise ConfigError(f"--output {output_dir} would overwrite the input {item.path}: choose "
                          "another output folder")
    return path


def predict(cfg, model, items: Sequence[ImageInput], categories: Categories, output_dir: str,
            score_threshold: float, with_file_names: bool = False, echo=print) -> Dict:
    """Run the model on every input; writes the drawn images and RESULTS_FILE into `output_dir`.
    `with_file_names` adds each result's file_name (inputs that are not a COCO json). Returns
    {"images": count, "detections": count, "results": path}."""
    from PIL import Image

    predictor = Predictor(cfg, model, score_threshold)
    paths = [output_path(output_dir, item) for item in items]
    results = []
    for item, path in zip(items, paths):
        image, rgb = read_rgb(item.path, cfg.INPUT.FORMAT)
        instances = predictor(image)
        entries = coco_results(instances, item.image_id, categories)
        if with_file_names:
            for entry in entries:
                entry["file_name"] = item.name
        results += entries
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(draw(rgb, instances, categories)).save(path)
        shown = ", ".join(f"{categories.names[int(c)]} {s:.2f}" for c, s in
                          zip(instances.pred_classes[:5].tolist(), instances.scores[:5].tolist()))
        echo(f"{item.name}: {len(instances)} detection(s)" + (f" ({shown}"
             + (", ..." if len(instances) > 5 else "") + ")" if len(instances) else ""))
    results_path = os.path.join(output_dir, RESULTS_FILE)
    os.makedirs(output_dir, exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(results, f)
    return {"images": len(items), "detections": len(results), "results": results_path}
