"""The jitted train step on 8 devices equals the same step on 1 device."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from segjax.models import build_model
from segjax.tasks import semantic
from segjax.training import optimizers, sharding, steps
from segjax.training.train_state import create_train_state


def _optimizer():
  config = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.05, min_learning_rate=0.0, schedule="poly", poly_power=0.9,
      warmup_steps=0, momentum=0.9, nesterov=False, weight_decay=5e-4, b1=0.9, b2=0.999,
      grad_clip_norm=0.0))
  return optimizers.create_optimizer(config, total_steps=10)


def _run(devices, batch, num_steps=2, param_rules=()):
  mesh = sharding.create_mesh((("data", -1),), devices)
  model = build_model("unet", 4, {"width": 4, "depth": 2})
  tx, schedule = _optimizer()
  state, state_sh = create_train_state(model, tx, jax.random.key(0), (1, 32, 32, 3), mesh,
                                       param_rules)
  batch_sh = sharding.batch_sharding(mesh, ("data",))
  repl = NamedSharding(mesh, P())
  step = jax.jit(functools.partial(steps.train_step,
                                   objective=semantic.objective(model=model, ignore_index=255),
                                   tx=tx, schedule=schedule),
                 in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                 donate_argnums=(0,))
  batch = jax.device_put(batch, batch_sh)
  for _ in range(num_steps):
    state, metrics = step(state, batch, jax.random.key(1))
  return jax.device_get(state), jax.device_get(metrics), state


def _batch():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (8, 32, 32)).astype(np.int32)
  labels[:, :4] = 255
  # Per-example scale differences make per-device BN statistics differ from global ones.
  images = (rng.normal(size=(8, 32, 32, 3)) * np.arange(1, 9)[:, None, None, None]).astype(
      np.float32)
  return {"image": images, "label": labels}


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  batch = _batch()
  one, m1, _ = _run(jax.devices()[:1], batch)
  eight, m8, sharded = _run(jax.devices(), batch)
  # The 8-device state is really sharded/replicated over 8 devices.
  assert len(sharded.params["classifier"]["kernel"].sharding.device_set) == 8
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # BatchNorm statistics are global: equal to the 1-device ones, not a per-device mean.
  np.testing.assert_allclose(one.batch_stats["down0"]["conv0"]["bn"]["var"],
                             eight.batch_stats["down0"]["conv0"]["bn"]["var"], rtol=1e-4)


def test_param_rules_shard_parameters_and_keep_results():
  batch = _batch()
  # Matches the kernels of level 1 (8 output channels) in params and optimizer state.
  rules = ((r"down1/.*conv/kernel$", (None, None, None, "data")),)
  ref, _, _ = _run(jax.devices()[:1], batch, num_steps=1)
  out, _, sharded = _run(jax.devices(), batch, num_steps=1, param_rules=rules)
  kernel = sharded.params["down1"]["conv0"]["conv"]["kernel"]  # (3, 3, 4, 8): 8 out channels
  assert kernel.sharding.spec == P(None, None, None, "data")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 4, 1)
  momentum = [x for x in jax.tree.leaves(sharded.opt_state) if x.shape == kernel.shape]
  assert momentum and all(m.sharding.spec == P(None, None, None, "data") for m in momentum)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_mesh_and_rules_are_reported():
  import pytest
  with pytest.raises(ValueError, match="need 16 devices, but 8 are available"):
    sharding.create_mesh((("data", 16),))
  mesh = sharding.create_mesh((("data", -1),))
  tree = {"params": {"w": jnp.zeros((3, 5))}}
  with pytest.raises(ValueError, match="params/w of shape \\(3, 5\\).*5 is not divisible by 8"):
    sharding.tree_shardings(tree, mesh, ((r"w$", (None, "data")),))
