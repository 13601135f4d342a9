"""Pure, keyword-bound train and eval steps.

`train_step(state, batch, rng, *, model, tx, ...)` and `eval_step` are plain
functions of arrays; the trainer binds the keyword arguments with
`functools.partial` and jits them with explicit shardings.
"""
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax.inference import predict_at_original_size
from segjax.layers import resize_bilinear
from segjax.losses import build_loss
from segjax.metrics import confusion_matrix
from segjax.training.train_state import TrainState


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


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               ignore_index: int, loss_fn: Optional[Callable] = None,
               class_weights: Optional[Tuple[float, ...]] = None,
               aux_weight: float = 0.4) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on a global batch; returns the new state and scalars.

  `loss_fn` is `segjax.losses.build_loss(spec)` (default: cross-entropy). The
  model returns logits, or in training a dict with `logits` and optionally
  `aux_logits`, whose loss (the same terms) is added with weight `aux_weight`.
  A batch may carry `pixel_weights` (e.g. U-Net's weight map) for the terms
  that take them.
  """
  loss_fn = loss_fn or build_loss(DEFAULT_LOSS)
  labels = batch["label"].astype(jnp.int32)
  pixel_weights = batch.get("pixel_weights")
  dropout_rng = jax.random.fold_in(rng, state.step)

  def objective(params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    if not isinstance(outputs, dict):
      outputs = {"logits": outputs}
    logits, targets, weights = align(outputs["logits"], labels, model, pixel_weights)
    loss, terms = loss_fn(logits, targets, ignore_index, class_weights, weights)
    if "aux_logits" in outputs:  # auxiliary head (PSPNet, DeepLabV3): weighted extra loss
      aux_logits, aux_targets, aux_weights = align(outputs["aux_logits"], labels, model,
                                                   pixel_weights)
      aux_loss, _ = loss_fn(aux_logits, aux_targets, ignore_index, class_weights, aux_weights)
      loss += aux_weight * aux_loss
    return loss, (logits, targets, terms, updates)

  (loss, (logits, labels, terms, updates)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates["batch_stats"], opt_state=opt_state)
  valid = labels != ignore_index
  correct = (jnp.argmax(logits, -1) == labels) & valid
  metrics = {"loss": loss, "learning_rate": schedule(state.step),
             "pixel_accuracy": correct.sum() / jnp.maximum(valid.sum(), 1),
             "grad_norm": optax.global_norm(grads)}
  if len(terms) > 1:
    metrics.update({f"loss_{name}": value for name, value in terms.items()})
  return new_state, metrics


def predict(state: TrainState, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Inference-mode logits at the input resolution."""
  return model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                     train=False)


def eval_step(state: TrainState, batch: Dict[str, jax.Array], confusion: jax.Array, *,
              model: nn.Module, num_classes: int, ignore_index: int) -> Tuple[jax.Array, Any]:
  """Adds the batch to the running confusion matrix; also returns predictions.

  With `resized_size` and `original_size` in the batch (a test-time resize that
  kept the labels at their original size) predictions are made at that size.
  """
  logits = predict(state, batch["image"], model=model)
  labels = batch["label"].astype(jnp.int32)
  if "original_size" in batch:
    predictions = predict_at_original_size(logits, batch["resized_size"],
                                           batch["original_size"], labels.shape[1:3])
  else:
    logits, labels, _ = align(logits, labels, model)
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return confusion + confusion_matrix(predictions, labels, num_classes, ignore_index), predictions


def detection_train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
                         model: nn.Module, tx: optax.GradientTransformation,
                         schedule: optax.Schedule,
                         loss_weights: Optional[Dict[str, float]] = None
                         ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step of a two-stage detector (`MaskRCNN`) on a global batch.

  The batch carries `image` and the padded instance rows (`boxes`, `classes`,
  `instance_valid`, optional `is_crowd`, and `masks` or `box_masks`); the loss is
  the weighted sum of the model's losses (weight 1 where `loss_weights` has none).
  """
  loss_weights = dict(loss_weights or {})
  targets = {k: v for k, v in batch.items() if k != "image"}
  sample_rng = jax.random.fold_in(rng, state.step)

  def objective(params):
    losses, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], targets,
        sample_rng, train=True, mutable=["batch_stats"], method="losses")
    total = sum(loss_weights.get(name, 1.0) * value for name, value in losses.items())
    return total, (losses, updates)

  (loss, (losses, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates["batch_stats"], opt_state=opt_state)
  metrics = {"loss": loss, "learning_rate": schedule(state.step),
             "grad_norm": optax.global_norm(grads),
             **{f"loss_{name}": value for name, value in losses.items()}}
  return new_state, metrics

