"""Inference: turning model logits into predictions at the labels' resolution."""
from segjax.inference.original_size import predict_at_original_size

__all__ = ["predict_at_original_size"]
