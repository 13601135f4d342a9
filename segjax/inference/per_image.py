"""Evaluation one image at a time with `SemanticPredictor`: any image size,
sliding windows, test-time augmentation, scored at the original resolution.
Used by eval.py and by training when `inference.mode` is "whole" or "slide"."""
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from segjax.data import pipeline, transforms
from segjax.data.sources import DatasetSpec
from segjax.inference.semantic import SemanticPredictor
from segjax.metrics import confusion_matrix, segmentation_metrics


def make_predictor(config: ml_collections.ConfigDict, model, state,
                   num_classes: int) -> SemanticPredictor:
  """A `SemanticPredictor` with the config's inference settings."""
  inference = config.inference
  if inference.mode not in ("whole", "slide"):
    raise ValueError(f"inference.mode {inference.mode!r} cannot label single images; use "
                     "'whole' or 'slide'.")
  scale = tuple(inference.scale) if min(inference.scale) > 0 else None
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return SemanticPredictor(
      model, variables, num_classes, mean=tuple(config.data.mean), std=tuple(config.data.std),
      mode=inference.mode, scale=scale, window=tuple(inference.window),
      stride=tuple(inference.stride), window_batch=inference.window_batch,
      scales=tuple(inference.scales), flip=inference.flip, crf=crf_options(config),
      exact_shapes=bool(inference.get("exact_shapes", False)))


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
  ops = "|".join(p for p in ("squeeze_labels", "check_image", config.inference.label_ops,
                             f"check_labels(num_classes={dataset.num_classes}, "
                             f"ignore_index={dataset.ignore_index})") if p)
  return transforms.parse_pipeline(ops)


def confusion(config: ml_collections.ConfigDict, dataset: DatasetSpec,
              predictor: SemanticPredictor, progress: bool = True) -> np.ndarray:
  """Confusion matrix of the predictor over the eval split, one image at a time."""
  prepare = label_pipeline(config, dataset)
  source = pipeline.process_slice(dataset.source(config.data.eval_split))
  confusion = np.zeros((dataset.num_classes,) * 2, np.int64)
  count = jax.jit(confusion_matrix, static_argnums=(2, 3))
  for i in tqdm(range(len(source)), unit="image", disable=not progress or jax.process_index() != 0):
    example = prepare(source[i], np.random.default_rng(0))
    prediction = predictor.predict(example["image"])
    confusion += np.asarray(count(prediction, example["label"], dataset.num_classes,
                                  dataset.ignore_index))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    confusion = multihost_utils.process_allgather(confusion).sum(0)
  return confusion


def evaluate(config: ml_collections.ConfigDict, dataset: DatasetSpec, model, state,
             progress: bool = True) -> Dict[str, Any]:
  """mmseg's metrics of `state` on `data.eval_split` in the config's inference mode."""
  predictor = make_predictor(config, model, state, dataset.num_classes)
  return segmentation_metrics(confusion(config, dataset, predictor, progress))
