"""Optax optimizers and learning-rate schedules built from the config.

Weight decay is applied to convolution and dense kernels only: BatchNorm
scales/offsets and biases (all parameters of rank < 2) are not decayed; LARS
also leaves them out of its layer-wise trust ratio (You et al., 2017).

Large batches: `lr_scaling` "linear" (Goyal et al., 2017) or "sqrt" multiplies
the learning rate by (batch / reference_batch_size) or its square root, the
warmup included; `lars` and `lamb` are the layer-wise adaptive optimizers.
"""
import jax
import ml_collections
import optax


SCALING_RULES = ("none", "linear", "sqrt")


def scaled_learning_rate(config: ml_collections.ConfigDict, batch_size: int) -> float:
  """`learning_rate` scaled from `reference_batch_size` to the global `batch_size`."""
  rule = config.get("lr_scaling", "none")
  if rule not in SCALING_RULES:
    raise ValueError(f"Unknown optimizer.lr_scaling {rule!r}; use one of {list(SCALING_RULES)}.")
  if rule == "none":
    return config.learning_rate
  if config.get("reference_batch_size", 0) <= 0:
    raise ValueError(f"optimizer.lr_scaling={rule!r} needs optimizer.reference_batch_size, the "
                     "batch size that optimizer.learning_rate was tuned for.")
  ratio = batch_size / config.reference_batch_size
  return config.learning_rate * (ratio if rule == "linear" else ratio ** 0.5)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           batch_size: int = 0) -> optax.Schedule:
  """Linear warmup from `warmup_factor * lr`, then `poly` (PSPNet), `cosine`,
  `constant` or `steps` (x `decay_factor` at each of `decay_steps`) decay; lr is
  `scaled_learning_rate` for the global `batch_size`."""
  base_lr, warmup = scaled_learning_rate(config, batch_size), config.warmup_steps
  scale = base_lr / config.learning_rate if config.learning_rate else 1.0
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "poly":
    # mmseg PolyLR: (base - min) * (1 - t / T) ** power + min.
    decay = optax.polynomial_schedule(base_lr, config.min_learning_rate * scale,
                                      config.poly_power, decay_steps)
  elif config.schedule == "cosine":
    alpha = config.min_learning_rate / config.learning_rate if config.learning_rate else 0.
    decay = optax.cosine_decay_schedule(base_lr, decay_steps, alpha)
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


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int, frozen=None,
                     batch_size: int = 0):
  """Returns (optax transformation, schedule) for `config.optimizer` and the global
  `batch_size` (used by `lr_scaling`).

  `frozen(params)` may mark parameters that never train (a detector's frozen
  backbone stages): they get no update at all, weight decay included.
  """
  schedule = learning_rate_schedule(config, total_steps, batch_size)
  if config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  elif config.name == "adamw":
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                     weight_decay=config.weight_decay, mask=decay_mask)
  elif config.name == "lars":
    tx = optax.lars(schedule, weight_decay=config.weight_decay, weight_decay_mask=decay_mask,
                    trust_coefficient=config.get("trust_coefficient", 0.001),
                    trust_ratio_mask=decay_mask,
                    momentum=config.momentum, nesterov=config.nesterov)
  elif config.name == "lamb":
    tx = optax.lamb(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                    mask=decay_mask)
  else:
    raise ValueError(f"Unknown optimizer.name {config.name!r}; use sgd, adamw, lars or lamb.")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if frozen is not None:
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train", frozen(params))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
