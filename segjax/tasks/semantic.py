"""Semantic segmentation: a class for every pixel (FCN, SegNet, U-Net, PSPNet, DeepLab...).

Trained with the configured per-pixel loss terms (plus an auxiliary head's, weighted),
scored with mmseg's metrics from a confusion matrix: in static batches through
`data.eval_ops` (inference.mode "batched") or one image at a time at its original
size (modes "whole" and "slide", `SemanticPredictor`).
"""
import functools
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from segjax import paths, visualization
from segjax.data import device, pipeline
from segjax.data import transforms
from segjax.data.sources import DatasetSpec
from segjax.inference import per_image, predict_at_original_size
from segjax.layers import resize_bilinear
from segjax.losses import build_loss
from segjax.metrics import confusion_matrix, format_iou_table, segmentation_metrics
from segjax.tasks.base import (TASKS, Evaluator, Objective, PredictionWriter, Task, Variables,
                               float32_tree, with_lowering)


def align(logits: jax.Array, labels: jax.Array, model: nn.Module,
          pixel_weights: Optional[jax.Array] = None):
  """Logits and labels (and per-pixel weights) of the same size: a model whose
  output covers only the central region (unpadded convolutions, e.g.
  `unet_valid`) gets its labels center-cropped; other logits are resized
  bilinearly to the labels. Returns (logits, labels, pixel_weights)."""
  size = labels.shape[1:3]
  if tuple(logits.shape[1:3]) == tuple(size):
    return logits, labels, pixel_weights
  if getattr(model, "output_is_center_crop", False):
    top, left = (size[0] - logits.shape[1]) // 2, (size[1] - logits.shape[2]) // 2
    crop = lambda x: x[:, top:top + logits.shape[1], left:left + logits.shape[2]]
    return logits, crop(labels), None if pixel_weights is None else crop(pixel_weights)
  return resize_bilinear(logits, size, align_corners=False), labels, pixel_weights


DEFAULT_LOSS = ({"name": "cross_entropy", "weight": 1.0},)


def objective(*, model: nn.Module, ignore_index: int, loss_fn=None, class_weights=None,
              aux_weight: float = 0.4, mean=device.IMAGENET_MEAN,
              std=device.IMAGENET_STD) -> Objective:
  """The per-pixel loss of `model`'s logits (and of its `aux_logits`, times `aux_weight`).

  `loss_fn` is `segjax.losses.build_loss(spec)` (default: cross-entropy). uint8 images are
  normalized with `mean` / `std` on the device first (`device.normalize`). A batch may
  carry `pixel_weights` (e.g. U-Net's weight map) for the terms that take them. Logits
  are cast to float32 before the loss (bf16 models). Micro-batches are weighted by their
  valid label pixels: the large-batch gradient of a per-pixel mean loss.
  """
  loss_fn = loss_fn or build_loss(DEFAULT_LOSS)

  def fn(params, batch_stats, micro, rng):
    labels = micro["label"].astype(jnp.int32)
    pixel_weights = micro.get("pixel_weights")
    outputs, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        device.normalize(micro["image"], mean, std), train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    if not isinstance(outputs, dict):
      outputs = {"logits": outputs}
    outputs = float32_tree(outputs)
    logits, targets, weights = align(outputs["logits"], labels, model, pixel_weights)
    loss, terms = loss_fn(logits, targets, ignore_index, class_weights, weights)
    if "aux_logits" in outputs:  # auxiliary head (PSPNet, DeepLabV3): weighted extra loss
      aux_logits, aux_targets, aux_weights = align(outputs["aux_logits"], labels, model,
                                                   pixel_weights)
      aux_loss, _ = loss_fn(aux_logits, aux_targets, ignore_index, class_weights, aux_weights)
      loss += aux_weight * aux_loss
    valid = targets != ignore_index
    sums = {"correct": ((jnp.argmax(logits, -1) == targets) & valid).sum(),
            "valid": valid.sum(), **{f"loss_{name}": v for name, v in terms.items()}}
    return loss, (sums, updates["batch_stats"])

  def summarize(sums: Dict[str, Any], count: int) -> Dict[str, Any]:
    metrics = {"pixel_accuracy": sums["correct"] / jnp.maximum(sums["valid"], 1)}
    terms = {k: v / count for k, v in sums.items() if k.startswith("loss_")}
    if len(terms) > 1:
      metrics.update(terms)
    return metrics

  return Objective(fn, "valid", summarize)


def eval_step(variables: Variables, batch: Dict[str, jax.Array], *, model: nn.Module,
              num_classes: int, ignore_index: int, mean=device.IMAGENET_MEAN,
              std=device.IMAGENET_STD):
  """(confusion matrix of the batch, predictions).

  uint8 images are normalized with `mean` / `std` here (`device.normalize`). With
  `resized_size` and `original_size` in the batch (a test-time resize that
  kept the labels at their original size) predictions are made at that size.
  """
  logits = model.apply(variables, device.normalize(batch["image"], mean, std), train=False)
  labels = batch["label"].astype(jnp.int32)
  if "original_size" in batch:
    predictions = predict_at_original_size(logits, batch["resized_size"],
                                           batch["original_size"], labels.shape[1:3])
  else:
    logits, labels, _ = align(logits, labels, model)
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return confusion_matrix(predictions, labels, num_classes, ignore_index), predictions


class SemanticEvaluator(Evaluator):
  """mIoU, aAcc, mAcc and per-class IoU/Acc from a confusion matrix (mmseg's IoUMetric)."""
  table_tag = "per_class"

  def __init__(self, config: ml_collections.ConfigDict, dataset: DatasetSpec):
    super().__init__(config.model.conv_lowering)
    self.config, self.dataset = config, dataset
    self.source = dataset.source(config.data.eval_split)
    self.confusion = None

  def reset(self) -> None:
    self.confusion = np.zeros((self.dataset.num_classes,) * 2, np.int64)

  def result(self) -> Dict[str, Any]:
    return segmentation_metrics(self.confusion)

  def table(self, result: Dict[str, Any]) -> str:
    return format_iou_table(result, self.dataset.class_names)

  def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(result[k]) for k in ("mIoU", "aAcc", "mAcc")}


class BatchedSemanticEvaluator(SemanticEvaluator):
  """The eval split through `data.eval_ops` in static global batches (as training sees
  them), jitted over the mesh; the first batch makes the panel."""

  def __init__(self, config, dataset, model, ops, variable_shardings=None,
               batch_sharding=None):
    super().__init__(config, dataset)
    self.ops, self.batch_sharding = ops, batch_sharding
    step = functools.partial(eval_step, model=model, num_classes=dataset.num_classes,
                             ignore_index=dataset.ignore_index, mean=tuple(config.data.mean),
                             std=tuple(config.data.std))
    if batch_sharding is None:
      self._step = jax.jit(step)
    else:
      self._step = jax.jit(step, in_shardings=(variable_shardings, batch_sharding),
                           out_shardings=(NamedSharding(batch_sharding.mesh, P()),
                                          batch_sharding))
    self._first = None

  def reset(self) -> None:
    super().reset()
    self._first = None

  def inputs(self):
    return pipeline.eval_batches(self.source, self.ops, self.config.data.eval_batch_size,
                                 self.dataset.ignore_index)

  def to_device(self, inputs):
    return device.put(inputs, self.batch_sharding)

  def predict(self, variables, inputs):
    return self._step(variables, inputs)

  def update(self, inputs, outputs) -> None:
    confusion, predictions = outputs
    self.confusion += np.asarray(jax.device_get(confusion), np.int64)
    if self._first is None:
      if self.batch_sharding is not None:
        predictions = pipeline.to_host(predictions)
      self._first = (inputs, np.asarray(predictions))

  def panel(self) -> Optional[np.ndarray]:
    if self._first is None:
      return None
    batch, predictions = self._first
    images, labels = batch["image"], batch["label"]
    if "original_size" in batch:  # show only each example's valid region
      rows = [(x[:r[0], :r[1]], y[:o[0], :o[1]], p[:o[0], :o[1]]) for x, y, p, r, o in zip(
          images, labels, predictions, batch["resized_size"], batch["original_size"])
              if o.min() > 0]  # blank padding examples have size 0
      images, labels, predictions = zip(*rows)
    return visualization.panel(images, labels, predictions, self.dataset.palette,
                               self.dataset.ignore_index, self.config.data.mean,
                               self.config.data.std)


class PerImageSemanticEvaluator(SemanticEvaluator):
  """One image at a time with `SemanticPredictor` (any size, sliding windows, test-time
  augmentation, CRF), scored at the label's original resolution; no panel."""

  def __init__(self, config, dataset, model, progress: bool = True):
    super().__init__(config, dataset)
    self.model, self.progress = model, progress
    self.prepare = per_image.label_pipeline(config, dataset)
    self._count = jax.jit(confusion_matrix, static_argnums=(2, 3))
    self._predictor = None

  def inputs(self):
    source = pipeline.process_slice(self.source)
    for i in tqdm(range(len(source)), unit="image",
                  disable=not self.progress or jax.process_index() != 0):
      yield self.prepare(source[i], np.random.default_rng(0))

  def reset(self) -> None:
    super().reset()
    self._predictor = None  # one per evaluation: the variables change between them

  def predict(self, variables, inputs):
    if self._predictor is None:
      self._predictor = per_image.make_predictor(self.config, self.model, variables,
                                                 self.dataset.num_classes)
    return self._predictor.predict(inputs["image"])

  def update(self, inputs, outputs) -> None:
    self.confusion += np.asarray(self._count(outputs, inputs["label"], self.dataset.num_classes,
                                             self.dataset.ignore_index))

  def result(self) -> Dict[str, Any]:
    confusion = self.confusion
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      confusion = multihost_utils.process_allgather(confusion).sum(0)
    return segmentation_metrics(confusion)


@TASKS.register("semantic")
class SemanticTask(Task):
  """Per-pixel classification into the dataset's classes."""
  name = "semantic"
  train_keys = pipeline.MODEL_KEYS
  optional_train_keys = pipeline.OPTIONAL_TRAIN_KEYS

  def extra_ops(self, config, dataset):
    return [], [transforms.check_labels(num_classes=dataset.num_classes,
                                        ignore_index=dataset.ignore_index)]

  def validate(self, config) -> None:
    super().validate(config)
    if config.inference.mode == "batched" and per_image.crf_options(config) is not None:
      raise ValueError("The dense CRF (--crf, inference.crf) refines one image at a time; "
                       "add --config.inference.mode=whole (or slide).")

  def prediction_config(self, config):
    """"batched" evaluation needs trained-size batches: single images run "whole"."""
    if config.inference.mode != "batched":
      return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.inference.mode = "whole"
    return config

  def objective(self, config, model, dataset) -> Objective:
    class_weights = tuple(config.loss.class_weights) or None
    if class_weights and len(class_weights) != dataset.num_classes:
      raise ValueError(f"loss.class_weights has {len(class_weights)} entries but dataset "
                       f"{dataset.name!r} has {dataset.num_classes} classes.")
    return objective(model=model, ignore_index=dataset.ignore_index,
                     loss_fn=build_loss(config.loss.terms), class_weights=class_weights,
                     aux_weight=config.loss.aux_weight, mean=tuple(config.data.mean),
                     std=tuple(config.data.std))

  def evaluator(self, config, dataset, model, *, variable_shardings=None,
                batch_sharding=None, progress: bool = True) -> Evaluator:
    if config.inference.mode == "batched":
      ops = self.data_ops(config, config.data.eval_ops, dataset)
      return BatchedSemanticEvaluator(config, dataset, model, ops, variable_shardings,
                                      batch_sharding)
    return PerImageSemanticEvaluator(config, dataset, model, progress)

  def predictor(self, config, dataset, model, variables):
    predictor = per_image.make_predictor(config, model, variables, dataset.num_classes)
    return with_lowering(predictor.predict, config.model.conv_lowering)

  def writer(self, output_dir, dataset, model) -> PredictionWriter:
    del model
    return LabelMapWriter(output_dir, dataset)


class LabelMapWriter(PredictionWriter):
  """<stem>.png (a palette PNG whose pixel values are class ids) and <stem>_overlay.jpg."""

  def write(self, prediction, image, stem) -> List[str]:
    labels, palette = np.asarray(prediction), self.dataset.palette
    label_path = str(paths.path(self.output_dir) / f"{stem}.png")
    overlay_path = str(paths.path(self.output_dir) / f"{stem}_overlay.jpg")
    paths.save_image(visualization.label_png(labels, palette), label_path)
    paths.save_image(Image.fromarray(visualization.overlay(
        image, labels, palette, self.dataset.ignore_index)), overlay_path, quality=90)
    return [label_path, overlay_path]
