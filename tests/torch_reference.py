"""Imports torchvision as a PyTorch reference for parity tests.

The installed torchvision wheel is a CUDA build whose compiled extension
(`torchvision._C`) does not load next to the CPU-only torch here, so its
custom operators (torchvision::nms, roi_align, ...) are never registered. On
import, torchvision's `_meta_registrations` and `_autograd_registrations`
attach kernels to those operators and fail with "operator torchvision::nms
does not exist". Nothing the tests use needs them: the models are plain
Python modules. So both modules are replaced by empty ones in `sys.modules`
before the import.

This is the one place that does this; tests call `import_torchvision()`.
Whole detection models do call two of those operators at run time (NMS and
RoIAlign); `plain_torch_detection_ops()` swaps in plain-torch versions
(`greedy_batched_nms` and `lean_roi_align`) while they run. torchvision's own
fallback, the pure-Python `torchvision.ops.roi_align._roi_align`, is not used
there: run eagerly it builds int64 indices and values of shape [K, C, PH, PW,
IY, IX] (IY, IX = H, W with adaptive sampling), tens of GB for a Mask R-CNN
train step at 512x512, and it reads the clamped border where the C++ kernel
adds 0. `lean_roi_align` computes the C++ kernel's result with small indices
(tests/ops/test_torch_roi_align.py checks it against `_roi_align`).
"""
import contextlib
import importlib
import sys
import types

import pytest

_BROKEN_ON_CPU_TORCH = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
# Most (feature row, weight) pairs one `embedding_bag` call of `lean_roi_align` reduces; RoIs
# go in chunks under it (64 MiB of int64 indices), whatever their sampling grids.
_ROI_ALIGN_PAIRS = 1 << 23


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
  of the same class is > the threshold. Returns the kept indices by descending score. Classes
  are independent, so each is run on its own: IoU matrices per class, not over all boxes (the
  RPN's ~7000 proposals of a 512x512 image in 5 level classes).
  """
  import numpy as np

  def batched_nms(boxes, scores, idxs, iou_threshold):
    b = boxes.detach().float().numpy()  # float32 IoUs, as torchvision's kernel
    classes = idxs.numpy()
    order = np.argsort(-scores.detach().numpy(), kind="stable")
    keep = []
    for c in np.unique(classes):
      members = order[classes[order] == c]  # by descending score, ties in index order
      box = b[members]
      area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
      lt = np.maximum(box[:, None, :2], box[None, :, :2])
      rb = np.minimum(box[:, None, 2:], box[None, :, 2:])
      wh = np.clip(rb - lt, 0, None)
      inter = wh[..., 0] * wh[..., 1]
      with np.errstate(divide="ignore", invalid="ignore"):
        overlap = inter / (area[:, None] + area[None, :] - inter) > iou_threshold
      suppressed = np.zeros(len(members), bool)
      for i in range(len(members)):
        if not suppressed[i]:
          keep.append(members[i])
          suppressed |= overlap[i]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return torch.as_tensor(np.asarray(sorted(keep, key=rank.__getitem__), np.int64))

  return batched_nms


def _rois(torch, boxes):
  """torchvision's RoI format [K, 5] (batch index, x1, y1, x2, y2) of `roi_align`'s boxes."""
  if isinstance(boxes, (list, tuple)):
    if not boxes or any(b.dim() != 2 or b.shape[1] != 4 for b in boxes):
      raise ValueError("roi_align's boxes as a list need one [Ki, 4] tensor (x1, y1, x2, y2) "
                       f"per image, got shapes {[tuple(b.shape) for b in boxes]}.")
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1)
                      for i, b in enumerate(boxes)])
  if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 5:
    raise ValueError("roi_align's boxes must be a [K, 5] tensor (batch index, x1, y1, x2, y2) "
                     f"or a list of [Ki, 4] tensors, got {getattr(boxes, 'shape', type(boxes))}.")
  return boxes


def _axis_samples(torch, start, length, bins, grid, most, size):
  """Bilinear taps along one axis (y or x) of every RoI, bin and sample.

  Args: the RoIs' start and length [K] in feature cells, `bins` per RoI, `grid` [K] samples
  per bin (only the first `grid` of `most` count), the map's `size` on this axis.
  Returns (low, high) cell indices and their weights, each [K, bins, most]; a sample outside
  [-1, size] or beyond its RoI's grid gets weight 0, as in torchvision's C++ kernel.
  """
  bin_size = length / bins
  sample = torch.arange(most, device=start.device)
  pos = (start[:, None, None]
         + torch.arange(bins, device=start.device)[None, :, None] * bin_size[:, None, None]
         + (sample + 0.5).to(start.dtype) * (bin_size / grid)[:, None, None])
  valid = (pos >= -1) & (pos <= size) & (sample < grid[:, None])[:, None, :]
  # Clamping to [0, size - 1] is the kernel's rule: at or past the last cell both taps are it.
  pos = torch.where(valid, pos, 0).clamp(0, size - 1)
  low = pos.long()
  high = (low + 1).clamp(max=size - 1)
  frac = pos - low
  return low, high, torch.where(valid, 1 - frac, 0), torch.where(valid, frac, 0)


def _roi_chunks(grid_y, grid_x, pairs_per_sample):
  """RoIs in chunks of at most `_ROI_ALIGN_PAIRS` (row, weight) pairs: [(RoI indices, samples
  per bin along y, along x)], each chunk padded to its largest grids. RoIs go by grid size, so
  a chunk pads little; no RoIs give one empty chunk."""
  sizes = [(max(1, int(gy)), max(1, int(gx))) for gy, gx in zip(grid_y, grid_x)]
  chunks, members, most_y, most_x = [], [], 1, 1
  for i in sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1]):
    grown_y, grown_x = max(most_y, sizes[i][0]), max(most_x, sizes[i][1])
    if members and (len(members) + 1) * grown_y * grown_x * pairs_per_sample > _ROI_ALIGN_PAIRS:
      chunks.append((members, most_y, most_x))
      members, (grown_y, grown_x) = [], sizes[i]
    members.append(i)
    most_y, most_x = grown_y, grown_x
  return chunks + [(members, most_y, most_x)]


def lean_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                   aligned=False):
  """`torchvision.ops.roi_align` in plain torch, lean in memory and differentiable in `input`.

  Same arguments and result as torchvision's C++ kernel: `input` [N, C, H, W]; `boxes` [K, 5]
  (batch index, x1, y1, x2, y2) or a list of [Ki, 4] per image; `output_size` int or (PH, PW);
  `sampling_ratio` > 0 samples per bin and axis, else ceil(RoI side / bins) per RoI; `aligned`
  shifts by -0.5 cell, otherwise RoIs are at least 1x1 cell; a sample at y < -1, y > H, x < -1
  or x > W adds 0, others are clamped into the map; each bin averages its samples. Returns
  [K, C, PH, PW].

  The features become a [N * H * W, C] table and each output bin a bag of 4 * IY * IX
  (row, weight) pairs that `embedding_bag` sums (its backward scatter-adds into the table), so
  nothing of size [K, C, PH, PW, IY, IX] exists; RoIs go in chunks of similar grids and at most
  `_ROI_ALIGN_PAIRS` pairs.
  """
  import torch
  import torch.nn.functional as F

  if input.dim() != 4:
    raise ValueError(f"roi_align's input must be [N, C, H, W], got shape {tuple(input.shape)}.")
  rois = _rois(torch, boxes)
  pooled_h, pooled_w = ((output_size, output_size) if isinstance(output_size, int)
                        else tuple(output_size))
  n, channels, height, width = input.shape
  offset = 0.5 if aligned else 0.0
  start_x, start_y, end_x, end_y = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
  length_y, length_x = end_y - start_y, end_x - start_x
  if not aligned:
    length_y, length_x = length_y.clamp(min=1.0), length_x.clamp(min=1.0)
  if sampling_ratio > 0:
    grid_y = grid_x = torch.full_like(start_y, sampling_ratio)
    count = torch.full_like(start_y, max(sampling_ratio * sampling_ratio, 1))
  else:
    grid_y, grid_x = torch.ceil(length_y / pooled_h), torch.ceil(length_x / pooled_w)
    count = (grid_y * grid_x).clamp(min=1)
  table = input.permute(0, 2, 3, 1).reshape(n * height * width, channels)
  batch = rois[:, 0].long() * (height * width)
  chunks = _roi_chunks(grid_y.tolist(), grid_x.tolist(), pooled_h * pooled_w * 4)
  outputs = []
  for members, most_y, most_x in chunks:
    part = torch.as_tensor(members, dtype=torch.long, device=rois.device)
    y0, y1, wy0, wy1 = _axis_samples(torch, start_y[part], length_y[part], pooled_h,
                                     grid_y[part], most_y, height)
    x0, x1, wx0, wx1 = _axis_samples(torch, start_x[part], length_x[part], pooled_w,
                                     grid_x[part], most_x, width)
    rows_y = torch.stack([y0, y1], -1) * width + batch[part, None, None, None]  # [k, PH, IY, 2]
    weights_y = torch.stack([wy0, wy1], -1) / count[part, None, None, None]
    rows_x, weights_x = torch.stack([x0, x1], -1), torch.stack([wx0, wx1], -1)  # [k, PW, IX, 2]
    rows = (rows_y[:, :, None, :, None, :, None] + rows_x[:, None, :, None, :, None, :])
    weights = weights_y[:, :, None, :, None, :, None] * weights_x[:, None, :, None, :, None, :]
    bags = (len(members) * pooled_h * pooled_w, most_y * most_x * 4)
    pooled = F.embedding_bag(rows.reshape(bags), table, mode="sum",
                             per_sample_weights=weights.reshape(bags).to(input.dtype))
    outputs.append(pooled.reshape(len(members), pooled_h, pooled_w, channels))
  order = torch.as_tensor([i for members, _, _ in chunks for i in members], dtype=torch.long)
  pooled = torch.cat(outputs).index_select(0, torch.argsort(order).to(input.device))
  return pooled.permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def plain_torch_detection_ops():
  """Within the block, torchvision's detection models run without its compiled operators.

  `torchvision.ops.boxes.batched_nms` (called by the RPN and the RoI heads) becomes
  `greedy_batched_nms`, and `torchvision.ops.roi_align` where the detection models call it
  (`MultiScaleRoIAlign` in `torchvision.ops.poolers`, and the mask targets of
  `project_masks_on_boxes` in `torchvision.models.detection.roi_heads`) becomes
  `lean_roi_align`, which computes what the C++ kernel does. Yields torchvision and restores
  every patched function on exit.
  """
  tv = import_torchvision()
  import torch
  boxes, poolers, roi_heads = (importlib.import_module(name) for name in (
      "torchvision.ops.boxes", "torchvision.ops.poolers", "torchvision.models.detection.roi_heads"))
  saved = boxes.batched_nms, poolers.roi_align, roi_heads.roi_align
  boxes.batched_nms = greedy_batched_nms(torch)
  poolers.roi_align = roi_heads.roi_align = lean_roi_align
  try:
    yield tv
  finally:
    boxes.batched_nms, poolers.roi_align, roi_heads.roi_align = saved
