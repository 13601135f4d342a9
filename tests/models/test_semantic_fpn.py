"""Panoptic FPN's semantic branch: `SemanticFPNHead` against a torch re-implementation of
detectron2's SemSegFPNHead with the same weights, its shapes on FPN maps of odd sizes,
gradients, init, `upsample_logits`, and the `panoptic_semantic` target op."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segjax.data import shapes
from segjax.data.transforms import PREPROCESS_OPS, parse_pipeline
from segjax.models.fpn import ResNetFPN
from segjax.models.semantic_fpn import SemanticFPNHead, upsample_logits

LEVELS = ("p2", "p3", "p4", "p5")


def _features(sizes, channels, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal((batch, h, w, channels)).astype(np.float32)
          for k, (h, w) in zip(LEVELS, sizes)}


# detectron2's SemSegFPNHead, written out in torch.


def _torch_head(in_channels, channels, num_classes, norm, seed=0):
  """Per level, a list of (conv, groupnorm or None) stages; and the predictor. Biases and
  GroupNorm affines are random, so that none is the identity."""
  g = torch.Generator().manual_seed(seed)
  branches = []
  for level in range(len(LEVELS)):
    stages = []
    for k in range(max(1, level)):
      conv = torch.nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1,
                             bias=not norm)
      gn = torch.nn.GroupNorm(32, channels) if norm else None
      if conv.bias is not None:
        conv.bias.data = 0.1 * torch.randn(channels, generator=g)
      if gn is not None:
        gn.weight.data = 1 + 0.2 * torch.randn(channels, generator=g)
        gn.bias.data = 0.2 * torch.randn(channels, generator=g)
      stages.append((conv, gn))
    branches.append(stages)
  predictor = torch.nn.Conv2d(channels, num_classes, 1)
  predictor.bias.data = 0.1 * torch.randn(num_classes, generator=g)
  return branches, predictor


def _torch_forward(branches, predictor, feats, exact_sizes):
  """Sum of the level branches, then the predictor. Upsampling is detectron2's
  scale_factor=2, or with `exact_sizes` a resize to the next finer level's size."""
  total = 0
  for level, (x, stages) in enumerate(zip(feats, branches)):
    for k, (conv, gn) in enumerate(stages):
      x = F.relu(conv(x) if gn is None else gn(conv(x)))
      if level and exact_sizes:
        x = F.interpolate(x, size=feats[level - 1 - k].shape[-2:], mode="bilinear",
                          align_corners=False)
      elif level:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    total = total + x
  return predictor(total)


def _to_flax(branches, predictor):
  """The torch weights in `SemanticFPNHead`'s parameter layout, copied by hand."""
  kernel = lambda conv: jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  vec = lambda t: jnp.asarray(t.detach().numpy())
  params = {}
  for key, stages in zip(LEVELS, branches):
    for k, (conv, gn) in enumerate(stages):
      params[f"{key}_{k}"] = {"kernel": kernel(conv)}
      if conv.bias is not None:
        params[f"{key}_{k}"]["bias"] = vec(conv.bias)
      if gn is not None:
        params[f"{key}_{k}_norm"] = {"scale": vec(gn.weight), "bias": vec(gn.bias)}
  params["predictor"] = {"kernel": kernel(predictor), "bias": vec(predictor.bias)}
  return {"params": params}


@pytest.mark.parametrize("norm", ["GN", ""])
@pytest.mark.parametrize("sizes,exact", [
    (((16, 16), (8, 8), (4, 4), (2, 2)), False),   # detectron2's padded case
    (((24, 20), (12, 10), (6, 5), (3, 3)), True),  # a 96x80 image: P5 is not half of P4
])
def test_matches_torch_semsegfpnhead(norm, sizes, exact):
  branches, predictor = _torch_head(16, 64, 5, norm)
  feats = _features(sizes, 16)
  with torch.no_grad():
    expected = _torch_forward(branches, predictor,
                              [torch.from_numpy(feats[k].transpose(0, 3, 1, 2)) for k in LEVELS],
                              exact).numpy().transpose(0, 2, 3, 1)
  head = SemanticFPNHead(num_classes=5, channels=64, norm=norm)
  variables = _to_flax(branches, predictor)
  reference = jax.eval_shape(head.init, jax.random.key(0), feats)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference)
  got = np.asarray(jax.jit(head.apply)(variables, feats))
  assert got.shape == expected.shape == (2,) + sizes[0] + (5,)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_shapes_on_resnet_fpn_pyramids(size):
  # Shapes only (traced, not run): the head's numbers are checked against torch above.
  fpn = ResNetFPN("resnet18", channels=32, backbone_width=8)
  images = jax.ShapeDtypeStruct((2,) + size + (3,), jnp.float32)
  feats = jax.eval_shape(lambda x: fpn.apply(fpn.init(jax.random.key(0), x), x), images)
  assert [feats[k].shape[1:3] for k in LEVELS] == [
      tuple(math.ceil(s / stride) for s in size) for stride in (4, 8, 16, 32)]
  head = SemanticFPNHead(num_classes=4, channels=32)
  logits = jax.eval_shape(lambda f: head.apply(head.init(jax.random.key(1), f), f), feats)
  assert logits.shape == (2, size[0] // 4, size[1] // 4, 4) and logits.dtype == jnp.float32
  full = jax.eval_shape(lambda y: upsample_logits(y, size), logits)
  assert full.shape == (2,) + size + (4,)
  half = SemanticFPNHead(num_classes=4, channels=32, dtype=jnp.bfloat16)
  variables, logits = jax.eval_shape(
      lambda f: (lambda v: (v, half.apply(v, f)))(half.init(jax.random.key(1), f)), feats)
  assert logits.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(lambda y: upsample_logits(y, size), logits).dtype == jnp.float32


def test_gradients_reach_every_level():
  # The pyramid of a 96x80 image (above), where 2x P5 (3x3) is not P4's size (6x5).
  feats = _features(((24, 20), (12, 10), (6, 5), (3, 3)), 16)
  head = SemanticFPNHead(num_classes=4, channels=32)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 24, 20, 4)), jnp.float32)

  @jax.jit
  def grads(f):
    loss = lambda p, f: jnp.sum(head.apply({"params": p}, f) * weights)
    return jax.grad(loss, argnums=(0, 1))(head.init(jax.random.key(1), f)["params"], f)

  param_grads, feat_grads = grads(feats)
  names = {f"{k}_{i}" for k, n in zip(LEVELS, (1, 1, 2, 3)) for i in range(n)}
  assert set(param_grads) == names | {f"{n}_norm" for n in names} | {"predictor"}
  for name, leaves in param_grads.items():
    for leaf, g in leaves.items():
      assert float(jnp.abs(g).max()) > 0, (name, leaf)
  assert all(float(jnp.abs(feat_grads[k]).max()) > 0 for k in LEVELS)


def test_norm_on_and_off_parameters():
  # (The two variants' outputs are checked against torch above.)
  feats = _features(((8, 8), (4, 4), (2, 2), (1, 1)), 8)
  gn, plain = (jax.eval_shape(SemanticFPNHead(num_classes=3, channels=64, norm=norm).init,
                              jax.random.key(0), feats) for norm in ("GN", ""))
  assert set(gn) == set(plain) == {"params"}  # GroupNorm keeps no running statistics
  gn, plain = gn["params"], plain["params"]
  for name in ("p2_0", "p3_0", "p4_0", "p4_1", "p5_0", "p5_1", "p5_2"):
    assert set(gn[name]) == {"kernel"} and set(gn[f"{name}_norm"]) == {"scale", "bias"}
    assert set(plain[name]) == {"kernel", "bias"} and f"{name}_norm" not in plain
  assert set(gn["predictor"]) == set(plain["predictor"]) == {"kernel", "bias"}


def test_init_statistics():
  feats = _features(((2, 2), (1, 1), (1, 1), (1, 1)), 256, batch=1)
  default = SemanticFPNHead(num_classes=54)
  small = SemanticFPNHead(num_classes=54, predictor_std=0.001, norm="")
  params, small = jax.jit(lambda f: [m.init(jax.random.key(0), f)["params"]
                                     for m in (default, small)])(feats)
  for name, p in params.items():
    if name.endswith("_norm"):
      assert np.all(np.asarray(p["scale"]) == 1) and np.all(np.asarray(p["bias"]) == 0)
      continue
    w = np.asarray(p["kernel"])
    kh, kw, cin, cout = w.shape
    if name == "predictor":
      assert w.shape == (1, 1, 128, 54) and np.all(np.asarray(p["bias"]) == 0)
    else:
      assert (kh, kw, cout) == (3, 3, 128) and cin in (256, 128) and "bias" not in p
    std = math.sqrt(2.0 / (kh * kw * cout))  # kaiming normal, fan_out, ReLU gain
    assert abs(w.mean()) < 0.05 * std, name
    assert abs(w.std() / std - 1) < 0.05, (name, w.std(), std)
    assert np.abs(w).max() > 3 * std, name  # a normal, not a normal truncated at 2 std
  assert abs(np.asarray(small["predictor"]["kernel"]).std() / 0.001 - 1) < 0.05
  for name, p in small.items():
    assert np.all(np.asarray(p["bias"]) == 0), name


def test_rejects_bad_configuration():
  with pytest.raises(ValueError, match="norm must be one of"):
    SemanticFPNHead(num_classes=3, norm="BN")
  with pytest.raises(ValueError, match="multiple of 32"):
    SemanticFPNHead(num_classes=3, channels=48)
  SemanticFPNHead(num_classes=3, channels=48, norm="")
  with pytest.raises(ValueError, match="doubling from common_stride"):
    SemanticFPNHead(num_classes=3, common_stride=8)
  with pytest.raises(ValueError, match="one stride per feature"):
    SemanticFPNHead(num_classes=3, in_features=("p2", "p3"))
  with pytest.raises(ValueError, match="predictor_std"):
    SemanticFPNHead(num_classes=3, predictor_std=0.0)
  feats = _features(((8, 8), (4, 4), (2, 2)), 8)
  with pytest.raises(ValueError, match=r"\['p5'\] are not among"):
    SemanticFPNHead(num_classes=3, channels=32).init(jax.random.key(0), feats)


def test_upsample_logits_matches_torch_scale_factor_and_crop():
  # A 65x50 image gives stride-4 logits of ceil(65 / 4) x ceil(50 / 4) = 17 x 13;
  # detectron2 upsamples 4x (to the padded 68 x 52) and crops the image away.
  logits = np.random.default_rng(0).standard_normal((2, 17, 13, 3)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(logits.transpose(0, 3, 1, 2)), scale_factor=4,
                           mode="bilinear", align_corners=False)[:, :, :65, :50]
  assert upsample_logits(jnp.asarray(logits, jnp.bfloat16), (65, 50)).dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(upsample_logits(logits, (65, 50))),
                             expected.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not come from a 64x50 image"):
    upsample_logits(logits, (64, 50))
  with pytest.raises(ValueError, match="NHWC"):
    upsample_logits(logits[0], (65, 50))


# The panoptic_semantic op.

LABEL = np.array([[4, 4, 0, 255],
                  [5, 1, 1, 6],
                  [6, 255, 3, 2]], np.uint8)


def test_panoptic_semantic_merge_and_keep():
  example = {"label": LABEL.copy(), "image": np.zeros((3, 4, 3), np.uint8)}
  merged = parse_pipeline("panoptic_semantic(stuff_classes=(4, 5, 6))")(example, None)
  np.testing.assert_array_equal(merged["label"], [[1, 1, 0, 255],
                                                  [2, 0, 0, 3],
                                                  [3, 255, 0, 0]])
  assert merged["label"].dtype == np.uint8 and merged["image"] is example["image"]
  np.testing.assert_array_equal(example["label"], LABEL)  # input untouched
  # The order of stuff_classes sets the ids; 5 is not stuff here, so it is a thing.
  reordered = PREPROCESS_OPS.get("panoptic_semantic")((6, 4), things="merge")(example, None)
  np.testing.assert_array_equal(reordered["label"], [[2, 2, 0, 255],
                                                     [0, 0, 0, 1],
                                                     [1, 255, 0, 0]])
  custom = PREPROCESS_OPS.get("panoptic_semantic")((4, 5), ignore_index=6)(
      {"label": LABEL}, None)
  np.testing.assert_array_equal(custom["label"][1], [2, 0, 0, 6])  # 6 is ignore now
  kept = parse_pipeline('panoptic_semantic(stuff_classes=(4, 5, 6), things="keep")')(
      example, None)
  np.testing.assert_array_equal(kept["label"], LABEL)


def test_panoptic_semantic_on_shapes_scene():
  scene = shapes.generate_example(np.random.default_rng(3))
  out = PREPROCESS_OPS.get("panoptic_semantic")(shapes.STUFF_CLASSES)(scene, None)["label"]
  label = scene["label"].astype(int)
  # segjax_shapes: things 0-3 -> 0, stuff 4, 5, 6 -> 1, 2, 3, ignore kept.
  expected = np.where(label == 255, 255, np.where(label >= 4, label - 3, 0))
  np.testing.assert_array_equal(out, expected)
  assert {0, 255} <= set(np.unique(out).tolist())


def test_panoptic_semantic_errors():
  op = PREPROCESS_OPS.get("panoptic_semantic")
  with pytest.raises(ValueError, match="stuff_classes"):
    op(())
  with pytest.raises(ValueError, match="stuff_classes"):
    op((4, 4))
  with pytest.raises(ValueError, match="things"):
    op((4,), things="drop")
  with pytest.raises(ValueError, match="ignore_index 255 is among stuff_classes"):
    op((4, 255))
  with pytest.raises(ValueError, match="would include ignore_index 2"):
    op((4, 5), ignore_index=2)
  with pytest.raises(ValueError, match="run squeeze_labels first"):
    op((4,))({"label": LABEL[..., None]}, None)
  with pytest.raises(KeyError, match="needs `label`"):
    op((4,), things="keep")({"image": LABEL}, None)
