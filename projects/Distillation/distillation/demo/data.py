"""The demo's data: the generated shapes of a preset, or the user's own COCO detection splits,
checked by distillation/data_checks.py (the same checks as train_net.py)."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .. import synthetic
from ..data_checks import DataError, check_coco_detection, parse_split
from .console import say
from .presets import Preset


def generate_data(root: str, preset: Preset, seed: int,
                  with_masks: bool = False) -> Dict[str, str]:
    """Generated train/val splits (with instance masks for Mask R-CNN), reused when present;
    registered with detectron2."""
    paths = {}
    for split, n in (("train", preset.train_images), ("val", preset.val_images)):
        json_file = os.path.join(root, f"{split}.json")
        if not os.path.isfile(json_file):
            def progress(i, total, split=split):
                if i == total or i % max(1, total // 10) == 0:
                    say(f"[demo]   generating {split}: {i}/{total} images")
            synthetic.generate(root, split, n, tuple(preset.image_size), seed, progress,
                               with_masks)
        name = f"dsig_shapes_{os.path.basename(root)}_{split}"
        synthetic.register(name, json_file, os.path.join(root, split))
        paths[split] = name
    return paths


@dataclass
class UserData:
    """A COCO detection dataset of the user's: train and val splits as (name, json, image root)."""
    train: Tuple[str, str, str]
    val: Tuple[str, str, str]
    num_classes: int = 0
    image_size: Tuple[int, int] = (0, 0)  # (short side, long side) of the inputs


def prepare_user_data(train_spec: str, val_spec: str,
                      image_size: Optional[Sequence[int]] = None,
                      task: str = "bbox") -> UserData:
    """Checks (data_checks.check_coco_detection: files, boxes, categories, every image file
    present) and registers the user's splits; the input size defaults to the median image,
    capped at 800 x 1333."""
    from ..training import register_datasets

    train, val = parse_split(train_spec), parse_split(val_spec)
    masks = task == "segm"
    info = check_coco_detection(train[1], train[2], "train", need_masks=masks)
    val_info = check_coco_detection(val[1], val[2], "val", every_category_used=False,
                                    need_masks=masks)
    if val_info["categories"] != info["categories"]:
        raise DataError(f"the val categories {sorted(val_info['categories'].values())} differ "
                        f"from the train categories {sorted(info['categories'].values())}")
    register_datasets([train, val])
    short, long = image_size or (min(800, info["median_size"][0]),
                                 min(1333, info["median_size"][1]))
    if not 0 < short <= long:
        raise ValueError(f"image size must be SHORT LONG with 0 < SHORT <= LONG, got "
                         f"{short} {long}")
    return UserData(train, val, len(info["categories"]), (int(short), int(long)))


def user_data_opts(data: UserData) -> List[str]:
    """Config overrides that train and evaluate on the user's splits at their input size."""
    short, long = data.image_size
    k = data.num_classes
    # the teacher takes the student's class count (teacher.teacher_config)
    return ["DATASETS.TRAIN", f"('{data.train[0]}',)", "DATASETS.TEST", f"('{data.val[0]}',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(k),
            "INPUT.MIN_SIZE_TRAIN", f"({short},)", "INPUT.MAX_SIZE_TRAIN", str(long),
            "INPUT.MIN_SIZE_TEST", str(short), "INPUT.MAX_SIZE_TEST", str(long)]
