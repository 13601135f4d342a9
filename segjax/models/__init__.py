"""Segmentation models, built by name from a config."""
from segjax.models.registry import MODELS, build_model
from segjax.models import (  # noqa: F401  (registers the models)
    deconvnet, deeplab, fcn, mask_rcnn, panoptic_fpn, pspnet, sam, segnet, unet)

__all__ = ["MODELS", "build_model"]
