"""Pod-scale options on 8 CPU devices: FSDP equals data parallel with less memory
per device; gradient accumulation over 4 micro-batches equals the 4x batch;
BatchNorm statistics are the global batch's (sync), each device's (per_device),
or the real examples' only; remat keeps the gradients; LARS, LAMB and lr
scaling; bf16 mixed precision trains a smoke config (and writes a profile)."""
import functools
import glob
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import unet_shapes
from segjax.layers import norm
from segjax.models import build_model
from segjax.tasks import semantic
from segjax.training import optimizers, sharding, steps, train_state, trainer


def _sgd(lr=0.05, **extra):
  return ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=lr, min_learning_rate=0.0, schedule="constant", poly_power=0.9,
      warmup_steps=0, warmup_factor=0.0, momentum=0.9, nesterov=False, weight_decay=5e-4,
      b1=0.9, b2=0.999, grad_clip_norm=0.0, **extra))


def _train(model, batch, rules=(), num_steps=2, optimizer=None, **step_options):
  """Trains on 8 devices; returns (host state, last metrics, compiled step)."""
  mesh = sharding.create_mesh((("data", -1),))
  tx, schedule = optimizers.create_optimizer(optimizer or _sgd(), total_steps=10)
  state, state_sh = train_state.create_train_state(
      model, tx, jax.random.key(0), (1,) + batch["image"].shape[1:], mesh, rules)
  batch_sh, repl = sharding.batch_sharding(mesh, ("data",)), NamedSharding(mesh, P())
  step = jax.jit(functools.partial(steps.train_step,
                                   objective=semantic.objective(model=model, ignore_index=255),
                                   tx=tx, schedule=schedule, **step_options),
                 in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl))
  batch = jax.device_put(batch, batch_sh)
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  for _ in range(num_steps):
    state, metrics = step(state, batch, jax.random.key(1))
  return state, jax.device_get(metrics), compiled


def _batch(size=32, n=8):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (n, size, size)).astype(np.int32)
  labels[rng.random(labels.shape) < np.linspace(0, 0.6, n)[:, None, None]] = 255  # ignored
  images = (rng.normal(size=(n, size, size, 3)) * np.arange(1, n + 1)[:, None, None, None])
  return {"image": images.astype(np.float32), "label": labels}


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_fsdp_equals_data_parallel_with_less_memory_per_device():
  model = build_model("unet", 4, {"width": 32, "depth": 2})
  batch = _batch()
  dp, m_dp, c_dp = _train(model, batch)
  fsdp, m_fsdp, c_fsdp = _train(model, batch, rules=sharding.param_rules(
      ml_collections.ConfigDict({"strategy": "fsdp", "param_rules": ()})))
  kernel = fsdp.params["down1"]["conv1"]["conv"]["kernel"]  # (3, 3, 64, 64)
  assert kernel.sharding.spec == P(None, None, "data", None)
  assert kernel.addressable_shards[0].data.shape == (3, 3, 8, 64)
  momentum = [x for x in jax.tree.leaves(fsdp.opt_state) if x.shape == kernel.shape]
  assert momentum and all(m.sharding.spec == kernel.sharding.spec for m in momentum)
  small = fsdp.params["down0"]["conv0"]["bn"]["scale"]  # under the size limit: replicated
  assert small.sharding.spec == P()
  np.testing.assert_allclose(m_dp["loss"], m_fsdp["loss"], rtol=1e-6)
  _assert_trees_close(dp, fsdp)
  dp_bytes = c_dp.memory_analysis().argument_size_in_bytes
  fsdp_bytes = c_fsdp.memory_analysis().argument_size_in_bytes
  assert fsdp_bytes < 0.5 * dp_bytes, (fsdp_bytes, dp_bytes)


def test_four_micro_batches_equal_the_four_times_larger_batch():
  # No BatchNorm (the paper's U-Net), so the micro-batches' math is the large batch's;
  # examples ignore different numbers of pixels, which the valid-pixel weights handle.
  model = build_model("unet_valid", 4, {"width": 4, "depth": 2, "dropout_rate": 0.0})
  batch = _batch(size=44, n=32)
  large, m_large, c_large = _train(model, batch)
  micro, m_micro, c_micro = _train(model, batch, accumulation_steps=4)
  np.testing.assert_allclose(m_micro["loss"], m_large["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_micro["pixel_accuracy"], m_large["pixel_accuracy"], rtol=1e-6)
  _assert_trees_close(large, micro)
  # The micro-batches ignore different numbers of pixels: equal weights would differ.
  valid = [(batch["label"][i::4, 20:24, 20:24] != 255).sum() for i in range(4)]
  assert len(set(valid)) > 1
  # One micro-batch's activations at a time: less temporary memory.
  assert (c_micro.memory_analysis().temp_size_in_bytes
          < c_large.memory_analysis().temp_size_in_bytes)


def _statistics(x, mask, groups, use_jit=True):
  """Normalized outputs and updated running mean of one BatchNorm on 8 devices."""
  layer = norm.BatchNorm(use_running_average=False, momentum=0.0, epsilon=0.0)
  variables = layer.init(jax.random.key(0), x)

  def apply(x, mask):
    with norm.batch_statistics(groups, mask):
      return layer.apply(variables, x, mutable=["batch_stats"])
  mesh = sharding.create_mesh((("data", -1),))
  shard = NamedSharding(mesh, P("data"))
  y, updates = jax.jit(apply)(jax.device_put(x, shard), jax.device_put(mask, shard))
  return np.asarray(y), updates["batch_stats"]


def test_batch_norm_statistics_global_per_device_and_masked():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(16, 3, 5, 2)) * np.arange(1, 17)[:, None, None, None] + 3).astype(
      np.float32)
  everyone = np.ones(16, bool)

  # sync: the statistics of the whole global batch, not a mean of device means.
  y, stats = _statistics(x, everyone, groups=1)
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], var, rtol=1e-5)

  # per_device: each device's two examples with their own statistics.
  y, stats = _statistics(x, everyone, groups=8)
  for d in range(8):
    shard = x[2 * d:2 * d + 2]
    np.testing.assert_allclose(y[2 * d:2 * d + 2], (shard - shard.mean((0, 1, 2)))
                               / np.sqrt(shard.var((0, 1, 2))), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5)  # equal counts: the global mean

  # Unequal per-device batches: devices hold 2, 1, 0, 2, 1, 2, 2, 1 real examples.
  mask = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0], bool)
  real = x[mask]
  y, stats = _statistics(x, mask, groups=1)
  np.testing.assert_allclose(y[mask], (real - real.mean((0, 1, 2)))
                             / np.sqrt(real.var((0, 1, 2))), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats["mean"], real.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], real.var((0, 1, 2)), rtol=1e-5)
  y, stats = _statistics(x, mask, groups=8)
  for d in range(8):
    keep = mask[2 * d:2 * d + 2]
    if keep.any():
      shard = x[2 * d:2 * d + 2][keep]
      np.testing.assert_allclose(y[2 * d:2 * d + 2][keep], (shard - shard.mean((0, 1, 2)))
                                 / np.sqrt(shard.var((0, 1, 2))), rtol=1e-4, atol=1e-4)
  # The running mean weights each device by its real examples: the global mean.
  np.testing.assert_allclose(stats["mean"], real.mean((0, 1, 2)), rtol=1e-5)
  with pytest.raises(ValueError, match="cannot be split into 3 BatchNorm"):
    _statistics(x, everyone, groups=3)


def test_per_device_batch_norm_trains_differently_from_sync():
  model = build_model("unet", 4, {"width": 4, "depth": 2})
  batch = _batch()
  sync, _, _ = _train(model, batch, num_steps=1)
  local, _, _ = _train(model, batch, num_steps=1, bn_groups=8)
  var = lambda s: np.asarray(s.batch_stats["down0"]["conv0"]["bn"]["var"])
  assert np.abs(var(sync) - var(local)).max() > 1e-3
  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.model.batch_norm = "per_device"
  options = steps.step_options(config, sharding.create_mesh((("data", -1),)))
  assert options["bn_groups"] == 8
  config.optimizer.accumulation_steps = 3
  with pytest.raises(ValueError, match="multiple of optimizer.accumulation_steps"):
    steps.step_options(config, sharding.create_mesh((("data", -1),)))


def test_remat_keeps_gradients():
  model = build_model("pspnet", 5, {"backbone": "resnet18", "backbone_width": 8,
                                    "head_channels": 16, "aux_channels": 8, "dropout": 0.0})
  batch = _batch(size=32)
  plain, m_plain, _ = _train(model, batch, num_steps=1)
  remat, m_remat, _ = _train(model, batch, num_steps=1, remat_policy="nothing_saveable")
  np.testing.assert_allclose(m_plain["grad_norm"], m_remat["grad_norm"], rtol=1e-5)
  _assert_trees_close(plain, remat)
  # The blocks really are rematerialized: the traced step has recomputation (remat) regions.
  assert "remat" in _step_jaxpr(model, batch, remat_policy="nothing_saveable")
  assert "remat" not in _step_jaxpr(model, batch)
  with pytest.raises(ValueError, match="Unknown remat policy"):
    steps.remat.check_policy("all")


def _step_jaxpr(model, batch, **options):
  tx, schedule = optimizers.create_optimizer(_sgd(), total_steps=10)
  state = jax.eval_shape(lambda: train_state._initializer(
      model, tx, (1,) + batch["image"].shape[1:])(jax.random.key(0)))
  step = functools.partial(steps.train_step,
                           objective=semantic.objective(model=model, ignore_index=255),
                           tx=tx, schedule=schedule, **options)
  return str(jax.make_jaxpr(step)(state, batch, jax.random.key(1)))


def test_learning_rate_scaling_and_layerwise_optimizers():
  config = _sgd(lr=0.01, lr_scaling="linear", reference_batch_size=16)
  config.warmup_steps = 5
  _, schedule = optimizers.create_optimizer(config, 100, batch_size=64)
  assert float(schedule(5)) == pytest.approx(0.04)
  config.lr_scaling = "sqrt"
  assert optimizers.scaled_learning_rate(config, 64) == pytest.approx(0.02)
  config.reference_batch_size = 0
  with pytest.raises(ValueError, match="reference_batch_size"):
    optimizers.scaled_learning_rate(config, 64)

  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in ("lars", "lamb"):
    tx, _ = optimizers.create_optimizer(_with_name(name), 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only weight decay moves parameters, and never biases.
    assert np.abs(updates["conv"]["kernel"]).max() > 0
    assert np.abs(updates["conv"]["bias"]).max() == 0
  model = build_model("unet", 4, {"width": 4, "depth": 2})
  for name in ("lars", "lamb"):
    first = _train(model, _batch(), num_steps=1, optimizer=_with_name(name))[1]["loss"]
    later = _train(model, _batch(), num_steps=6, optimizer=_with_name(name))[1]["loss"]
    assert later < first, (name, first, later)


def _with_name(name):
  config = _sgd(lr=0.5 if name == "lars" else 0.01)
  config.name = name
  config.trust_coefficient = 0.001
  return config


def test_bf16_smoke_config_trains_with_float32_state_and_writes_a_profile(tmp_path):
  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.eval_split = "validation[:32]"
  config.model.dtype = "bfloat16"
  config.total_steps, config.eval_every, config.checkpoint_every = 40, 40, 40
  config.profile_steps = 2
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  state = result["state"]
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {
      jnp.dtype(jnp.float32)}
  losses = [r["train/loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
            if "train/loss" in r]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses  # as float32 in test_training
  assert glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
