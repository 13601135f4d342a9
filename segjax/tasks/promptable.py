"""Promptable segmentation (Segment Anything): masks for point and box prompts.

Training fine-tunes SAM on a segjax instance dataset: every instance slot of an image is
one query, prompted (at random, per query) by its box with jitter or by one point drawn
inside its mask; slots without an instance are padding (weight 0), so shapes are static.
The loss is the paper's: 20 x focal + 1 x Dice on the mask logits, plus the MSE of the
IoU head against the IoU of the predicted mask; of the 3 multimask outputs only the one
of lowest mask loss is trained (as the paper does for ambiguous prompts). The image
encoder is frozen unless `model.options.freeze_image_encoder` is False; then it gets
no gradient at all (stop_gradient), and the optimizer leaves it alone.

Images reach the model as uint8 batches and are normalized here, inside the objective and
the predictors, with SAM's pixel mean and std.

The evaluator scores box prompts (each instance's box) and point prompts (one point
inside each instance, the best of 3 masks by predicted IoU) by their mean mask IoU.
predict.py writes the masks of prompts given on the command line, or with none, the
automatic mask generator's masks (COCO RLE JSON) and an overlay.
"""
import json
import os
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from segjax import visualization
from segjax.data import pipeline, transforms
from segjax.inference import sam_automatic, sam_predictor
from segjax.ops import rle
from segjax.tasks.base import (TASKS, Evaluator, Objective, PredictionWriter, Task,
                               finite_scalars)

TRAIN_KEYS = ("image", "boxes", "instance_valid", "masks")
# SAM's automatic mask generator settings (segment_anything's defaults), read from
# config.inference.sam together with the prompts of predict.py.
AUTOMATIC_SETTINGS = dict(
    points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
    stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1, min_mask_region_area=0)
LOSS_DEFAULTS = dict(focal=20.0, dice=1.0, iou=1.0, point_prob=0.5, box_noise=0.1,
                     box_noise_max=20.0)


def inference_settings() -> ml_collections.ConfigDict:
  """config.inference.sam: predict.py's prompts and the automatic generator's settings."""
  return ml_collections.ConfigDict(dict(points="", point_labels="", boxes="", automatic=False,
                                        **AUTOMATIC_SETTINGS))


def loss_settings() -> ml_collections.ConfigDict:
  """config.loss.sam: loss weights and prompt sampling of fine-tuning."""
  return ml_collections.ConfigDict(LOSS_DEFAULTS)


def normalize(model, images):
  """uint8 (or float, unnormalized) [B, H, W, 3] -> SAM's normalized float32 input."""
  mean = jnp.asarray(model.pixel_mean, jnp.float32)
  std = jnp.asarray(model.pixel_std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


# ------------------------------------------------------------------------------ prompts, loss

def sample_prompts(rng, boxes, masks, valid, point_prob: float, noise: float,
                   noise_max: float):
  """One prompt per instance slot: a box or a point inside the mask.

  boxes [B, K, 4] (x0, y0, x1, y1 pixels), masks [B, K, H, W], valid [B, K]. Returns
  (point_coords [B, K, 1, 2], point_valid [B, K, 1], jittered boxes [B, K, 4], box_valid
  [B, K]): each valid slot is a point with probability `point_prob`, else its box with
  each coordinate moved by N(0, noise x its side) clipped to +-noise_max pixels.
  """
  k_kind, k_point, k_noise = jax.random.split(rng, 3)
  b, k, h, w = masks.shape
  use_point = jax.random.uniform(k_kind, (b, k)) < point_prob
  # A uniform pixel of the mask: the largest Gumbel-perturbed score among its pixels.
  score = jax.random.gumbel(k_point, (b, k, h * w))
  flat = masks.reshape(b, k, h * w) > 0
  pixel = jnp.argmax(jnp.where(flat, score, -jnp.inf), axis=-1)
  points = jnp.stack([pixel % w, pixel // w], axis=-1).astype(jnp.float32)[:, :, None]
  has_pixels = jnp.any(flat, axis=-1)
  side = jnp.concatenate([boxes[..., 2:] - boxes[..., :2]] * 2, axis=-1)
  jitter = jnp.clip(jax.random.normal(k_noise, boxes.shape) * noise * side, -noise_max,
                    noise_max)
  limit = jnp.array([w, h, w, h], jnp.float32)
  jittered = jnp.clip(boxes + jitter, 0, limit)
  jittered = jnp.concatenate([jnp.minimum(jittered[..., :2], jittered[..., 2:]),
                              jnp.maximum(jittered[..., :2], jittered[..., 2:])], axis=-1)
  point_valid = (valid & use_point & has_pixels)[..., None]
  box_valid = valid & ~point_valid[..., 0]
  return points, point_valid, jittered, box_valid


def low_res_targets(masks, size: int):
  """Masks [B, K, H, W] (H, W <= 4g x the stride, zero-padded bottom-right to the model's
  image_size = S) -> float targets [B, K, size, size]: the fraction of each cell covered,
  thresholded at 1/2."""
  b, k, h, w = masks.shape
  return masks.reshape(b, k, size, h // size, size, w // size).astype(jnp.float32).mean(
      axis=(3, 5)) > 0.5


def sigmoid_focal(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Mean over pixels of the sigmoid focal loss (Lin et al.), [..., h, w] -> [...]."""
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  a_t = alpha * targets + (1 - alpha) * (1 - targets)
  return jnp.mean(a_t * ce * (1 - p_t) ** gamma, axis=(-2, -1))


def dice_loss(logits, targets, smooth: float = 1.0):
  """1 - soft Dice of sigmoid(logits) and the targets, [..., h, w] -> [...]."""
  p = jax.nn.sigmoid(logits)
  inter = jnp.sum(p * targets, axis=(-2, -1))
  return 1 - (2 * inter + smooth) / (jnp.sum(p, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
                                     + smooth)


def mask_iou(pred, targets):
  """IoU of bool masks [..., h, w] -> [...] (1 where both are empty)."""
  inter = jnp.sum(pred & targets, axis=(-2, -1))
  union = jnp.sum(pred | targets, axis=(-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def pad_to(x, size: int, name: str):
  """[..., H, W] zero-padded bottom-right to [..., size, size], as SAM pads its input."""
  h, w = x.shape[-2:]
  if h > size or w > size:
    raise ValueError(f"SAM with image_size {size} got {name} of {h}x{w}; resize the images' "
                     f"longest side to at most {size} in the data ops.")
  return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, size - h), (0, size - w)])


def objective(*, model, focal: float = 20.0, dice: float = 1.0, iou: float = 1.0,
              point_prob: float = 0.5, box_noise: float = 0.1,
              box_noise_max: float = 20.0) -> Objective:
  """SAM's fine-tuning loss (module docstring) on batches of `TRAIN_KEYS`; micro-batches
  are weighted by their number of valid instances."""
  size = model.mask_input_size

  def fn(params, batch_stats, micro, rng):
    variables = {"params": params}
    images = normalize(model, micro["image"])
    embedding = model.apply(variables, images, method=type(model).embed_image)
    if model.freeze_image_encoder:
      embedding = jax.lax.stop_gradient(embedding)
    valid = micro["instance_valid"]
    boxes = micro["boxes"].astype(jnp.float32)
    masks = micro["masks"]
    points, point_valid, boxes, box_valid = sample_prompts(
        rng, boxes, masks, valid, point_prob, box_noise, box_noise_max)
    low_res, iou_pred = model.apply(
        variables, embedding, point_coords=points, point_labels=jnp.ones(points.shape[:-1],
                                                                         jnp.int32),
        point_valid=point_valid, boxes=boxes, box_valid=box_valid, multimask_output=True,
        method=type(model).decode)  # [B, K, 3, s, s], [B, K, 3]
    targets = low_res_targets(pad_to(masks, model.image_size, "masks"), size)[:, :, None]
    targets = targets.astype(jnp.float32)
    mask_losses = focal * sigmoid_focal(low_res, targets) + dice * dice_loss(low_res, targets)
    best = jnp.argmin(mask_losses, axis=-1)  # [B, K]
    pick = lambda x: jnp.take_along_axis(x, best[..., None], axis=-1)[..., 0]
    mask_loss = pick(mask_losses)
    actual = jax.lax.stop_gradient(mask_iou(low_res > 0, targets > 0.5))
    iou_loss = pick((iou_pred - actual) ** 2)
    weight = valid.astype(jnp.float32)
    count = jnp.sum(weight)
    denom = jnp.maximum(count, 1.0)
    mask_term = jnp.sum(mask_loss * weight) / denom
    iou_term = jnp.sum(iou_loss * weight) / denom
    total = mask_term + iou * iou_term
    sums = {"mask": mask_term * count, "iou": iou_term * count, "instances": count}
    return total, (sums, batch_stats)

  def summarize(sums, micro_batches):
    del micro_batches
    count = jnp.maximum(sums["instances"], 1.0)
    return {"loss_mask": sums["mask"] / count, "loss_iou": sums["iou"] / count}

  return Objective(fn, "instances", summarize)


# --------------------------------------------------------------------------------- evaluator

def first_mask_points(masks):
  """A deterministic point inside each mask [B, K, H, W]: the mask pixel nearest to the
  mask's centroid ((0, 0) for an empty mask), as [B, K, 1, 2] (x, y)."""
  b, k, h, w = masks.shape
  m = masks > 0
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  area = jnp.maximum(jnp.sum(m, axis=(-2, -1)), 1)
  cx = jnp.sum(m * xs, axis=(-2, -1)) / area
  cy = jnp.sum(m * ys, axis=(-2, -1)) / area
  dist = (xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2
  pixel = jnp.argmin(jnp.where(m, dist, jnp.inf).reshape(b, k, h * w), axis=-1)
  return jnp.stack([pixel % w, pixel // w], axis=-1).astype(jnp.float32)[:, :, None]


def eval_ious(variables, batch, *, model):
  """Per instance slot [B, K]: the mask IoU of its box prompt's mask and of its point
  prompt's best mask (at the batch's image size)."""
  from segjax.models.sam import transforms as sam_transforms
  images = normalize(model, batch["image"])
  h, w = images.shape[1:3]
  embedding = model.apply(variables, images, method=type(model).embed_image)
  masks = batch["masks"] > 0
  decode = lambda **prompts: model.apply(variables, embedding, method=type(model).decode,
                                         **prompts)
  up = lambda low: sam_transforms.postprocess_masks(low, (h, w), (h, w), model.image_size)
  box_low, _ = decode(boxes=batch["boxes"].astype(jnp.float32), multimask_output=False)
  box_iou = mask_iou(up(box_low[:, :, 0]) > 0, masks)
  points = first_mask_points(batch["masks"])
  point_low, point_pred = decode(point_coords=points,
                                 point_labels=jnp.ones(points.shape[:-1], jnp.int32))
  best = jnp.argmax(point_pred, axis=-1)[..., None, None, None]
  point_masks = jnp.take_along_axis(point_low, best, axis=2)[:, :, 0]
  point_iou = mask_iou(up(point_masks) > 0, masks)
  return box_iou, point_iou


class PromptEvaluator(Evaluator):
  """Mean mask IoU over the eval split's instances, prompted by box and by one point."""
  table_tag = "prompts"

  def __init__(self, config, dataset, model, ops, variable_shardings=None,
               batch_sharding=None):
    super().__init__(config.model.conv_lowering)
    self.config, self.dataset, self.ops = config, dataset, ops
    self.source = dataset.source(config.data.eval_split)
    self.batch_sharding = batch_sharding
    fn = lambda variables, batch: eval_ious(variables, batch, model=model)
    self._ious = (jax.jit(fn) if batch_sharding is None else
                  jax.jit(fn, in_shardings=(variable_shardings, batch_sharding)))
    self.reset()

  def reset(self):
    self.sums, self.count = np.zeros(2), 0
    self._index = 0

  def inputs(self):
    return pipeline.eval_batches(self.source, self.ops, self.config.data.eval_batch_size,
                                 self.dataset.ignore_index, keys=TRAIN_KEYS)

  def predict(self, variables, inputs):
    batch = (inputs if self.batch_sharding is None
             else pipeline.to_global(inputs, self.batch_sharding))
    return pipeline.to_host(self._ious(variables, batch))

  def update(self, inputs, outputs):
    truth = pipeline.to_host(inputs)
    real, _ = pipeline.eval_slots(self.source, self.config.data.eval_batch_size, self._index)
    self._index += 1
    valid = np.asarray(truth["instance_valid"], bool) & real[:, None]
    box_iou, point_iou = (np.asarray(x) for x in outputs)
    self.sums += [box_iou[valid].sum(), point_iou[valid].sum()]
    self.count += int(valid.sum())

  def result(self) -> Dict[str, Any]:
    n = max(self.count, 1)
    return {"box_mIoU": 100 * self.sums[0] / n, "point_mIoU": 100 * self.sums[1] / n,
            "instances": self.count}

  def table(self, result) -> str:
    return (f"instances {result['instances']}: box prompts mIoU {result['box_mIoU']:.2f}, "
            f"point prompts mIoU {result['point_mIoU']:.2f}")

  def scalars(self, result) -> Dict[str, float]:
    return finite_scalars(result)


# -------------------------------------------------------------------------- predict.py, task

def prompt_edit(points: str = "", point_labels: str = "", boxes: str = "",
                automatic: bool = False):
  """predict.py's SAM prompts as a config edit into config.inference.sam (None when no
  prompt flag is given); the prompts are checked here, before any model loads."""
  if not (points or point_labels or boxes or automatic):
    return None
  if automatic and (points or point_labels or boxes):
    raise ValueError("--automatic segments everything and takes no --points, --point_labels "
                     "or --boxes; give either prompts or --automatic.")
  parsed = sam_predictor.parse_points(points) if points else None
  if point_labels:
    if parsed is None:
      raise ValueError("--point_labels needs --points, one label per point.")
    sam_predictor.parse_labels(point_labels, len(parsed))
  if not automatic:  # the prompt's shape: several boxes take no points
    sam_predictor.prompt_queries(parsed, None,
                                 sam_predictor.parse_boxes(boxes) if boxes else None)

  def edit(config):
    from segjax.tasks.base import task_name
    name = task_name(config)
    if name != "promptable":
      raise ValueError(f"--points, --boxes and --automatic prompt SAM models, but model "
                       f"{config.model.name!r} is a {name} model; drop those flags.")
    if "sam" not in config.inference:
      config.inference.sam = inference_settings()
    config.inference.sam.update(dict(points=points, point_labels=point_labels, boxes=boxes,
                                     automatic=bool(automatic)))
  return edit


class PromptPredictor:
  """image -> the masks of config.inference.sam's prompts, or (none, or `automatic`) the
  automatic mask generator's records."""

  def __init__(self, config, model, variables):
    settings = config.inference.get("sam", inference_settings())
    self.predictor = sam_predictor.SamPredictor(model, variables)
    self.automatic = settings.automatic or not (settings.points or settings.boxes)
    if self.automatic:
      options = {k: settings.get(k, v) for k, v in AUTOMATIC_SETTINGS.items()}
      self.generator = sam_automatic.AutomaticMaskGenerator(self.predictor, **options)
      return
    points = sam_predictor.parse_points(settings.points) if settings.points else None
    labels = (sam_predictor.parse_labels(settings.point_labels, len(points))
              if points is not None and settings.point_labels else None)
    if settings.point_labels and points is None:
      raise ValueError("--point_labels needs --points.")
    boxes = sam_predictor.parse_boxes(settings.boxes) if settings.boxes else None
    self.query = sam_predictor.prompt_queries(points, labels, boxes)[0]
    self.multimask = points is not None and len(points) == 1 and boxes is None

  def __call__(self, image: np.ndarray) -> Dict[str, Any]:
    state = self.predictor.set_image(image)
    if self.automatic:
      return {"records": self.generator.generate(image)}
    masks, iou, _ = self.predictor.predict(state, **self.query,
                                           multimask_output=self.multimask)
    masks, scores = sam_predictor.best_masks(np.asarray(masks) > 0, np.asarray(iou))
    return {"masks": masks, "scores": scores, **{k: np.asarray(v) for k, v in
                                                 self.query.items()}}


class PromptWriter(PredictionWriter):
  """Prompts: <stem>_mask<k>.png (0/255) per prompt and <stem>_overlay.jpg (masks, points,
  boxes). Automatic: <stem>.json (the generator's records, masks as COCO RLE) and
  <stem>_overlay.jpg."""

  def write(self, prediction, image, stem) -> List[str]:
    written = []
    if "records" in prediction:
      records = prediction["records"]
      masks = [r["segmentation"] for r in records]
      out = [{**r, "segmentation": rle.coco_rle(rle.mask_to_rle(r["segmentation"]))}
             for r in records]
      json_path = os.path.join(self.output_dir, f"{stem}.json")
      with open(json_path, "w") as f:
        json.dump(out, f)
      written.append(json_path)
      # Largest first, so that small masks stay visible on top.
      masks = [masks[i] for i in np.argsort([-r["area"] for r in records], kind="stable")]
    else:
      masks = list(prediction["masks"])
      for k, mask in enumerate(masks):
        path = os.path.join(self.output_dir, f"{stem}_mask{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        written.append(path)
    overlay = overlay_masks(image, masks, prediction.get("point_coords"),
                            prediction.get("point_labels"), prediction.get("boxes"))
    path = os.path.join(self.output_dir, f"{stem}_overlay.jpg")
    Image.fromarray(overlay).save(path, quality=90)
    return written + [path]


def overlay_masks(image, masks, points=None, labels=None, boxes=None, alpha: float = 0.5):
  """The image with each mask tinted in its own colour, points (green foreground, red
  background) and boxes drawn."""
  from PIL import ImageDraw
  out = image.astype(np.float32)
  colors = visualization.instance_colors(max(len(masks), 1)).astype(np.float32)
  for mask, color in zip(masks, colors):
    out[mask] = (1 - alpha) * out[mask] + alpha * color
  drawn = Image.fromarray(out.astype(np.uint8))
  draw = ImageDraw.Draw(drawn)
  if points is not None:
    for (x, y), label in zip(points.reshape(-1, 2), labels.reshape(-1)):
      fill = (0, 255, 0) if label == 1 else (255, 0, 0)
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=fill, outline=(255, 255, 255))
  if boxes is not None:
    for box in boxes.reshape(-1, 4):
      draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=2)
  return np.asarray(drawn)


@TASKS.register("promptable")
class PromptableTask(Task):
  """Segment Anything: masks for prompts, and for everything (the automatic generator)."""
  name = "promptable"
  train_keys = TRAIN_KEYS

  def num_classes(self, dataset) -> int:
    del dataset
    return 0  # SAM's masks have no class

  def data_ops(self, config, ops, dataset) -> transforms.Pipeline:
    """Input checks, the configured ops; no normalization (images stay uint8, normalized
    on the device by the objective and predictors)."""
    del config, dataset
    return transforms.compose(transforms.squeeze_labels(), transforms.check_image(), ops)

  def init_from_arch(self, config) -> str:
    """An official SAM file (sam_vit_b_01ec64.pth) converts as its variant's checkpoint."""
    return f"sam_{config.model.options.get('variant', 'vit_b')}"

  def ignored_settings(self, config) -> List[str]:
    ignored = []
    if config.inference.crf.enabled:
      ignored.append("inference.crf.enabled")
    return ignored

  def objective(self, config, model, dataset) -> Objective:
    del dataset
    settings = {**LOSS_DEFAULTS, **dict(config.loss.get("sam", {}))}
    return objective(model=model, **settings)

  def evaluator(self, config, dataset, model, *, variable_shardings=None,
                batch_sharding=None, progress: bool = True) -> Evaluator:
    del progress
    return PromptEvaluator(config, dataset, model,
                           self.data_ops(config, config.data.eval_ops, dataset),
                           variable_shardings, batch_sharding)

  def predictor(self, config, dataset, model, variables):
    del dataset
    return PromptPredictor(config, model, variables)

  def writer(self, output_dir, dataset, model) -> PredictionWriter:
    del model
    return PromptWriter(output_dir, dataset)
