"""Building blocks shared by backbones and heads."""
from segjax.layers.context import ASPP, PyramidPoolingModule, SeparableConvBNAct
from segjax.layers.conv import Conv, ConvBNAct, Deconv2x2, batch_norm, resolve_dtype
from segjax.layers.pooling import adaptive_avg_pool, max_pool_with_indices, max_unpool
from segjax.layers.resize import resize_bilinear

__all__ = ["ASPP", "Conv", "ConvBNAct", "Deconv2x2", "PyramidPoolingModule", "SeparableConvBNAct",
           "adaptive_avg_pool", "batch_norm", "max_pool_with_indices", "max_unpool",
           "resize_bilinear", "resolve_dtype"]
