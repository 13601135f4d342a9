"""Instance segmentation: detected objects with boxes, classes, scores and masks
(Faster / Mask R-CNN).

The model predicts the dataset's thing classes (0-based thing indices); it trains on the
weighted sum of its own losses and is scored with COCO box and mask AP by pycocotools
against ground truth built from the eval split.
"""
import json
from typing import Any, Dict, List

import ml_collections
import numpy as np
from PIL import Image

from segjax import paths
from segjax.data import device, pipeline
from segjax.data import transforms
from segjax.data.sources import DatasetSpec
from segjax.inference import instances
from segjax.metrics.coco import (GroundTruthBuilder, IOU_TYPES, coco_evaluate, format_coco_table,
                                 to_coco_results)
from segjax.tasks.base import (TASKS, Evaluator, Objective, PredictionWriter, Task,
                               finite_scalars, float32_tree, with_lowering)
from segjax.tasks.semantic import DEFAULT_LOSS

EVAL_OPTIONAL_KEYS = ("is_crowd", "masks")


def objective(*, model, loss_weights: Dict[str, float], mean=device.IMAGENET_MEAN,
              std=device.IMAGENET_STD) -> Objective:
  """The weighted sum of a two-stage detector's losses (weight 1 where `loss_weights`
  has none). The batch carries `image` (uint8, normalized on the device with `mean` /
  `std`) and the padded instance rows (`boxes`, `classes`, `instance_valid`, optional
  `is_crowd`, and `masks` or `box_masks`). Micro-batches weigh the same."""
  loss_weights = dict(loss_weights)

  def fn(params, batch_stats, micro, rng):
    targets = {k: v for k, v in micro.items() if k != "image"}
    images = device.normalize(micro["image"], mean, std)
    losses, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, targets, rng,
        train=True, mutable=["batch_stats"], method="losses")
    losses = float32_tree(losses)
    total = sum(loss_weights.get(name, 1.0) * value for name, value in losses.items())
    return total, (losses, updates["batch_stats"])

  def summarize(sums, count):
    return {f"loss_{name}": value / count for name, value in sums.items()}

  return Objective(fn, None, summarize)


def thing_ops(dataset: DatasetSpec) -> List[Any]:
  """Class ids -> thing indices, unless they are the same already."""
  things = tuple(dataset.thing_classes)
  return [transforms.thing_classes(ids=things)] if things != tuple(range(len(things))) else []


class CocoInstanceEvaluator(Evaluator):
  """COCO box (and mask) AP of detections on `data.eval_split`.

  Ground truth comes from the eval records after `data.eval_ops` (thing classes only;
  an image's id is its index in the split + 1). The result is `coco_evaluate`'s
  {"bbox": {...}, "segm": {...}} plus flat "bbox_AP", "segm_AP", ... entries; the panel
  shows the first images' detections where they share the images' frame.
  """
  table_tag = "coco"

  def __init__(self, config, dataset, model, ops, variable_shardings=None,
               batch_sharding=None):
    super().__init__(config.model.conv_lowering)
    self.config, self.dataset, self.ops = config, dataset, ops
    self.source = dataset.source(config.data.eval_split)
    self.batch_sharding = batch_sharding
    self._detect = instances.make_detect_fn(model, variable_shardings, batch_sharding,
                                            config.data.mean, config.data.std)
    self.reset()

  def reset(self) -> None:
    self.gt = GroundTruthBuilder([self.dataset.class_names[c]
                                  for c in self.dataset.thing_classes])
    self.results, self.with_masks, self._first, self._index = [], False, None, 0

  def inputs(self):
    return pipeline.eval_batches(self.source, self.ops, self.config.data.eval_batch_size,
                                 self.dataset.ignore_index, keys=pipeline.INSTANCE_KEYS,
                                 optional_keys=EVAL_OPTIONAL_KEYS)

  def to_device(self, inputs):
    return device.put(inputs, self.batch_sharding)

  def predict(self, variables, inputs):
    return pipeline.to_host(self._detect(variables, inputs))

  def update(self, inputs, outputs) -> None:
    truth = pipeline.to_host(inputs)
    real, index = pipeline.eval_slots(self.source, self.config.data.eval_batch_size,
                                      self._index)
    self._index += 1
    image_ids = index + 1
    frame = truth["masks"].shape[2:4] if "masks" in truth else truth["image"].shape[1:3]
    image_sizes = truth.get("original_size", np.tile(frame, (len(real), 1)))
    for b in np.flatnonzero(real):
      self.gt.add(int(image_ids[b]), int(image_sizes[b][0]), int(image_sizes[b][1]),
                  truth["boxes"][b], truth["classes"][b],
                  truth["masks"][b] if "masks" in truth else None,
                  truth["is_crowd"][b] if "is_crowd" in truth else None,
                  truth["instance_valid"][b])
    self.with_masks = "masks" in outputs and "masks" in truth
    self.results += to_coco_results(
        image_ids, outputs["boxes"], outputs["scores"], outputs["classes"],
        outputs["masks"] if self.with_masks else None, outputs["valid"] & real[:, None],
        category_ids=self.gt.category_ids,
        image_sizes=image_sizes if self.with_masks else None)
    if self._first is None:
      self._first = (inputs, outputs)

  def result(self) -> Dict[str, Any]:
    metrics = coco_evaluate(self.gt.to_dict(), self.results,
                            IOU_TYPES if self.with_masks else ("bbox",))
    for iou_type, summary in list(metrics.items()):
      metrics.update({f"{iou_type}_{k}": v for k, v in summary.items() if k != "per_class"})
    return metrics

  def table(self, result: Dict[str, Any]) -> str:
    return format_coco_table({k: v for k, v in result.items() if isinstance(v, dict)})

  def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
    return finite_scalars(result)  # NaN: no such ground truth

  def panel(self):
    # Only where detections and images share a frame (no test-time resize).
    if self._first is None or "original_size" in self._first[0]:
      return None
    return instances.panel(self._first[0], self._first[1], self.dataset, self.config)


class DetectionTask(Task):
  """What instance and panoptic models share: thing classes, instance batches, the
  detector's own losses, batched evaluation only."""
  train_keys = pipeline.INSTANCE_KEYS
  optional_train_keys = pipeline.OPTIONAL_INSTANCE_KEYS

  def num_classes(self, dataset: DatasetSpec) -> int:
    if not dataset.thing_classes:
      raise ValueError(f"This model detects instances, but dataset {dataset.name!r} has no "
                       "instance annotations; use a dataset with objects (segjax_shapes, "
                       "coco_instances, coco_panoptic, cityscapes).")
    return len(dataset.thing_classes)

  def ignored_settings(self, config: ml_collections.ConfigDict) -> List[str]:
    ignored = []
    if config.inference.mode != "batched":
      ignored.append(f"inference.mode={config.inference.mode!r} (detectors evaluate in "
                     "batches and label any image size)")
    if config.inference.crf.enabled:
      ignored.append("inference.crf.enabled")
    if tuple(config.loss.class_weights):
      ignored.append("loss.class_weights")
    if [dict(t) for t in config.loss.terms] != [dict(t) for t in DEFAULT_LOSS]:
      ignored.append("loss.terms (detectors weigh their own losses with loss.detection)")
    return ignored

  def extra_ops(self, config, dataset):
    return thing_ops(dataset), []

  def objective(self, config, model, dataset) -> Objective:
    return objective(model=model, loss_weights=dict(config.loss.detection),
                     mean=tuple(config.data.mean), std=tuple(config.data.std))


@TASKS.register("instance")
class InstanceTask(DetectionTask):
  """Objects of the dataset's thing classes, each with a box, score and mask."""
  name = "instance"

  def evaluator(self, config, dataset, model, *, variable_shardings=None,
                batch_sharding=None, progress: bool = True) -> Evaluator:
    del progress
    return CocoInstanceEvaluator(config, dataset, model,
                                 self.data_ops(config, config.data.eval_ops, dataset),
                                 variable_shardings, batch_sharding)

  def predictor(self, config, dataset, model, variables):
    return with_lowering(instances.ImageDetector(config, model, variables),
                         config.model.conv_lowering)

  def writer(self, output_dir, dataset, model) -> PredictionWriter:
    del model
    return DetectionWriter(output_dir, dataset)


class DetectionWriter(PredictionWriter):
  """<stem>.json (the COCO results format: boxes [x, y, w, h], scores, category names
  and RLE masks, every detection) and <stem>_instances.jpg (masks, boxes and labels of
  detections scoring >= score_threshold)."""
  score_threshold = 0.5

  def write(self, prediction, image, stem) -> List[str]:
    dataset = self.dataset
    names = [dataset.class_names[c] for c in dataset.thing_classes]
    masks = prediction.get("masks")
    results = to_coco_results(
        [0], prediction["boxes"][None], prediction["scores"][None],
        prediction["classes"][None], None if masks is None else masks[None],
        prediction["valid"][None], category_ids=range(len(names)))
    for result in results:
      result.pop("image_id")
      result["category"] = names[result.pop("category_id")]
    json_path = str(paths.path(self.output_dir) / f"{stem}.json")
    paths.write_text(json_path, json.dumps(results))
    drawn_path = str(paths.path(self.output_dir) / f"{stem}_instances.jpg")
    drawn = instances.draw(image, {k: v[None] for k, v in prediction.items()}, 0, dataset,
                           self.score_threshold)
    paths.save_image(Image.fromarray(drawn), drawn_path, quality=90)
    return [json_path, drawn_path]
