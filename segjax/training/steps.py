"""Pure, keyword-bound train and eval steps.

`train_step(state, batch, rng, *, model, tx, ...)` and `eval_step` are plain
functions of arrays; the trainer binds the keyword arguments with
`functools.partial` and jits them with explicit shardings.
"""
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax.inference import predict_at_original_size
from segjax.layers import resize_bilinear
from segjax.losses import pixel_cross_entropy
from segjax.metrics import confusion_matrix
from segjax.training.train_state import TrainState


def align(logits: jax.Array, labels: jax.Array, model: nn.Module) -> Tuple[jax.Array, jax.Array]:
  """Logits and labels of the same size: a model whose output covers only the
  central region (unpadded convolutions, e.g. `unet_valid`) gets its labels
  center-cropped; other logits are resized bilinearly to the labels."""
  size = labels.shape[1:3]
  if tuple(logits.shape[1:3]) == tuple(size):
    return logits, labels
  if getattr(model, "output_is_center_crop", False):
    top, left = (size[0] - logits.shape[1]) // 2, (size[1] - logits.shape[2]) // 2
    return logits, labels[:, top:top + logits.shape[1], left:left + logits.shape[2]]
  return resize_bilinear(logits, size, align_corners=False), labels


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               ignore_index: int, class_weights: Optional[Tuple[float, ...]] = None,
               aux_weight: float = 0.4) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on a global batch; returns the new state and scalars.

  The model returns logits, or in training a dict with `logits` and optionally
  `aux_logits`, whose loss is added with weight `aux_weight`.
  """
  labels = batch["label"].astype(jnp.int32)
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    if not isinstance(outputs, dict):
      outputs = {"logits": outputs}
    logits, targets = align(outputs["logits"], labels, model)
    loss = pixel_cross_entropy(logits, targets, ignore_index, class_weights)
    if "aux_logits" in outputs:  # auxiliary head (PSPNet, DeepLabV3): weighted extra loss
      aux_logits, aux_targets = align(outputs["aux_logits"], labels, model)
      loss += aux_weight * pixel_cross_entropy(aux_logits, aux_targets, ignore_index,
                                               class_weights)
    return loss, (logits, targets, updates)

  (loss, (logits, labels, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates["batch_stats"], opt_state=opt_state)
  valid = labels != ignore_index
  correct = (jnp.argmax(logits, -1) == labels) & valid
  metrics = {"loss": loss, "learning_rate": schedule(state.step),
             "pixel_accuracy": correct.sum() / jnp.maximum(valid.sum(), 1),
             "grad_norm": optax.global_norm(grads)}
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
    logits, labels = align(logits, labels, model)
    predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return confusion + confusion_matrix(predictions, labels, num_classes, ignore_index), predictions
