"""Building blocks shared by backbones and heads."""
from segjax.layers.conv import ConvBNAct, batch_norm, resolve_dtype

__all__ = ["ConvBNAct", "batch_norm", "resolve_dtype"]
