"""Segmentation losses: pure, jittable functions of (..., C) logits and (...)
integer labels with an ignore index, and `build_loss` to combine them by name.

U-Net's per-pixel weight map is a host-side preprocessing step: see
`segjax.data.unet_weights` and the `unet_weights` data op.
"""
from segjax.losses.binary_cross_entropy import binary_cross_entropy_with_logits
from segjax.losses.cross_entropy import (cross_entropy, pixel_cross_entropy,
                                         weighted_pixel_cross_entropy)
from segjax.losses.dice import dice_loss
from segjax.losses.focal import sigmoid_focal_loss, softmax_focal_loss
from segjax.losses.lovasz import lovasz_softmax
from segjax.losses.ohem import ohem_cross_entropy, ohem_keep_mask
from segjax.losses.registry import LOSSES, build_loss

__all__ = [
    "LOSSES",
    "binary_cross_entropy_with_logits",
    "build_loss",
    "cross_entropy",
    "dice_loss",
    "lovasz_softmax",
    "ohem_cross_entropy",
    "ohem_keep_mask",
    "pixel_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "weighted_pixel_cross_entropy",
]
