"""Models: shapes, dtypes, the registry and input checks (U-Net, FCN-8s); then SegNet,
DeconvNet and the U-Net variants (unpadded, ResNet encoder): output sizes, SegNet's index-based
unpooling against PyTorch, gradients in a training step, and parameter counts derived from the
papers' architectures."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segjax.models.deconvnet  # noqa: F401  (registers the models)
import segjax.models.segnet  # noqa: F401
import segjax.models.unet  # noqa: F401
from segjax.layers import ConvBNAct
from segjax.losses import pixel_cross_entropy
from segjax.models import MODELS, build_model
from segjax.models.segnet import VGG16_BLOCKS
from segjax.models.unet import unet_valid_output_size

TINY_UNET_FCN = {"unet": {"width": 4, "depth": 3},
                 "fcn8s": {"backbone": "vgg16_bn", "width": 4, "fc_width": 16, "pad_first": 0}}


def _init_zeros(model, shape):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                    jnp.zeros(shape), train=False)


@pytest.mark.parametrize("name", ["fcn8s", "unet"])
def test_logits_at_input_resolution(name):
  model = build_model(name, 5, TINY_UNET_FCN[name])
  variables = _init_zeros(model, (2, 64, 96, 3))
  logits = model.apply(variables, jnp.ones((2, 64, 96, 3)))
  assert logits.shape == (2, 64, 96, 5) and logits.dtype == jnp.float32
  # Training mode updates the BatchNorm statistics.
  _, updates = model.apply(variables, jnp.ones((2, 64, 96, 3)), train=True,
                           mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates["batch_stats"],
                                       variables["batch_stats"]))


@pytest.mark.parametrize("name", ["fcn8s", "unet"])
def test_bfloat16_compute_float32_params(name):
  model = build_model(name, 3, TINY_UNET_FCN[name], dtype="bfloat16", param_dtype="float32")
  variables = _init_zeros(model, (1, 64, 64, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.ones((1, 64, 64, 3)))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def test_unet_structure_follows_the_paper():
  model = build_model("unet", 2, {"width": 8, "depth": 2})
  params = _init_zeros(model, (1, 32, 32, 3))["params"]
  # Transposed convs are 2x2 and halve the channels; 1x1 classifier.
  assert params["upsample1"]["kernel"].shape == (2, 2, 32, 16)
  assert params["upsample0"]["kernel"].shape == (2, 2, 16, 8)
  # After concatenation with the encoder feature the first up conv sees 2x channels.
  assert params["up1"]["conv0"]["conv"]["kernel"].shape == (3, 3, 32, 16)
  assert params["classifier"]["kernel"].shape == (1, 1, 8, 2)


def test_registry_and_bad_inputs():
  assert {"unet", "fcn8s"} <= set(MODELS.names())
  with pytest.raises(KeyError, match="Unknown model 'nope'.*fcn8s.*unet"):
    build_model("nope", 3, {})
  with pytest.raises(ValueError, match="no option.*'widht'"):
    build_model("unet", 3, {"widht": 4})
  model = build_model("unet", 3, TINY_UNET_FCN["unet"])
  variables = _init_zeros(model, (1, 32, 32, 3))
  with pytest.raises(ValueError,
                     match=r"shaped \(batch, height, width, 3\), got shape \(32, 32, 3\)"):
    model.apply(variables, jnp.ones((32, 32, 3)))
  with pytest.raises(ValueError, match="dtype uint8"):
    model.apply(variables, jnp.ones((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match="divisible by 8"):
    model.apply(variables, jnp.ones((1, 36, 32, 3)))


# --- Encoder-decoder models: SegNet, DeconvNet, unpadded U-Net, U-Net on a ResNet ---

TINY = {
    "segnet": {"width": 4},
    "deconvnet": {"width": 4, "fc_width": 16},
    "unet_resnet": {"backbone": "resnet18", "backbone_width": 8, "decoder_width": 16},
    "unet_valid": {"width": 4, "depth": 2},
}
# RBG keys: XLA compiles their random bits far faster than threefry's on CPU.
RNGS = {"params": jax.random.key(0, impl="rbg"), "dropout": jax.random.key(1, impl="rbg")}


def _images(shape):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)


def _init(model, images, train=False):
  return jax.jit(lambda x: model.init(RNGS, x, train=train))(images)


def _logits(model, variables, images):
  return jax.jit(model.apply)(variables, images)


def _param_count(name, num_classes, shape):
  model = build_model(name, num_classes, {})
  variables = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros(shape), train=True))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name", ["segnet", "deconvnet", "unet_resnet"])
def test_logits_at_odd_input_size(name):
  model = build_model(name, 5, TINY[name])
  images = _images((2, 97, 129, 3))
  logits = _logits(model, _init(model, images), images)
  assert logits.shape == (2, 97, 129, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_unet_valid_gives_the_papers_sizes_and_rejects_others():
  model = build_model("unet_valid", 2, {"width": 2, "depth": 4})
  images = _images((1, 572, 572, 3))
  assert _logits(model, _init(model, images), images).shape == (1, 388, 388, 2)
  # The closed-form rule agrees with the network, per axis, at depth 2 as well.
  model = build_model("unet_valid", 2, TINY["unet_valid"])
  images = _images((1, 44, 100, 3))
  assert _logits(model, _init(model, images), images).shape == (1, 4, 60, 2)
  assert [unet_valid_output_size(s, 2) for s in (44, 100)] == [4, 60]
  with pytest.raises(ValueError, match="nearest valid sizes: 556, 572"):
    unet_valid_output_size(571, 4)
  with pytest.raises(ValueError, match="at least 44, got 40"):
    model.init(RNGS, _images((1, 40, 44, 3)))


def test_segnet_decoder_unpools_with_the_matching_encoder_indices():
  """The input of each decoder block's first conv is PyTorch's max_unpool2d of
  the previous stage's output at the argmax positions of the matching encoder
  block's max pool (its pre-pool activation pooled by F.max_pool2d), at the
  pre-pool size (odd here)."""
  model = build_model("segnet", 3, {"width": 2})
  images = _images((2, 37, 45, 3))

  @jax.jit
  def conv_inputs_and_outputs(variables):
    seen = {}
    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, ConvBNAct) and context.method_name == "__call__":
        seen[context.module.name] = (args[0], out)
      return out
    with nn.intercept_methods(record):
      model.apply(variables, images)
    return seen

  seen = jax.tree.map(np.array, conv_inputs_and_outputs(_init(model, images)))
  nchw = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  previous = None  # the decoder output feeding the next unpooling
  for b in reversed(range(1, len(VGG16_BLOCKS) + 1)):
    convs = VGG16_BLOCKS[b - 1][0]
    pre_pool = nchw(seen[f"block{b}_conv{convs}"][1])
    pooled, indices = F.max_pool2d(pre_pool, 2, 2, return_indices=True)
    values = pooled if previous is None else nchw(previous)
    expected = F.max_unpool2d(values, indices, 2, 2, output_size=pre_pool.shape[2:])
    decoder_input, _ = seen[f"decoder{b}_conv{convs}"]
    np.testing.assert_array_equal(decoder_input, expected.numpy().transpose(0, 2, 3, 1))
    assert (decoder_input == 0).mean() >= 0.75  # sparse: one value per 2x2 window at most
    if b > 1:
      previous = seen[f"decoder{b}_conv1"][1]


def test_deconvnet_fc6_is_valid_on_the_papers_input_and_same_on_short_axes():
  model = build_model("deconvnet", 4, {"width": 2, "fc_width": 8})
  for shape, fc6_hw in [((1, 224, 224, 3), (1, 1)), ((1, 97, 257, 3), (3, 2))]:
    images = _images(shape)
    logits, state = jax.jit(lambda v: model.apply(
        v, images, capture_intermediates=lambda m, _: m.name == "fc6"))(_init(model, images))
    assert state["intermediates"]["fc6"]["__call__"][0].shape == (1, *fc6_hw, 8)
    assert logits.shape == (*shape[:3], 4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_training_step_gradients_are_finite_and_nonzero_for_every_parameter(name):
  model = build_model(name, 3, TINY[name])
  images = _images((1, 64, 64, 3))
  variables = _init(model, images, train=True)
  out_hw = jax.eval_shape(model.apply, variables, images).shape[1:3]
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, (1, *out_hw)))

  @jax.jit
  def grads(params):
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, images, train=True,
                              mutable=["batch_stats"], rngs={"dropout": RNGS["dropout"]})
      return pixel_cross_entropy(logits, labels)
    return jax.grad(loss)(params)

  flat = jax.tree_util.tree_flatten_with_path(grads(variables["params"]))[0]
  bad = [jax.tree_util.keystr(path) for path, g in flat
         if not (np.all(np.isfinite(g)) and np.any(g != 0))]
  assert not bad, bad


def test_segnet_parameter_count():
  """SegNet, width 64, 11 classes (CamVid). Encoder, VGG-16's 13 bias-free 3x3
  convs: 9 * (3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 2*256*256 + 256*512
  + 5*512*512) = 14,710,464, and BN (2 per channel) over 4,224 channels 8,448.
  Decoder, the 12 mirrored convs (512->512 x5, 512->256, 256->256 x2, 256->128,
  128->128, 128->64, 64->64): 9 * 1,634,304 = 14,708,736, and BN over 3,712
  channels 7,424; the 3x3 classifier 9*64*11 + 11 = 6,347. Total 29,441,419
  (the paper's 29.5M)."""
  assert _param_count("segnet", 11, (1, 64, 64, 3)) == 29_441_419


def test_unet_valid_parameter_count():
  """The paper's U-Net, width 64, depth 4, 2 classes; 3x3 convs with bias
  (9*cin*cout + cout), no BN. Contracting: 3->64 1,792; 64->64 36,928; 64->128
  73,856; 128->128 147,584; 128->256 295,168; 256->256 590,080; 256->512
  1,180,160; 512->512 2,359,808; bottleneck 512->1024 4,719,616, 1024->1024
  9,438,208 (18,843,200). Expanding, per level the 2x2 up-conv (4*cin*cout +
  cout) and two convs, the first on the concatenation: 1024: 2,097,664 +
  4,719,104 + 2,359,808; 512: 524,544 + 1,179,904 + 590,080; 256: 131,200 +
  295,040 + 147,584; 128: 32,832 + 73,792 + 36,928 (12,188,480); 1x1
  classifier 130. Total 31,031,810 (the paper's ~31.0M)."""
  assert _param_count("unet_valid", 2, (1, 572, 572, 3)) == 31_031_810


def test_deconvnet_parameter_count():
  """DeconvNet, width 64, fc 4096, 21 classes (PASCAL VOC). VGG-16 convs + BN
  14,718,912 (as in SegNet); fc6 7*7*512*4096 + BN = 102,768,640; fc7
  4096*4096 + BN = 16,785,408; the 7x7 deconvolution 4096 -> 512 + BN
  102,761,472; 13 3x3 deconvolutions (512->512 x5, 512->256, 256->256 x2,
  256->128, 128->128, 128->64, 64->64 x2) 9 * 1,638,400 = 14,745,600 + BN over
  3,776 channels 7,552; 1x1 classifier 64*21 + 21 = 1,365. Total 251,788,949
  (the paper's 252M)."""
  assert _param_count("deconvnet", 21, (1, 224, 224, 3)) == 251_788_949


def test_train_step_crops_labels_for_the_valid_unet():
  """unet_valid predicts the central region: the loss uses the centre-cropped labels."""
  import functools
  import optax
  from segjax.losses import pixel_cross_entropy
  from segjax.tasks import semantic, variables_of
  from segjax.training import steps
  from segjax.training.train_state import TrainState
  model = build_model("unet_valid", 3, {"width": 2, "depth": 2})
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 60, 60, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, (2, 60, 60)), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False))(RNGS, images)
  tx = optax.sgd(0.1)
  state = TrainState.create(variables["params"], {}, tx)
  base = jax.random.key(3)
  objective = semantic.objective(model=model, ignore_index=255)
  _, metrics = steps.train_step(state, {"image": images, "label": labels}, base,
                                objective=objective, tx=tx,
                                schedule=optax.constant_schedule(0.1))
  logits = model.apply({"params": variables["params"]}, images, train=True,
                       rngs={"dropout": jax.random.fold_in(base, 0)})
  assert logits.shape[1:3] == (20, 20)
  expected = pixel_cross_entropy(logits, labels[:, 20:40, 20:40], 255)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
  confusion, predictions = semantic.eval_step(variables_of(state),
                                              {"image": images, "label": labels}, model=model,
                                              num_classes=3, ignore_index=255)
  assert predictions.shape == (2, 20, 20) and int(confusion.sum()) == 2 * 20 * 20
