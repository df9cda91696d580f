"""Roofline floors of the dsig kernels on an H100 SXM (the design report's section 5).

Byte and FLOP counts of the DSIG workload: 800x1333 images, P2-P5 with 256 channels, 7x7 bins;
peaks of an H100 SXM 80 GB: HBM3 3.35 TB/s, FP32 (non-tensor) 67 TFLOP/s, BF16 dense 989 TFLOP/s.
A floor is a lower bound in microseconds, not a prediction; ratios above 1 say how far a measured
kernel is from it. On other GPUs the floors stay those of an H100 SXM (labelled so).
"""
import math

HBM_BYTES_PER_S = 3.35e12
FP32_FLOPS = 67e12
BF16_TC_FLOPS = 989e12
PLANNING_FOOTPRINT_PX = 484  # (s_l + 2)^2 feature pixels per RoI and channel, s_l ~ 20
CHANNELS = 256
BINS = 49
STRIDES = (4, 8, 16, 32)


def pyramid_elements(image_hw=(800, 1333), channels=CHANNELS):
    """Elements of one image's P2-P5 (ceil division, as the backbone produces them)."""
    h, w = image_hw
    return channels * sum(math.ceil(h / s) * math.ceil(w / s) for s in STRIDES)


def _us(nbytes):
    return 1e6 * nbytes / HBM_BYTES_PER_S


def roi_align_forward_floor_us(batch, rois_per_image, elem_bytes):
    """Write the output once and read every RoI's footprint once, the reads capped at the
    pyramid (the 'no reuse' column); never under the ~5 us launch floor."""
    k = batch * rois_per_image
    out = k * CHANNELS * BINS * elem_bytes
    reads = min(k * PLANNING_FOOTPRINT_PX * CHANNELS, batch * pyramid_elements()) * elem_bytes
    return max(5.0, _us(out + reads))


def roi_align_backward_owner_floor_us(batch, rois_per_image, elem_bytes):
    """Owner-computes (deterministic) backward: write the pyramid gradient once in its own dtype
    and read grad_out once."""
    k = batch * rois_per_image
    return max(5.0, _us(batch * pyramid_elements() * elem_bytes + k * CHANNELS * BINS * elem_bytes))


def roi_align_backward_atomic_floor_us(batch, rois_per_image, elem_bytes):
    """Atomic backward: zero-fill an fp32 pyramid, read-modify-write it, read grad_out, and for
    16-bit features a cast pass (read fp32, write the native dtype)."""
    k = batch * rois_per_image
    pyr32 = batch * pyramid_elements() * 4
    nbytes = pyr32 + 2 * pyr32 + k * CHANNELS * BINS * elem_bytes
    if elem_bytes != 4:
        nbytes += pyr32 + batch * pyramid_elements() * elem_bytes
    return max(5.0, _us(nbytes))


def edge_loss_floor_us(graphs, nodes, dim, elem_bytes, tensor_cores=False):
    """Forward (two Grams) and backward (M X) of the edge loss: 6 N^2 D FLOPs and 4 N D elements
    of traffic per graph; FP32 SIMT peak unless tensor cores are used."""
    flops = 6.0 * nodes * nodes * dim * graphs
    nbytes = 4.0 * nodes * dim * elem_bytes * graphs
    peak = BF16_TC_FLOPS if tensor_cores else FP32_FLOPS
    return max(5.0, 1e6 * flops / peak, _us(nbytes))
