"""segjax: semantic, instance and panoptic segmentation in JAX/Flax."""

__version__ = "0.1.0"
