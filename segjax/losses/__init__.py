"""Segmentation losses."""
from segjax.losses.cross_entropy import pixel_cross_entropy

__all__ = ["pixel_cross_entropy"]
