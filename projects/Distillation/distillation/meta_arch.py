"""DSIG distillation of a Faster R-CNN student from a frozen Faster R-CNN teacher."""
import logging
from typing import Dict, List

import torch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.profiler import record_function as region  # names the profile's rows

import dsig_ext

from . import losses as L
from .config import resolve_feature_loss_levels
from .teacher import (build_teacher, class_count_mismatch, needs_channel_flip,
                      teacher_images)

logger = logging.getLogger(__name__)


def log_graph_sizes(node_counts, n_fg=None, n_bg=None):
    """Training metrics of the instance graphs (host counts, no extra sync): nodes per graph and,
    for two-stage graphs, the fraction of sampled bg RoIs the teacher mined into the edges."""
    try:
        storage = get_event_storage()
    except AssertionError:  # a training-mode forward outside detectron2's trainer
        return
    storage.put_scalar("dsig/graph_nodes", sum(node_counts) / max(1, len(node_counts)))
    if n_fg is not None:
        mined = sum(node_counts) - sum(n_fg)
        storage.put_scalar("dsig/mined_bg_fraction", mined / max(1, sum(n_bg)))


def describe_graph_sizes(nodes: float, mined_bg_fraction=None) -> str:
    """The logged graph metrics in words, as reports and benchmarks print them."""
    text = f"{nodes:.0f} nodes per image"
    if mined_bg_fraction is not None:
        text += f", {100 * mined_bg_fraction:.0f} % of the sampled bg RoIs mined into the edges"
    return text


def fused_pooler_like(pooler: nn.Module, backend: str) -> nn.Module:
    """dsig_ext.MultiLevelRoIAlign with the same geometry as a detectron2 ROIPooler."""
    if isinstance(pooler, dsig_ext.MultiLevelRoIAlign) or not isinstance(pooler, ROIPooler):
        return pooler
    first = pooler.level_poolers[0]
    if type(first).__name__ != "ROIAlign":
        return pooler  # ROIPool / rotated types stay with detectron2
    return dsig_ext.MultiLevelRoIAlign(
        pooler.output_size, [p.spatial_scale for p in pooler.level_poolers], first.sampling_ratio,
        "ROIAlignV2" if first.aligned else "ROIAlign",
        canonical_box_size=pooler.canonical_box_size, canonical_level=pooler.canonical_level,
        backend=backend)


@META_ARCH_REGISTRY.register()
class DistillationRCNN(nn.Module):
    """Student GeneralizedRCNN (stock, parameter names unchanged) + frozen teacher GeneralizedRCNN.

    Training: the student runs as detectron2 runs it, except that its box branch keeps the pooled
    256x7x7 features of the sampled RoIs; the teacher (eval, no autograd) pools the same RoIs once
    and classifies them; DSIG adds node, edge and the configured optional losses. A Mask R-CNN
    student (MODEL.MASK_ON) trains its mask branch with its own loss on the same sampled RoIs; the
    DSIG terms stay on the box branch, so the teacher may be a Mask R-CNN or a Faster R-CNN.
    Inference: the student alone (no teacher work).
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.MODEL.KEYPOINT_ON:
            raise ValueError("DistillationRCNN distils Faster R-CNN and Mask R-CNN: "
                             "MODEL.KEYPOINT_ON is not supported")
        self.student = GeneralizedRCNN(cfg)
        teacher, tcfg = build_teacher(cfg)
        self.teacher = teacher
        self.backend = cfg.DISTILL.BACKEND
        if self.backend not in ("fused", "reference"):
            raise ValueError(f"DISTILL.BACKEND must be 'fused' or 'reference', got {self.backend!r}")
        if self.backend == "fused":  # the student's own poolers too (no parameters: same names)
            heads = self.student.roi_heads
            heads.box_pooler = fused_pooler_like(heads.box_pooler, self.backend)
            if getattr(heads, "mask_on", False) and heads.mask_pooler is not None:
                heads.mask_pooler = fused_pooler_like(heads.mask_pooler, self.backend)
        self.teacher_pooler = (fused_pooler_like(self.teacher.roi_heads.box_pooler, self.backend)
                               if self.backend == "fused" else self.teacher.roi_heads.box_pooler)
        self._check_compatible(cfg, tcfg)
        self.flip_teacher_input = needs_channel_flip(cfg.INPUT.FORMAT, tcfg.INPUT.FORMAT)
        d = cfg.DISTILL
        self.num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.cfg_distill = d.clone()
        self.teacher_in_features = tcfg.MODEL.ROI_HEADS.IN_FEATURES
        self.feature_loss_levels = resolve_feature_loss_levels(
            d.FEATURE_LOSS_LEVELS, list(self.student.backbone.output_shape()),
            list(self.teacher.backbone.output_shape()))
        # set again by DistillationCheckpointer when a checkpoint brings teacher.* weights
        self.teacher_weights_loaded = bool(cfg.DISTILL.TEACHER.WEIGHTS)
        self.record_graph, self.last_graph = False, None

    @torch.no_grad()
    def instance_graphs(self, batched_inputs: List[Dict]) -> Dict:
        """The instance graphs of one training step on these inputs (with annotations): node
        boxes per image ([fg ; mined bg]), their counts and the student / teacher node features."""
        from detectron2.utils.events import EventStorage

        mode = self.training
        self.train()
        self.record_graph = True
        try:
            with EventStorage():
                self(batched_inputs)
        finally:
            self.record_graph = False
            self.train(mode)
        if self.last_graph is None:
            raise RuntimeError("DISTILL.EDGE_LOSS_ON is off: there is no instance graph")
        return self.last_graph

    @staticmethod
    def _check_compatible(cfg, tcfg):
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != tcfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise class_count_mismatch("MODEL.ROI_HEADS.NUM_CLASSES",
                                       cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                                       tcfg.MODEL.ROI_HEADS.NUM_CLASSES)
        if cfg.MODEL.FPN.OUT_CHANNELS != tcfg.MODEL.FPN.OUT_CHANNELS:
            raise ValueError("student and teacher FPNs must have the same OUT_CHANNELS (DSIG has "
                             "no adaptation layer)")
        if (cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION != tcfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
                or len(cfg.MODEL.ROI_HEADS.IN_FEATURES) != len(tcfg.MODEL.ROI_HEADS.IN_FEATURES)):
            raise ValueError("student and teacher must pool RoIs alike (resolution and levels)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: eval mode always
        return self

    @property
    def device(self):
        return self.student.device

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.student(batched_inputs)
        s = self.student
        images = s.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        with region("student.backbone"):
            features = s.backbone(images.tensor)
        with torch.no_grad(), region("dsig.teacher_backbone"):
            t_images = teacher_images(self.teacher, batched_inputs, self.flip_teacher_input,
                                      self.device)
            t_features = self.teacher.backbone(t_images.tensor)
        with region("student.rpn"):
            proposals, proposal_losses = s.proposal_generator(images, features, gt_instances)
        losses = dict(proposal_losses)
        with region("student.box_branch"):
            proposals = s.roi_heads.label_and_sample_proposals(proposals, gt_instances)
        det_losses, kd_losses = self._box_branch_and_dsig(features, t_features, proposals,
                                                          len(batched_inputs))
        losses.update(det_losses)
        losses.update(kd_losses)
        if getattr(s.roi_heads, "mask_on", False) and not self.record_graph:
            with region("student.mask_branch"):  # detectron2's own: fg RoIs, its mask loss
                losses.update(s.roi_heads._forward_mask(features, proposals))
        if self.cfg_distill.FEATURE_LOSS_ON:
            with region("dsig.feature_loss"):
                losses["loss_dsig_feature"] = L.feature_map_loss(
                    features, t_features, self.feature_loss_levels,
                    self.cfg_distill.FEATURE_LOSS_WEIGHT)
        return losses

    def _box_branch_and_dsig(self, features, t_features, proposals, num_images):
        """detectron2's StandardROIHeads box branch on the sampled RoIs, keeping their pooled
        features, and the DSIG terms on them."""
        d = self.cfg_distill
        heads = self.student.roi_heads
        with region("student.box_branch"):
            boxes = [p.proposal_boxes for p in proposals]
            pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
            predictions = heads.box_predictor(heads.box_head(pooled))
            det_losses = heads.box_predictor.losses(predictions, proposals)

        with region("dsig.graph_assembly"):
            gt_classes, image_of, fg_idx, n_fg, bg_idx, n_bg = self._split_fg_bg(proposals)
        counts = [len(p) for p in proposals]

        roi_kd = d.ROI_CLS_KD_ON or d.ROI_REG_KD_ON
        mining = d.EDGE_LOSS_ON and d.BG_MINING_ON
        if not (roi_kd or d.FG_NODE_LOSS_ON or d.BG_NODE_LOSS_ON or d.EDGE_LOSS_ON):
            return det_losses, {}  # no RoI-level term (e.g. feature imitation alone)
        with torch.no_grad(), region("dsig.teacher_roi"):
            t_pooled = self.teacher_pooler([t_features[f] for f in self.teacher_in_features],
                                           boxes)
            th = self.teacher.roi_heads
            t_scores = t_deltas = t_bg_scores = None
            if roi_kd:  # the teacher classifies every sampled RoI
                t_scores, t_deltas = th.box_predictor(th.box_head(t_pooled))
                t_bg_scores = t_scores[bg_idx]
            elif mining:  # only the bg RoIs, for mining
                t_bg_scores = th.box_predictor(th.box_head(t_pooled[bg_idx]))[0]

        c = L.image_reduction_factor(num_images, d.IMAGE_REDUCTION, d.REFERENCE_IMAGES)
        s_flat, t_flat = pooled.flatten(1), t_pooled.flatten(1)
        kd = {}
        with region("dsig.node_losses"):
            if d.FG_NODE_LOSS_ON or d.BG_NODE_LOSS_ON:
                row_errors = L.row_mse(s_flat, t_flat)  # every sampled RoI, one pass
            if d.FG_NODE_LOSS_ON:
                kd["loss_dsig_fg_node"] = L.fg_node_loss(row_errors[fg_idx], n_fg,
                                                         d.FG_NODE_LOSS_WEIGHT, c)
            if d.BG_NODE_LOSS_ON:
                a = (L.adaptive_bg_weights(n_fg, n_bg, d.BG_WEIGHT_ALPHA)
                     if d.BG_ADAPTIVE_WEIGHT_ON else [1.0] * len(counts))
                kd["loss_dsig_bg_node"] = L.bg_node_loss(row_errors[bg_idx], n_bg, a,
                                                         d.BG_NODE_LOSS_WEIGHT, c)
        if d.EDGE_LOSS_ON:
            kd["loss_dsig_edge"] = self._edge_term(s_flat, t_flat, boxes, fg_idx, n_fg, bg_idx,
                                                   n_bg, image_of, t_bg_scores, c)
        with region("dsig.roi_kd"):
            if d.ROI_CLS_KD_ON:
                kd["loss_dsig_roi_cls"] = L.roi_cls_kd_loss(predictions[0], t_scores,
                                                            d.ROI_CLS_KD_TEMPERATURE,
                                                            d.ROI_CLS_KD_WEIGHT)
            if d.ROI_REG_KD_ON:
                kd["loss_dsig_roi_reg"] = L.roi_reg_kd_loss(predictions[1], t_deltas,
                                                            gt_classes, self.num_classes,
                                                            d.ROI_REG_KD_WEIGHT)
        return det_losses, kd

    def _edge_term(self, s_flat, t_flat, boxes, fg_idx, n_fg, bg_idx, n_bg, image_of,
                   t_bg_scores, c):
        """L_edge over per-image graphs [fg ; mined bg]."""
        d = self.cfg_distill
        with region("dsig.graph_assembly"):
            if d.BG_MINING_ON:
                mined = L.mine_background(t_bg_scores, self.num_classes,
                                          d.BG_MINING_THRESHOLD, n_bg, d.BG_MINING_MAX)
            else:
                mined = torch.zeros(len(bg_idx), dtype=torch.bool, device=bg_idx.device)
            node_idx, node_counts = self._graph_nodes(fg_idx, n_fg, bg_idx[mined],
                                                      image_of[bg_idx[mined]], len(n_fg))
        log_graph_sizes(node_counts, n_fg, n_bg)
        with region("dsig.edge_loss"):
            loss = L.edge_loss(s_flat[node_idx], t_flat[node_idx], node_counts,
                               d.EDGE_LOSS_WEIGHT, c, self.backend, d.EDGE_ZERO_DEAD_ROWS)
        if self.record_graph:  # for tools/visualize_graph.py
            all_boxes = torch.cat([b.tensor for b in boxes])
            self.last_graph = {"boxes": all_boxes[node_idx].detach(), "counts": node_counts,
                               "n_fg": n_fg, "student": s_flat[node_idx].detach(),
                               "teacher": t_flat[node_idx]}
        return loss

    def _split_fg_bg(self, proposals):
        """Sampled RoIs (image-major rows) split into fg and bg: their row indices, grouped by
        image in row order, and their counts per image."""
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        is_fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        counts = [len(p) for p in proposals]
        image_of = torch.repeat_interleave(torch.arange(len(counts), device=gt_classes.device),
                                           torch.as_tensor(counts, device=gt_classes.device))
        n_fg = [int(v) for v in torch.bincount(image_of[is_fg], minlength=len(counts)).tolist()]
        n_bg = [c - f for c, f in zip(counts, n_fg)]
        # rows are image-major, so nonzero's ascending order is already grouped by image
        fg_idx = is_fg.nonzero(as_tuple=True)[0]
        bg_idx = (~is_fg).nonzero(as_tuple=True)[0]
        return gt_classes, image_of, fg_idx, n_fg, bg_idx, n_bg

    @staticmethod
    def _graph_nodes(fg_idx, n_fg, mined_idx, mined_image, num_images):
        """Row indices of the graphs [fg_b ; mined bg_b], image by image, and their sizes. The
        mined rows come in ascending (image-major) row order, so already grouped by image."""
        mined_counts = torch.bincount(mined_image, minlength=num_images).tolist()
        parts, counts, f0, m0 = [], [], 0, 0
        for b in range(num_images):
            parts += [fg_idx[f0:f0 + n_fg[b]], mined_idx[m0:m0 + mined_counts[b]]]
            counts.append(n_fg[b] + mined_counts[b])
            f0 += n_fg[b]
            m0 += mined_counts[b]
        return torch.cat(parts), counts
