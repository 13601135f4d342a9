"""Pixel affinity graphs for graph-based segmentation (Shi & Malik, 2000).

Each pixel is a node; the weight between pixels i and j is

  w_ij = exp(-||F_i - F_j||^2 / (2 sigma_F^2)) * exp(-||X_i - X_j||^2 / (2 sigma_X^2))

when ||X_i - X_j|| < radius and 0 otherwise, with X the (row, column) position and F
the pixel feature. The diagonal is zero (no self loops): a node's own weight would
add the same constant to assoc(A, V) whichever side it is on and only blur the cut.

The matrix is dense [N, N] with N = H * W, so it is meant for small images (up to
about 64x64: N = 4096 gives a 64 MiB float32 matrix, and the eigen-solve of a
normalized cut is O(N^3)). Larger images should be downsampled or over-segmented first.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

FEATURES = ("intensity", "color")


def _check_image(image, name="image"):
  if image.ndim not in (2, 3):
    raise ValueError(f"{name} must be [H, W] or [H, W, C], got shape {image.shape}.")
  if image.shape[0] < 1 or image.shape[1] < 1 or (image.ndim == 3 and image.shape[2] < 1):
    raise ValueError(f"{name} must be non-empty, got shape {image.shape}.")


def _check_positive(value, name):
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}.")


def _hsv_cone(rgb):
  """Shi & Malik's colour feature [v, v s sin(2 pi h), v s cos(2 pi h)] of RGB [..., 3]."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.max(rgb, axis=-1)
  chroma = value - jnp.min(rgb, axis=-1)  # = v * s
  safe = jnp.where(chroma > 0, chroma, 1)
  sector = jnp.where(value == r, (g - b) / safe,
                     jnp.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
  angle = jnp.pi / 3 * sector  # 2 pi h with h = sector / 6
  return jnp.stack([value, chroma * jnp.sin(angle), chroma * jnp.cos(angle)], axis=-1)


def pixel_features(image, features: str = "intensity") -> jax.Array:
  """Per-pixel features [H * W, C] in raster order, as float32.

  Args:
    image: [H, W] or [H, W, C] array.
    features: "intensity": the grey value ([H, W] images as they are, the mean over
      channels otherwise); "color": Shi & Malik's HSV cone
      [v, v s sin(2 pi h), v s cos(2 pi h)], which needs an RGB [H, W, 3] image and
      makes hue differences count less for dark and unsaturated pixels.
  """
  image = jnp.asarray(image, jnp.float32)
  _check_image(image)
  if features not in FEATURES:
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}.")
  h, w = image.shape[:2]
  if features == "intensity":
    grey = image if image.ndim == 2 else jnp.mean(image, axis=-1)
    return grey.reshape(h * w, 1)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"features='color' needs an RGB image [H, W, 3], got shape {image.shape}; "
                     "use features='intensity' for grey images.")
  return _hsv_cone(image).reshape(h * w, 3)


@functools.partial(jax.jit, static_argnames=("sigma_position", "sigma_feature", "radius",
                                             "features"))
def affinity_matrix(image, sigma_position: float = 4.0, sigma_feature: float = 0.1,
                    radius: float = 5.0, features: str = "intensity") -> jax.Array:
  """Dense affinity matrix W [H * W, H * W] (float32, symmetric, zero diagonal).

  Jitted; the scalar arguments are static Python values. Defaults follow Shi &
  Malik's intensity experiments on images scaled to [0, 1].

  Args:
    image: [H, W] or [H, W, C] array; nodes are pixels in raster order.
    sigma_position: spatial scale sigma_X in pixels (> 0).
    sigma_feature: feature scale sigma_F in image units (> 0).
    radius: pixels at distance >= radius are not linked (> 0; math.inf links all).
    features: "intensity" or "color", see `pixel_features`.
  """
  _check_positive(sigma_position, "sigma_position")
  _check_positive(sigma_feature, "sigma_feature")
  _check_positive(radius, "radius")
  feats = pixel_features(image, features)
  h, w = image.shape[:2]
  rows, cols = np.divmod(np.arange(h * w), w)
  # Positions are small integers, so these differences and squares are exact.
  dist2 = (jnp.asarray(rows[:, None] - rows[None, :], jnp.float32) ** 2
           + jnp.asarray(cols[:, None] - cols[None, :], jnp.float32) ** 2)
  feat2 = sum((feats[:, None, c] - feats[None, :, c]) ** 2 for c in range(feats.shape[1]))
  weights = jnp.exp(-feat2 / (2 * sigma_feature ** 2) - dist2 / (2 * sigma_position ** 2))
  linked = (dist2 < radius ** 2) & ~jnp.eye(h * w, dtype=bool)
  return jnp.where(linked, weights, 0).astype(jnp.float32)


def check_affinity_matrix(affinity, name: str = "W") -> jax.Array:
  """Checks an affinity matrix and returns it as a float32 jax array.

  The shape must be square [N, N]. When the values are concrete (not traced under
  jit) they must also be finite, non-negative and symmetric (to float32 rounding).
  """
  if isinstance(affinity, jax.core.Tracer):
    values = None
  else:
    values = np.asarray(affinity, np.float64)
  affinity = jnp.asarray(affinity, jnp.float32)
  if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1] or affinity.shape[0] < 1:
    raise ValueError(f"{name} must be a square affinity matrix [N, N] with N >= 1, got shape "
                     f"{affinity.shape}.")
  if values is not None:
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{name} has non-finite entries; affinities must be finite.")
    if np.any(values < 0):
      raise ValueError(f"{name} has negative entries; affinities must be >= 0.")
    scale = max(float(np.max(values)), np.finfo(np.float64).tiny)
    if not np.allclose(values, values.T, rtol=1e-5, atol=1e-6 * scale):
      raise ValueError(f"{name} is not symmetric; pass (W + W.T) / 2 for an undirected graph.")
  return affinity
