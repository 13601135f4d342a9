"""The U-Net loss weight map against a brute-force NumPy evaluation of its formula,
and on touching instances, class balance with labels, and bad input."""
import numpy as np
import pytest

from segjax.data.unet_weights import unet_weight_map

IGNORE = 255


def _brute_force_unet(ids, w0, sigma):
  ys, xs = np.indices(ids.shape)
  distances = []
  for k in np.unique(ids[ids > 0]):
    ky, kx = np.nonzero(ids == k)
    d = np.sqrt((ys[..., None] - ky) ** 2 + (xs[..., None] - kx) ** 2).min(-1)
    distances.append(d)
  d = np.sort(np.stack(distances), axis=0)
  counts = {c: (ids > 0).sum() if c else (ids == 0).sum() for c in (0, 1)}
  w_c = np.where(ids > 0, max(counts.values()) / counts[1], max(counts.values()) / counts[0])
  border = w0 * np.exp(-(d[0] + d[1]) ** 2 / (2 * sigma ** 2))
  return w_c + np.where(ids == 0, border, 0.0)


@pytest.mark.parametrize("sigma", [1.5, 5.0])
def test_unet_weight_map_matches_formula(sigma):
  ids = np.zeros((22, 26), np.int32)
  ids[2:7, 3:9] = 4
  ids[8:12, 3:12] = 9  # 1-px gap below instance 4
  ids[14:20, 15:24] = 2
  ids[0:3, 20:26] = 7
  ours = unet_weight_map(ids, w0=10.0, sigma=sigma)
  assert ours.dtype == np.float32 and ours.shape == ids.shape
  np.testing.assert_allclose(ours, _brute_force_unet(ids, 10.0, sigma), rtol=1e-5, atol=1e-6)


def test_unet_weight_map_peaks_between_touching_instances():
  ids = np.zeros((30, 40), np.int32)
  ids[10:20, 5:15] = 1
  ids[10:20, 16:26] = 2  # column 15 is the 1-px border between them
  weights = unet_weight_map(ids)
  row, col = np.unravel_index(np.argmax(weights), weights.shape)
  assert col == 15 and 10 <= row < 20
  gap = weights[10:20, 15]
  far = weights[0, 39]
  assert gap.min() > far + 5.0
  # Background is the majority class (weight 1); the gap adds 10 exp(-(1 + 1)^2 / 50).
  np.testing.assert_allclose(weights.max(), 1.0 + 10.0 * np.exp(-4.0 / 50.0), rtol=1e-5)
  np.testing.assert_allclose(weights[12, 8], (ids == 0).sum() / (ids > 0).sum(), rtol=1e-6)


def test_unet_weight_map_with_labels_and_single_instance():
  ids = np.zeros((8, 8), np.int32)
  ids[2:5, 2:5] = 3
  labels = np.where(ids > 0, 1, 0)
  labels[7, :] = IGNORE
  labels[6, :4] = 2
  weights = unet_weight_map(ids, labels)
  counts = {c: (labels == c).sum() for c in (0, 1, 2)}
  for c in (0, 1, 2):
    np.testing.assert_allclose(weights[labels == c], max(counts.values()) / counts[c])
  assert np.all(weights[7] == 0)  # ignored pixels; one instance: no border term
  with pytest.raises(ValueError, match="instance_ids"):
    unet_weight_map(ids.astype(np.float32))
