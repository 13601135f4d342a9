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
  assert (counts > 0.005).sum() >= 3 and counts.max() < 0.95, np.sort(counts)[-5:]
  return float((ours == ref).mean())


def test_whole_image_labels_at_the_config_scale(mmseg, tmp_path):
  """PSPNet-ADE20K at its own test scale (2048, 512): coffee (400x600) is enlarged."""
  mm, config, model, variables = _cached_build("pspnet_ade20k")
  assert _agreement(mm, config, model, variables, _photo("coffee"), tmp_path,
                    config.inference.scale) >= 0.995


@pytest.mark.parametrize("name, photo, size, scale", [
    ("fcn_ade20k", "astronaut", None, (256, 192)),  # 512x512 -> 192x192
    ("pspnet_ade20k", "rocket", (700, 1050), (512, 256)),  # 700x1050 -> 256x384
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


# ---------------------------------------------------------------------------- metrics


def test_iou_metric_equals_mmseg(mmseg):
  """The same predictions scored by mmseg's IoUMetric and by segjax's confusion matrix."""
  import torch
  from mmseg.evaluation import IoUMetric
  from segjax.metrics import confusion_matrix, segmentation_metrics
  num_classes, rng = 6, np.random.default_rng(0)
  metric = IoUMetric(ignore_index=255, iou_metrics=["mIoU", "mDice", "mFscore"])
  metric.dataset_meta = {"classes": [f"c{i}" for i in range(num_classes)]}
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for shape in ((40, 60), (33, 47), (64, 64)):
    labels = rng.integers(0, num_classes - 1, shape)  # class 5 is never labelled
    labels[rng.random(shape) < 0.1] = 255
    predictions = np.where(rng.random(shape) < 0.6, labels % num_classes,
                           rng.integers(0, num_classes, shape))
    predictions[labels == 255] = rng.integers(0, num_classes, (labels == 255).sum())
    metric.process({}, [{"pred_sem_seg": {"data": torch.as_tensor(predictions)[None]},
                         "gt_sem_seg": {"data": torch.as_tensor(labels)[None]}}])
    confusion += np.asarray(confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels),
                                             num_classes, 255))
  intersect, union, pred_area, label_area = (sum(r[i] for r in metric.results) for i in range(4))
  np.testing.assert_array_equal(np.diag(confusion), intersect.numpy())
  np.testing.assert_array_equal(confusion.sum(0) + confusion.sum(1) - np.diag(confusion),
                                union.numpy())
  np.testing.assert_array_equal(confusion.sum(0), pred_area.numpy())
  np.testing.assert_array_equal(confusion.sum(1), label_area.numpy())
  ref = IoUMetric.total_area_to_metrics(intersect, union, pred_area, label_area,
                                        ["mIoU", "mDice", "mFscore"])
  ours = segmentation_metrics(confusion)
  for key in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"):
    np.testing.assert_allclose(ours[key], np.asarray(ref[key], np.float64), rtol=1e-6)
  np.testing.assert_allclose(ours["aAcc"], float(ref["aAcc"]), rtol=1e-6)
  summary = metric.compute_metrics(metric.results)  # mmseg's reported numbers: % to 2 places
  for key in ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall"):
    # The same two-decimal figure (mmseg's is float32, hence the float32 comparison).
    assert np.float32(summary[key]) == np.float32(np.round(ours[key] * 100, 2)), key


# ---------------------------------------------------------------------------- transforms


class _Draws:
  """A stand-in for the np.random.Generator segjax's ops take, returning scripted draws."""

  def __init__(self, uniforms=(), integers=(), randoms=()):
    self._uniforms, self._integers, self._randoms = (list(uniforms), list(integers),
                                                     list(randoms))

  def uniform(self, low, high):
    return self._uniforms.pop(0) * (high - low) + low  # mmcv's ratio formula

  def integers(self, low, high):
    value = self._integers.pop(0)
    assert low <= value < high
    return value

  def random(self):
    return self._randoms.pop(0)


def _example(h, w, seed=0, dominant=None):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  label = rng.integers(0, 5, (h, w)).astype(np.uint8)
  if dominant is not None:  # one class over most of the top-left, for cat_max_ratio retries
    label[:dominant[0], :dominant[1]] = 3
  return image, label


def _op(spec):
  from segjax.data import transforms
  return transforms.parse_pipeline(spec)


@pytest.mark.parametrize("u", [0.0, 0.37, 0.999])
def test_random_resize_scale_and_image_equal_mmseg(mmseg, monkeypatch, u):
  """mmcv's RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True) and
  segjax's random_resize with the same ratio draw: the same target size and image.
  (Labels differ by design: mmcv resizes them with cv2.INTER_NEAREST, whose samples sit
  half a pixel off the image's; segjax samples at the image's pixel centres.)"""
  from mmcv.transforms import RandomResize
  image, label = _example(375, 500)
  monkeypatch.setattr(np.random, "random_sample", lambda *a: u)
  ref = RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)(
      {"img": image, "gt_seg_map": label, "seg_fields": ["gt_seg_map"],
       "img_shape": image.shape[:2]})
  ours = _op("random_resize(scale=(2048, 512), ratio_range=(0.5, 2.0))")(
      {"image": image, "label": label}, _Draws(uniforms=[u]))
  assert ours["image"].shape == ref["img"].shape and ours["label"].shape == ref["gt_seg_map"].shape
  np.testing.assert_array_equal(ours["image"], ref["img"])


def test_test_resize_equals_mmseg(mmseg):
  """mmcv's Resize(scale, keep_ratio=True) of the test pipelines, image sizes and pixels."""
  from mmcv.transforms import Resize
  from segjax.inference.semantic import resized_size
  for (h, w), scale in [((375, 500), (2048, 512)), ((1024, 2048), (2048, 1024)),
                        ((700, 1050), (512, 256)), ((333, 1999), (2048, 512))]:
    image, _ = _example(h, w)
    ref = Resize(scale=scale, keep_ratio=True)({"img": image})["img"]
    assert resized_size(h, w, scale) == ref.shape[:2]
    ours = _op(f"resize(scale={scale}, resize_labels=False)")({"image": image}, None)["image"]
    np.testing.assert_array_equal(ours, ref)


def test_random_crop_with_cat_max_ratio_retries_equals_mmseg(mmseg, monkeypatch):
  """mmseg's RandomCrop(crop_size, cat_max_ratio=0.75) and segjax's random_crop given the
  same offset draws: the same rejected windows and the same final crop."""
  from mmseg.datasets.transforms import RandomCrop
  image, label = _example(300, 400, dominant=(250, 330))
  # (y, x) offsets: the first three fall in the one-class corner and are rejected.
  offsets = [(0, 0), (10, 20), (30, 5), (172, 240)]
  for cat_max_ratio, expected in ((0.75, offsets[3]), (1.0, offsets[0])):
    draws = [v for yx in offsets for v in yx]
    script = iter(draws)
    monkeypatch.setattr(np.random, "randint", lambda low, high: next(script))
    ref = RandomCrop(crop_size=(128, 160), cat_max_ratio=cat_max_ratio)(
        {"img": image, "gt_seg_map": label, "seg_fields": ["gt_seg_map"],
         "img_shape": image.shape[:2]})
    ours = _op(f"random_crop(size=(128, 160), cat_max_ratio={cat_max_ratio})")(
        {"image": image, "label": label}, _Draws(integers=draws))
    y, x = expected
    np.testing.assert_array_equal(ref["img"], image[y:y + 128, x:x + 160])
    np.testing.assert_array_equal(ours["image"], ref["img"])
    np.testing.assert_array_equal(ours["label"], ref["gt_seg_map"])


def test_flip_and_label_padding_equal_mmseg(mmseg):
  """RandomFlip(prob=1) flips image and labels alike; mmseg's data preprocessor pads the
  batch bottom/right to the crop size, labels with 255 and images with 0, as segjax's pad
  op does. (mmseg pads after normalizing, so its padded pixels are the mean colour where
  segjax's are black; `stack_batch` is given the image before normalization here.)"""
  import torch
  from mmcv.transforms import RandomFlip
  from mmseg.utils import stack_batch
  from mmseg.structures import SegDataSample
  from mmengine.structures import PixelData
  image, label = _example(90, 120)
  ref = RandomFlip(prob=1.0)({"img": image, "gt_seg_map": label, "seg_fields": ["gt_seg_map"],
                              "img_shape": image.shape[:2]})
  ours = _op("random_flip(prob=1.0)")({"image": image, "label": label}, _Draws(randoms=[0.5]))
  np.testing.assert_array_equal(ours["image"], ref["img"])
  np.testing.assert_array_equal(ours["label"], ref["gt_seg_map"])

  sample = SegDataSample(gt_sem_seg=PixelData(data=torch.as_tensor(label)[None]))
  inputs = torch.as_tensor(image).permute(2, 0, 1).float()
  padded, (sample,) = stack_batch([inputs], [sample], size=(128, 160), pad_val=0,
                                  seg_pad_val=255)
  ours = _op("pad(size=(128, 160))")({"image": image, "label": label}, None)
  np.testing.assert_array_equal(ours["label"], sample.gt_sem_seg.data[0].numpy())
  assert padded.shape[2:] == ours["image"].shape[:2]
  np.testing.assert_array_equal(ours["image"], padded[0].permute(1, 2, 0).numpy())


def test_predict_py_labels_photos_from_the_mmseg_checkpoint_file(mmseg, tmp_path):
  """The user's path: mmseg's checkpoint file straight into predict.py, no dataset on the
  machine; the label PNGs agree with mmseg's `inference_model` on the same photos."""
  import subprocess
  import sys
  from PIL import Image
  mm = mmseg_reference.init_model(CONFIGS["fcn_ade20k"], seed=3)
  mm.test_cfg = type(mm.test_cfg)(dict(mode="whole"))
  checkpoint = str(tmp_path / "fcn_r50-d8_ade20k.pth")
  _save_checkpoint(mm, checkpoint)
  photos, out, empty = tmp_path / "photos", tmp_path / "out", tmp_path / "no_datasets"
  photos.mkdir()
  empty.mkdir()
  images = {"astronaut": _photo("astronaut"), "rocket": _photo("rocket", (700, 1050))}
  for stem, image in images.items():
    Image.fromarray(image).save(photos / f"{stem}.png")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = subprocess.run(
      [sys.executable, os.path.join(repo, "predict.py"), "--config=configs/fcn_ade20k.py",
       "--config.inference.scale=(512, 256)", f"--checkpoint={checkpoint}",
       f"--input={photos}", f"--output={out}"], cwd=repo, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=repo, TFDS_DATA_DIR=str(empty)), timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert not os.listdir(empty)
  for stem, image in images.items():
    ours = np.asarray(Image.open(out / f"{stem}.png"))
    ref = _mmseg_labels(mm, image, tmp_path, (512, 256))
    assert ours.shape == ref.shape == image.shape[:2]
    assert (ours == ref).mean() >= 0.995, (stem, (ours == ref).mean())
