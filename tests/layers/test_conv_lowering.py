"""segjax.layers.conv_lowering: the CPU rewrites of convolutions equal XLA's convolutions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax.layers import Conv, conv_lowering
from segjax.models import build_model
from segjax.tasks import semantic
from segjax.training import steps

NHWC = ("NHWC", "HWIO", "NHWC")
# (input [N, H, W, C], kernel [kh, kw, C, O], stride, dilation, padding)
CASES = [
    ((2, 9, 11, 3), (3, 3, 3, 5), 1, 1, "SAME"),
    ((2, 10, 13, 4), (3, 3, 4, 6), 2, 1, ((1, 1), (1, 1))),
    ((1, 12, 12, 3), (3, 3, 3, 4), 1, 2, ((2, 2), (2, 2))),
    ((2, 15, 15, 3), (7, 7, 3, 8), 2, 1, ((3, 3), (3, 3))),
    ((1, 9, 9, 2), (3, 3, 2, 3), 2, 3, "SAME"),
    ((1, 9, 10, 2), (2, 2, 2, 3), 2, 1, ((0, 1), (1, 0))),
]
POINTWISE = [
    ((2, 8, 8, 5), (1, 1, 5, 7), 1, 1, "VALID"),
    ((2, 9, 11, 4), (1, 1, 4, 6), 2, 1, "VALID"),  # a ResNet downsample
    ((2, 9, 11, 4), (1, 1, 4, 6), 2, 1, "SAME"),
    ((1, 7, 6, 3), (1, 1, 3, 2), 1, 1, ((1, 0), (2, 1))),
]


def _gradients(conv, x, w, stride, dilation, padding):
  loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding,
                                           rhs_dilation=(dilation, dilation),
                                           dimension_numbers=NHWC)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("case", POINTWISE + CASES, ids=str)
def test_gradients_equal_xla(case):
  """1x1 kernels take the matmul filter gradient; larger ones are XLA's convolution as is."""
  x_shape, w_shape, stride, dilation, padding = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
  expected = _gradients(lax.conv_general_dilated, x, w, stride, dilation, padding)
  with conv_lowering.lowering("patches"):
    actual = _gradients(conv_lowering.conv_general_dilated, x, w, stride, dilation, padding)
  np.testing.assert_array_equal(actual[0], expected[0])  # the input gradient is XLA's own
  np.testing.assert_allclose(actual[1], expected[1], rtol=1e-5, atol=1e-5 * np.abs(
      expected[1]).max())


@pytest.mark.parametrize("case", POINTWISE[:1] + CASES, ids=str)
def test_depthwise_convolution_and_gradients_equal_xla(case):
  x_shape, w_shape, stride, dilation, padding = case
  channels = x_shape[-1]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=w_shape[:2] + (1, channels)), jnp.float32)

  def conv(implementation):
    return lambda x, w: implementation(x, w, (stride, stride), padding,
                                       rhs_dilation=(dilation, dilation),
                                       dimension_numbers=NHWC, feature_group_count=channels)

  expected = conv(lax.conv_general_dilated)(x, w)
  expected_grads = _gradients(lambda x, w, *a, **k: conv(lax.conv_general_dilated)(x, w),
                              x, w, stride, dilation, padding)
  with conv_lowering.lowering("patches"):
    actual = jax.jit(conv(conv_lowering.conv_general_dilated))(x, w)
    jaxpr = str(jax.make_jaxpr(conv(conv_lowering.conv_general_dilated))(x, w))
    grads = _gradients(lambda x, w, *a, **k: conv(conv_lowering.conv_general_dilated)(x, w),
                       x, w, stride, dilation, padding)
  assert "conv_general_dilated" not in jaxpr  # shifted multiply-adds
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  for a, e in zip(grads, expected_grads):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


def _has_custom_vjp(mode, feature_group_count=1, kernel=(1, 1)):
  conv = Conv(4, kernel, feature_group_count=feature_group_count)
  x = jnp.ones((1, 8, 8, 4))
  variables = conv.init(jax.random.key(0), x)
  loss = lambda v: jnp.sum(conv.apply(v, x))
  with conv_lowering.lowering(mode):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables))
  return "custom_vjp" in jaxpr


def test_mode_chooses_the_gradient():
  assert jax.default_backend() == "cpu"
  assert _has_custom_vjp("auto") and _has_custom_vjp("patches")
  assert not _has_custom_vjp("xla")
  assert not _has_custom_vjp("patches", feature_group_count=2)  # grouped: XLA's own
  assert not _has_custom_vjp("patches", kernel=(3, 3))  # XLA's own filter gradient
  with pytest.raises(ValueError, match="conv_lowering"):
    with conv_lowering.lowering("fast"):
      pass


def test_conv_is_nn_conv_with_the_same_parameters_and_outputs():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  ours, theirs = Conv(5, (3, 3), strides=2), nn.Conv(5, (3, 3), strides=2)
  variables = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, theirs.init(jax.random.key(1), x))
  np.testing.assert_array_equal(ours.apply(variables, x), theirs.apply(variables, x))


def test_bfloat16_filter_gradient_keeps_the_kernel_dtype():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (1, 1, 4, 6), jnp.bfloat16)
  expected = _gradients(lax.conv_general_dilated, x, w, 1, 1, "SAME")
  with conv_lowering.lowering("patches"):
    actual = _gradients(conv_lowering.conv_general_dilated, x, w, 1, 1, "SAME")
  assert actual[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(actual[1], np.float32),
                             np.asarray(expected[1], np.float32), rtol=0.05, atol=0.5)


def test_train_step_updates_match_xla_gradients():
  """A whole train step (ResNet, ASPP, separable decoder convs) moves the parameters as XLA's
  convolutions do."""
  import optax

  from segjax.training.train_state import TrainState
  model = build_model("deeplabv3plus", 3, {"backbone": "resnet18", "backbone_width": 8,
                                           "channels": 8, "low_level_channels": 4})
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(1), (2, 32, 32), 0, 3)
  variables = model.init({"params": jax.random.key(2), "dropout": jax.random.key(3)}, images,
                         train=True)
  tx = optax.sgd(0.1)
  results = {}
  for mode in ("xla", "patches"):
    state = TrainState.create(variables["params"], variables["batch_stats"], tx)
    new_state, metrics = jax.jit(lambda s: steps.train_step(
        s, {"image": images, "label": labels}, jax.random.key(4),
        objective=semantic.objective(model=model, ignore_index=255), tx=tx,
        schedule=lambda _: 0.1, conv_lowering_mode=mode))(state)
    results[mode] = (new_state.params, float(metrics["loss"]))
  assert np.isclose(results["xla"][1], results["patches"][1], rtol=1e-6)  # depthwise rounding
  for a, b in zip(jax.tree.leaves(results["xla"][0]), jax.tree.leaves(results["patches"][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
