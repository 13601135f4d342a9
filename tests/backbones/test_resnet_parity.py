"""ResNet encoders against torchvision: converted weights give the same features.

Each reference model has random weights and random BatchNorm affine parameters
and running statistics (so no BatchNorm is an identity), runs in eval mode,
and is compared stage by stage with segjax's ResNet on one 64x64 image.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.backbones import BACKBONES, ResNet
from segjax.convert import load_variables, main as convert_main, torch_resnet_to_flax
from tests.torch_reference import import_torchvision

STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")


def _randomize_batch_norms(model, torch, seed=0):
  """Random BatchNorm scale, bias and running statistics; eval mode."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.weight.data = torch.rand(n, generator=g) + 0.5
      m.bias.data = 0.2 * torch.randn(n, generator=g)
      m.running_mean = 0.2 * torch.randn(n, generator=g)
      m.running_var = torch.rand(n, generator=g) + 0.5
  return model.eval()


def _torch_features(model, x, torch):
  """The five feature maps of a torchvision ResNet (or one with a `stem`), NHWC numpy."""
  with torch.no_grad():
    stem = model.stem(x) if hasattr(model, "stem") else model.relu(model.bn1(model.conv1(x)))
    feats = {"stem": stem}
    y = model.maxpool(stem)
    for s in range(1, 5):
      y = feats[f"stage{s}"] = getattr(model, f"layer{s}")(y)
  return {k: v.permute(0, 2, 3, 1).numpy() for k, v in feats.items()}


def _v1c_stem(torch):
  """mmseg's ResNetV1c deep stem, keyed stem.0 ... stem.8 as in its checkpoints."""
  nn = torch.nn
  layers = []
  for cin, cout, stride in [(3, 32, 2), (32, 32, 1), (32, 64, 1)]:
    layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
               nn.ReLU(inplace=True)]
  return nn.Sequential(*layers)


def _set_dilation(conv, rate):
  conv.dilation, conv.padding = (rate, rate), (rate, rate)


def _reference(case, torch, tv):
  """(torch model, segjax ResNet) for a parity case."""
  if case == "resnet50_os32":
    return tv.models.resnet50(weights=None), ResNet(depth=50)
  if case == "resnet50_os8":
    return (tv.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]),
            ResNet(depth=50, output_stride=8))
  if case == "resnet18_os32":
    return tv.models.resnet18(weights=None), ResNet(depth=18)
  # mmseg-style ResNet-50-v1c at output stride 8 without contracted first
  # dilations and with Multi-Grid (1, 2, 4): dilations set by hand in torch.
  model = tv.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
  del model.conv1, model.bn1
  model.stem = _v1c_stem(torch)
  _set_dilation(model.layer3[0].conv2, 2)
  for block, rate in zip(model.layer4, (4, 8, 16)):
    _set_dilation(block.conv2, rate)
  return model, ResNet(depth=50, stem="v1c", output_stride=8, contract_dilation=False,
                       multi_grid=(1, 2, 4))


@pytest.mark.parametrize("case", ["resnet50_os32", "resnet50_os8", "resnet18_os32",
                                  "resnet50_v1c_os8_multigrid"])
def test_parity_with_torchvision(case):
  tv = import_torchvision()
  import torch
  torch.manual_seed(0)
  model, ours = _reference(case, torch, tv)
  model = _randomize_batch_norms(model, torch)
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  expected = _torch_features(model, x, torch)

  variables = torch_resnet_to_flax(model.state_dict(), ours.depth, ours.stem)
  got = ours.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  for name in STAGES:
    assert got[name].shape == expected[name].shape, name
    ref = expected[name]
    err = np.max(np.abs(np.asarray(got[name]) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"{case} {name}: max relative error {err:.2e}"


def _strides(model, size=64):
  shapes = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, 3)))[0])
  return {k: size // v.shape[1] for k, v in shapes.items()}


@pytest.mark.parametrize("output_stride, last", [(8, (8, 8)), (16, (16, 16)), (32, (16, 32))])
def test_feature_strides(output_stride, last):
  strides = _strides(BACKBONES.get("resnet50_v1c")(output_stride=output_stride))
  assert strides == {"stem": 2, "stage1": 4, "stage2": 8, "stage3": last[0], "stage4": last[1]}


def _architecture_param_count(depth, stem):
  """Parameters (conv kernels, BatchNorm scale and bias) counted from the design."""
  conv_bn = lambda k, cin, cout: k * k * cin * cout + 2 * cout
  if stem == "torchvision":
    total = conv_bn(7, 3, 64)
  else:
    total = conv_bn(3, 3, 32) + conv_bn(3, 32, 32) + conv_bn(3, 32, 64)
  bottleneck = depth >= 50
  blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
  cin = 64
  for s, (w, n) in enumerate(zip((64, 128, 256, 512), blocks)):
    cout = 4 * w if bottleneck else w
    for b in range(n):
      if bottleneck:
        total += conv_bn(1, cin, w) + conv_bn(3, w, w) + conv_bn(1, w, cout)
      else:
        total += conv_bn(3, cin, w) + conv_bn(3, w, w)
      if b == 0 and (s > 0 or cin != cout):
        total += conv_bn(1, cin, cout)
      cin = cout
  return total


@pytest.mark.parametrize("name, count", [
    ("resnet18", 11_176_512), ("resnet50", 23_508_032), ("resnet50_v1c", 23_527_264),
    ("resnet101", 42_500_160), ("resnet101_v1c", 42_519_392)])
def test_parameter_counts(name, count):
  model = BACKBONES.get(name)()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  ours = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert ours == count == _architecture_param_count(model.depth, model.stem)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_count_matches_torchvision(name):
  tv = import_torchvision()
  reference = sum(p.numel() for k, p in getattr(tv.models, name)(weights=None).named_parameters()
                  if not k.startswith("fc."))
  shapes = jax.eval_shape(BACKBONES.get(name)().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == reference


def test_convert_cli_round_trip(tmp_path):
  tv = import_torchvision()
  import torch
  state = tv.models.resnet18(weights=None).state_dict()
  # Wrapped and prefixed as in an mmseg segmentor checkpoint.
  torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "meta": {}},
             tmp_path / "r18.pth")
  subprocess.run([sys.executable, "-m", "segjax.convert", "--arch", "resnet18", "--prefix",
                  "backbone.", "--input", str(tmp_path / "r18.pth"),
                  "--output", str(tmp_path / "r18.npz")], check=True, capture_output=True)
  loaded = load_variables(tmp_path / "r18.npz")
  direct = torch_resnet_to_flax(state, 18)
  assert jax.tree.structure(loaded) == jax.tree.structure(direct)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)
  # An .npz state dict needs no torch.
  np.savez(tmp_path / "r18_state.npz", **{k: v.numpy() for k, v in state.items()})
  convert_main(["--arch", "resnet18", "--input", str(tmp_path / "r18_state.npz"),
                "--output", str(tmp_path / "r18_from_npz.npz")])
  from_npz = load_variables(tmp_path / "r18_from_npz.npz")
  for a, b in zip(jax.tree.leaves(from_npz), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)


def test_convert_names_missing_and_unknown_keys():
  tv = import_torchvision()
  state = tv.models.resnet18(weights=None).state_dict()
  del state["layer1.0.bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing keys \['layer1\.0\.bn1\.running_var'\]"):
    torch_resnet_to_flax(state, 18)
  state = tv.models.resnet18(weights=None).state_dict()
  state["layer5.0.conv1.weight"] = state["layer4.0.conv1.weight"]
  with pytest.raises(ValueError, match=r"unknown keys \['layer5\.0\.conv1\.weight'\]"):
    torch_resnet_to_flax(state, 18)
  with pytest.raises(ValueError, match="stem.0.weight"):
    torch_resnet_to_flax(tv.models.resnet50(weights=None).state_dict(), 50, "v1c")


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=42), "Unknown ResNet depth 42"),
    (dict(output_stride=4), "Unknown output_stride 4"),
    (dict(stem="v1d"), "Unknown ResNet stem 'v1d'"),
    (dict(multi_grid=(1, 2)), "one multiplier per block"),
])
def test_bad_configuration(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ResNet(**kwargs)


def test_unknown_backbone_name():
  with pytest.raises(KeyError, match="resnet42.*known backbones"):
    BACKBONES.get("resnet42")
