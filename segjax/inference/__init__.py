"""Inference: model outputs into predictions at the images' own resolution.

Semantic logits at the original size (batched, `predict_at_original_size`) and for
single images of any size (`SemanticPredictor`: whole, sliding window, test-time
augmentation, CRF); detections at the original size, drawn; panoptic fusion and COCO
panoptic output. The tasks (segjax/tasks) build their evaluators and predictors from
these; nothing here knows about training.
"""
from segjax.inference.original_size import predict_at_original_size
from segjax.inference.semantic import SemanticPredictor, resized_size

__all__ = ["SemanticPredictor", "predict_at_original_size", "resized_size"]
