"""Single-image semantic inference settings from a config: the `SemanticPredictor` of
`config.inference` and the ops that prepare an eval record's image and labels at their
original size. Used by the semantic task's per-image evaluator and by predict.py."""
from typing import Any

import ml_collections

from segjax.data import transforms
from segjax.data.sources import DatasetSpec
from segjax.inference.semantic import SemanticPredictor


def make_predictor(config: ml_collections.ConfigDict, model, variables: Any,
                   num_classes: int) -> SemanticPredictor:
  """A `SemanticPredictor` of `variables` ({"params", "batch_stats"}) with the config's
  inference settings."""
  inference = config.inference
  if inference.mode not in ("whole", "slide"):
    raise ValueError(f"inference.mode {inference.mode!r} cannot label single images; use "
                     "'whole' or 'slide'.")
  scale = tuple(inference.scale) if min(inference.scale) > 0 else None
  return SemanticPredictor(
      model, variables, num_classes, mean=tuple(config.data.mean), std=tuple(config.data.std),
      mode=inference.mode, scale=scale, window=tuple(inference.window),
      stride=tuple(inference.stride), window_batch=inference.window_batch,
      scales=tuple(inference.scales), flip=inference.flip, crf=crf_options(config),
      exact_shapes=inference.exact_shapes)


def crf_options(config: ml_collections.ConfigDict):
  """`dense_crf` keyword arguments of `inference.crf`, or None when it is off."""
  crf = config.inference.get("crf")
  if crf is None or not crf.enabled:
    return None
  options = {k: v for k, v in crf.items() if k != "enabled"}
  options["window"] = options["window"] or None
  return options


def label_pipeline(config: ml_collections.ConfigDict, dataset: DatasetSpec):
  """The ops that turn a record into the uint8 image and checked labels scored at
  the original size (`inference.label_ops` included)."""
  return transforms.compose(
      transforms.squeeze_labels(), transforms.check_image(), config.inference.label_ops,
      transforms.check_labels(num_classes=dataset.num_classes, ignore_index=dataset.ignore_index))
