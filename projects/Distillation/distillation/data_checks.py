"""Checks of COCO-format detection data before anything is built: one implementation for
train_net.py (every dataset a run names, before the model is built), its --check and the demo's
own-data mode.

A json without `images` / `annotations` / `categories`, an annotation of an undefined category,
a box empty or outside its image, an image file missing under the image root, a train category
without instances, train and test categories that differ, instance masks missing where the model
needs them, a dataset name nobody registered: each is an error that names the dataset, the
problem and the fix (the config key, the option or the environment variable). The class count
comes from the data: a config that leaves MODEL.ROI_HEADS.NUM_CLASSES (RETINANET.NUM_CLASSES) at
detectron2's default gets the data's count; one that sets another count is refused.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError, InputError, MissingFileError

logger = logging.getLogger(__name__)


class DataError(InputError, ValueError):
    pass


class MissingDataError(MissingFileError):
    pass


class UnregisteredDatasetError(DataError):
    pass


# datasets registered from --register-coco / DSIG_COCO_DATASETS / the demo: name -> (json, root)
USER_DATASETS: Dict[str, Tuple[str, str]] = {}

REGISTER_HINT = ("register a COCO-format dataset of your own with --register-coco NAME ann.json "
                 "image_root (train_net.py) or DSIG_COCO_DATASETS=\"NAME=ann.json,image_root\" "
                 "(start_train.sh) and name it in DATASETS.TRAIN / DATASETS.TEST")


def parse_split(spec: str) -> Tuple[str, str, str]:
    """"NAME=ann.json,image_root" -> (name, json, image_root)."""
    name, _, rest = spec.partition("=")
    json_file, _, image_root = rest.partition(",")
    if not (name and json_file and image_root):
        raise DataError(f"dataset {spec!r} is not NAME=ann.json,image_root")
    return name, json_file, image_root


def check_coco_detection(json_file: str, image_root: str, split: str,
                         every_category_used: bool = True, need_masks: bool = False,
                         check_images: bool = True) -> Dict:
    """Reads and checks a COCO detection json (with instance masks: `need_masks`; every image
    file present under `image_root`: `check_images`); `split` names it in messages. Returns its
    categories {id: name}, image and box counts and the median (short, long) image side.
    Raises DataError / MissingDataError naming the problem otherwise."""
    if not os.path.isfile(json_file):
        raise MissingDataError(f"{split}: annotation file {json_file} not found")
    if not os.path.isdir(image_root):
        raise MissingDataError(f"{split}: image folder {image_root} not found")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{split}: {json_file} is not JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data.get(k) if isinstance(data, dict) else None, list)]
    if missing:
        raise DataError(f"{split}: {json_file} is not a COCO detection json: no "
                        f"{', '.join(repr(k) for k in missing)} list")
    if not data["images"] or not data["categories"]:
        raise DataError(f"{split}: {json_file} has no images or no categories")
    categories = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    bad, used = [], set()
    for a in data["annotations"]:
        im = images.get(a.get("image_id"))
        box = a.get("bbox")
        if a.get("category_id") not in categories:
            raise DataError(f"{split}: annotation {a.get('id')} has category "
                            f"{a.get('category_id')}, which {json_file} does not define")
        ok = (im is not None and isinstance(box, list) and len(box) == 4 and box[2] > 0
              and box[3] > 0 and box[0] >= -1 and box[1] >= -1
              and box[0] + box[2] <= im["width"] + 1 and box[1] + box[3] <= im["height"] + 1)
        if not ok:
            bad.append(f"annotation {a.get('id')} of image {a.get('image_id')}: bbox {box}" +
                       (f" in a {im['width']}x{im['height']} image" if im else " (no such image)"))
        if need_masks and not isinstance(a.get("segmentation"), (list, dict)):
            raise DataError(f"{split}: annotation {a.get('id')} in {json_file} has no "
                            "'segmentation' (polygons or RLE): a Mask R-CNN (MODEL.MASK_ON, "
                            "--task segm) needs instance masks")
        used.add(a["category_id"])
    if bad:
        raise DataError(f"{split}: {len(bad)} box(es) in {json_file} are empty or outside their "
                        "image, e.g. " + "; ".join(bad[:3]))
    unused = sorted(categories[c] for c in categories if c not in used)
    if every_category_used and unused:
        raise DataError(f"{split}: categories with no instance in {json_file}: {unused} (remove "
                        "them: a class never seen in training cannot be learned)")
    if check_images:
        absent = [im["file_name"] for im in data["images"]
                  if not os.path.isfile(os.path.join(image_root, im["file_name"]))]
        if absent:
            raise MissingDataError(
                f"{split}: {len(absent)} of the {len(images)} images {json_file} lists are not "
                f"in {image_root}, e.g. {', '.join(absent[:3])} (is image_root the folder the "
                "file_name entries are relative to?)")
    sides = sorted((min(im["height"], im["width"]), max(im["height"], im["width"]))
                   for im in data["images"])
    return {"categories": categories, "images": len(images),
            "annotations": len(data["annotations"]), "median_size": sides[len(sides) // 2]}


# --- datasets by registered name (train_net.py, --check) ---------------------------------------

def builtin_hint() -> str:
    """Where detectron2 looks for its own COCO splits, and how to point it elsewhere."""
    root = os.environ.get("DETECTRON2_DATASETS")
    where = (f"DETECTRON2_DATASETS={root}" if root else
             f"DETECTRON2_DATASETS is not set, so ./datasets, here {os.path.abspath('datasets')}")
    return (f"detectron2 reads its COCO splits from $DETECTRON2_DATASETS/coco ({where}): set "
            "DETECTRON2_DATASETS to the folder holding coco/annotations and coco/train2017, "
            f"or {REGISTER_HINT}")


def dataset_files(name: str) -> Optional[Tuple[str, str]]:
    """(json, image root) of a registered COCO-json dataset (None for other kinds)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
    if not json_file or image_root is None or not json_file.endswith(".json"):
        return None
    return json_file, image_root


def check_dataset(name: str, key: str, every_category_used: bool = True,
                  need_masks: bool = False, full: bool = True) -> Dict:
    """Checks the registered dataset `name`, which config key `key` names (DATASETS.TRAIN /
    DATASETS.TEST). `full`: read the json (check_coco_detection); else only see that its files
    exist (detectron2's own COCO splits in a training run: the json is large and detectron2
    reads it next). Returns {"name", "key", "json", "image_root", "user" (registered by this
    project's options), "checked" (False: not a COCO-json dataset) and, when read,
    check_coco_detection's fields}. Raises naming the fix."""
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        raise UnregisteredDatasetError(f"{key}: dataset {name!r} is not registered: "
                                       f"{REGISTER_HINT}")
    user = name in USER_DATASETS
    files = dataset_files(name)
    info = {"name": name, "key": key, "user": user, "checked": files is not None}
    if files is None:
        return info
    json_file, image_root = files
    info.update(json=json_file, image_root=image_root)
    label = f"{key} {name}"
    hint = ("fix the paths given to --register-coco / DSIG_COCO_DATASETS" if user
            else builtin_hint())
    try:
        if full:
            info.update(check_coco_detection(json_file, image_root, label, every_category_used,
                                             need_masks))
        else:
            for path, what, exists in ((json_file, "annotation file", os.path.isfile),
                                       (image_root, "image folder", os.path.isdir)):
                if not exists(path):
                    raise MissingDataError(f"{label}: {what} {path} not found")
    except MissingDataError as e:
        raise MissingDataError(f"{e}; {hint}") from None
    return info


def check_same_categories(infos: Sequence[Dict]) -> None:
    """Every read dataset of a run has the categories of the first (the model has one set)."""
    read = [i for i in infos if "categories" in i]
    for other in read[1:]:
        if other["categories"] != read[0]["categories"]:
            raise DataError(
                f"{other['key']} {other['name']} has the categories "
                f"{sorted(other['categories'].values())}, {read[0]['key']} {read[0]['name']} "
                f"{sorted(read[0]['categories'].values())}: a run's datasets must share one "
                "category list")


def check_run_datasets(cfg, eval_only: bool = False, full_builtin: bool = False) -> List[Dict]:
    """check_dataset for every dataset a run reads (DATASETS.TRAIN unless `eval_only`, and
    DATASETS.TEST), full for the user's datasets (and detectron2's with `full_builtin`), then
    check_same_categories. Returns their infos, training sets first."""
    from detectron2.data import DatasetCatalog

    masks = bool(cfg.MODEL.MASK_ON)
    infos = []
    for key, names in (("DATASETS.TRAIN", () if eval_only else cfg.DATASETS.TRAIN),
                       ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            full = full_builtin or name in USER_DATASETS or name not in DatasetCatalog.list()
            infos.append(check_dataset(name, key, every_category_used=key == "DATASETS.TRAIN",
                                       need_masks=masks and key == "DATASETS.TRAIN", full=full))
    check_same_categories(infos)
    return infos


# --- the class count -----------------------------------------------------------------------------

def class_count_key(cfg) -> str:
    from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

    from .meta_arch_retinanet import DistillationRetinaNet

    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    one_stage = isinstance(arch, type) and issubclass(arch, (RetinaNet, DistillationRetinaNet))
    return "MODEL.RETINANET.NUM_CLASSES" if one_stage else "MODEL.ROI_HEADS.NUM_CLASSES"


def _set_in(data, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def class_count_opts(cfg, infos: Sequence[Dict], config_file: str, opts: Sequence[str],
                     allow_unsafe_yaml: bool = False) -> List[str]:
    """The overrides that give the model the data's class count: [] when the config has it
    already or no dataset was read; [KEY, K] when the config leaves KEY at detectron2's default
    (the teacher takes the student's count); a ConfigError when the config file or the command
    line sets another count."""
    from .yaml_io import read_config

    read = [i for i in infos if "categories" in i]
    if not read:
        return []
    k, source = len(read[0]["categories"]), f"{read[0]['key']} {read[0]['name']}"
    key = class_count_key(cfg)
    node = cfg
    for part in key.split("."):
        node = node[part]
    if node == k:
        return []
    where = ("on the command line" if key in list(opts)[::2] else
             f"in {config_file}" if _set_in(read_config(config_file, allow_unsafe_yaml), key)
             else None)
    if where:
        raise ConfigError(f"{key} is {node} ({where}) but {source} has {k} categories: set "
                          f"{key} {k} (the teacher takes the student's count), or name the "
                          "dataset you meant in DATASETS.TRAIN")
    logger.info("%s %d: the class count of %s (detectron2's default is %d)", key, k, source, node)
    return [key, str(k)]
