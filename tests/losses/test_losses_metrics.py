"""Cross-entropy against PyTorch; mIoU/aAcc/mAcc against a direct NumPy count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from segjax.losses import pixel_cross_entropy
from segjax.metrics import confusion_matrix, format_iou_table, segmentation_metrics


def _random_case(seed, shape=(2, 9, 11), num_classes=5, ignore_frac=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=shape + (num_classes,)).astype(np.float32) * 3
  labels = rng.integers(0, num_classes, shape)
  labels[rng.random(shape) < ignore_frac] = 255
  return logits, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_matches_torch(seed):
  logits, labels = _random_case(seed)
  ours = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255)
  ref = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels), ignore_index=255)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)


def test_cross_entropy_class_weights_match_torch():
  logits, labels = _random_case(3)
  weights = np.array([0.5, 1.0, 2.0, 0.1, 3.0], np.float32)
  ours = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255, jnp.asarray(weights))
  ref = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels),
      weight=torch.from_numpy(weights), ignore_index=255)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)


def test_ignored_pixels_have_no_loss_and_zero_gradient():
  logits, labels = _random_case(4)
  ignored = labels == 255
  grads = jax.grad(pixel_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels), 255)
  assert np.all(np.asarray(grads)[ignored] == 0)
  assert np.any(np.abs(np.asarray(grads)[~ignored]) > 0)
  # Changing logits at ignored pixels changes nothing.
  perturbed = logits.copy()
  perturbed[ignored] += 100.0
  np.testing.assert_allclose(float(pixel_cross_entropy(jnp.asarray(perturbed), labels, 255)),
                             float(pixel_cross_entropy(jnp.asarray(logits), labels, 255)),
                             rtol=1e-6)
  # The mean is over non-ignored pixels only.
  valid = ~ignored
  nll = -jax.nn.log_softmax(jnp.asarray(logits))[valid, labels[valid]]
  np.testing.assert_allclose(float(pixel_cross_entropy(jnp.asarray(logits), labels, 255)),
                             float(nll.mean()), rtol=1e-5)


def test_all_ignored_gives_zero_loss():
  logits, labels = _random_case(5)
  assert float(pixel_cross_entropy(jnp.asarray(logits), np.full_like(labels, 255), 255)) == 0.0


def _numpy_metrics(preds, labels, num_classes, ignore_index=255):
  """The mmsegmentation definitions, written out per class."""
  valid = labels != ignore_index
  p, l = preds[valid], labels[valid]
  inter = np.array([np.sum((p == c) & (l == c)) for c in range(num_classes)], float)
  area_p = np.array([np.sum(p == c) for c in range(num_classes)], float)
  area_l = np.array([np.sum(l == c) for c in range(num_classes)], float)
  union = area_p + area_l - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou, acc = inter / union, inter / area_l
  return np.nanmean(iou), inter.sum() / area_l.sum(), np.nanmean(acc), iou


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_direct_numpy_computation(seed):
  rng = np.random.default_rng(seed)
  num_classes = 6
  labels = rng.integers(0, num_classes, (4, 17, 13))
  labels[rng.random(labels.shape) < 0.2] = 255
  if seed % 2:  # a class absent from labels and predictions -> NaN IoU, left out of the mean
    labels[labels == 5] = 0
  preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, num_classes,
                                                                         labels.shape))
  preds[preds == 255] = 1
  if seed % 2:
    preds[preds == 5] = 2
  # Accumulated batch by batch, as the eval loop does.
  cm = jnp.zeros((num_classes, num_classes), jnp.int32)
  for b in range(labels.shape[0]):
    cm = cm + confusion_matrix(jnp.asarray(preds[b:b + 1]), jnp.asarray(labels[b:b + 1]),
                               num_classes, 255)
  ours = segmentation_metrics(np.asarray(cm))
  miou, aacc, macc, iou = _numpy_metrics(preds, labels, num_classes)
  np.testing.assert_allclose(ours["mIoU"], miou, rtol=1e-12)
  np.testing.assert_allclose(ours["aAcc"], aacc, rtol=1e-12)
  np.testing.assert_allclose(ours["mAcc"], macc, rtol=1e-12)
  np.testing.assert_array_equal(np.isnan(ours["IoU"]), np.isnan(iou))
  assert np.isnan(ours["IoU"][5]) == bool(seed % 2)
  table = format_iou_table(ours, [f"c{i}" for i in range(num_classes)])
  assert f"mIoU {100 * miou:.2f}" in table


def test_perfect_predictions_give_one():
  labels = np.array([[[0, 1, 255], [2, 2, 1]]])
  m = segmentation_metrics(np.asarray(confusion_matrix(jnp.asarray(np.where(
      labels == 255, 0, labels)), jnp.asarray(labels), 3)))
  assert m["mIoU"] == 1.0 and m["aAcc"] == 1.0 and m["mAcc"] == 1.0


def test_dice_precision_recall_fscore_match_pixel_counts():
  """mmseg's mDice/mFscore family, recomputed from boolean masks per class."""
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 4, (3, 9, 11))
  labels[:, :2] = 255
  preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 4, labels.shape))
  preds[preds == 255] = 0
  m = segmentation_metrics(np.asarray(confusion_matrix(jnp.asarray(preds), jnp.asarray(labels),
                                                       5)))
  valid = labels != 255
  for c in range(4):
    tp = np.sum((preds == c) & (labels == c) & valid)
    pred_c, label_c = np.sum((preds == c) & valid), np.sum((labels == c) & valid)
    p, r = tp / pred_c, tp / label_c
    np.testing.assert_allclose(m["Dice"][c], 2 * tp / (pred_c + label_c), rtol=1e-12)
    np.testing.assert_allclose(m["Precision"][c], p, rtol=1e-12)
    np.testing.assert_allclose(m["Recall"][c], r, rtol=1e-12)
    np.testing.assert_allclose(m["Fscore"][c], 2 * p * r / (p + r), rtol=1e-12)
  assert np.isnan(m["Dice"][4])  # class 4 never occurs: left out of the means
  np.testing.assert_allclose(m["mDice"], np.mean(m["Dice"][:4]), rtol=1e-12)
  np.testing.assert_allclose(m["mFscore"], np.mean(m["Fscore"][:4]), rtol=1e-12)


def test_unet_weights_op_feeds_the_train_step():
  """The op's map peaks in the gap between two instances, and the loss the
  train step builds weighs pixels by it."""
  from segjax.data import transforms
  from segjax.losses import build_loss
  ids = np.zeros((16, 16), np.int32)
  ids[2:7, 2:7], ids[2:7, 8:13] = 1, 2  # two squares with a 1-pixel gap
  example = {"image": np.zeros((16, 16, 3), np.uint8), "instance_ids": ids,
             "label": (ids > 0).astype(np.uint8)}
  out = transforms.parse_pipeline("unet_weights(w0=10.0, sigma=5.0)")(
      example, np.random.default_rng(0))
  weights = out["pixel_weights"]
  assert weights.shape == (16, 16) and weights.dtype == np.float32
  assert weights[4, 7] == weights.max() > weights[15, 15]  # the gap between the squares
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16, 16, 2)), jnp.float32)
  labels = jnp.asarray(example["label"][None], jnp.int32)
  loss_fn = build_loss([{"name": "cross_entropy", "weight": 1.0}])
  plain, _ = loss_fn(logits, labels, 255)
  weighted, _ = loss_fn(logits, labels, 255, None, jnp.asarray(weights[None]))
  assert not np.isclose(float(plain), float(weighted))
