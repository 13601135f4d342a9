"""VGG-16 encoders against torchvision, and FCN-32s / 16s / 8s on them: output
sizes, crop offsets, learned upsampling and parameter counts."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.backbones import BACKBONES
from segjax.backbones.vgg import max_pool_2x2
from segjax.convert.common import CONVERTERS
from segjax.convert.vgg import torch_vgg_to_flax
from segjax.models import build_model
from segjax.models.fcn import _OUTPUT_CROPS, _SKIP_CROPS, learned_upsampling
from tests.backbones.test_resnet_parity import _randomize_batch_norms
from tests.torch_reference import import_torchvision

TINY = {"width": 4, "fc_width": 16}


def _torch_blocks(features, x, torch):
  """{"conv{b}": input of the b-th max pool, "pool{b}": its output}, NHWC numpy."""
  out, b = {}, 1
  with torch.no_grad():
    for layer in features:
      if isinstance(layer, torch.nn.MaxPool2d):
        out[f"conv{b}"] = x
        out[f"pool{b}"] = x = layer(x)
        b += 1
      else:
        x = layer(x)
  return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _torchvision_vgg(name):
  """torchvision's `name` with random weights and BatchNorm statistics, eval mode."""
  tv = import_torchvision()
  import torch
  torch.manual_seed(0)
  return _randomize_batch_norms(getattr(tv.models, name)(weights=None), torch)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_parity_with_torchvision(name):
  model = _torchvision_vgg(name)
  import torch
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  expected = _torch_blocks(model.features, x, torch)

  variables = CONVERTERS.get(name)(model.state_dict())  # classifier.* is ignored
  assert (sum(v.size for v in jax.tree.leaves(variables["params"]))
          == sum(p.numel() for p in model.features.parameters()))
  got = jax.jit(BACKBONES.get(name)().apply)(variables, x.numpy().transpose(0, 2, 3, 1))
  assert sorted(got) == sorted(expected)
  for key, ref in expected.items():
    assert got[key].shape == ref.shape, key
    err = np.max(np.abs(np.asarray(got[key]) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"{name} {key}: max relative error {err:.2e}"


def test_ceil_mode_pools_like_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(1, 7, 9, 3)).astype(np.float32)
  ref = torch.nn.MaxPool2d(2, 2, ceil_mode=True)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_array_equal(np.asarray(max_pool_2x2(jnp.asarray(x), ceil_mode=True)),
                                ref.permute(0, 2, 3, 1).numpy())
  model = BACKBONES.get("vgg16")(width=4, ceil_mode=True, pad_first=2)
  got = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((1, 7, 9, 3)))[0]
  # conv1_1 pads by 2 (7x9 -> 9x11); each pool then rounds up.
  assert [got[f"pool{b}"].shape[1:3] for b in range(1, 6)] == [
      (5, 6), (3, 3), (2, 2), (1, 1), (1, 1)]


@pytest.mark.parametrize("name, key", [("vgg16", "features.28.bias"),
                                       ("vgg16_bn", "features.41.running_var")])
def test_converter_names_missing_and_unknown_keys(name, key):
  state = _torchvision_vgg(name).state_dict()
  value = state.pop(key)
  with pytest.raises(ValueError, match=rf"missing keys \['{re.escape(key)}'\]; unknown keys none"):
    CONVERTERS.get(name)(state)
  state[key] = state["features.99.weight"] = value
  with pytest.raises(ValueError, match=r"keys none; unknown keys \['features\.99\.weight'\]"):
    torch_vgg_to_flax(state, batch_norm=name.endswith("_bn"))


@pytest.mark.parametrize("pad_first", [0, 100])
@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_fcn_logits_match_any_input_size(name, pad_first):
  model = build_model(name, 3, dict(TINY, pad_first=pad_first))
  x = jnp.zeros((1, 97, 129, 3))
  logits = jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0]
  assert logits.shape == (1, 97, 129, 3) and logits.dtype == jnp.float32


@pytest.mark.parametrize("pad_first", [0, 100])
def test_fcn8s_runs_on_odd_sizes(pad_first):
  model = build_model("fcn8s", 3, dict(TINY, backbone="vgg16_bn", pad_first=pad_first))
  x = np.random.default_rng(0).normal(size=(2, 97, 129, 3)).astype(np.float32)
  # Random variables (the score layers start at zero) from numpy, which saves
  # compiling jax.random per shape: He-scaled kernels, positive vectors.
  rng = np.random.default_rng(1)
  def fill(s):
    if len(s.shape) == 4:
      return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:3]))).astype(s.dtype)
    return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
  variables = jax.tree.map(fill, jax.eval_shape(model.init, jax.random.key(0), x))
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  assert logits.shape == (2, 97, 129, 3) and np.all(np.isfinite(logits))
  assert np.std(logits) > 0


def _coordinate(layers):
  """(a, b) with input pixel = a * u + b for index u after `layers`, each
  ("conv", kernel, stride, pad) or ("up", kernel, stride, pad) (transposed)."""
  a, b = 1.0, 0.0
  for kind, k, s, p in layers:
    # The layer maps its output index u to its input index c * u + d.
    c, d = (s, (k - 1) / 2 - p) if kind == "conv" else (1 / s, (p - (k - 1) / 2) / s)
    a, b = a * c, a * d + b
  return a, b


@pytest.mark.parametrize("pad_first", [0, 100])
def test_crop_offsets_follow_from_the_layer_geometry(pad_first):
  """With the model's crops, summed maps sit on the same input pixels, and the
  output's index u on pixel u."""
  paper = pad_first == 100
  # The other 3x3 convs pad by 1 and move nothing.
  conv1_1, pool = ("conv", 3, 1, pad_first if paper else 1), ("conv", 2, 2, 0)
  pools = {b: [conv1_1] + [pool] * b for b in range(1, 6)}
  up = lambda f: ("up", 2 * f, f, 0 if paper else f // 2)
  score_fr = pools[5] + [("conv", 7, 1, 0 if paper else 3)]

  def pixel(layers, index):
    a, b = _coordinate(layers)
    return a * index + b

  skip_crops = _SKIP_CROPS if paper else {"pool4": 0, "pool3": 0}
  assert pixel(score_fr + [up(2)], 0) == pixel(pools[4], skip_crops["pool4"])
  assert pixel(score_fr + [up(2)] * 2, 0) == pixel(pools[3], skip_crops["pool3"])
  for factor, ups in ((32, []), (16, [up(2)]), (8, [up(2)] * 2)):
    a, b = _coordinate(score_fr + ups + [up(factor)])
    crop = _OUTPUT_CROPS[factor] if paper else 0
    assert (a, a * crop + b) == (1, 0), factor
  if paper:
    assert (_SKIP_CROPS, _OUTPUT_CROPS) == ({"pool4": 5, "pool3": 9}, {32: 19, 16: 27, 8: 31})


@pytest.mark.parametrize("factor, padding", [(2, 0), (2, 1), (8, 0), (8, 4), (32, 16)])
def test_learned_upsampling(factor, padding):
  layer = learned_upsampling(1, factor, padding)
  x = jnp.ones((1, 5, 6, 1))
  y, variables = layer.init_with_output(jax.random.key(0), x)
  k = 2 * factor
  assert y.shape[1:3] == tuple((n - 1) * factor - 2 * padding + k for n in (5, 6))
  # Bilinear: a constant stays constant away from the borders (k - padding wide).
  inner = np.asarray(y)[0, k - padding:-(k - padding), k - padding:-(k - padding), 0]
  assert inner.size and np.allclose(inner, 1.0)
  # Same numbers as PyTorch's ConvTranspose2d with that padding (symmetric kernel).
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(1, 5, 6, 1)).astype(np.float32)
  kernel = torch.from_numpy(np.array(variables["params"]["kernel"]).transpose(2, 3, 0, 1))
  ref = torch.nn.functional.conv_transpose2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), kernel,
                                             stride=factor, padding=padding)
  np.testing.assert_allclose(np.asarray(layer.apply(variables, jnp.asarray(x))),
                             ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _fcn_param_count(skips, num_classes=21, fc=4096):
  """Parameters of the paper's FCN-VGG16, counted from its design: VGG-16's 13
  3x3 convs with bias (14,714,688); fc6, a 7x7 conv 512 -> 4096 with bias
  (102,764,544); fc7, 1x1 4096 -> 4096 (16,781,312); score_fr, 1x1 4096 -> 21
  (86,037); per skip a 1x1 scorer with bias (pool4: 512 * 21 + 21 = 10,773,
  pool3: 5,397) and a bias-free 4x4 21 -> 21 transposed conv (7,056); and the
  bias-free final transposed conv, kernel 64 / 32 / 16 (1,806,336 / 451,584 /
  112,896). FCN-8s: 134,489,759, the ~134M of the caffe model."""
  convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  total = sum(9 * cin * cout + cout for cin, cout in convs)
  total += 49 * 512 * fc + fc + fc * fc + fc + fc * num_classes + num_classes
  for pool in skips:
    total += {"pool4": 512, "pool3": 256}[pool] * num_classes + num_classes
    total += 16 * num_classes ** 2
  k = 2 * (32 >> len(skips))
  return total + k * k * num_classes ** 2


@pytest.mark.parametrize("name, skips, count", [
    ("fcn32s", (), 136_152_917), ("fcn16s", ("pool4",), 134_815_994),
    ("fcn8s", ("pool4", "pool3"), 134_489_759)])
def test_paper_parameter_counts(name, skips, count):
  model = build_model(name, 21, {})
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == count == _fcn_param_count(skips)


@pytest.mark.parametrize("options, message", [
    ({"pad_first": 50}, "pad_first 0 .* or 100"), ({"backbone": "resnet50"}, "'vgg16' or")])
def test_bad_fcn_options(options, message):
  with pytest.raises(ValueError, match=message):
    build_model("fcn8s", 3, options)
