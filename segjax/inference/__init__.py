"""Inference: turning model logits into predictions at the labels' resolution."""
from segjax.inference.original_size import predict_at_original_size
from segjax.inference.semantic import SemanticPredictor, resized_size

__all__ = ["SemanticPredictor", "predict_at_original_size", "resized_size"]
