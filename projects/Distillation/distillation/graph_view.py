"""The instance-graph view: nodes (fg RoIs, mined bg RoIs) drawn on an image, and the teacher's
and student's edge matrices side by side with their difference."""
import json
import os

from .errors import ConfigError, MissingFileError


def load_example(json_file, image_path, cfg):
    import numpy as np
    import torch
    from detectron2.data import detection_utils as utils
    from detectron2.structures import BoxMode

    for path, option in ((json_file, "--json"), (image_path, "--image")):
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} not found ({option})")
    with open(json_file) as f:
        coco = json.load(f)
    name = os.path.basename(image_path)
    image = next((im for im in coco["images"] if os.path.basename(im["file_name"]) == name), None)
    if image is None:
        raise ConfigError(f"{name} is not an image of {json_file} (--image must be one of the "
                          "json's images: its annotations are the graph's nodes)")
    cats = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    annos = [{"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cats[a["category_id"]]}
             for a in coco["annotations"] if a["image_id"] == image["id"]]
    img = utils.read_image(image_path, format=cfg.INPUT.FORMAT)
    instances = utils.annotations_to_instances(annos, img.shape[:2])
    tensor = torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return img, [{"image": tensor, "instances": instances, "height": img.shape[0],
                  "width": img.shape[1]}]


def draw(img_rgb, graph, output, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt
    import torch

    import dsig_ext

    n, n_fg = graph["counts"][0], graph["n_fg"][0]
    boxes = graph["boxes"][:n].cpu()
    offsets = torch.tensor([0, n])
    e_s = dsig_ext.cosine_edges(graph["student"][:n].float().cpu(), offsets)
    e_t = dsig_ext.cosine_edges(graph["teacher"][:n].float().cpu(), offsets)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    axes[0].imshow(img_rgb)
    for i, b in enumerate(boxes.tolist()):
        color = "lime" if i < n_fg else "orange"
        axes[0].add_patch(patches.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False,
                                            edgecolor=color, linewidth=0.8))
    axes[0].set_title(f"nodes: {n_fg} fg (green), {n - n_fg} mined bg (orange)", fontsize=9)
    axes[0].axis("off")
    low = float(min(e_t.min(), e_s.min()))  # one colour scale for both edge matrices
    diff = float((e_t - e_s).abs().max()) or 1e-6
    for ax, m, t, cmap, v in ((axes[1], e_t, "teacher edges", "viridis", (low, 1.0)),
                              (axes[2], e_s, "student edges", "viridis", (low, 1.0)),
                              (axes[3], e_t - e_s, "teacher - student", "coolwarm",
                               (-diff, diff))):
        im = ax.imshow(m.numpy(), cmap=cmap, vmin=v[0], vmax=v[1])
        ax.axhline(n_fg - 0.5, color="white", linewidth=0.6)
        ax.axvline(n_fg - 0.5, color="white", linewidth=0.6)
        ax.set_title(t, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return {"nodes": n, "fg": n_fg, "edge_mse": float(((e_t - e_s) ** 2).mean())}


class GraphConfigError(ConfigError):
    """A config whose model has no instance graph (tools/visualize_graph.py prints it, as any
    InputError, as one line)."""


def visualize(config, image, json_file, output, weights="", opts=(), seed=0):
    """Draw the instance graph of `image` (annotated in the COCO `json_file`) to `output`; the
    model from `config` with the KEY VALUE `opts`, its weights from the checkpoint `weights`
    (student.* and teacher.*) or, without one, from MODEL.WEIGHTS / DISTILL.TEACHER.WEIGHTS.
    Returns the graph's sizes and edge MSE. Raises InputError on bad input."""
    import torch
    from detectron2.modeling import META_ARCH_REGISTRY, build_model

    from distillation.checkpoint import DistillationCheckpointer, TeacherWeightsError
    from distillation.training import load_config

    cfg = load_config(config, list(opts))
    if weights:
        if not os.path.isfile(weights):
            raise MissingFileError(f"checkpoint {weights} not found (--weights)")
        # the checkpoint is the model's weights: the build then knows a teacher is coming
        cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    arch = cfg.MODEL.META_ARCHITECTURE
    if not hasattr(META_ARCH_REGISTRY.get(arch), "instance_graphs"):
        raise GraphConfigError(f"{config} is not a DistillationRCNN config (MODEL."
                               f"META_ARCHITECTURE is {arch}): only a two-stage distillation "
                               "model has an instance graph to draw")
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:  # as training loads it; a --weights checkpoint must fill the student
        # (a drawing of a partly random trained student would mislead)
        DistillationCheckpointer(model, require_complete=bool(weights)).load(cfg.MODEL.WEIGHTS)
    if not model.teacher_weights_loaded and not cfg.DISTILL.TEACHER.ALLOW_RANDOM_INIT:
        raise TeacherWeightsError(
            "the teacher has no weights: give --weights a distillation checkpoint (teacher.* "
            "keys) or set DISTILL.TEACHER.WEIGHTS; to draw a random teacher's graph, "
            "DISTILL.TEACHER.ALLOW_RANDOM_INIT True")
    img, batch = load_example(json_file, image, cfg)
    torch.manual_seed(seed)  # RoI sampling
    graph = model.instance_graphs(batch)
    rgb = img[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else img
    return draw(rgb, graph, output, title=os.path.basename(image))
