"""DSIG distillation of a RetinaNet student from a frozen RetinaNet teacher (one-stage variant):
the graph nodes are the student's own current detections."""
from typing import Dict, List

import torch
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torch.profiler import record_function as region  # names the profile's rows

import dsig_ext

from . import losses as L
from .config import resolve_feature_loss_levels
from .meta_arch import log_graph_sizes
from .teacher import (build_teacher, class_count_mismatch, needs_channel_flip,
                      teacher_images)


@META_ARCH_REGISTRY.register()
class DistillationRetinaNet(nn.Module):
    """Student RetinaNet (stock) + frozen teacher RetinaNet (eval, no autograd, unused at
    inference). Nodes: per image the student's top-NODE_TOPK_PER_LEVEL candidates per level above
    NODE_SCORE_THRESH, class-wise NMS, the best NODE_MAX_PER_IMAGE, boxes not clipped; both
    networks pool them with one dsig_ext call each on the RetinaNet levels (p3-p7)."""

    def __init__(self, cfg):
        super().__init__()
        self.student = RetinaNet(cfg)
        self.teacher, tcfg = build_teacher(cfg)
        for attr in ("head", "head_in_features", "anchor_generator"):
            if not hasattr(self.teacher, attr):
                raise ValueError(f"the teacher of {type(self).__name__} must be a RetinaNet "
                                 f"(its config builds {type(self.teacher).__name__})")
        if self.teacher.num_classes != self.student.num_classes:
            raise class_count_mismatch("MODEL.RETINANET.NUM_CLASSES", self.student.num_classes,
                                       self.teacher.num_classes)
        if len(self.teacher.head_in_features) != len(self.student.head_in_features):
            raise ValueError("student and teacher must use the same number of FPN levels")
        self.backend = cfg.DISTILL.BACKEND
        shapes = self.student.backbone.output_shape()
        scales = [1.0 / shapes[f].stride for f in self.student.head_in_features]
        self.node_pooler = dsig_ext.MultiLevelRoIAlign(
            cfg.DISTILL.NODE_POOLER_RESOLUTION, scales, 0, "ROIAlignV2", canonical_box_size=224,
            canonical_level=4, backend=self.backend)
        self.flip_teacher_input = needs_channel_flip(cfg.INPUT.FORMAT, tcfg.INPUT.FORMAT)
        self.cfg_distill = cfg.DISTILL.clone()
        self.feature_loss_levels = resolve_feature_loss_levels(
            cfg.DISTILL.FEATURE_LOSS_LEVELS, list(self.student.head_in_features),
            list(self.teacher.head_in_features))
        self.teacher_weights_loaded = bool(cfg.DISTILL.TEACHER.WEIGHTS)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def device(self):
        return self.student.device

    @torch.no_grad()
    def student_detections(self, images: ImageList, features, predictions):
        """The node boxes: the student's current detections (detached), as its inference would
        give them with the node settings, for all images at once: per level one top-k over
        every image's (anchor, class) logits (the sigmoid is monotonic, so it is applied to the
        winners only; a full sort of millions of scores, as detectron2's decoding does, costs
        ~0.15 s per level on a CPU), then one class-wise NMS over images and levels."""
        s, d = self.student, self.cfg_distill
        num_classes = s.num_classes
        # float32 under autocast too: box decoding in 16 bits is off by pixels
        logits, deltas = s._transpose_dense_predictions(
            [[p.detach().float() for p in predictions[0]],
             [p.detach().float() for p in predictions[1]]], [num_classes, 4])
        anchors = s.anchor_generator(features)
        boxes, scores, classes = [], [], []
        for a, x, r in zip(anchors, logits, deltas):  # x [N, A, K], r [N, A, 4]
            flat = x.flatten(1)
            top, idx = flat.topk(min(d.NODE_TOPK_PER_LEVEL, flat.shape[1]), dim=1)
            anchor_idx = idx // num_classes
            r_sel = torch.gather(r, 1, anchor_idx.unsqueeze(-1).expand(-1, -1, 4))
            decoded = s.box2box_transform.apply_deltas(r_sel.reshape(-1, 4),
                                                       a.tensor[anchor_idx.reshape(-1)])
            boxes.append(decoded.reshape(r_sel.shape))
            scores.append(top.sigmoid())
            classes.append(idx % num_classes)
        boxes, scores, classes = cat(boxes, 1), cat(scores, 1), cat(classes, 1)
        image = torch.arange(len(images), device=boxes.device)[:, None].expand_as(scores)
        valid = (scores > d.NODE_SCORE_THRESH).flatten()
        flat_boxes, flat_scores = boxes.reshape(-1, 4)[valid], scores.flatten()[valid]
        flat_classes, flat_image = classes.flatten()[valid], image.flatten()[valid]
        keep = batched_nms(flat_boxes, flat_scores, flat_image * num_classes + flat_classes,
                           d.NODE_NMS_THRESH)  # by decreasing score
        results = []
        for i, image_size in enumerate(images.image_sizes):
            mine = keep[flat_image[keep] == i][: d.NODE_MAX_PER_IMAGE]
            results.append(Instances(image_size, pred_boxes=Boxes(flat_boxes[mine]),
                                     scores=flat_scores[mine], pred_classes=flat_classes[mine]))
        return results

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.student(batched_inputs)  # no teacher work at inference
        s, d = self.student, self.cfg_distill
        images = s.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        with region("student.backbone"):
            feature_dict = s.backbone(images.tensor)
        features = [feature_dict[f] for f in s.head_in_features]
        with region("student.head_and_losses"):
            predictions = s.head(features)
            losses = s.forward_training(images, features, predictions, gt_instances)

        dense_kd = d.ROI_CLS_KD_ON or d.ROI_REG_KD_ON
        with torch.no_grad(), region("dsig.teacher_backbone"):
            t_images = teacher_images(self.teacher, batched_inputs, self.flip_teacher_input,
                                      self.device)
            t_dict = self.teacher.backbone(t_images.tensor)
            t_features = [t_dict[f] for f in self.teacher.head_in_features]
        t_predictions = None
        if dense_kd:  # the teacher's dense head, for the anchor-level KD terms only
            with torch.no_grad(), region("dsig.teacher_head"):
                t_predictions = self.teacher.head(t_features)
        with region("dsig.node_selection"):
            detections = self.student_detections(images, features, predictions)
        boxes = [r.pred_boxes for r in detections]
        counts = [len(b) for b in boxes]
        log_graph_sizes(counts)
        with region("dsig.node_pooling"):
            s_nodes = self.node_pooler(features, boxes).flatten(1)
            with torch.no_grad():
                t_nodes = self.node_pooler(t_features, boxes).flatten(1)
        c = L.image_reduction_factor(len(batched_inputs), d.IMAGE_REDUCTION, d.REFERENCE_IMAGES)
        if d.FG_NODE_LOSS_ON:
            with region("dsig.node_losses"):
                losses["loss_dsig_node"] = L.fg_node_loss(L.row_mse(s_nodes, t_nodes), counts,
                                                          d.FG_NODE_LOSS_WEIGHT, c)
        if d.EDGE_LOSS_ON:
            with region("dsig.edge_loss"):
                losses["loss_dsig_edge"] = L.edge_loss(s_nodes, t_nodes, counts,
                                                       d.EDGE_LOSS_WEIGHT, c, self.backend,
                                                       d.EDGE_ZERO_DEAD_ROWS)
        if d.FEATURE_LOSS_ON:
            named_s = dict(zip(s.head_in_features, features))
            named_t = dict(zip(s.head_in_features, t_features))
            losses["loss_dsig_feature"] = L.feature_map_loss(
                named_s, named_t, self.feature_loss_levels, d.FEATURE_LOSS_WEIGHT)
        if dense_kd:
            losses.update(self._dense_kd(features, predictions, t_predictions, gt_instances))
        return losses

    def _dense_kd(self, features, predictions, t_predictions, gt_instances):
        s, d = self.student, self.cfg_distill
        K = s.num_classes
        s_logits, s_deltas = s._transpose_dense_predictions(predictions, [K, 4])
        t_logits, t_deltas = s._transpose_dense_predictions(t_predictions, [K, 4])
        anchors = s.anchor_generator(features)
        gt_labels, _ = s.label_anchors(anchors, gt_instances)
        gt_labels = torch.stack(gt_labels)  # [N, A]
        valid = gt_labels >= 0
        positive = valid & (gt_labels != K)
        out = {}
        if d.ROI_CLS_KD_ON:
            out["loss_dsig_dense_cls"] = L.dense_cls_kd_loss(cat(s_logits, 1), cat(t_logits, 1),
                                                             valid, d.ROI_CLS_KD_WEIGHT)
        if d.ROI_REG_KD_ON:
            out["loss_dsig_dense_reg"] = L.dense_reg_kd_loss(cat(s_deltas, 1), cat(t_deltas, 1),
                                                             positive, d.ROI_REG_KD_WEIGHT)
        return out
