"""Bucketed whole-image evaluation gives exactly the confusion matrix of the paths it
replaces, on a small ADE20K-shaped split (images of several aspect ratios, resized
keeping the ratio as the recipe does, at 1/8 of its scale), with few compiled shapes."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import pspnet_ade20k
from segjax.data.sources import DatasetSpec
from segjax.inference import buckets as buckets_lib
from segjax.tasks import get_task
from segjax.tasks.semantic import BucketedSemanticEvaluator

NUM_CLASSES = 6
# ADE20K-like (h, w): landscape and portrait 4:3, square, 3:2, wide, a large one; 1/8 scale.
SIZES = [(64, 85), (85, 64), (48, 64), (40, 120), (75, 100)]
SCALE = (256, 64)  # the recipe's (2048, 512) / 8


def _records():
  rng = np.random.default_rng(0)
  records = []
  for h, w in SIZES:
    yy, xx = np.mgrid[:h, :w]
    label = ((yy * 3 // h) * 2 + (xx * 2 // w)) % NUM_CLASSES  # blocks of classes
    label[rng.random((h, w)) < 0.05] = 255  # some ignored pixels
    base = np.stack([label * 40, 255 - label * 30, (label * 70) % 256], -1)
    image = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    records.append({"image": image, "label": label.astype(np.uint8)[..., None]})
  return records


@pytest.fixture(scope="module")
def dataset():
  records = _records()
  return DatasetSpec(name="ade20k_shaped", class_names=tuple(f"c{i}" for i in range(NUM_CLASSES)),
                     palette=np.arange(NUM_CLASSES * 3, dtype=np.uint8).reshape(-1, 3),
                     ignore_index=255, splits=("validation",),
                     open_split=lambda split: records[:3] if split.endswith("[:3]") else records)


def _config(**inference):
  config = pspnet_ade20k.get_config("smoke")
  config.unlock()
  config.data.eval_batch_size = 2
  config.inference.scale = SCALE
  config.inference.exact_shapes = False
  config.inference.size_divisor = 0
  config.data.eval_ops = ("resize(scale=(256, 64), resize_labels=False)|"
                          "pad(size=(256, 256), label_size=(128, 128))")
  for key, value in inference.items():
    config.inference[key] = value
  config.lock()
  return config


@pytest.fixture(scope="module")
def pspnet(dataset):
  """The smoke PSPNet (dilated ResNet-18 layout at width 8, pyramid pooling) with random
  weights and batch statistics."""
  config = _config()
  model = get_task(config).build_model(config, dataset)
  # Filled on the host from the shapes alone: compiling flax's initializers takes a minute.
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) >= 2:  # kernels: He-normal
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if "scale" in name or "var" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _evaluate(config, dataset, model, variables):
  task = get_task(config)
  task.validate(config)
  evaluator = task.evaluator(config, dataset, model, progress=False)
  evaluator.evaluate(variables)
  return evaluator, evaluator.confusion.copy()


def _valid_pixels():
  return sum(int((r["label"] != 255).sum()) for r in _records())


def test_exact_buckets_equal_the_exact_per_image_path(dataset, pspnet):
  """size_divisor=1 (no padding) with exact_shapes: the recipe's mmseg-exact path."""
  per_image, reference = _evaluate(_config(mode="whole", exact_shapes=True), dataset, *pspnet)
  bucketed, confusion = _evaluate(_config(mode="whole", exact_shapes=True, size_divisor=1),
                                  dataset, *pspnet)
  assert isinstance(bucketed, BucketedSemanticEvaluator)
  assert not isinstance(per_image, BucketedSemanticEvaluator)
  assert reference.sum() == _valid_pixels()
  np.testing.assert_array_equal(confusion, reference)
  # One model shape per distinct resized size and batch (three 64x85: a batch of 2 and
  # one of 1), each compiled once for both evaluations.
  models = {(2, 64, 85), (1, 64, 85), (1, 85, 64), (1, 64, 192)}
  assert {k[1:] for k in bucketed.compiled if k[0] == "model"} == models
  assert bucketed._forward._cache_size() == len(models)
  bucketed.evaluate(pspnet[1])
  assert bucketed._forward._cache_size() == len(models)
  np.testing.assert_array_equal(bucketed.confusion, reference)


def test_padded_buckets_equal_the_padded_whole_image_path(dataset, pspnet):
  """size_divisor=32: the padding `SemanticPredictor` gives whole images without
  exact_shapes, in batches."""
  config = _config(mode="whole")
  with config.unlocked():
    config.data.eval_split = "validation[:3]"  # 64x85, 85x64 and 48x64 -> 64x85
  _, reference = _evaluate(config, dataset, *pspnet)
  with config.unlocked():
    config.inference.size_divisor = 32
  bucketed, confusion = _evaluate(config, dataset, *pspnet)
  np.testing.assert_array_equal(confusion, reference)
  assert {k[1:] for k in bucketed.compiled if k[0] == "model"} == {(2, 64, 96), (1, 96, 64)}


class Pointwise(nn.Module):
  """Logits of each pixel from that pixel alone: any padding leaves them unchanged."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Conv(self.num_classes, (1, 1))(nn.tanh(nn.Conv(16, (1, 1))(x)))


def test_buckets_equal_the_old_batched_path_whatever_the_padding(dataset):
  """Against today's `data.eval_ops` path (every image padded to one static shape, labels
  scored at the original size): with a model the padding cannot change, the confusion
  matrices are equal, so grouping, blank slots, label canvases and the resize back to
  the original size lose and double-count nothing."""
  model = Pointwise()
  variables = dict(model.init(jax.random.key(1), np.zeros((1, 8, 8, 3), np.float32)))
  variables["batch_stats"] = {}
  _, reference = _evaluate(_config(mode="batched"), dataset, model, variables)
  assert reference.sum() == _valid_pixels()
  explicit = ((64, 96), (96, 64), (64, 192))
  for options in ({"size_divisor": 1}, {"buckets": explicit}):
    bucketed, confusion = _evaluate(_config(mode="whole", **options), dataset, model,
                                    variables)
    np.testing.assert_array_equal(confusion, reference, err_msg=str(options))
  assert {k[2:] for k in bucketed.compiled if k[0] == "model"} <= set(explicit)


def test_plan_groups_by_bucket_and_covers_every_image():
  buckets = buckets_lib.Buckets(shapes=((512, 1024), (512, 512), (1024, 512)))
  sizes = [(512, 683), (512, 512), (683, 512), (512, 683), (384, 512), (512, 683)]
  batches = buckets_lib.plan(sizes, buckets, 2)
  assert batches == [((512, 512), (1, 4), 2), ((512, 1024), (0, 3), 2),
                     ((512, 1024), (5,), 1), ((1024, 512), (2,), 1)]
  assert buckets_lib.padded_pixels(batches) == 2 * 512 * 512 + 4 * 512 * 1024
  # A bucket's last batch runs at the smallest power of two that holds it.
  assert [buckets_lib.slots_for(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  assert [b.slots for b in buckets_lib.plan([(512, 512)] * 11, buckets, 8)] == [8, 4]


@pytest.mark.parametrize("override, message", [
    ({"mode": "whole", "size_divisor": 32, "exact_shapes": True}, "size_divisor=1"),
    ({"mode": "whole", "size_divisor": 32, "buckets": ((64, 64),)}, "not both"),
    ({"mode": "whole", "buckets": ((64, 0),)}, "positive integers"),
    ({"mode": "whole", "size_divisor": -1}, ">= 0"),
])
def test_bucket_settings_are_checked(override, message):
  with pytest.raises(ValueError, match=message):
    get_task(_config(**override)).validate(_config(**override))


@pytest.mark.parametrize("override", [{"flip": True}, {"scales": (0.5, 1.0)},
                                      {"mode": "slide"}])
def test_augmented_and_sliding_evaluation_stay_per_image(dataset, pspnet, override):
  config = _config(**{"mode": "whole", "size_divisor": 32, **override})
  get_task(config).validate(config)
  evaluator = get_task(config).evaluator(config, dataset, pspnet[0], progress=False)
  assert not isinstance(evaluator, BucketedSemanticEvaluator)


def test_an_image_larger_than_every_bucket_is_named(dataset, pspnet):
  config = _config(mode="whole", buckets=((64, 96), (96, 64)))
  with pytest.raises(ValueError, match="192.*fits none of inference.buckets"):
    _evaluate(config, dataset, *pspnet)


def test_confusion_of_uint8_labels_with_many_classes():
  """uint8 labels (as datasets decode them) of 150 classes: label * 150 must not wrap."""
  from segjax.metrics import confusion_matrix
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 150, (40, 50)).astype(np.uint8)
  predictions = rng.integers(0, 150, (40, 50)).astype(np.int32)
  expected = np.zeros((150, 150), np.int64)
  np.add.at(expected, (labels.astype(np.int64), predictions), 1)
  np.testing.assert_array_equal(np.asarray(confusion_matrix(predictions, labels, 150, 255)),
                                expected)
