"""Resize, pooling and context layers against their PyTorch counterparts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segjax.layers import (ASPP, PyramidPoolingModule, SeparableConvBNAct, adaptive_avg_pool,
                           max_pool_with_indices, max_unpool, resize_bilinear)
from tests.torch_reference import import_torchvision


def _nchw(x):
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", [((7, 9), (16, 13)), ((33, 17), (8, 5)),
                                          ((5, 20), (11, 6)), ((1, 1), (4, 3)),
                                          ((6, 8), (6, 3))])
def test_resize_bilinear_matches_interpolate(in_hw, out_hw, align_corners):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  resize = jax.jit(lambda v: resize_bilinear(v, out_hw, align_corners=align_corners))
  got = resize(jnp.asarray(x))
  want = _nhwc(F.interpolate(_nchw(x), size=out_hw, mode="bilinear",
                             align_corners=align_corners))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_resize_bilinear_keeps_dtype():
  out = resize_bilinear(jnp.ones((1, 5, 5, 2), jnp.bfloat16), (9, 3), align_corners=False)
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 9, 3, 2)


@pytest.mark.parametrize("window,stride", [(2, 2), (3, 2)])
def test_max_pool_and_unpool_match_torch(window, stride):
  # Small integers, so that windows contain ties that PyTorch breaks row-major.
  x = np.random.default_rng(1).integers(0, 4, size=(2, 9, 11, 3)).astype(np.float32)
  pooled, indices = jax.jit(lambda v: max_pool_with_indices(v, window, stride))(jnp.asarray(x))
  x_t = _nchw(x).requires_grad_()
  pooled_t, indices_t = F.max_pool2d(x_t, window, stride, return_indices=True)
  np.testing.assert_array_equal(pooled, _nhwc(pooled_t))
  np.testing.assert_array_equal(indices, _nhwc(indices_t))

  # Gradients: pooling routes to (and accumulates at) the argmax positions.
  g = np.random.default_rng(2).normal(size=pooled.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(max_pool_with_indices(v, window, stride)[0] * g))(
      jnp.asarray(x))
  pooled_t.backward(_nchw(g))
  np.testing.assert_allclose(grad, _nhwc(x_t.grad), atol=1e-6)

  values = np.random.default_rng(3).normal(size=pooled.shape).astype(np.float32)
  unpool = jax.jit(lambda v, i: max_unpool(v, i, (9, 11)))
  v_t = _nchw(values).requires_grad_()
  unpooled_t = F.max_unpool2d(v_t, indices_t, window, stride, output_size=(9, 11))
  np.testing.assert_array_equal(unpool(jnp.asarray(values), indices), _nhwc(unpooled_t))
  if window == stride:  # Distinct positions: unpooling's gradient is a gather.
    g = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    grad = jax.grad(lambda v: jnp.sum(unpool(v, indices) * g))(jnp.asarray(values))
    unpooled_t.backward(_nchw(g))
    np.testing.assert_allclose(grad, _nhwc(v_t.grad), atol=1e-6)


def test_unpool_worked_example():
  a, b, c, d = 5.0, 6.0, 7.0, 8.0
  x = np.array([[1, 0, 2, b],
                [0, a, 0, 1],
                [c, 3, 1, 0],
                [2, 0, d, 4]], np.float32)[None, :, :, None]
  pooled, indices = max_pool_with_indices(jnp.asarray(x))
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[a, b], [c, d]])
  np.testing.assert_array_equal(indices[0, :, :, 0], [[5, 3], [8, 14]])
  sparse = np.array([[0, 0, 0, b],
                     [0, a, 0, 0],
                     [c, 0, 0, 0],
                     [0, 0, d, 0]], np.float32)
  np.testing.assert_array_equal(max_unpool(pooled, indices, (4, 4))[0, :, :, 0], sparse)
  # Both gradients are nonzero exactly at the argmax positions.
  at_max = (sparse != 0).astype(np.float32)
  grad_pool = jax.grad(lambda v: max_pool_with_indices(v)[0].sum())(jnp.asarray(x))
  np.testing.assert_array_equal(grad_pool[0, :, :, 0], at_max)
  weights = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  grad_unpool = jax.grad(lambda v: (max_unpool(v, indices, (4, 4)) * weights).sum())(pooled)
  np.testing.assert_array_equal(grad_unpool[0, :, :, 0], [[6, 4], [9, 15]])


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
@pytest.mark.parametrize("hw", [(13, 17), (5, 4)])
def test_adaptive_avg_pool_matches_torch(hw, bins):
  x = np.random.default_rng(5).normal(size=(2, *hw, 3)).astype(np.float32)
  got = jax.jit(lambda v: adaptive_avg_pool(v, bins))(jnp.asarray(x))
  want = _nhwc(torch.nn.AdaptiveAvgPool2d(bins)(_nchw(x)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# --- Context modules: copy PyTorch weights, compare outputs. ---

def _conv_bn(*modules):
  """Randomises the BatchNorm of a PyTorch conv(+BN) and returns the
  (params, batch_stats) of the equivalent ConvBNAct."""
  conv, bn = [m for m in modules if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
  with torch.no_grad():
    for tensor, low, high in [(bn.weight, 0.5, 1.5), (bn.bias, -0.2, 0.2),
                              (bn.running_mean, -0.2, 0.2), (bn.running_var, 0.5, 1.5)]:
      tensor.uniform_(low, high)
  arr = lambda t: jnp.asarray(t.detach().numpy())
  params = {"conv": {"kernel": arr(conv.weight.permute(2, 3, 1, 0))},
            "bn": {"scale": arr(bn.weight), "bias": arr(bn.bias)}}
  return params, {"bn": {"mean": arr(bn.running_mean), "var": arr(bn.running_var)}}


def _variables(named_pairs, reference):
  """Variables from {flax name: (params, stats)}, checked against `reference`'s tree."""
  variables = {"params": {k: p for k, (p, _) in named_pairs.items()},
               "batch_stats": {k: s for k, (_, s) in named_pairs.items()}}
  assert jax.tree.structure(variables) == jax.tree.structure(reference)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, variables, reference))
  return variables


class _TorchPPM(torch.nn.Module):
  """mmseg's PPM in plain PyTorch (ConvModule = conv without bias, BN, ReLU)."""

  def __init__(self, in_channels, channels, bins, align_corners):
    super().__init__()
    self.align_corners = align_corners
    self.stages = torch.nn.ModuleList(torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(b), torch.nn.Conv2d(in_channels, channels, 1, bias=False),
        torch.nn.BatchNorm2d(channels), torch.nn.ReLU()) for b in bins)

  def forward(self, x):
    return torch.cat([x] + [F.interpolate(s(x), size=x.shape[2:], mode="bilinear",
                                          align_corners=self.align_corners)
                            for s in self.stages], dim=1)


@pytest.mark.parametrize("align_corners", [False, True])
def test_pyramid_pooling_matches_mmseg(align_corners):
  torch.manual_seed(0)
  bins = (1, 2, 3, 6)
  ref = _TorchPPM(8, 4, bins, align_corners).eval()
  x = np.random.default_rng(6).normal(size=(2, 13, 17, 8)).astype(np.float32)
  ppm = PyramidPoolingModule(bins, 4, align_corners=align_corners)
  init = ppm.init(jax.random.key(0), jnp.asarray(x), train=False)
  variables = _variables({f"branch{i}": _conv_bn(*s) for i, s in enumerate(ref.stages)}, init)
  got = ppm.apply(variables, jnp.asarray(x), train=False)
  assert got.shape == (2, 13, 17, 8 + 4 * len(bins))
  with torch.no_grad():
    want = _nhwc(ref(_nchw(x)))
  assert _rel_err(got, want) <= 1e-4


def test_aspp_matches_torchvision():
  torchvision = import_torchvision()
  torch.manual_seed(0)
  rates = (3, 7, 12)
  ref = torchvision.models.segmentation.deeplabv3.ASPP(32, list(rates), 16).eval()
  x = np.random.default_rng(7).normal(size=(2, 17, 19, 32)).astype(np.float32)
  aspp = ASPP(rates, 16)
  init = aspp.init(jax.random.key(0), jnp.asarray(x), train=False)
  pairs = {f"branch{k}": _conv_bn(*ref.convs[k]) for k in range(len(rates) + 1)}
  pairs["pool_branch"] = _conv_bn(*ref.convs[len(rates) + 1])
  pairs["project"] = _conv_bn(*ref.project)
  variables = _variables(pairs, init)
  got = aspp.apply(variables, jnp.asarray(x), train=False)
  with torch.no_grad():
    want = _nhwc(ref(_nchw(x)))
  assert got.shape == (2, 17, 19, 16)
  assert _rel_err(got, want) <= 1e-4

  # Training normalises with batch statistics as PyTorch does (compared with
  # dropout off on both sides); the default dropout keeps about half, scaled by 2.
  ref.train().project[3].p = 0.0
  got_train, _ = aspp.clone(dropout_rate=0.0).apply(
      variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  with torch.no_grad():
    want_train = _nhwc(ref(_nchw(x)))
  assert _rel_err(got_train, want_train) <= 1e-4
  dropped, _ = aspp.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.key(1)})
  active = np.asarray(got_train) != 0
  kept = np.asarray(dropped)[active] != 0
  assert 0.4 < kept.mean() < 0.6
  np.testing.assert_allclose(np.asarray(dropped)[active][kept],
                             2 * np.asarray(got_train)[active][kept], rtol=1e-6)


def test_separable_conv_is_depthwise_then_pointwise():
  torch.manual_seed(0)
  depthwise = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6,
                                                  bias=False), torch.nn.BatchNorm2d(6))
  pointwise = torch.nn.Sequential(torch.nn.Conv2d(6, 10, 1, bias=False), torch.nn.BatchNorm2d(10))
  ref = torch.nn.Sequential(depthwise, torch.nn.ReLU(), pointwise, torch.nn.ReLU()).eval()
  x = np.random.default_rng(8).normal(size=(2, 9, 7, 6)).astype(np.float32)
  module = SeparableConvBNAct(10, dilation=2)
  init = module.init(jax.random.key(0), jnp.asarray(x), train=False)
  assert init["params"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 6)
  assert init["params"]["pointwise"]["conv"]["kernel"].shape == (1, 1, 6, 10)
  variables = _variables({"depthwise": _conv_bn(*depthwise), "pointwise": _conv_bn(*pointwise)},
                         init)
  got = module.apply(variables, jnp.asarray(x), train=False)
  with torch.no_grad():
    want = _nhwc(ref(_nchw(x)))
  assert got.shape == (2, 9, 7, 10)
  assert _rel_err(got, want) <= 1e-4


def test_trace_settings_nest_restore_and_check_on_entry():
  """lowering / rematerialization / batch_statistics set their value for the block only,
  restore the outer one on exit (also after an exception), and reject bad values on entry."""
  from segjax.layers import conv_lowering, norm, remat

  assert conv_lowering._MODE.get() == "auto" and remat._POLICY.get() == ""
  with conv_lowering.lowering("xla"), remat.rematerialization("dots_saveable"):
    with conv_lowering.lowering("patches"):
      assert conv_lowering._MODE.get() == "patches" and conv_lowering._rewrites_apply()
    assert conv_lowering._MODE.get() == "xla" and not conv_lowering._rewrites_apply()
    assert remat.block(SeparableConvBNAct) is not SeparableConvBNAct
  assert remat.block(SeparableConvBNAct) is SeparableConvBNAct
  mask = jnp.array([True, False])
  with pytest.raises(RuntimeError, match="inside"):
    with norm.batch_statistics(2, mask):
      assert norm._SETTINGS.get() == norm._Statistics(2, mask)
      raise RuntimeError("inside")
  assert norm._SETTINGS.get() == norm._Statistics()
  context = conv_lowering.lowering("fast")  # checked when entered, as a `with` block needs
  with pytest.raises(ValueError, match="Unknown convolution lowering 'fast'"):
    context.__enter__()
  with pytest.raises(ValueError, match="Unknown remat policy 'all'"):
    with remat.rematerialization("all"):
      pass
  with pytest.raises(ValueError, match="groups must be >= 1, got 0"):
    with norm.batch_statistics(0):
      pass
  assert conv_lowering._MODE.get() == "auto" and remat._POLICY.get() == ""
