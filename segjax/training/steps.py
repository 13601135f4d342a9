"""Pure, keyword-bound train and eval steps.

`train_step(state, batch, rng, *, model, tx, ...)` and `eval_step` are plain
functions of arrays; the trainer binds the keyword arguments with
`functools.partial` and jits them with explicit shardings.
"""
import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax.inference import predict_at_original_size
from segjax.layers import conv_lowering, norm, remat, resize_bilinear
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


@contextlib.contextmanager
def _training_context(bn_groups: int, remat_policy: str,
                      conv_lowering_mode: str) -> Iterator[None]:
  """The trace-time settings of a train step's forward pass: BatchNorm groups, remat policy
  and the convolutions' lowering."""
  with (norm.batch_statistics(bn_groups), remat.rematerialization(remat_policy),
        conv_lowering.lowering(conv_lowering_mode)):
    yield


def micro_batches(batch: Dict[str, jax.Array], count: int) -> Dict[str, jax.Array]:
  """[B, ...] -> [count, B / count, ...], micro-batch i holding rows i, i + count, ...

  Strided rather than contiguous, so that each micro-batch of a batch sharded
  over devices in contiguous blocks still has rows on every device (each device's
  rows stay together, which keeps per-device BatchNorm groups per device).
  """
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"A batch of {x.shape[0]} examples cannot be split into "
                       f"{count} micro-batches (optimizer.accumulation_steps); make the batch "
                       "size a multiple of it.")
    return x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(objective: Callable, params, batch_stats, batch, rng: jax.Array,
                         count: int, weight_key: Optional[str] = None):
  """Loss, summed extras, BatchNorm statistics and gradients of `objective` over
  `count` micro-batches of `batch`.

  `objective(params, batch_stats, micro_batch, rng)` returns (loss, (sums,
  new_batch_stats)), `sums` being a dict of additive quantities. Each micro-batch
  is weighted by `sums[weight_key]` (its number of valid label pixels, for a
  per-pixel mean loss; equal weights without a key), so the result is the
  gradient of the whole batch's mean loss; BatchNorm statistics are those of
  each micro-batch in turn, as in PyTorch. Only one micro-batch's activations are
  alive at a time.
  """
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if count == 1:
    (loss, (sums, batch_stats)), grads = grad_fn(params, batch_stats, batch, rng)
    return loss, sums, batch_stats, grads

  def body(carry, inputs):
    index, micro = inputs
    grads_sum, loss_sum, weight_sum, sums_sum, stats = carry
    (loss, (sums, stats)), grads = grad_fn(params, stats, micro, jax.random.fold_in(rng, index))
    weight = (sums[weight_key] if weight_key else jnp.ones(())).astype(jnp.float32)
    grads_sum = jax.tree.map(lambda a, g: a + weight * g, grads_sum, grads)
    sums_sum = jax.tree.map(jnp.add, sums_sum, sums)
    return (grads_sum, loss_sum + weight * loss, weight_sum + weight, sums_sum, stats), None

  micro = micro_batches(batch, count)
  first = jax.tree.map(lambda x: x[0], micro)
  sums_shape = jax.eval_shape(objective, params, batch_stats, first, rng)[1][0]
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
  init = (zeros(params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
          zeros(sums_shape), batch_stats)
  (grads_sum, loss_sum, weight_sum, sums, batch_stats), _ = jax.lax.scan(
      body, init, (jnp.arange(count), micro))
  total = jnp.maximum(weight_sum, 1e-12)
  return loss_sum / total, sums, batch_stats, jax.tree.map(lambda g: g / total, grads_sum)


def apply_gradients(state: TrainState, grads, batch_stats,
                    tx: optax.GradientTransformation) -> TrainState:
  """The state after one optimizer update with `grads` and the new BatchNorm statistics."""
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, param_updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def _float32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               ignore_index: int, loss_fn: Optional[Callable] = None,
               class_weights: Optional[Tuple[float, ...]] = None,
               aux_weight: float = 0.4, accumulation_steps: int = 1, bn_groups: int = 1,
               remat_policy: str = "", conv_lowering_mode: str = "auto"
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on a global batch; returns the new state and scalars.

  `loss_fn` is `segjax.losses.build_loss(spec)` (default: cross-entropy). The
  model returns logits, or in training a dict with `logits` and optionally
  `aux_logits`, whose loss (the same terms) is added with weight `aux_weight`.
  A batch may carry `pixel_weights` (e.g. U-Net's weight map) for the terms
  that take them. Logits are cast to float32 before the loss (bf16 models).

  `accumulation_steps` > 1 computes the gradient over that many micro-batches
  (`accumulate_gradients`, weighted by valid pixels: the large-batch update for a
  per-pixel mean loss such as cross-entropy); `bn_groups` > 1 gives BatchNorm
  per-device statistics (`segjax.layers.norm`); `remat_policy` rematerializes
  the backbone blocks (`segjax.layers.remat`); `conv_lowering_mode` says how
  convolutions are lowered (`segjax.layers.conv_lowering`: "auto" rewrites the
  ones XLA's CPU backend runs slowly, on the CPU only).
  """
  loss_fn = loss_fn or build_loss(DEFAULT_LOSS)

  def objective(params, batch_stats, micro, rng):
    labels = micro["label"].astype(jnp.int32)
    pixel_weights = micro.get("pixel_weights")
    with _training_context(bn_groups, remat_policy, conv_lowering_mode):
      outputs, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, micro["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
    if not isinstance(outputs, dict):
      outputs = {"logits": outputs}
    outputs = _float32(outputs)
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

  loss, sums, batch_stats, grads = accumulate_gradients(
      objective, state.params, state.batch_stats, batch, jax.random.fold_in(rng, state.step),
      accumulation_steps, weight_key="valid")
  new_state = apply_gradients(state, grads, batch_stats, tx)
  metrics = {"loss": loss, "learning_rate": schedule(state.step),
             "pixel_accuracy": sums["correct"] / jnp.maximum(sums["valid"], 1),
             "grad_norm": optax.global_norm(grads)}
  terms = {k: v / accumulation_steps for k, v in sums.items() if k.startswith("loss_")}
  if len(terms) > 1:
    metrics.update(terms)
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
                         loss_weights: Optional[Dict[str, float]] = None,
                         accumulation_steps: int = 1, bn_groups: int = 1,
                         remat_policy: str = "", conv_lowering_mode: str = "auto"
                         ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step of a two-stage detector (`MaskRCNN`) on a global batch.

  The batch carries `image` and the padded instance rows (`boxes`, `classes`,
  `instance_valid`, optional `is_crowd`, and `masks` or `box_masks`); the loss is
  the weighted sum of the model's losses (weight 1 where `loss_weights` has none).
  With `accumulation_steps` > 1 the micro-batches' losses are averaged with equal
  weights; `bn_groups`, `remat_policy` and `conv_lowering_mode` as in `train_step`.
  """
  loss_weights = dict(loss_weights or {})

  def objective(params, batch_stats, micro, rng):
    targets = {k: v for k, v in micro.items() if k != "image"}
    with _training_context(bn_groups, remat_policy, conv_lowering_mode):
      losses, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, micro["image"], targets,
          rng, train=True, mutable=["batch_stats"], method="losses")
    losses = _float32(losses)
    total = sum(loss_weights.get(name, 1.0) * value for name, value in losses.items())
    return total, (losses, updates["batch_stats"])

  loss, losses, batch_stats, grads = accumulate_gradients(
      objective, state.params, state.batch_stats, batch, jax.random.fold_in(rng, state.step),
      accumulation_steps)
  new_state = apply_gradients(state, grads, batch_stats, tx)
  metrics = {"loss": loss, "learning_rate": schedule(state.step),
             "grad_norm": optax.global_norm(grads),
             **{f"loss_{name}": value / accumulation_steps for name, value in losses.items()}}
  return new_state, metrics
