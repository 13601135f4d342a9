"""The pure, keyword-bound train step every task shares.

`train_step(state, batch, rng, *, objective, tx, schedule, ...)` is a plain function of
arrays: the task's `Objective` (segjax/tasks) gives the loss, this module the gradient
(accumulated over micro-batches), the optimizer update and the logged scalars. The
trainer binds the keyword arguments with `functools.partial` and jits it with explicit
shardings.
"""
import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from segjax.layers import conv_lowering, norm, remat
from segjax.tasks import Objective
from segjax.training.train_state import TrainState


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


def all_finite(tree) -> jax.Array:
  """Whether every floating-point value in `tree` is finite (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_gradients(state: TrainState, grads, batch_stats,
                    tx: optax.GradientTransformation) -> TrainState:
  """The state after one optimizer update with `grads` and the new BatchNorm statistics."""
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, param_updates),
                       batch_stats=batch_stats, opt_state=opt_state)


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               objective: Objective, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accumulation_steps: int = 1, bn_groups: int = 1,
               remat_policy: str = "", conv_lowering_mode: str = "auto",
               skip_nonfinite: bool = False) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step of the task's `objective` on a global batch; returns the new
  state and scalars (loss, learning rate, gradient norm and the objective's own).

  `accumulation_steps` > 1 computes the gradient over that many micro-batches
  (`accumulate_gradients`, weighted by `objective.weight_key`); `bn_groups` > 1 gives
  BatchNorm per-device statistics (`segjax.layers.norm`); `remat_policy` rematerializes
  the backbone blocks (`segjax.layers.remat`); `conv_lowering_mode` says how
  convolutions are lowered (`segjax.layers.conv_lowering`: "auto" rewrites the ones
  XLA's CPU backend runs slowly, on the CPU only); `skip_nonfinite` keeps the parameters,
  BatchNorm statistics and optimizer state of a step whose loss or gradient norm is not
  finite, or whose update is not (only the step count advances, so the data position
  stays right), and reports it as the scalar "skipped" (1.0).
  """
  with _training_context(bn_groups, remat_policy, conv_lowering_mode):
    loss, sums, batch_stats, grads = accumulate_gradients(
        objective.fn, state.params, state.batch_stats, batch,
        jax.random.fold_in(rng, state.step), accumulation_steps, objective.weight_key)
  new_state = apply_gradients(state, grads, batch_stats, tx)
  grad_norm = optax.global_norm(grads)
  if skip_nonfinite:  # the updated state too: a finite loss may still blow parameters up
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(
        (new_state.params, new_state.batch_stats, new_state.opt_state))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                             state.replace(step=state.step + 1))
    extra = {"skipped": 1.0 - ok.astype(jnp.float32)}
  else:
    extra = {}
  metrics = {"loss": loss, "learning_rate": schedule(state.step), "grad_norm": grad_norm,
             **objective.summarize(sums, accumulation_steps), **extra}
  return new_state, metrics


def step_options(config: ml_collections.ConfigDict, mesh) -> Dict[str, Any]:
  """`train_step`'s keyword arguments for accumulation, BatchNorm, remat and the
  convolutions' lowering."""
  if config.model.batch_norm not in ("sync", "per_device"):
    raise ValueError(f"Unknown model.batch_norm {config.model.batch_norm!r}; use sync or "
                     "per_device.")
  if config.optimizer.nonfinite not in ("stop", "skip"):
    raise ValueError(f"Unknown optimizer.nonfinite {config.optimizer.nonfinite!r}; use stop "
                     "(end the run at a non-finite loss) or skip (skip that step's update).")
  remat.check_policy(config.model.remat)
  conv_lowering.check_mode(config.model.conv_lowering)
  micro = config.optimizer.accumulation_steps
  devices = int(np.prod([mesh.shape[a] for a in config.mesh.batch_axes]))
  if micro < 1 or config.data.batch_size % (micro * devices):
    raise ValueError(f"data.batch_size {config.data.batch_size} must be a multiple of "
                     f"optimizer.accumulation_steps ({micro}) x the {devices} devices of the "
                     "batch axes, so every micro-batch spreads evenly over the devices.")
  return {"accumulation_steps": micro, "remat_policy": config.model.remat,
          "bn_groups": devices if config.model.batch_norm == "per_device" else 1,
          "conv_lowering_mode": config.model.conv_lowering,
          "skip_nonfinite": config.optimizer.nonfinite == "skip"}
