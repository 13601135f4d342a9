"""ResNet-FPN against torchvision: converted Mask R-CNN backbone weights give the
same pyramid, shapes follow PyTorch's for odd sizes, and freezing matches
torchvision's `trainable_layers`."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.convert.fpn import torch_resnet_fpn_to_flax
from segjax.models.fpn import FPN, ResNetFPN, frozen_backbone_modules, resize_nearest
from tests.backbones.test_resnet_parity import _randomize_batch_norms
from tests.torch_reference import import_torchvision

LEVELS = {"0": "p2", "1": "p3", "2": "p4", "3": "p5", "pool": "p6"}
# ResNet-50 without fc (test_resnet_parity) + FPN: 1x1 laterals and 3x3 outputs, with biases.
FPN_PARAMS = 256 * (256 + 512 + 1024 + 2048) + 4 * 256 + 4 * (9 * 256 * 256 + 256)
RESNET50_FPN_PARAMS = 23_508_032 + FPN_PARAMS


def _randomize(model, torch, seed=0):
  """Random BatchNorm affine parameters and running statistics and random FPN
  biases (torchvision starts them at 0), so none is an identity; eval mode."""
  g = torch.Generator().manual_seed(seed + 1)
  for m in model.modules():
    if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
      m.bias.data = 0.1 * torch.randn(m.out_channels, generator=g)
  return _randomize_batch_norms(model, torch, seed)


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def test_maskrcnn_backbone_parity_and_parameter_count():
  tv = import_torchvision()
  import torch
  torch.manual_seed(0)
  detector = tv.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  _randomize(detector.backbone, torch)
  x = torch.randn(1, 3, 97, 129, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = {LEVELS[k]: v.permute(0, 2, 3, 1).numpy() for k, v in detector.backbone(x).items()}

  # The whole detector's state dict: rpn.* and roi_heads.* are skipped.
  variables = torch_resnet_fpn_to_flax(detector.state_dict())
  model = ResNetFPN()
  got = jax.jit(model.apply)(variables, _nhwc(x))
  assert sorted(got) == sorted(expected) == ["p2", "p3", "p4", "p5", "p6"]
  for name, ref in expected.items():
    assert got[name].shape == ref.shape, name
    err = np.max(np.abs(np.asarray(got[name]) - ref)) / np.max(np.abs(ref))
    assert err <= 1e-4, f"{name}: max relative error {err:.2e}"

  reference = sum(p.numel() for p in detector.backbone.parameters())
  ours = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert ours == reference == RESNET50_FPN_PARAMS


@pytest.mark.parametrize("height, width", [(97, 129), (32, 32), (1, 45), (200, 63)])
def test_output_shapes_for_odd_sizes(height, width):
  shapes = jax.eval_shape(lambda: ResNetFPN().init_with_output(
      jax.random.key(0), jnp.zeros((2, height, width, 3)))[0])
  size = [height, width]
  for level in range(1, 7):  # every stride-2 step maps n -> ceil(n / 2)
    size = [math.ceil(n / 2) for n in size]
    if level >= 2:
      assert shapes[f"p{level}"].shape == (2, *size, 256), level


@pytest.mark.parametrize("src, dst", [(4, 7), (7, 13), (13, 25), (3, 6), (5, 5), (9, 4), (1, 3)])
def test_nearest_resize_matches_torch(src, dst):
  import_torchvision()
  import torch
  x = torch.randn(1, 2, src, src + 1, generator=torch.Generator().manual_seed(src))
  ref = torch.nn.functional.interpolate(x, size=(dst, dst + 2), mode="nearest")
  got = resize_nearest(_nhwc(x), (dst, dst + 2))
  np.testing.assert_array_equal(np.asarray(got), ref.permute(0, 2, 3, 1).numpy())


def _small(**kwargs):
  return ResNetFPN(backbone="resnet18", backbone_width=8, channels=16, **kwargs)


def _random_variables(model, images, seed=0):
  """Random variables of `model`'s shapes (numpy RNG: quicker than a ResNet's init on
  CPU); BatchNorm variances in [0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32),
                        shapes["params"])
  stats = {k: jax.tree.map(lambda s: rng.random(s.shape, np.float32) + 0.5, v)
           for k, v in shapes["batch_stats"].items()}
  return {"params": params, "batch_stats": stats}


def test_frozen_bn_uses_running_statistics_in_training():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _random_variables(_small(), images)
  evaluated = jax.jit(_small().apply)(variables, images)
  train = jax.jit(lambda m, v: m.apply(v, images, train=True, mutable=["batch_stats"]),
                  static_argnums=0)
  trained, updates = train(_small(), variables)
  for k in evaluated:
    np.testing.assert_array_equal(np.asarray(trained[k]), np.asarray(evaluated[k]))
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plain, _ = train(_small(frozen_bn=False), variables)
  assert not np.allclose(np.asarray(plain["p2"]), np.asarray(evaluated["p2"]), atol=1e-3)


def _torch_frozen_modules(tv, trainable_layers):
  """segjax module-name prefixes of the ResNet parameters that torchvision's
  resnet_fpn_backbone leaves with requires_grad=False."""
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  import torch
  model = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                              norm_layer=torch.nn.BatchNorm2d,
                              trainable_layers=trainable_layers)
  names = {"conv1": "stem_conv1", "bn1": "stem_bn1"}
  frozen = set()
  for key, p in model.body.named_parameters():
    top = key.split(".")[0]
    name = names.get(top) or f"stage{top[-1]}_block{key.split('.')[1]}"
    if not p.requires_grad:
      frozen.add(name)
  return frozen


@pytest.mark.parametrize("trainable_layers", [0, 3, 5])
def test_trainable_layers_match_torchvision(trainable_layers):
  tv = import_torchvision()
  model = _small(trainable_layers=trainable_layers, frozen_bn=False)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _random_variables(model, images)

  @jax.jit
  def grads(params):
    def loss(p):
      out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images,
                           train=True, mutable=["batch_stats"])
      return sum(jnp.sum(v ** 2) for v in out.values())
    return jax.grad(loss)(params)

  g = grads(variables["params"])
  zero = {k for k, sub in g["backbone"].items()
          if all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(sub))}
  assert zero == _torch_frozen_modules(tv, trainable_layers)
  assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g["fpn"]))
  mask = model.frozen_params_mask(variables["params"])
  assert {k for k, sub in mask["backbone"].items() if all(jax.tree.leaves(sub))} == zero
  assert not any(jax.tree.leaves(mask["fpn"]))


def test_convert_names_missing_and_unknown_keys():
  tv = import_torchvision()
  state = tv.models.detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None).backbone.state_dict()
  state = {f"backbone.{k}": v for k, v in state.items()}
  missing = dict(state)
  del missing["backbone.fpn.layer_blocks.2.0.bias"]
  with pytest.raises(ValueError, match=r"missing keys \['backbone\.fpn\.layer_blocks\.2\.0\.bias"):
    torch_resnet_fpn_to_flax(missing)
  state["backbone.fpn.inner_blocks.4.0.weight"] = state["backbone.fpn.inner_blocks.3.0.weight"]
  with pytest.raises(ValueError, match=r"unknown keys \['backbone\.fpn\.inner_blocks\.4\.0"):
    torch_resnet_fpn_to_flax(state)
  # A bare resnet_fpn_backbone state dict converts with prefix="".
  bare = {k[len("backbone."):]: v for k, v in state.items() if "inner_blocks.4" not in k}
  variables = torch_resnet_fpn_to_flax(bare, prefix="")
  np.testing.assert_array_equal(variables["params"]["fpn"]["inner_3"]["bias"],
                                bare["fpn.inner_blocks.3.0.bias"].numpy())


@pytest.mark.parametrize("build, message", [
    (lambda: ResNetFPN(trainable_layers=6), "trainable_layers must be 0-5"),
    (lambda: ResNetFPN(backbone="vgg16").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))),
     "needs a ResNet backbone"),
    (lambda: FPN().init(jax.random.key(0), {"stage1": jnp.zeros((1, 8, 8, 4))}),
     r"\['stage2', 'stage3', 'stage4'\] are not among"),
])
def test_bad_configuration(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_frozen_modules_by_trainable_layers():
  assert frozen_backbone_modules(5) == ()
  assert frozen_backbone_modules(3) == ("stem_", "stage1_")
  assert frozen_backbone_modules(0) == ("stem_", "stage1_", "stage2_", "stage3_", "stage4_")
