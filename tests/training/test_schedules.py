"""Learning-rate schedules (step decay, warmup start) and frozen parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import default
from segjax.training.optimizers import create_optimizer, learning_rate_schedule


def optimizer_config(**overrides):
  config = default.get_config().optimizer
  config.unlock()
  for key, value in overrides.items():
    config[key] = value
  config.lock()
  return config


def lrs(schedule, steps):
  return np.array([float(schedule(jnp.int32(step))) for step in steps])


@pytest.mark.parametrize("warmup", [0, 5])
def test_steps_schedule_decays_at_the_boundaries_counted_from_step_0(warmup):
  lr, factor = 0.2, 0.3
  config = optimizer_config(schedule="steps", learning_rate=lr, decay_factor=factor,
                            decay_steps=(20, 12), warmup_steps=warmup, warmup_factor=0.1)
  schedule = learning_rate_schedule(config, total_steps=40)
  steps = np.arange(warmup, 40)
  expected = lr * factor ** ((steps >= 12).astype(int) + (steps >= 20))
  np.testing.assert_allclose(lrs(schedule, steps), expected, rtol=1e-6)
  np.testing.assert_allclose(lrs(schedule, [11, 12, 19, 20]),
                             [lr, lr * factor, lr * factor, lr * factor ** 2], rtol=1e-6)


def test_steps_schedule_with_warmup_matches_torch():
  """torch LinearLR warmup chained with MultiStepLR (detectron2's WarmupMultiStepLR)."""
  lr, warmup, factor = 0.02, 6, 0.1
  config = optimizer_config(schedule="steps", learning_rate=lr, decay_factor=factor,
                            decay_steps=(10, 15), warmup_steps=warmup, warmup_factor=0.001)
  ours = lrs(learning_rate_schedule(config, total_steps=20), range(20))
  optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
  scheduler = torch.optim.lr_scheduler.ChainedScheduler([
      torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=warmup),
      torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 15], gamma=factor)])
  expected = []
  for _ in range(20):
    expected.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
  # optax's float32 warmup rounds its tiny start value to ~lr * 1e-8.
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=lr * 1e-7)


@pytest.mark.parametrize("schedule", ["poly", "cosine", "constant", "steps"])
@pytest.mark.parametrize("warmup_factor", [0.0, 0.001, 0.5])
def test_warmup_starts_at_warmup_factor_and_is_linear(schedule, warmup_factor):
  lr, warmup = 0.1, 8
  config = optimizer_config(schedule=schedule, learning_rate=lr, warmup_steps=warmup,
                            warmup_factor=warmup_factor, decay_steps=(30,))
  values = lrs(learning_rate_schedule(config, total_steps=40), range(warmup + 1))
  start = warmup_factor * lr
  np.testing.assert_allclose(values, start + (lr - start) * np.arange(warmup + 1) / warmup,
                             rtol=1e-6, atol=lr * 1e-7)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="Unknown optimizer.schedule 'step'.*steps"):
    learning_rate_schedule(optimizer_config(schedule="step"), total_steps=10)


# Frozen parameters.


def params_and_grads():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {"backbone": {"stem": {"kernel": normal(3, 3, 2, 4), "bias": normal(4)},
                         "stage4": {"kernel": normal(4, 5)}},
            "head": {"kernel": normal(5, 3), "bias": normal(3), "scale": normal(3)}}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(4)]
  return params, grads


def backbone_frozen(params):
  return {name: jax.tree.map(lambda _, frozen=(name == "backbone"): frozen, tree)
          for name, tree in params.items()}


def run(tx, params, grads):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grad):
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  for grad in grads:
    params, state = step(params, state, grad)
  return params


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("grad_clip_norm", [0.0, 1.0])
def test_frozen_parameters_never_change(name, grad_clip_norm):
  config = optimizer_config(name=name, schedule="constant", learning_rate=0.1, weight_decay=0.1,
                            grad_clip_norm=grad_clip_norm)
  params, grads = params_and_grads()
  # Huge frozen gradients must not leak into the others through the clip norm.
  grads = [{"backbone": jax.tree.map(lambda g: 1e4 * g, g["backbone"]), "head": g["head"]}
           for g in grads]
  tx, _ = create_optimizer(config, total_steps=10, frozen=backbone_frozen)
  trained = run(tx, params, grads)
  for before, after in zip(jax.tree.leaves(params["backbone"]),
                           jax.tree.leaves(trained["backbone"])):
    np.testing.assert_array_equal(before, after)
  # The trainable ones train as if they were the whole model.
  alone, _ = create_optimizer(config, total_steps=10)
  expected = run(alone, params["head"], [g["head"] for g in grads])
  for key in expected:
    assert np.abs(np.asarray(trained["head"][key]) - np.asarray(params["head"][key])).min() > 0
    np.testing.assert_allclose(trained["head"][key], expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_frozen_kernels_get_no_weight_decay(name):
  """Zero gradients: without freezing, weight decay alone would shrink the kernels."""
  config = optimizer_config(name=name, schedule="constant", learning_rate=0.1, weight_decay=0.5)
  params, _ = params_and_grads()
  zeros = [jax.tree.map(jnp.zeros_like, params)] * 3
  frozen, _ = create_optimizer(config, total_steps=10, frozen=backbone_frozen)
  trained = run(frozen, params, zeros)
  plain, _ = create_optimizer(config, total_steps=10)
  decayed = run(plain, params, zeros)
  kernel = params["backbone"]["stage4"]["kernel"]
  np.testing.assert_array_equal(trained["backbone"]["stage4"]["kernel"], kernel)
  assert np.abs(np.asarray(decayed["backbone"]["stage4"]["kernel"]) - np.asarray(kernel)).min() > 0
  # Decay reaches the trainable kernel but, as always, not biases or scales.
  assert np.abs(np.asarray(trained["head"]["kernel"] - params["head"]["kernel"])).min() > 0
  np.testing.assert_array_equal(trained["head"]["bias"], params["head"]["bias"])
