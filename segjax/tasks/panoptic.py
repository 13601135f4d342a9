"""Panoptic segmentation: every pixel a stuff class or one thing instance (Panoptic FPN,
UPSNet-style parameter-free fusion).

The model detects thing instances and labels stuff per pixel; its losses are the
detector's plus the semantic branch's. The fused segment maps are scored with
panopticapi's PQ/SQ/RQ against the eval split's panoptic annotations, and predict.py
writes COCO panoptic PNGs plus one predictions.json.
"""
import json
from typing import Any, Dict, List

import numpy as np

from segjax import paths
from segjax.data import device, pipeline
from segjax.data import transforms
from segjax.inference import panoptic_eval
from segjax.inference.panoptic import write_coco_panoptic
from segjax.metrics.panoptic import PQAccumulator, format_pq_table, rgb_to_id
from segjax.tasks.base import TASKS, Evaluator, PredictionWriter, finite_scalars, with_lowering
from segjax.tasks.instance import DetectionTask


class PQEvaluator(Evaluator):
  """PQ/SQ/RQ (All, Things, Stuff, per class) of the fused segment maps on
  `data.eval_split`, scored against each image's panoptic annotation at its original
  size (panopticapi's `pq_compute`)."""
  table_tag = "pq"

  def __init__(self, config, dataset, model, ops, variable_shardings=None,
               batch_sharding=None):
    super().__init__(config.model.conv_lowering)
    self.config, self.dataset, self.model, self.ops = config, dataset, model, ops
    self.source = dataset.source(config.data.eval_split)
    self.batch_sharding = batch_sharding
    self._segment = panoptic_eval.make_segment_fn(model, config, variable_shardings,
                                                  batch_sharding)
    self.reset()

  def reset(self) -> None:
    self.accumulator = PQAccumulator(panoptic_eval.categories(self.dataset))
    self._index = 0

  def inputs(self):
    return pipeline.eval_batches(self.source, self.ops, self.config.data.eval_batch_size,
                                 self.dataset.ignore_index, keys=panoptic_eval.EVAL_KEYS,
                                 optional_keys=("segment_is_crowd",))

  def to_device(self, inputs):
    return device.put(inputs["image"], self.batch_sharding)

  def predict(self, variables, inputs):
    return pipeline.to_host(self._segment(variables, inputs))

  def update(self, inputs, outputs) -> None:
    truth = pipeline.to_host({k: v for k, v in inputs.items() if k != "image"})
    real, index = pipeline.eval_slots(self.source, self.config.data.eval_batch_size,
                                      self._index)
    self._index += 1
    for b in np.flatnonzero(real):
      crowd = truth.get("segment_is_crowd")
      gt = [{"id": int(s), "category_id": int(c), "iscrowd": int(crowd[b][k]) if crowd is not None
             else 0}
            for k, (s, c, v) in enumerate(zip(truth["segment_ids"][b],
                                               truth["segment_classes"][b],
                                               truth["segment_valid"][b])) if v]
      gt_ids = rgb_to_id(truth["panoptic"][b])
      segments = outputs["segments"][b]
      if "original_size" in truth:  # a test-time resize: back to the annotation's frame
        segments = panoptic_eval.at_original_size(segments, truth["resized_size"][b],
                                                  truth["original_size"][b], gt_ids.shape)
      _, info = panoptic_eval.predicted_segments(segments, outputs["classes"][b],
                                                 outputs["scores"][b], self.model)
      self.accumulator.add(gt_ids, gt, segments, info, image_id=int(index[b]))

  def result(self) -> Dict[str, Any]:
    result = self.accumulator.result()
    metrics = {"pq": result, "categories": panoptic_eval.categories(self.dataset)}
    for group, short in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
      for key in ("pq", "sq", "rq"):
        metrics[f"{key.upper()}{short}"] = result[group][key]
    return metrics

  def table(self, result: Dict[str, Any]) -> str:
    return format_pq_table(result["pq"], result["categories"])

  def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
    return finite_scalars(result)


class PanopticSegmenter:
  """One RGB uint8 image -> (segment map [H, W], classes, scores) at its own size."""

  def __init__(self, config, model, variables):
    self._segment = panoptic_eval.make_segment_fn(model, config)
    self._variables = variables

  def __call__(self, image: np.ndarray) -> Dict[str, np.ndarray]:
    h, w = image.shape[:2]
    # Padded to a multiple of 32 with zeros after normalization (on the device).
    found = pipeline.to_host(self._segment(self._variables, *device.pad_image(image)))
    return {"segments": found["segments"][0, :h, :w], "classes": found["classes"][0],
            "scores": found["scores"][0]}


class PanopticWriter(PredictionWriter):
  """<stem>.png (COCO panoptic ids as RGB) per image and `predictions.json`
  ({"annotations", "categories"}, the prediction JSON `pq_compute` reads)."""

  def __init__(self, output_dir, dataset, model):
    super().__init__(output_dir, dataset)
    self.model, self.annotations = model, []

  def write(self, prediction, image, stem) -> List[str]:
    del image
    png, info = panoptic_eval.predicted_segments(prediction["segments"], prediction["classes"],
                                                 prediction["scores"], self.model)
    self.annotations.append(write_coco_panoptic(self.output_dir, f"{stem}.png", png, info,
                                                image_id=stem))
    return [str(paths.path(self.output_dir) / f"{stem}.png")]

  def close(self) -> List[str]:
    path = str(paths.path(self.output_dir) / "predictions.json")
    paths.write_text(path, json.dumps({"annotations": self.annotations,
                                       "categories": panoptic_eval.categories(self.dataset)}))
    return [path]


@TASKS.register("panoptic")
class PanopticTask(DetectionTask):
  """Thing instances and stuff regions, fused into one segment map per image."""
  name = "panoptic"
  train_keys = pipeline.INSTANCE_KEYS + ("label",)

  def model_options(self, config, dataset) -> Dict[str, Any]:
    return {"thing_classes": tuple(dataset.thing_classes),
            "stuff_classes": panoptic_eval.stuff_classes(dataset),
            "ignore_index": dataset.ignore_index}

  def extra_ops(self, config, dataset):
    before, after = super().extra_ops(config, dataset)
    if config.model.options.get("fusion", "heuristic") == "heuristic":
      after = after + [transforms.panoptic_semantic(
          stuff_classes=panoptic_eval.stuff_classes(dataset), ignore_index=dataset.ignore_index)]
    return before, after

  def evaluator(self, config, dataset, model, *, variable_shardings=None,
                batch_sharding=None, progress: bool = True) -> Evaluator:
    del progress
    return PQEvaluator(config, dataset, model,
                       self.data_ops(config, config.data.eval_ops, dataset),
                       variable_shardings, batch_sharding)

  def predictor(self, config, dataset, model, variables):
    return with_lowering(PanopticSegmenter(config, model, variables), config.model.conv_lowering)

  def writer(self, output_dir, dataset, model) -> PredictionWriter:
    return PanopticWriter(output_dir, dataset, model)
