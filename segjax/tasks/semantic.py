"""Semantic segmentation: a class for every pixel (FCN, SegNet, U-Net, PSPNet, DeepLab...).

Trained with the configured per-pixel loss terms (plus an auxiliary head's, weighted),
scored with mmseg's metrics from a confusion matrix: in static batches through
`data.eval_ops` (inference.mode "batched"), one image at a time at its original
size (modes "whole" and "slide", `SemanticPredictor`), or whole-image in batches of
one size bucket each (mode "whole" with `inference.size_divisor` or
`inference.buckets`, `BucketedSemanticEvaluator`).
"""
import functools
from typing import Any, Dict, List, Optional

import cv2
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from absl import logging
from PIL import Image
from tqdm import tqdm

from segjax import paths, visualization
from segjax.data import device, pipeline
from segjax.data import transforms
from segjax.data.sources import DatasetSpec
from segjax.inference import buckets as buckets_lib
from segjax.inference import per_image, predict_at_original_size
from segjax.inference.semantic import resized_size
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


class BucketedSemanticEvaluator(SemanticEvaluator):
  """Whole-image evaluation at each image's original resolution, as
  `PerImageSemanticEvaluator` computes it, but in batches of `data.eval_batch_size`
  images of one size bucket (segjax/inference/buckets.py; a bucket's last batch at the
  smallest power of two that holds it): every image is resized as
  `inference.scale` says, padded bottom/right to its bucket (zeros after
  normalization, as `SemanticPredictor` pads) and the logits of its valid region are
  resized back to its original size. One model program is compiled per (batch size,
  bucket) and one scoring program per (batch size, bucket, label canvas); both counts
  are logged. With
  `size_divisor=1` nothing is padded and the predictions are the exact-shapes
  per-image path's (mmseg's); with `size_divisor=32` they are the padded whole-image
  path's. No panel.
  """

  def __init__(self, config, dataset, model, progress: bool = True, batch_sharding=None):
    super().__init__(config, dataset)
    inference = config.inference
    self.buckets = buckets_lib.Buckets(inference.size_divisor, tuple(inference.buckets))
    self.scale = tuple(inference.scale) if min(inference.scale) > 0 else None
    self.batch_size = pipeline.local_batch_size(config.data.eval_batch_size)
    self.prepare = per_image.label_pipeline(config, dataset)
    self.progress = progress
    # One process: batches are split over the mesh's batch axis (every process has its
    # own plan, so several processes each evaluate on their own devices' copy).
    self.batch_sharding = batch_sharding if jax.process_count() == 1 else None
    self.plan: Optional[List[buckets_lib.Batch]] = None
    self.compiled = set()  # ("model", B, h, w) and ("score", B, h, w, canvas h, w)
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    num_classes, ignore_index = dataset.num_classes, dataset.ignore_index

    def forward(variables, images, valid):
      x = device.normalize(images, mean, std, extent=valid)  # zeros beyond each image
      logits = model.apply(variables, x, train=False)
      expected = images.shape[:3] + (num_classes,)
      if tuple(logits.shape) != expected:
        raise ValueError(f"{type(model).__name__} gave logits of shape {logits.shape} for "
                         f"inputs {images.shape}; bucketed evaluation expects {expected} "
                         "(logits at the input size); use inference.mode=slide.")
      return logits.astype(jnp.float32)

    def score(logits, valid, original, labels):
      predictions = predict_at_original_size(logits, valid, original, labels.shape[1:3])
      return confusion_matrix(predictions, labels.astype(jnp.int32), num_classes,
                              ignore_index)

    self._forward, self._score = jax.jit(forward), jax.jit(score)

  def _example(self, record):
    """The record's labels at the original size and its image resized for the model."""
    example = self.prepare(record, np.random.default_rng(0))
    image = example["image"]
    height, width = image.shape[:2]
    size = resized_size(height, width, self.scale)
    if size != (height, width):
      image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
    return {"image": image, "label": example["label"]}

  def _make_plan(self, source) -> List[buckets_lib.Batch]:
    """The batches of this process's records, from their image sizes (read once per
    evaluator: the split does not change between evaluations)."""
    shapes = grain.MapDataset.source(source).map(lambda r: np.shape(r["image"])[:2])
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    sizes = [resized_size(h, w, self.scale) for h, w in shapes.to_iter_dataset(read)]
    batches = buckets_lib.plan(sizes, self.buckets, self.batch_size)
    real = sum(h * w for h, w in sizes)
    padded = buckets_lib.padded_pixels(batches)
    logging.info("Bucketed evaluation: %d images in %d batches of %d over %d size buckets; "
                 "the model sees %.2fx the images' pixels.", len(sizes), len(batches),
                 self.batch_size, len({b.shape for b in batches}), padded / max(real, 1))
    return batches

  def inputs(self):
    source = pipeline.process_slice(self.source)
    if self.plan is None:
      self.plan = self._make_plan(source)
    order = [i for batch in self.plan for i in batch.indices]
    examples = grain.MapDataset.source(order).map(lambda i: self._example(source[i]))
    it = iter(examples.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                         prefetch_buffer_size=8)))
    for batch in tqdm(self.plan, unit="batch",
                      disable=not self.progress or jax.process_index() != 0):
      yield self._assemble(batch, [next(it) for _ in batch.indices])

  def _assemble(self, batch, examples) -> Dict[str, np.ndarray]:
    """The planned `batch`: images padded to its bucket, labels (ignore_index beyond each
    image) to a canvas holding the largest original size rounded up to 128; blank slots
    (size 0, labels all ignored) fill a partial batch."""
    size, shape = batch.slots, batch.shape
    canvas = tuple(buckets_lib.round_up(max(e["label"].shape[i] for e in examples), 128)
                   for i in (0, 1))
    label_dtype = examples[0]["label"].dtype
    if not np.can_cast(np.min_scalar_type(self.dataset.ignore_index), label_dtype):
      label_dtype = np.int32
    arrays = {"image": np.zeros((size,) + tuple(shape) + (3,), np.uint8),
             "label": np.full((size,) + canvas, self.dataset.ignore_index, label_dtype),
             "valid": np.zeros((size, 2), np.int32),
             "original_size": np.zeros((size, 2), np.int32)}
    for j, example in enumerate(examples):
      (h, w), (oh, ow) = example["image"].shape[:2], example["label"].shape
      arrays["image"][j, :h, :w] = example["image"]
      arrays["label"][j, :oh, :ow] = example["label"]
      arrays["valid"][j], arrays["original_size"][j] = (h, w), (oh, ow)
    return arrays

  def predict(self, variables, inputs):
    slots = inputs["image"].shape[0]
    if self.batch_sharding is not None and slots % self.batch_sharding.mesh.size == 0:
      inputs = jax.device_put(inputs, self.batch_sharding)
    model, canvas = inputs["image"].shape[:3], inputs["label"].shape[1:3]
    self.compiled.update({("model",) + model, ("score",) + model + canvas})
    logits = self._forward(variables, inputs["image"], inputs["valid"])
    return self._score(logits, inputs["valid"], inputs["original_size"], inputs["label"])

  def update(self, inputs, outputs) -> None:
    self.confusion += np.asarray(jax.device_get(outputs), np.int64)

  def result(self) -> Dict[str, Any]:
    models = sum(key[0] == "model" for key in self.compiled)
    bound = self.buckets.bound
    logging.info("Bucketed evaluation: %d model shapes compiled (%s buckets, batch sizes "
                 "%s), %d scoring shapes.", models,
                 f"at most {bound}" if bound else "one per distinct resized size",
                 sorted({key[1] for key in self.compiled}), len(self.compiled) - models)
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
    inference = config.inference
    if inference.get("size_divisor", 0) or inference.get("buckets", ()):
      buckets_lib.Buckets(inference.size_divisor, tuple(inference.buckets))
      if inference.exact_shapes and (inference.buckets or inference.size_divisor != 1):
        raise ValueError("inference.exact_shapes runs the model on unpadded images: with it "
                         "use inference.size_divisor=1 and no inference.buckets, or set "
                         "exact_shapes=False to pad to buckets.")

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
    if bucketed(config):
      return BucketedSemanticEvaluator(config, dataset, model, progress, batch_sharding)
    if config.inference.mode == "whole" and (config.inference.size_divisor or
                                             config.inference.buckets):
      logging.info("Test-time augmentation and the CRF run one image at a time: "
                   "inference.size_divisor / inference.buckets are not used.")
    return PerImageSemanticEvaluator(config, dataset, model, progress)

  def predictor(self, config, dataset, model, variables):
    predictor = per_image.make_predictor(config, model, variables, dataset.num_classes)
    return with_lowering(predictor.predict, config.model.conv_lowering)

  def writer(self, output_dir, dataset, model) -> PredictionWriter:
    del model
    return LabelMapWriter(output_dir, dataset)


def bucketed(config) -> bool:
  """Whether evaluation batches whole images by size bucket (`BucketedSemanticEvaluator`):
  inference.size_divisor or inference.buckets set, in whole mode, one pass without CRF
  (test-time augmentation and the CRF stay one image at a time, with the same results)."""
  inference = config.inference
  return (bool(inference.get("size_divisor", 0) or inference.get("buckets", ()))
          and inference.mode == "whole" and not inference.flip
          and tuple(inference.scales) == (1.0,) and per_image.crf_options(config) is None)


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
