"""Imports torchvision as a PyTorch reference for parity tests.

The installed torchvision wheel is a CUDA build whose compiled extension
(`torchvision._C`) does not load next to the CPU-only torch here, so its
custom operators (torchvision::nms, roi_align, ...) are never registered. On
import, torchvision's `_meta_registrations` and `_autograd_registrations`
attach kernels to those operators and fail with "operator torchvision::nms
does not exist". Nothing the tests use needs them: the models are plain
Python modules, and `torchvision.ops.roi_align._roi_align` is pure Python. So
both modules are replaced by empty ones in `sys.modules` before the import.

This is the one place that does this; tests call `import_torchvision()`.
Whole detection models do call two of those operators at run time (NMS and
RoIAlign); `plain_torch_detection_ops()` swaps in plain-torch versions
(`greedy_batched_nms` and the pure-Python `_roi_align`) while they run.
"""
import contextlib
import sys
import types

import pytest

_BROKEN_ON_CPU_TORCH = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision():
  """Returns the torchvision module, skipping the calling test if torch or
  torchvision is not installed."""
  pytest.importorskip("torch")
  if "torchvision" not in sys.modules:
    for name in _BROKEN_ON_CPU_TORCH:
      sys.modules.setdefault(name, types.ModuleType(name))
  return pytest.importorskip("torchvision")


def greedy_batched_nms(torch):
  """`torchvision.ops.batched_nms` without the compiled torchvision::nms (numpy inside).

  Greedy class-aware NMS: boxes are visited by descending score, ties in index order (a stable
  sort, as segjax's NMS; torchvision's kernel sorts with the unstable `torch.sort`, so equal
  scores may be visited in another order there); a box is dropped when its IoU with a kept box
  of the same class is > the threshold. Returns the kept indices by descending score.
  """
  import numpy as np

  def batched_nms(boxes, scores, idxs, iou_threshold):
    b = boxes.detach().float().numpy()  # float32 IoUs, as torchvision's kernel
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(b[:, None, :2], b[None, :, :2])
    rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
      overlap = inter / (area[:, None] + area[None, :] - inter) > iou_threshold
    classes = idxs.numpy()
    overlap &= classes[:, None] == classes[None, :]
    suppressed = np.zeros(len(b), bool)
    keep = []
    for i in np.argsort(-scores.detach().numpy(), kind="stable"):
      if not suppressed[i]:
        keep.append(i)
        suppressed |= overlap[i]
    return torch.as_tensor(np.asarray(keep, np.int64))

  return batched_nms


@contextlib.contextmanager
def plain_torch_detection_ops():
  """Within the block, torchvision's detection models run without its compiled operators.

  `torchvision.ops.boxes.batched_nms` (called by the RPN and the RoI heads) becomes
  `greedy_batched_nms`, and the RoIAlign of `MultiScaleRoIAlign` becomes the pure-Python
  `torchvision.ops.roi_align._roi_align` (without its lazy torch.compile wrapper) with the one
  rule of the C++ kernel it lacks restored: a sample at y < -1, y > H, x < -1 or x > W adds 0
  (the Python version reads the clamped border instead). Detectors reach such samples: with
  aligned=False a RoI is at least one feature cell tall and wide, so a thin box clipped at the
  image's bottom or right edge samples up to one cell beyond the map. Yields torchvision and
  restores every patched function on exit.
  """
  tv = import_torchvision()
  import torch
  import torchvision.ops.poolers  # noqa: F401  (the module that calls roi_align)
  boxes, poolers = sys.modules["torchvision.ops.boxes"], sys.modules["torchvision.ops.poolers"]
  python = sys.modules["torchvision.ops.roi_align"]
  python_roi_align, interpolate = python._roi_align.__wrapped__, python._bilinear_interpolate

  def bilinear_interpolate(features, batch_index, y, x, ymask, xmask):
    """The Python samples [K, C, PH, PW, IY, IX], zero where the C++ kernel's are empty."""
    height, width = features.shape[-2:]
    inside_y = (y >= -1) & (y <= height)  # [K, PH, IY]
    inside_x = (x >= -1) & (x <= width)  # [K, PW, IX]
    inside = inside_y[:, None, :, None, :, None] & inside_x[:, None, None, :, None, :]
    return torch.where(inside, interpolate(features, batch_index, y, x, ymask, xmask), 0)

  def roi_align(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
                aligned=False):
    height, width = (output_size, output_size) if isinstance(output_size, int) else output_size
    return python_roi_align(features, rois, spatial_scale, height, width, sampling_ratio, aligned)

  saved = boxes.batched_nms, poolers.roi_align, python._bilinear_interpolate
  boxes.batched_nms, poolers.roi_align = greedy_batched_nms(torch), roi_align
  python._bilinear_interpolate = bilinear_interpolate
  try:
    yield tv
  finally:
    boxes.batched_nms, poolers.roi_align, python._bilinear_interpolate = saved
