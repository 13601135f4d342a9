"""segjax against mmsegmentation itself (tests/mmseg_reference.py imports it).

For each of the six mmseg-recipe configs, mmseg builds the model of the same
name from the config it ships, with random weights and random BatchNorm
statistics; its checkpoint ({"meta", "state_dict"}, saved as mmseg saves one)
loads into segjax's model with `load_peer_checkpoint`, and the two give the
same decode-head and auxiliary-head logits. On real photographs, segjax's
`SemanticPredictor` with the config's test settings labels the pixels as mmseg's
`inference_model` does (whole and slide inference, images enlarged and shrunk,
once at the config's own test scale). mmseg's IoUMetric and segjax's metrics
agree exactly, and so do mmseg's deterministic training transforms and segjax's.
"""
import functools
import importlib
import os
import tempfile

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.backbones import BACKBONES
from segjax.convert import load_peer_checkpoint, main as convert_main
from segjax.data import sources
from segjax.inference.semantic import SemanticPredictor
from segjax.layers import resize_bilinear
from segjax.models import build_model
from segjax.models.heads import FCNHead
from tests import mmseg_reference

CONFIGS = {
    "pspnet_ade20k": "pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py",
    "deeplabv3_ade20k": "deeplabv3/deeplabv3_r50-d8_4xb4-80k_ade20k-512x512.py",
    "deeplabv3plus_ade20k": "deeplabv3plus/deeplabv3plus_r50-d8_4xb4-80k_ade20k-512x512.py",
    "fcn_ade20k": "fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py",
    "pspnet_cityscapes": "pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py",
    "deeplabv3plus_cityscapes":
        "deeplabv3plus/deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py",
}
GPUS = 4  # mmseg's recipes: 4 GPUs, per-GPU batch in the config
RTOL = 1e-4


@pytest.fixture(scope="module")
def mmseg():
  return mmseg_reference.import_mmseg()


def _config(name, variant=""):
  return importlib.import_module(f"configs.{name}").get_config(variant)


def _num_classes(config):
  return len(sources.archive_dataset(config.data.name).class_names)


def _mmseg_config(name):
  from mmengine import Config
  return Config.fromfile(mmseg_reference.config_path(CONFIGS[name]))


def _save_checkpoint(model, path):
  import torch
  torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": model.state_dict()}, path)


def _build(name, seed=0):
  """(mmseg model, segjax config, segjax model, segjax variables from its checkpoint)."""
  mm = mmseg_reference.init_model(CONFIGS[name], seed=seed)
  config = _config(name)
  model = build_model(config.model.name, _num_classes(config), config.model.options)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint.pth")
    _save_checkpoint(mm, path)
    variables = load_peer_checkpoint(path, model)
  return mm, config, model, variables


_cached_build = functools.lru_cache(maxsize=2)(_build)


def _relative_error(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_the_mmseg_recipe(mmseg, name):
  """Model, data, schedule and test settings of the config are mmseg's."""
  del mmseg
  ref, config = _mmseg_config(name), _config(name)
  model, options = ref.model, config.model.options
  assert model.backbone.type == "ResNetV1c" and model.backbone.depth == 50
  assert options.backbone == "resnet50_v1c" and options.output_stride == 8
  assert tuple(model.backbone.dilations) == (1, 1, 2, 4) and tuple(model.backbone.strides) == (
      1, 2, 1, 1)
  assert model.backbone.contract_dilation and options.contract_dilation
  assert config.model.init_from == "resnet50_v1c"
  assert model.pretrained == "open-mmlab://resnet50_v1c"
  aux = model.auxiliary_head
  assert (aux.type, aux.in_index, aux.channels, aux.num_convs, aux.concat_input) == (
      "FCNHead", 2, 256, 1, False)
  assert options.aux_channels == 256 and config.loss.aux_weight == aux.loss_decode.loss_weight
  assert model.decode_head.num_classes == _num_classes(config)
  head = model.decode_head
  expected_model = {"PSPHead": "pspnet", "ASPPHead": "deeplabv3_mmseg",
                    "DepthwiseSeparableASPPHead": "deeplabv3plus_mmseg",
                    "FCNHead": "fcn_mmseg"}[head.type]
  assert config.model.name == expected_model
  if head.type == "PSPHead":
    assert (tuple(options.pool_bins), options.head_channels) == (tuple(head.pool_scales),
                                                                 head.channels)
  else:
    assert options.channels == head.channels
  if "ASPP" in head.type:
    assert tuple(options.dilations) == tuple(head.dilations)
  if head.type == "DepthwiseSeparableASPPHead":
    assert options.c1_channels == head.c1_channels
  if head.type == "FCNHead":
    assert (options.num_convs, options.concat_input) == (head.num_convs, head.concat_input)
  assert options.dropout == head.dropout_ratio

  train = {t.type: t for t in ref.train_pipeline}
  resize, crop = train["RandomResize"], train["RandomCrop"]
  ops = config.data.train_ops
  assert (f"random_resize(scale={tuple(resize.scale)}, "
          f"ratio_range={tuple(resize.ratio_range)})") in ops
  assert (f"random_crop(size={tuple(crop.crop_size)}, "
          f"cat_max_ratio={crop.cat_max_ratio})") in ops
  assert f"random_flip(prob={train['RandomFlip'].prob})" in ops and "photometric" in ops
  assert f"pad(size={tuple(ref.model.data_preprocessor.size)})" in ops
  reduce_zero = train["LoadAnnotations"].get("reduce_zero_label", False)
  assert ops.startswith("reduce_zero_label|") == reduce_zero
  assert (config.inference.label_ops == "reduce_zero_label") == reduce_zero
  assert config.data.batch_size == GPUS * ref.train_dataloader.batch_size
  assert tuple(config.data.mean) == tuple(ref.model.data_preprocessor.mean)
  assert tuple(config.data.std) == tuple(ref.model.data_preprocessor.std)

  test_resize = [t for t in ref.test_pipeline if t.type == "Resize"][0]
  assert test_resize.keep_ratio and tuple(config.inference.scale) == tuple(test_resize.scale)
  assert config.inference.mode == ref.model.test_cfg.mode and config.inference.exact_shapes

  optimizer, (schedule,) = ref.optim_wrapper.optimizer, ref.param_scheduler
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum,
          config.optimizer.weight_decay) == ("sgd", optimizer.lr, optimizer.momentum,
                                             optimizer.weight_decay)
  assert (config.optimizer.schedule, config.optimizer.poly_power,
          config.optimizer.min_learning_rate) == ("poly", schedule.power, schedule.eta_min)
  assert config.total_steps == ref.train_cfg.max_iters == schedule.end


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_variant_trains_from_scratch(name):
  config = _config(name, "smoke")
  assert config.model.init_from == "" and config.data.name == "segjax_shapes"
  assert config.model.name == _config(name).model.name


# ---------------------------------------------------------------------------- weights


def _segjax_aux_logits(model, variables, images):
  """The auxiliary head's logits at the input size, as the model computes them in
  training, here with BatchNorm running statistics (mmseg's eval-mode aux head)."""
  part = lambda key: {c: variables[c][key] for c in variables}
  backbone = BACKBONES.get(model.backbone)(output_stride=model.output_stride,
                                           contract_dilation=model.contract_dilation,
                                           width=model.backbone_width)
  features = backbone.apply(part("backbone"), images, False)
  aux = FCNHead(model.num_classes, model.aux_channels).apply(part("aux_head"),
                                                              features["stage3"], False)
  return resize_bilinear(aux, images.shape[1:3], align_corners=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_checkpoint_gives_mmseg_logits(mmseg, name):
  import torch
  from mmseg.models.utils import resize
  mm, _, model, variables = (_cached_build if "ade20k" in name else _build)(name)
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert params == sum(p.numel() for p in mm.parameters())
  size = (97, 129)  # odd sizes: every stride-2 layer rounds up, as in PyTorch
  x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    features = mm.extract_feat(x)
    up = lambda y: resize(y, size=size, mode="bilinear", align_corners=False).permute(
        0, 2, 3, 1).numpy()
    decode, aux = up(mm.decode_head.forward(features)), up(mm.auxiliary_head.forward(features))
  images = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert _relative_error(logits, decode) < RTOL
  assert _relative_error(_segjax_aux_logits(model, variables, images), aux) < RTOL


def test_checkpoint_cli_and_loader_agree_and_refuse_bad_keys(mmseg, tmp_path, capsys):
  """`python -m segjax.convert --arch pspnet_r50-d8` writes what the loader reads from
  the .pth; missing, unknown and misshapen keys are named."""
  import torch
  mm, _, model, variables = _cached_build("pspnet_ade20k")
  pth, npz = str(tmp_path / "pspnet.pth"), str(tmp_path / "pspnet.npz")
  _save_checkpoint(mm, pth)
  convert_main(["--arch", "pspnet_r50-d8", "--input", pth, "--output", npz])
  assert "49,076,364 parameters" in capsys.readouterr().out
  again = load_peer_checkpoint(npz, model)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)

  state = dict(mm.state_dict())
  bad = str(tmp_path / "bad.pth")
  missing = dict(state)
  del missing["decode_head.bottleneck.bn.running_var"]
  torch.save({"state_dict": missing}, bad)
  with pytest.raises(ValueError, match=r"missing keys \['decode_head.bottleneck.bn.running_var'"):
    load_peer_checkpoint(bad, model)
  torch.save({"state_dict": {**state, "decode_head.extra.weight": torch.zeros(1)}}, bad)
  with pytest.raises(ValueError, match=r"unknown keys \['decode_head.extra.weight'\]"):
    load_peer_checkpoint(bad, model)
  wrong_classes = build_model("pspnet", 151, _config("pspnet_ade20k").model.options)
  with pytest.raises(ValueError, match=r"conv_seg.bias has shape \(150,\) .*; decode_head.conv_seg"
                                       r".weight has shape \(1, 1, 512, 150\)"):
    load_peer_checkpoint(pth, wrong_classes)
  no_aux = build_model("pspnet", 150, {**_config("pspnet_ade20k").model.options,
                                       "aux_channels": 0})
  with pytest.raises(ValueError, match=r"unknown keys \['auxiliary_head.conv_seg.bias'"):
    load_peer_checkpoint(pth, no_aux)
  with pytest.raises(ValueError, match=r"misshapen \[.*'params/classifier/bias \(150,\) \(needs "
                                       r"\(151,\)\)'"):
    load_peer_checkpoint(npz, wrong_classes)
  with pytest.raises(ValueError, match="does not exist"):
    load_peer_checkpoint(str(tmp_path / "nope.pth"), model)


# ---------------------------------------------------------------------------- labels


def _photo(name, size=None):
  import skimage.data
  image = getattr(skimage.data, name)()[..., :3]
  if size is not None:  # (h, w), a larger photograph for the shrinking case
    image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_CUBIC)
  return np.ascontiguousarray(image)


def _mmseg_labels(mm, image, tmp_path, scale):
  """mmseg's `inference_model` on the photo written to a file (BGR PNG, lossless)."""
  from mmseg.apis import inference_model
  path = str(tmp_path / "photo.png")
  cv2.imwrite(path, image[..., ::-1])
  for step in mm.cfg.test_pipeline:
    if step.type == "Resize":
      step.scale = tuple(scale)
  return inference_model(mm, path).pred_sem_seg.data[0].numpy()


def _agreement(mm, config, model, variables, image, tmp_path, scale, **slide):
  mm.test_cfg = type(mm.test_cfg)(dict(mode="slide", **slide) if slide else dict(mode="whole"))
  ref = _mmseg_labels(mm, image, tmp_path, scale)
  kw = dict(window=slide["crop_size"], stride=slide["stride"], window_batch=2) if slide else {}
  predictor = SemanticPredictor(model, variables, model.num_classes, mean=config.data.mean,
                                std=config.data.std, mode="slide" if slide else "whole",
                                scale=scale, exact_shapes=config.inference.exact_shapes, **kw)
  ours = predictor.predict(image)
  assert ours.shape == ref.shape == image.shape[:2]
  # Random weights still label photographs by their content: several classes, none all over.
  counts = np.bincount(ref.ravel(), minlength=model.num_classes) / ref.size
  assert (counts > 0.005).sum() >= 3 and counts.max() < 0.9, np.sort(counts)[-5:]
  return float((ours == ref).mean())


def test_whole_image_labels_at_the_config_scale(mmseg, tmp_path):
  """PSPNet-ADE20K at its own test scale (2048, 512): coffee (400x600) is enlarged."""
  mm, config, model, variables = _cached_build("pspnet_ade20k")
  assert _agreement(mm, config, model, variables, _photo("coffee"), tmp_path,
                    config.inference.scale) >= 0.995


@pytest.mark.parametrize("name, photo, size, scale", [
    ("fcn_ade20k", "astronaut", None, (256, 192)),  # 512x512 -> 192x192
    ("deeplabv3plus_ade20k", "rocket", (700, 1050), (512, 256)),  # 700x1050 -> 256x384
])
def test_whole_image_labels_of_shrunk_photos(mmseg, tmp_path, name, photo, size, scale):
  mm, config, model, variables = _cached_build(name)
  assert _agreement(mm, config, model, variables, _photo(photo, size), tmp_path,
                    scale) >= 0.995


def test_slide_inference_labels(mmseg, tmp_path):
  """mmseg's slide_inference: rocket resized to 256x384; 288x288 windows at stride 192
  (two columns; the image is lower than a window, which then shrinks to it)."""
  mm, config, model, variables = _cached_build("fcn_ade20k")
  assert _agreement(mm, config, model, variables, _photo("rocket"), tmp_path, (512, 256),
                    crop_size=(288, 288), stride=(192, 192)) >= 0.995
