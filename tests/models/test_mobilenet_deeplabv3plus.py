"""MobileNetV2 against torchvision (features and parameter counts), and
DeepLabV3+: output sizes, the auxiliary output and the ResNet-50 parameter count.

Reference MobileNetV2s have random weights and random BatchNorm statistics
(no BatchNorm is an identity), run in eval mode on one 64x64 image, and are
compared with the prefixes `features[:k]` that end where each segjax stage does.
Dilated cases set strides and dilations of the torch model by hand.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.backbones import BACKBONES, MobileNetV2
from segjax.convert import CONVERTERS
from segjax.convert.mobilenet_v2 import torch_mobilenet_v2_to_flax
from segjax.models import build_model
from tests.backbones.test_resnet_parity import _randomize_batch_norms
from tests.torch_reference import import_torchvision

# segjax feature -> length of the torchvision `features` prefix that gives it.
PREFIXES = {"stem": 1, "stage1": 4, "stage2": 7, "stage3": 14, "stage4": 18}


def _dilate(model, dilations):
  """Sets the depthwise conv of `features[i]` to stride 1 and dilation d."""
  for i, d in dilations.items():
    conv = model.features[i].conv[1][0]  # every block past features.1 has t > 1
    conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)


# case -> (segjax MobileNetV2, torchvision width_mult, dilations of torch features[i]).
CASES = {
    "os32": (MobileNetV2(), 1.0, {}),
    # Contracted: features.14 loses its stride but keeps dilation 1.
    "os16": (MobileNetV2(output_stride=16), 1.0, {14: 1, 15: 2, 16: 2, 17: 2}),
    "os8_full_dilation_last_conv": (
        MobileNetV2(width_mult=0.5, output_stride=8, contract_dilation=False,
                    include_last_conv=True),
        0.5, {**{i: 2 for i in range(7, 14)}, **{i: 4 for i in range(14, 18)}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_torchvision(case):
  tv = import_torchvision()
  import torch
  torch.manual_seed(0)
  ours, width_mult, dilations = CASES[case]
  model = _randomize_batch_norms(tv.models.mobilenet_v2(weights=None, width_mult=width_mult),
                                 torch)
  _dilate(model, dilations)
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  if case == "os32":  # the converter the command line uses
    variables = CONVERTERS.get("mobilenet_v2")(model.state_dict())
  else:
    variables = torch_mobilenet_v2_to_flax(model.state_dict(), width_mult, ours.include_last_conv)
  got = ours.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  for name, k in PREFIXES.items():
    k += name == "stage4" and ours.include_last_conv
    with torch.no_grad():
      ref = model.features[:k](x).permute(0, 2, 3, 1).numpy()
    assert got[name].shape == ref.shape, name
    err = np.max(np.abs(np.asarray(got[name]) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"{case} {name}: max relative error {err:.2e}"


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_strides_and_channels(output_stride):
  model = BACKBONES.get("mobilenet_v2")(output_stride=output_stride, contract_dilation=True)
  shapes = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))[0])
  strides = {k: 64 // v.shape[1] for k, v in shapes.items()}
  assert strides == {"stem": 2, "stage1": 4, "stage2": 8, "stage3": min(16, output_stride),
                     "stage4": output_stride}
  assert {k: v.shape[-1] for k, v in shapes.items()} == {
      "stem": 32, "stage1": 24, "stage2": 32, "stage3": 96, "stage4": 320}


def _param_count(model, train=False):
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                         jnp.zeros((1, 64, 64, 3)), train=train))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("width_mult, include_last_conv, count", [
    (1.0, False, 1_811_712), (1.0, True, 2_223_872), (0.5, False, 480_320)])
def test_parameter_count_matches_torchvision(width_mult, include_last_conv, count):
  """Without the last conv, torchvision's `features` less `features.18`."""
  tv = import_torchvision()
  skip = () if include_last_conv else ("features.18.",)
  reference = sum(p.numel() for k, p in
                  tv.models.mobilenet_v2(weights=None, width_mult=width_mult).named_parameters()
                  if k.startswith("features.") and not k.startswith(skip))
  ours = _param_count(MobileNetV2(width_mult=width_mult, include_last_conv=include_last_conv))
  assert ours == reference == count


def test_converter_names_missing_keys():
  tv = import_torchvision()
  state = tv.models.mobilenet_v2(weights=None).state_dict()
  del state["features.5.conv.1.1.running_var"]
  with pytest.raises(ValueError, match=r"missing keys \['features\.5\.conv\.1\.1\.running_var'\]"):
    torch_mobilenet_v2_to_flax(state)


def _deeplabv3plus_outputs(backbone, width, aux_channels, train):
  """Output shapes of a small DeepLabV3+ at initialization on a 97x129 image
  (traced, not run: the layers' numerics have parity tests of their own)."""
  model = build_model("deeplabv3plus", 5, {"backbone": backbone, "backbone_width": width,
                                           "channels": 16, "low_level_channels": 8,
                                           "aux_channels": aux_channels})
  outputs, _ = jax.eval_shape(lambda: model.init_with_output(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((1, 97, 129, 3)),
      train=train))
  return outputs


@pytest.mark.parametrize("backbone, width", [("resnet18", 8), ("mobilenet_v2", 16)])
def test_deeplabv3plus_logits_at_odd_input_size(backbone, width):
  logits = _deeplabv3plus_outputs(backbone, width, aux_channels=0, train=False)
  assert logits.shape == (1, 97, 129, 5)


def test_deeplabv3plus_aux_logits_in_training():
  outputs = _deeplabv3plus_outputs("resnet18", 8, aux_channels=8, train=True)
  assert {k: v.shape for k, v in outputs.items()} == {"logits": (1, 97, 129, 5),
                                                      "aux_logits": (1, 97, 129, 5)}


def test_deeplabv3plus_r50_parameter_count():
  """21 classes, output stride 16, no aux head, counted from the architecture
  (conv kernels; BN scale and bias; classifier bias):
  ResNet-50 23,508,032;
  ASPP on 2048 channels: 1x1 524,800 + three 3x3 atrous 3 x 4,719,104 + image
  pooling 1x1 524,800 + projection 1280->256 328,192 = 15,535,104;
  low-level 1x1 256->48 12,384;
  separable conv on 256+48 channels: depthwise 3,344 + pointwise 78,336 = 81,680;
  separable conv on 256: depthwise 2,816 + pointwise 66,048 = 68,864;
  classifier 256*21 + 21 = 5,397.
  Total 39,211,461."""
  count = _param_count(build_model("deeplabv3plus", 21, {}), train=True)
  assert count == 23_508_032 + 15_535_104 + 12_384 + 81_680 + 68_864 + 5_397 == 39_211_461
