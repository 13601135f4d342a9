"""What eval.py and predict.py do: restore a trained model from its checkpoint,
score it on a split, or label new images.

Evaluation runs in one of the `config.inference.mode`s: "batched" feeds the
eval split through `data.eval_ops` in static batches exactly as training's
evaluation does; "whole" and "slide" run `SemanticPredictor` on one image at a
time at any size (with test-time scales and flips) and score the prediction at
the label's original resolution.
"""
import glob
import json
import os
from typing import Any, Dict, List

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from segjax import visualization
from segjax.data import pipeline
from segjax.data.sources import get_dataset
from segjax.inference import instances, panoptic_eval, per_image
from segjax.metrics.coco import to_coco_results
from segjax.training import checkpointing, optimizers, sharding, trainer

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def restore(config: ml_collections.ConfigDict, checkpoint: str):
  """(dataset, model, state, step, mesh, state shardings) of a trained checkpoint."""
  dataset = get_dataset(config.data.name, config.data.data_dir, config.data.manual_dir)
  mesh = sharding.create_mesh(config.mesh.axes)
  model = trainer.build(config, dataset)
  tx, _ = optimizers.create_optimizer(config.optimizer, config.total_steps,
                                      getattr(model, "frozen_params_mask", None),
                                      config.data.batch_size)
  train_ops = trainer.data_ops(config, config.data.train_ops, dataset)
  example = pipeline.example_shapes(dataset.source(config.data.train_split), train_ops,
                                    ("image",))
  abstract, shardings = trainer.abstract_train_state(model, tx, (1,) + example["image"], mesh,
                                                     sharding.param_rules(config.mesh))
  record = checkpointing.model_record(config.model.name, model.num_classes, abstract.params)
  state, step = checkpointing.restore_state(checkpoint, abstract, record)
  return dataset, model, state, step, mesh, shardings


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        output: str = "") -> Dict[str, Any]:
  """Scores a checkpoint on `data.eval_split`; writes the metrics as JSON to `output`."""
  dataset, model, state, step, mesh, shardings = restore(config, checkpoint)
  if trainer.model_task(config) == "panoptic":
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.batch_axes)
    segment_fn = panoptic_eval.make_segment_fn(model, config, shardings, batch_sharding)
    metrics = panoptic_eval.evaluate(state, segment_fn, dataset, config, model, batch_sharding)
  elif trainer.model_task(config) == "instance":
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.batch_axes)
    detect_fn = instances.make_detect_fn(model, shardings, batch_sharding)
    panel_dir = os.path.dirname(os.path.abspath(output)) if output else None
    metrics = instances.evaluate(state, detect_fn, dataset, config, batch_sharding, panel_dir,
                                 step)
  elif config.inference.mode == "batched":
    if per_image.crf_options(config) is not None:
      raise ValueError("The dense CRF (--crf, inference.crf) refines one image at a time; "
                       "add --config.inference.mode=whole (or slide).")
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.batch_axes)
    replicated = NamedSharding(mesh, P())
    eval_fn = trainer.make_eval_fn(model, dataset, shardings, batch_sharding, replicated)
    panel_dir = os.path.dirname(os.path.abspath(output)) if output else None
    metrics = trainer.evaluate(state, eval_fn, dataset, config, batch_sharding, replicated,
                               panel_dir, step)
  else:
    metrics = per_image.evaluate(config, dataset, model, state)
  metrics = {"step": step, "split": config.data.eval_split, "mode": config.inference.mode,
             **metrics}
  if output and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(_jsonable(metrics, dataset.class_names), f, indent=1)
  return metrics


def _jsonable(metrics: Dict[str, Any], class_names) -> Dict[str, Any]:
  """Scalars as floats (NaN as null), per-class arrays as {class name: value},
  nested dicts (COCO's per iou type) likewise."""
  def number(x):
    return None if np.isnan(x) else float(x)
  out = {}
  for key, value in metrics.items():
    if isinstance(value, np.ndarray) and value.ndim == 1:
      out[key] = {name: number(v) for name, v in zip(class_names, value)}
    elif isinstance(value, (float, np.floating)):
      out[key] = number(value)
    elif isinstance(value, dict):
      out[key] = _jsonable(value, class_names)
    else:
      out[key] = value
  return out


def image_files(path: str) -> List[str]:
  """`path` itself if it is an image, else the images directly inside it, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ValueError(f"--input {path} is neither an image nor a folder.")
  files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"--input folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
  return files


def read_image(path: str) -> np.ndarray:
  """An RGB uint8 image, or a ValueError naming a file that is not one."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError) as e:
    raise ValueError(f"Cannot read {path} as an image ({e}); is it a corrupt or "
                     "non-image file?") from e


def predict_files(config: ml_collections.ConfigDict, checkpoint: str, input_path: str,
                  output_dir: str) -> List[str]:
  """Labels every input image; writes <stem>.png (class ids, palette) and
  <stem>_overlay.jpg to `output_dir` (instance models: <stem>.json and
  <stem>_instances.jpg, see `predict_instances`); returns the written paths."""
  files = image_files(input_path)
  dataset, model, state, _, _, _ = restore(config, checkpoint)
  if trainer.model_task(config) == "instance":
    return predict_instances(config, dataset, model, state, files, output_dir)
  if trainer.model_task(config) == "panoptic":
    return panoptic_eval.predict_files(config, dataset, model, state, files, output_dir,
                                       read_image)
  predictor = per_image.make_predictor(config, model, state, dataset.num_classes)
  os.makedirs(output_dir, exist_ok=True)
  written = []
  for path in tqdm(files, unit="image"):
    image = read_image(path)
    labels = np.asarray(predictor.predict(image))
    stem = os.path.splitext(os.path.basename(path))[0]
    label_path = os.path.join(output_dir, f"{stem}.png")
    overlay_path = os.path.join(output_dir, f"{stem}_overlay.jpg")
    visualization.label_png(labels, dataset.palette).save(label_path)
    Image.fromarray(visualization.overlay(image, labels, dataset.palette, dataset.ignore_index)).save(
        overlay_path, quality=90)
    written += [label_path, overlay_path]
  return written


def predict_instances(config: ml_collections.ConfigDict, dataset, model, state,
                      files: List[str], output_dir: str,
                      score_threshold: float = 0.5) -> List[str]:
  """Detects instances in every file; writes <stem>.json (the COCO results format: boxes
  [x, y, w, h], scores, category names and RLE masks, every detection) and
  <stem>_instances.jpg (masks, boxes and labels of detections scoring >= score_threshold)."""
  os.makedirs(output_dir, exist_ok=True)
  names = [dataset.class_names[c] for c in dataset.thing_classes]
  written = []
  detector = instances.ImageDetector(config, model, state)
  for path in tqdm(files, unit="image"):
    image = read_image(path)
    found = detector(image)
    stem = os.path.splitext(os.path.basename(path))[0]
    masks = found.get("masks")
    results = to_coco_results(
        [0], found["boxes"][None], found["scores"][None], found["classes"][None],
        None if masks is None else masks[None], found["valid"][None],
        category_ids=range(len(names)))
    for result in results:
      result.pop("image_id")
      result["category"] = names[result.pop("category_id")]
    json_path = os.path.join(output_dir, f"{stem}.json")
    with open(json_path, "w") as f:
      json.dump(results, f)
    drawn_path = os.path.join(output_dir, f"{stem}_instances.jpg")
    Image.fromarray(instances.draw(image, {k: v[None] for k, v in found.items()}, 0, dataset,
                                   score_threshold)).save(drawn_path, quality=90)
    written += [json_path, drawn_path]
  return written
