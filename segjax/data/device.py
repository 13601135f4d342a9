"""A batch's way onto the accelerators: uint8 images normalized inside the jitted steps,
and batches put on the devices one step ahead.

The input pipelines end with uint8 images (a quarter of the bytes of float32 ones), so
the host-to-device link carries the pixels themselves; every step that feeds a model
(training, batched and per-image evaluation, prediction) calls `normalize` first. It
looks each (pixel value, channel) up in a 256 x 3 float32 table computed on the host by
the very formula of the `normalize` preprocessing op, so the device gets bit for bit the
numbers host normalization gave, on any backend (arithmetic inside XLA is not: it turns
the division by `std` into a multiplication by its reciprocal, one ulp off for about a
quarter of the values). Floating-point images are taken as normalized already (a
pipeline that still ends with `normalize`) and pass through unchanged.

`prefetch_to_device` issues the transfer of batch s + 1 before step s is dispatched
(double buffering), so copying overlaps the step instead of preceding it.
"""
import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.data import pipeline

# The `normalize` op's defaults and configs/default.py's data.mean / data.std: ImageNet's.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(256, 3) float32: entry [v, c] is (v - mean[c]) / std[c] computed as the `normalize`
  op computes it (float32 numpy), so a lookup reproduces host normalization exactly."""
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"Normalization needs 3 per-RGB-channel means and 3 positive stds "
                     f"(data.mean, data.std), got mean={tuple(mean)!r}, std={tuple(std)!r}.")
  values = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32)
  return (values - np.float32(mean)) / np.float32(std)


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD,
              extent: Optional[jax.Array] = None) -> jax.Array:
  """(B, H, W, 3) uint8 images -> float32 (images - mean) / std, inside a jitted step.

  Floating-point images are returned as they are (normalized on the host already).
  `extent` (B, 2) int: each image's real (height, width) at its top left; the pixels
  beyond are padding and become 0 after normalization (as padding a normalized image
  with zeros, mmseg's pad_val=0). Without it, padding is whatever the pipeline put there
  (the `pad` op pads uint8 zeros, which normalize to -mean / std, as they did on the host).
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected (batch, height, width, 3) uint8 RGB images or normalized "
                     f"floating-point ones, got {images.dtype} of shape {tuple(images.shape)}.")
  flat = jnp.asarray(normalization_table(mean, std).reshape(-1))
  x = jnp.take(flat, images.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32),
               mode="clip")
  if extent is not None:
    extent = jnp.asarray(extent, jnp.int32)
    rows = jnp.arange(images.shape[1])[None, :] < extent[:, :1]
    cols = jnp.arange(images.shape[2])[None, :] < extent[:, 1:]
    x = jnp.where(rows[:, :, None, None] & cols[:, None, :, None], x, 0.0)
  return x


def pad_image(image: np.ndarray, size_divisor: int = 32):
  """One (H, W, 3) uint8 image as a model input: (1, H', W', 3) uint8 padded bottom/right
  to multiples of `size_divisor`, and its extent (1, 2) int32 [[H, W]] for `normalize`,
  which zeroes the padding after normalization."""
  h, w = image.shape[:2]
  padded = np.zeros((1, -(-h // size_divisor) * size_divisor,
                     -(-w // size_divisor) * size_divisor, 3), np.uint8)
  padded[0, :h, :w] = image
  return padded, np.int32([[h, w]])


def put(batch: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """A batch of numpy arrays on the devices: this process's rows of a global batch
  sharded by `sharding` (`pipeline.to_global`), or without one on the default device."""
  if sharding is None:
    return jax.device_put(batch)
  return pipeline.to_global(batch, sharding)


def prefetch_to_device(iterator: Iterable, size: int = 2,
                       transfer: Optional[Callable[[Any], Any]] = None,
                       sharding: Optional[jax.sharding.Sharding] = None) -> Iterator:
  """The items of `iterator` as `transfer(item)` (default: `put(item, sharding)`), each
  transferred `size - 1` items before it is yielded.

  The transfers are asynchronous: asking for item s starts the transfer of item
  s + size - 1 and returns item s, whose transfer was started while the previous steps
  ran. Everything happens in the calling thread in iteration order, so every process of
  a multi-process run makes the same calls in the same order. The iterator is read up
  to `size - 1` items ahead of what was yielded: callers that resume from a count of
  items consumed (the trainer, from its step) are unaffected; bound a long iterator
  (`itertools.islice`) to read nothing past its end.
  """
  if size < 1:
    raise ValueError(f"prefetch_to_device: size must be >= 1, got {size}.")
  transfer = transfer or (lambda item: put(item, sharding))
  iterator = iter(iterator)
  queue = collections.deque(transfer(item) for item in itertools.islice(iterator, size - 1))
  for item in iterator:
    queue.append(transfer(item))
    yield queue.popleft()
  while queue:
    yield queue.popleft()
