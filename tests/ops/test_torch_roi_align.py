"""`tests.torch_reference.lean_roi_align` against torchvision's RoIAlign.

References: torchvision's pure-Python `_roi_align` (its torch.compile wrapper removed) with the
one rule of the C++ kernel it lacks put back (a sample at y < -1, y > H, x < -1 or x > W adds 0;
the Python version reads the clamped border), for values and input gradients; and a loop
transcription of the C++ kernel in numpy, for values. The boxes cover several images, boxes
partly and wholly outside the map, boxes under one cell and the usual ones.
"""
import importlib
import math

import numpy as np
import pytest

from tests import torch_reference
from tests.torch_reference import import_torchvision, lean_roi_align

MAP = 12  # feature map side, cells
POOLED = (3, 2)  # output bins (PH, PW)


def _python_roi_align(torch):
  """torchvision's `_roi_align` with the C++ kernel's out-of-map rule, as roi_align's signature."""
  import_torchvision()
  module = importlib.import_module("torchvision.ops.roi_align")  # the module, not the function
  interpolate = module._bilinear_interpolate

  def bilinear_interpolate(features, batch_index, y, x, ymask, xmask):
    height, width = features.shape[-2:]
    inside_y = (y >= -1) & (y <= height)  # [K, PH, IY]
    inside_x = (x >= -1) & (x <= width)  # [K, PW, IX]
    inside = inside_y[:, None, :, None, :, None] & inside_x[:, None, None, :, None, :]
    return torch.where(inside, interpolate(features, batch_index, y, x, ymask, xmask), 0)

  def roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    module._bilinear_interpolate = bilinear_interpolate
    try:
      return module._roi_align.__wrapped__(features, rois, spatial_scale, *output_size,
                                           sampling_ratio, aligned)
    finally:
      module._bilinear_interpolate = interpolate
  return roi_align


def _kernel_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
  """torchvision's C++ RoIAlign forward, one sample at a time (numpy, float64)."""
  _, channels, height, width = features.shape
  pooled_h, pooled_w = output_size

  def bilinear(image, y, x):
    if y < -1 or y > height or x < -1 or x > width:
      return np.zeros(channels)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
      y0 = y1 = height - 1
      y = float(y0)
    else:
      y1 = y0 + 1
    if x0 >= width - 1:
      x0 = x1 = width - 1
      x = float(x0)
    else:
      x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[:, y0, x0] + (1 - ly) * lx * image[:, y0, x1]
            + ly * (1 - lx) * image[:, y1, x0] + ly * lx * image[:, y1, x1])

  out = np.zeros((len(rois), channels, pooled_h, pooled_w))
  offset = 0.5 if aligned else 0.0
  for k, (b, *box) in enumerate(rois):
    x1, y1, x2, y2 = (v * spatial_scale - offset for v in box)
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:
      roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
    for i in range(pooled_h):
      for j in range(pooled_w):
        total = np.zeros(channels)
        for iy in range(grid_h):
          for ix in range(grid_w):
            total += bilinear(features[int(b)], y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h,
                              x1 + j * bin_w + (ix + 0.5) * bin_w / grid_w)
        out[k, :, i, j] = total / max(grid_h * grid_w, 1)
  return out


def _inputs(torch, spatial_scale, dtype=None, seed=0):
  """Features [3, 4, MAP, MAP] and RoIs [K, 5] in image coordinates (map / spatial_scale)."""
  dtype = dtype or torch.float64
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(3, 4, MAP, MAP))
  side = MAP / spatial_scale
  cells = np.array([
      [0, 1.0, 2.0, 9.0, 7.5],  # inside
      [1, 0.3, 0.6, 11.7, 11.2],  # almost the whole map
      [2, 4.2, 5.1, 4.6, 5.3],  # under a cell
      [0, 6.0, 6.0, 6.0, 6.0],  # empty
      [1, -3.5, 8.0, 2.5, 14.5],  # partly left and below the map
      [2, 10.5, -2.7, 16.0, 3.0],  # partly right and above
      [0, 13.5, 1.0, 20.0, 6.0],  # wholly right of the map
      [1, -9.0, -8.0, -1.6, -1.2],  # wholly above-left
      [2, 11.4, 11.6, 11.9, 12.0],  # a thin sliver at the bottom-right edge
  ])
  random = np.concatenate([rng.integers(0, 3, (6, 1)), rng.uniform(-2, 14, (6, 4))], 1)
  random[:, 3:] = np.maximum(random[:, 1:3], random[:, 3:]) + rng.uniform(0, 3, (6, 2))
  rois = np.concatenate([cells, random])
  rois[:, 1:] *= side / MAP
  return (torch.tensor(features, dtype=dtype, requires_grad=True),
          torch.tensor(rois, dtype=dtype))


def _forward_and_grad(roi_align, features, rois, grad, *args):
  features.grad = None
  out = roi_align(features, rois, *args)
  (out * grad).sum().backward()
  return out.detach().numpy(), features.grad.numpy()


@pytest.mark.parametrize("spatial_scale", [0.25, 1 / 32])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision_python_roi_align(aligned, sampling_ratio, spatial_scale):
  import_torchvision()
  import torch
  features, rois = _inputs(torch, spatial_scale)
  # The Python reference samples adaptive grids of at most MAP per bin; stay within them.
  assert (rois[:, 3:] - rois[:, 1:3]).max() * spatial_scale / min(POOLED) <= MAP
  grad = torch.randn(len(rois), features.shape[1], *POOLED, generator=torch.Generator()
                     .manual_seed(1), dtype=features.dtype)
  args = (POOLED, spatial_scale, sampling_ratio, aligned)
  out, grad_in = _forward_and_grad(lean_roi_align, features, rois, grad, *args)
  ref, _ = _forward_and_grad(_python_roi_align(torch), features, rois, grad, *args)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # A RoI without samples (aligned, adaptive, zero size: a 0 / 0 sample step) has a NaN input
  # gradient in the Python version and none in the kernel; leave it out of the reference's.
  adaptive_empty = aligned and sampling_ratio <= 0
  sampled = (rois[:, 3:] - rois[:, 1:3]).min(1).values > 0 if adaptive_empty else slice(None)
  _, ref_grad = _forward_and_grad(_python_roi_align(torch), features, rois[sampled],
                                  grad[sampled], *args)
  np.testing.assert_allclose(grad_in, ref_grad, rtol=1e-5, atol=1e-5)
  kernel = _kernel_roi_align(features.detach().numpy(), rois.numpy(), *args)
  np.testing.assert_allclose(out, kernel, rtol=1e-5, atol=1e-5)
  # The boxes outside the map make the out-of-map rule matter: reading the clamped border
  # instead (the Python version as shipped) changes some outputs.
  from torchvision.ops.roi_align import _roi_align
  with torch.no_grad():
    border = _roi_align.__wrapped__(features, rois, spatial_scale, *POOLED, sampling_ratio,
                                    aligned)
  assert np.abs(out - border.numpy()).max() > 1e-3


def test_float32_list_boxes_and_chunks(monkeypatch):
  """float32 features, boxes as one [Ki, 4] tensor per image and RoIs split into many chunks
  give the reference's values and gradients."""
  import_torchvision()
  import torch
  features, rois = _inputs(torch, 0.25, torch.float32, seed=3)
  grad = torch.randn(len(rois), features.shape[1], 2, 2, generator=torch.Generator()
                     .manual_seed(2))
  order = torch.argsort(rois[:, 0], stable=True)
  rois = rois[order]
  per_image = [rois[rois[:, 0] == i, 1:] for i in range(3)]
  ref, ref_grad = _forward_and_grad(_python_roi_align(torch), features, rois, grad, (2, 2), 0.25,
                                    0, False)
  monkeypatch.setattr(torch_reference, "_ROI_ALIGN_PAIRS", 100)  # 1 RoI per chunk at most
  out, grad_in = _forward_and_grad(lean_roi_align, features, per_image, grad, 2, 0.25, 0, False)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_in, ref_grad, rtol=1e-5, atol=1e-5)


def test_no_rois_and_bad_boxes():
  import_torchvision()
  import torch
  features = torch.randn(2, 3, 8, 8, requires_grad=True)
  out = lean_roi_align(features, torch.zeros(0, 5), 7, 0.25, 2)
  assert out.shape == (0, 3, 7, 7)
  out.sum().backward()
  assert features.grad.abs().sum() == 0
  with pytest.raises(ValueError, match=r"\[K, 5\]"):
    lean_roi_align(features, torch.zeros(4, 4), 7)
  with pytest.raises(ValueError, match=r"\[Ki, 4\]"):
    lean_roi_align(features, [torch.zeros(4, 5)], 7)
  with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
    lean_roi_align(features[0], torch.zeros(1, 5), 7)
