"""Fully connected CRF refinement of any model's logits (Krähenbühl & Koltun 2011), as DeepLab.

Model. The unary energy of label l at pixel i is `-logits[i, l]`; every pair of pixels i != j
pays the Potts penalty `sum_m w_m k_m(i, j) [x_i != x_j]` with two Gaussian kernels
  smoothness  k_g(i, j) = exp(-|p_i - p_j|^2 / (2 gaussian_sxy^2)),
  appearance  k_b(i, j) = exp(-|p_i - p_j|^2 / (2 bilateral_sxy^2)
                              - |I_i - I_j|^2 / (2 bilateral_srgb^2)),
positions p = (row, column) in pixels and colours I in 0..255.

Mean field. Q = softmax(logits), then `num_iterations` times, with kn_m the (normalised)
kernel below and every sum over j != i:
  Q_i(l) <- softmax_l(logits_i(l) - sum_m w_m sum_j kn_m(i, j) (1 - Q_j(l)))
          = softmax_l(logits_i(l) + sum_m w_m sum_j kn_m(i, j) Q_j(l)).
The two lines are equal because `sum_j kn_m(i, j)` does not depend on l and cancels in the
softmax: the penalty for disagreeing with a neighbour is applied as a bonus of +w_m * message
on the logit of the neighbour's own label, which is how this module computes it.

Normalisation. "symmetric" (the default of Krähenbühl's densecrf code and of pydensecrf, for
which published weights are tuned) uses kn(i, j) = k(i, j) / sqrt(d_i d_j) with
d_i = sum_{j != i} k(i, j), so each message is a kernel-weighted vote in [0, 1] whatever the
image size. "none" is the paper's raw sum kn = k; its messages grow with the number of similar
pixels (about 2 pi sxy^2 in a flat region), so the weights must shrink accordingly.

Defaults are pydensecrf's example setting (5 iterations, smoothness 3 px / weight 3,
appearance 80 px, 13 colour levels / weight 10). DeepLab-v2 (ResNet-101, VOC) reimplementations
use num_iterations=10, gaussian_sxy=1, gaussian_weight=3, bilateral_sxy=67, bilateral_srgb=3,
bilateral_weight=4.

Filtering (every mode excludes the pixel itself exactly; d_i is computed by the same filter):
  * `window=None`: exact. The smoothness term is a separable filter over the whole image;
    the appearance term is the O(N^2) kernel matrix, evaluated in row blocks and never stored,
    allowed up to MAX_DENSE_PIXELS pixels per image.
  * `window=r, stride=s`: a truncated local approximation in the spirit of ConvCRF (Teichmann &
    Cipolla 2018). The senders j are grouped into the s x s cells of the image (zero-padded to
    a multiple of s), each cell standing for its pixels with their mean position and colour;
    pixel i receives appearance messages from the (2r+1)^2 cells centred on its own cell,
    k_b(i, j) being replaced by k_b between i's own features and j's cell mean (exact when
    s = 1). The smoothness term stays exact within the (2 r s + 1)^2 pixels around i
    (separable). With s = 1 both terms are the exact kernels truncated to the same window, and
    a window covering the image reproduces `window=None`. Cost per iteration is about
    N (2r+1)^2 kernel evaluations, so the default appearance range bilateral_sxy=80 is reached
    with a stride, e.g. window=10, stride=8 (senders up to 80-87 pixels away).

Everything after the argument checks is jitted with static shapes; the parameters other than
`logits` and `image` are Python numbers (static under an outer `jax.jit`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MAX_DENSE_PIXELS = 128 * 128  # Pixels per image above which window=None is refused.
_NORMALIZATIONS = ("symmetric", "none")
_BLOCK_ELEMENTS = 1 << 22  # Kernel entries per row block of the exact appearance filter.
_HIGHEST = lax.Precision.HIGHEST


def dense_crf(logits, image, num_iterations=5, gaussian_sxy=3.0, gaussian_weight=3.0,
              bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_weight=10.0, window=None,
              stride=1, normalization="symmetric"):
  """Mean-field refined label probabilities of a fully connected CRF (see the module docstring).

  Args:
    logits: [B, H, W, K] model logits at the image's resolution (the negative unary energy).
    image: [B, H, W, 3] RGB image in 0..255 (any real or integer dtype).
    num_iterations: mean-field updates; 0 returns softmax(logits).
    gaussian_sxy: spatial standard deviation (pixels) of the smoothness kernel.
    gaussian_weight: Potts weight of the smoothness kernel (0 disables it).
    bilateral_sxy: spatial standard deviation (pixels) of the appearance kernel.
    bilateral_srgb: colour standard deviation (0..255 units) of the appearance kernel.
    bilateral_weight: Potts weight of the appearance kernel (0 disables it).
    window: None for exact filtering (at most MAX_DENSE_PIXELS pixels per image when the
      appearance term is on), or the radius r >= 1 of the local approximation.
    stride: cell size s >= 1 of the appearance senders in the local approximation.
    normalization: "symmetric" or "none".

  Returns:
    [B, H, W, K] float32 probabilities.
  """
  logits, image = jnp.asarray(logits), jnp.asarray(image)
  _check_arguments(logits, image, num_iterations, gaussian_sxy, gaussian_weight, bilateral_sxy,
                   bilateral_srgb, bilateral_weight, window, stride, normalization)
  return _mean_field(logits, image, num_iterations=int(num_iterations),
                     gaussian_sxy=float(gaussian_sxy), gaussian_weight=float(gaussian_weight),
                     bilateral_sxy=float(bilateral_sxy), bilateral_srgb=float(bilateral_srgb),
                     bilateral_weight=float(bilateral_weight),
                     window=None if window is None else int(window), stride=int(stride),
                     normalization=normalization)


def crf_refine_labels(logits, image, **crf_kwargs):
  """[B, H, W] int32 argmax labels of `dense_crf(logits, image, **crf_kwargs)`."""
  return jnp.argmax(dense_crf(logits, image, **crf_kwargs), axis=-1).astype(jnp.int32)


def _is_int(value):
  """Whether value is a Python or numpy integer (bools excluded)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(logits, image, num_iterations, gaussian_sxy, gaussian_weight, bilateral_sxy,
                     bilateral_srgb, bilateral_weight, window, stride, normalization):
  """Raises ValueError naming the first bad argument of dense_crf."""
  if logits.ndim != 4 or 0 in logits.shape:
    raise ValueError(f"logits must be a non-empty [batch, height, width, classes] array, got "
                     f"shape {logits.shape}.")
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"image must be a [batch, height, width, 3] RGB array, got shape "
                     f"{image.shape}.")
  if image.shape[:3] != logits.shape[:3]:
    raise ValueError(f"image {image.shape[:3]} and logits {logits.shape[:3]} must share batch, "
                     "height and width; resize the logits to the image first.")
  if not _is_int(num_iterations) or num_iterations < 0:
    raise ValueError(f"num_iterations must be an int >= 0, got {num_iterations!r}.")
  for name, value in (("gaussian_sxy", gaussian_sxy), ("bilateral_sxy", bilateral_sxy),
                      ("bilateral_srgb", bilateral_srgb)):
    if not float(value) > 0:
      raise ValueError(f"{name} must be a positive standard deviation, got {value!r}.")
  for name, value in (("gaussian_weight", gaussian_weight),
                      ("bilateral_weight", bilateral_weight)):
    if not float(value) >= 0:
      raise ValueError(f"{name} must be >= 0 (a Potts weight; 0 disables the kernel), got "
                       f"{value!r}.")
  if window is not None and (not _is_int(window) or window < 1):
    raise ValueError(f"window must be None (exact) or an int radius >= 1, got {window!r}.")
  if not _is_int(stride) or stride < 1:
    raise ValueError(f"stride must be an int >= 1, got {stride!r}.")
  if stride != 1 and window is None:
    raise ValueError(f"stride={stride} only applies to the windowed approximation; set window "
                     "too, or use stride=1 for exact filtering.")
  if normalization not in _NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}.")
  pixels = logits.shape[1] * logits.shape[2]
  if window is None and bilateral_weight > 0 and pixels > MAX_DENSE_PIXELS:
    raise ValueError(f"Exact dense filtering of {logits.shape[1]}x{logits.shape[2]} = {pixels} "
                     f"pixels exceeds MAX_DENSE_PIXELS = {MAX_DENSE_PIXELS} (its cost is N^2); "
                     "set window (and stride) for the local approximation, e.g. window=10, "
                     "stride=8.")


@functools.partial(jax.jit, static_argnames=(
    "num_iterations", "gaussian_sxy", "gaussian_weight", "bilateral_sxy", "bilateral_srgb",
    "bilateral_weight", "window", "stride", "normalization"))
def _mean_field(logits, image, *, num_iterations, gaussian_sxy, gaussian_weight, bilateral_sxy,
                bilateral_srgb, bilateral_weight, window, stride, normalization):
  """dense_crf after its checks."""
  logits = logits.astype(jnp.float32)
  q = jax.nn.softmax(logits, axis=-1)
  b, h, w, _ = logits.shape
  terms = []
  if gaussian_weight > 0:
    reach = max(h, w) if window is None else window * stride
    terms.append((gaussian_weight, functools.partial(
        _gaussian_message, sxy=gaussian_sxy, radius_y=min(reach, h - 1),
        radius_x=min(reach, w - 1))))
  if bilateral_weight > 0:
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                              jnp.arange(w, dtype=jnp.float32), indexing="ij")
    positions = jnp.broadcast_to(jnp.stack([rows, cols], -1), (b, h, w, 2))
    features = jnp.concatenate([positions / bilateral_sxy,
                                image.astype(jnp.float32) / bilateral_srgb], axis=-1)
    if window is None:
      filter_fn = functools.partial(_exact_bilateral_message, features)
    else:
      filter_fn = functools.partial(_windowed_bilateral_message, features, radius=window,
                                    stride=stride)
    terms.append((bilateral_weight, filter_fn))
  if not terms or num_iterations == 0:
    return q

  scaled = []
  for weight, filter_fn in terms:
    if normalization == "symmetric":
      mass = filter_fn(jnp.ones((b, h, w, 1), jnp.float32))
      scale = jnp.where(mass > 0, lax.rsqrt(jnp.maximum(mass, 1e-37)), 0.0)
    else:
      scale = 1.0
    scaled.append((weight, filter_fn, scale))

  def update(_, q):
    message = sum(weight * scale * filter_fn(scale * q) for weight, filter_fn, scale in scaled)
    return jax.nn.softmax(logits + message, axis=-1)

  return lax.fori_loop(0, num_iterations, update, q)


def _gaussian_band(size, sxy, radius, keep_centre):
  """[size, size] matrix exp(-(a - b)^2 / (2 sxy^2)) for |a - b| <= radius, else 0.

  Built on device (not a numpy constant) so large images do not embed large constants.
  """
  index = jnp.arange(size, dtype=jnp.float32)
  d = index[:, None] - index[None, :]
  inside = jnp.abs(d) <= radius if keep_centre else (jnp.abs(d) <= radius) & (d != 0)
  return jnp.where(inside, jnp.exp(-d * d / (2.0 * sxy * sxy)), 0.0)


def _gaussian_message(values, sxy, radius_y, radius_x):
  """sum over offsets (dy, dx) != 0, |dy| <= radius_y, |dx| <= radius_x of k_g * values.

  Separable, each axis a banded matrix product (exact zero padding, any radius, fast on every
  backend); split as (dy != 0, any dx) + (dy == 0, dx != 0) so the self term is never
  subtracted.
  """
  _, h, w, _ = values.shape
  message = jnp.einsum("xz,bhzc->bhxc", _gaussian_band(w, sxy, radius_x, False), values,
                       precision=_HIGHEST)
  if h > 1:
    all_x = jnp.einsum("xz,bhzc->bhxc", _gaussian_band(w, sxy, radius_x, True), values,
                       precision=_HIGHEST)
    message = message + jnp.einsum("yz,bzwc->bywc", _gaussian_band(h, sxy, radius_y, False),
                                   all_x, precision=_HIGHEST)
  return message


def _exact_bilateral_message(features, values):
  """sum_{j != i} exp(-|f_i - f_j|^2 / 2) values_j over all pixels j, by row blocks.

  Args:
    features: [B, H, W, D] scaled features (position / sxy, colour / srgb).
    values: [B, H, W, C].
  """
  b, h, w, d = features.shape
  channels = values.shape[-1]
  n = h * w
  block = max(1, min(n, _BLOCK_ELEMENTS // (b * n)))
  blocks = -(-n // block)
  columns = jnp.arange(n)

  def one_image(feats, vals):
    padded = jnp.pad(feats, ((0, blocks * block - n), (0, 0))).reshape(blocks, block, d)
    rows = jnp.arange(blocks * block).reshape(blocks, block)

    def one_block(args):
      block_feats, block_rows = args
      dist2 = jnp.sum(jnp.square(block_feats[:, None, :] - feats[None, :, :]), axis=-1)
      kernel = jnp.where(block_rows[:, None] == columns[None, :], 0.0, jnp.exp(-0.5 * dist2))
      return jnp.matmul(kernel, vals, precision=_HIGHEST)

    return lax.map(one_block, (padded, rows)).reshape(blocks * block, channels)[:n]

  out = jax.vmap(one_image)(features.reshape(b, n, d), values.reshape(b, n, channels))
  return out.reshape(b, h, w, channels)


def _windowed_bilateral_message(features, values, radius, stride):
  """Appearance message from the (2 radius + 1)^2 stride x stride cells around each pixel's cell.

  A sender j counts as its cell's mean features; the receiver i keeps its own. The own cell
  contributes its other pixels only (cell sum minus the receiver's value).

  Args:
    features: [B, H, W, D] scaled features (position / sxy, colour / srgb).
    values: [B, H, W, C].
  """
  b, h, w, d = features.shape
  channels = values.shape[-1]
  s = stride
  hc, wc = -(-h // s), -(-w // s)
  pad = ((0, 0), (0, hc * s - h), (0, wc * s - w), (0, 0))
  fine_features = jnp.pad(features, pad).reshape(b, hc, s, wc, s, d)
  fine_values = jnp.pad(values, pad).reshape(b, hc, s, wc, s, channels)
  count = jnp.pad(jnp.ones((1, h, w, 1), jnp.float32), pad).reshape(1, hc, s, wc, s, 1)
  cell_features = fine_features.sum((2, 4)) / count.sum((2, 4))
  cell_values = fine_values.sum((2, 4))

  def kernel(cell_feats):
    diff = fine_features - cell_feats[:, :, None, :, None, :]
    return jnp.exp(-0.5 * jnp.sum(diff * diff, axis=-1, keepdims=True))

  own = kernel(cell_features) * (cell_values[:, :, None, :, None, :] - fine_values)
  ry, rx = min(radius, hc - 1), min(radius, wc - 1)
  offsets = np.array([(dy, dx) for dy in range(2 * ry + 1) for dx in range(2 * rx + 1)
                      if (dy, dx) != (ry, rx)], np.int32).reshape(-1, 2)
  if len(offsets) == 0:
    return own.reshape(b, hc * s, wc * s, channels)[:, :h, :w]
  cell_pad = ((0, 0), (ry, ry), (rx, rx), (0, 0))
  padded_features = jnp.pad(cell_features, cell_pad)
  padded_values = jnp.pad(cell_values, cell_pad)

  def add_offset(message, offset):
    start = (0, offset[0], offset[1], 0)
    feats = lax.dynamic_slice(padded_features, start, (b, hc, wc, d))
    vals = lax.dynamic_slice(padded_values, start, (b, hc, wc, channels))
    return message + kernel(feats) * vals[:, :, None, :, None, :], None

  message, _ = lax.scan(add_offset, own, jnp.asarray(offsets))
  return message.reshape(b, hc * s, wc * s, channels)[:, :h, :w]
