"""Segmentation models, built by name from a config."""
from segjax.models.registry import MODELS, build_model
from segjax.models import deeplab, fcn, pspnet, unet  # noqa: F401  (registers the models)

__all__ = ["MODELS", "build_model"]
