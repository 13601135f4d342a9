"""Optax optimizers and learning-rate schedules built from the config.

Weight decay is applied to convolution and dense kernels only: BatchNorm
scales/offsets and biases (all parameters of rank < 2) are not decayed.
"""
import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_factor * lr`, then `poly` (PSPNet), `cosine`,
  `constant` or `steps` (x `decay_factor` at each of `decay_steps`) decay."""
  base_lr, warmup = config.learning_rate, config.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "poly":
    # mmseg PolyLR: (base - min) * (1 - t / T) ** power + min.
    decay = optax.polynomial_schedule(base_lr, config.min_learning_rate, config.poly_power,
                                      decay_steps)
  elif config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(base_lr, decay_steps,
                                        config.min_learning_rate / base_lr if base_lr else 0.)
  elif config.schedule == "constant":
    decay = optax.constant_schedule(base_lr)
  elif config.schedule == "steps":  # detectron2 / mmdet MultiStepLR, boundaries from step 0
    boundaries = sorted(int(s) for s in config.decay_steps)
    if len(set(boundaries)) != len(boundaries) or (boundaries and boundaries[0] <= warmup):
      raise ValueError(f"optimizer.decay_steps {tuple(config.decay_steps)} must be distinct "
                       f"and after the {warmup} warmup steps.")
    decay = optax.piecewise_constant_schedule(
        base_lr, {s - warmup: config.decay_factor for s in boundaries})
  else:
    raise ValueError(f"Unknown optimizer.schedule {config.schedule!r}; use poly, cosine, "
                     "constant or steps.")
  if warmup <= 0:
    return decay
  start = config.warmup_factor * base_lr
  return optax.join_schedules([optax.linear_schedule(start, base_lr, warmup), decay], [warmup])


def decay_mask(params):
  """True for kernels (rank >= 2), False for biases and normalization parameters."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int, frozen=None):
  """Returns (optax transformation, schedule) for `config.optimizer`.

  `frozen(params)` may mark parameters that never train (a detector's frozen
  backbone stages): they get no update at all, weight decay included.
  """
  schedule = learning_rate_schedule(config, total_steps)
  if config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  elif config.name == "adamw":
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                     weight_decay=config.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"Unknown optimizer.name {config.name!r}; use sgd or adamw.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if frozen is not None:
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train", frozen(params))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
