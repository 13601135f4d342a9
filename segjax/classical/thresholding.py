"""Histogram thresholding: Otsu's threshold, multi-Otsu thresholds and labelling by them.

The histogram follows scikit-image (`skimage.filters.threshold_otsu` and
`threshold_multiotsu`, `source_range="image"`):
- uint8 / int8 images: one bin per integer value between the image's min and max
  (`bins` is ignored, as in skimage); bin centres are the integer values.
- any other dtype is read as float32: `bins` equal-width bins over [min, max] with
  numpy's float32 edges `i * ((max - min) / bins) + min` (last edge = max); a pixel
  goes to the last bin whose lower edge is <= it; centres are edge midpoints. XLA may fuse
  the edge multiply-add, so edges can differ from numpy's by one float32 ulp; float64
  images are rounded to float32 first. Thresholds of float images therefore match
  skimage to float32 tolerance (uint8 / int8: exactly). Wider integer types (uint16,
  int32) get the float binning, not skimage's one bin per integer value.
A threshold is always a bin centre. For n thresholds at bin indices t_1 < ... < t_n,
class k holds bins t_{k-1} + 1 .. t_k (t_0 = -1, t_{n+1} = last bin), and the chosen
indices maximise the between-class variance sum_k w_k (mu_k - mu)^2 (w_k pixel count,
mu_k class mean, mu the image mean) over all thresholds between the first and last occupied bin.
The search is an exact dynamic programme over bins: O(classes * bins^2) work, no
data-dependent shapes; ties go to the lexicographically smallest indices, as in
skimage. Counts and first moments are exact int32 prefix sums (float32 when
pixels * (bins - 1) >= 2^31), the variance terms float32. skimage's Otsu works in
float64 and agrees; its multi-Otsu accumulates probabilities in float32 (with
slightly different class-0 moments) and can settle on a near-tie whose variance
is ~1e-7 (relative) below the optimum found here.

Degenerate images: `otsu_threshold` of a constant image is that value (skimage's
rule); `multi_otsu_thresholds` returns NaN thresholds when fewer than `classes`
bins are occupied (skimage raises ValueError there, which a jitted function cannot
do on data).

Labels: `apply_thresholds` counts the thresholds <= a pixel (np.digitize, as
skimage's multi-Otsu examples do), so a pixel equal to a threshold goes to the
class above; skimage's Otsu convention for a binary mask is `image > threshold`.

Every function takes one image and is jittable; batch with `jax.vmap`.
"""
import functools

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma weights for R, G, B.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_BYTE_BINS = 256


def to_gray(rgb) -> jnp.ndarray:
  """Float32 luma `0.299 R + 0.587 G + 0.114 B` of an [..., 3] image (values keep their scale).

  The thresholding functions take grayscale images; convert color images with this
  (or any other rule) first.
  """
  rgb = jnp.asarray(rgb)
  if rgb.ndim < 1 or rgb.shape[-1] != 3:
    raise ValueError(f"to_gray needs an [..., 3] RGB image, got shape {rgb.shape}.")
  rgb = rgb.astype(jnp.float32)
  return sum(jnp.float32(w) * rgb[..., c] for c, w in enumerate(_GRAY_WEIGHTS))


def _check_image(image) -> jnp.ndarray:
  image = jnp.asarray(image)
  if image.ndim != 2:
    raise ValueError(f"image must be a grayscale [H, W] array, got shape {image.shape}; convert "
                     "color images with to_gray and batch with jax.vmap.")
  return image


def _is_byte_integer(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.integer) and jnp.dtype(dtype).itemsize == 1


def _histogram(image, bins: int):
  """Counts [B] int32, bin centres [B] float32 and the first/last occupied bin index."""
  if _is_byte_integer(image.dtype):
    offset = int(jnp.iinfo(image.dtype).min)
    index = image.reshape(-1).astype(jnp.int32) - offset
    counts = jnp.bincount(index, length=_BYTE_BINS)
    centres = jnp.arange(_BYTE_BINS, dtype=jnp.float32) + offset
    return counts, centres, index.min(), index.max()
  values = image.reshape(-1).astype(jnp.float32)
  first, last = values.min(), values.max()
  step = (last - first) / jnp.float32(bins)
  edges = jnp.arange(bins + 1, dtype=jnp.float32) * step + first
  edges = edges.at[-1].set(last)
  index = jnp.clip(jnp.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
  counts = jnp.bincount(index, length=bins)
  centres = (edges[:-1] + edges[1:]) / jnp.float32(2)
  return counts, centres, jnp.int32(0), jnp.int32(bins - 1)


def _class_terms(counts, num_pixels: int) -> jnp.ndarray:
  """[B, B] between-class variance term w (m - mu)^2 of the class of bins i..j (-inf for j < i).

  Means are in bin-index units (bin centres are affine in the index), which keeps
  the prefix sums exact integers.
  """
  num_bins = counts.shape[0]
  exact = num_pixels * (num_bins - 1) < 2**31
  acc = jnp.int32 if exact else jnp.float32
  counts = counts.astype(acc)
  zero = jnp.zeros((1,), acc)
  weight_sum = jnp.concatenate([zero, jnp.cumsum(counts)])
  moment_sum = jnp.concatenate([zero, jnp.cumsum(counts * jnp.arange(num_bins, dtype=acc))])
  weight = (weight_sum[None, 1:] - weight_sum[:-1, None]).astype(jnp.float32)
  moment = (moment_sum[None, 1:] - moment_sum[:-1, None]).astype(jnp.float32)
  mean = moment_sum[-1].astype(jnp.float32) / weight_sum[-1].astype(jnp.float32)
  class_mean = moment / jnp.maximum(weight, 1)
  term = jnp.where(weight > 0, weight * (class_mean - mean) ** 2, 0)
  upper = jnp.arange(num_bins)[None, :] >= jnp.arange(num_bins)[:, None]
  return jnp.where(upper, term, -jnp.inf)


def _best_threshold_indices(counts, lo, hi, num_thresholds: int, num_pixels: int):
  """Bin indices [num_thresholds] in [lo, hi - 1] maximising the between-class variance."""
  num_bins = counts.shape[0]
  term = _class_terms(counts, num_pixels)
  # next_term[i, j]: the class of bins i + 1 .. j that follows a threshold at bin i.
  next_term = jnp.concatenate([term[1:], jnp.full((1, num_bins), -jnp.inf)], axis=0)
  bin_index = jnp.arange(num_bins)
  allowed = (bin_index >= lo) & (bin_index < hi)
  # best[j]: best score of the classes up to a threshold at bin j.
  best = jnp.where(allowed, term[0], -jnp.inf)
  back_pointers = []
  for _ in range(num_thresholds - 1):
    candidates = best[:, None] + next_term
    back_pointers.append(jnp.argmax(candidates, axis=0))
    best = jnp.where(allowed, candidates.max(axis=0), -jnp.inf)
  last = jnp.argmax(best + next_term[:, -1])
  indices = [last]
  for pointer in reversed(back_pointers):
    indices.append(pointer[indices[-1]])
  return jnp.stack(indices[::-1])


def _check_bins(bins: int) -> None:
  if not isinstance(bins, int) or bins < 2:
    raise ValueError(f"bins must be an integer >= 2, got {bins!r}.")


@functools.partial(jax.jit, static_argnames=("bins",))
def otsu_threshold(image, bins: int = 256) -> jnp.ndarray:
  """Otsu's threshold of a grayscale [H, W] image, as `skimage.filters.threshold_otsu`.

  Args:
    image: [H, W] grayscale image (uint8/int8: integer bins; other dtypes: float32).
    bins: number of histogram bins for non-byte images (ignored for uint8/int8).

  Returns:
    A float32 scalar, the centre of the last bin of the lower class (skimage marks
    foreground as `image > threshold`; `apply_thresholds` uses `>=`, as np.digitize).
    A constant image returns its value.
  """
  image = _check_image(image)
  _check_bins(bins)
  counts, centres, lo, hi = _histogram(image, bins)
  index = _best_threshold_indices(counts, lo, hi, 1, image.size)[0]
  return jnp.where(lo == hi, centres[lo], centres[index])


@functools.partial(jax.jit, static_argnames=("classes", "bins"))
def multi_otsu_thresholds(image, classes: int = 3, bins: int = 256) -> jnp.ndarray:
  """`classes - 1` increasing thresholds of a grayscale [H, W] image, as `threshold_multiotsu`.

  Args:
    image: [H, W] grayscale image (uint8/int8: integer bins; other dtypes: float32).
    classes: number of classes (>= 2); the search costs O(classes * bins^2).
    bins: number of histogram bins for non-byte images (ignored for uint8/int8).

  Returns:
    float32 [classes - 1] bin centres; all NaN when fewer than `classes` bins are
    occupied. Label pixels with `apply_thresholds(image, thresholds)`.
  """
  image = _check_image(image)
  _check_bins(bins)
  if not isinstance(classes, int) or classes < 2:
    raise ValueError(f"classes must be an integer >= 2, got {classes!r}.")
  counts, centres, lo, hi = _histogram(image, bins)
  if classes > counts.shape[0]:
    raise ValueError(f"classes={classes} exceeds the {counts.shape[0]} histogram bins; use fewer "
                     "classes or more bins.")
  indices = _best_threshold_indices(counts, lo, hi, classes - 1, image.size)
  feasible = jnp.count_nonzero(counts) >= classes
  return jnp.where(feasible, centres[indices], jnp.nan)


@jax.jit
def apply_thresholds(image, thresholds) -> jnp.ndarray:
  """int32 labels 0..T of an image of any shape: the number of thresholds each pixel exceeds.

  A threshold is the last level of the class below it, so `pixel > threshold` is the split
  the Otsu search optimised (skimage's `image > threshold_otsu(image)`); this equals
  `np.digitize(image, thresholds, right=True)` for increasing thresholds (compared in
  float32; NaN thresholds count for no pixel).
  """
  thresholds = jnp.asarray(thresholds, jnp.float32)
  if thresholds.ndim != 1:
    raise ValueError(f"thresholds must be 1-D, got shape {thresholds.shape}.")
  image = jnp.asarray(image).astype(jnp.float32)
  return jnp.sum(image[..., None] > thresholds, axis=-1, dtype=jnp.int32)
