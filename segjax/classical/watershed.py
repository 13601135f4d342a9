"""Watershed and Felzenszwalb-Huttenlocher segmentation: thin scikit-image wrappers.

These are host (numpy) baselines; the algorithms are scikit-image's, called
unchanged, so results equal calling it directly with the same inputs.

`watershed_segment` floods the Sobel gradient magnitude of the gray image
(`skimage.filters.sobel`; an RGB image is first converted with
`skimage.color.rgb2gray`, a gray image is used at its own scale). Without
markers, the markers are the gradient's h-minima (`skimage.morphology.h_minima`:
regional minima at least `h` deep), labelled as connected components
(`skimage.measure.label`); the default `h` is 5% of the gradient's range, so
flat regions separated by edges of at least that strength each get one marker.
A flat gradient yields one region.
"""
from typing import Optional, Union

import numpy as np
from skimage import color, filters, measure, morphology, segmentation

DEFAULT_H_FRACTION = 0.05


def _gray(image) -> np.ndarray:
  """[H, W] float gray image from [H, W], [H, W, 1] or [H, W, 3] input."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  elif image.ndim == 3 and image.shape[-1] == 3:
    return color.rgb2gray(image)
  if image.ndim != 2:
    raise ValueError(f"image has shape {image.shape}; expected [H, W], [H, W, 1] or [H, W, 3].")
  return image.astype(np.float64)


def sobel_gradient(image) -> np.ndarray:
  """[H, W] Sobel gradient magnitude of the gray image (`skimage.filters.sobel`)."""
  return filters.sobel(_gray(image))


def h_minima_markers(gradient, h: Optional[float] = None, connectivity: int = 1) -> np.ndarray:
  """int32 markers 1..N: connected components of the gradient's h-minima.

  Args:
    gradient: [H, W] gradient magnitude.
    h: minimum depth of a kept minimum; None is 5% of the gradient's range.
    connectivity: 1 (4-neighbours) or 2 (8-neighbours) for the components.
  """
  gradient = np.asarray(gradient, np.float64)
  if gradient.ndim != 2:
    raise ValueError(f"gradient has shape {gradient.shape}; expected [H, W].")
  spread = float(gradient.max() - gradient.min())
  if spread == 0:
    return np.ones(gradient.shape, np.int32)
  if h is None:
    h = DEFAULT_H_FRACTION * spread
  if not h > 0:
    raise ValueError(f"h must be > 0, got {h}.")
  minima = morphology.h_minima(gradient, h)
  return measure.label(minima, connectivity=connectivity).astype(np.int32)


def watershed_segment(image, markers: Union[None, int, np.ndarray] = None,
                      compactness: float = 0.0, h: Optional[float] = None,
                      connectivity: int = 1) -> np.ndarray:
  """Marker-based watershed of the Sobel gradient; int32 [H, W] labels 1..N.

  Args:
    image: [H, W], [H, W, 1] or RGB [H, W, 3] image.
    markers: [H, W] integer markers (0 = unmarked, ids kept in the output), an int
      (that many markers chosen by scikit-image), or None for `h_minima_markers`.
    compactness: >= 0; larger values give more regular (compact) basins.
    h: depth for the default h-minima markers (see `h_minima_markers`).
    connectivity: 1 (4-neighbours) or 2 (8-neighbours), for flooding and markers.
  """
  if not compactness >= 0:
    raise ValueError(f"compactness must be >= 0, got {compactness}.")
  if connectivity not in (1, 2):
    raise ValueError(f"connectivity must be 1 or 2, got {connectivity}.")
  gradient = sobel_gradient(image)
  if markers is None:
    markers = h_minima_markers(gradient, h, connectivity)
  elif isinstance(markers, (int, np.integer)):
    if markers < 1:
      raise ValueError(f"markers as a count must be >= 1, got {markers}.")
  else:
    markers = np.asarray(markers)
    if markers.shape != gradient.shape:
      raise ValueError(f"markers has shape {markers.shape}; expected {gradient.shape}.")
    if not np.issubdtype(markers.dtype, np.integer) or markers.min() < 0:
      raise ValueError("markers must be non-negative integer ids (0 = unmarked).")
    if markers.max() == 0:
      raise ValueError("markers has no marked pixel; give at least one id >= 1.")
  labels = segmentation.watershed(gradient, markers, connectivity=connectivity,
                                  compactness=compactness)
  return labels.astype(np.int32)


def felzenszwalb_segment(image, scale: float = 100, sigma: float = 0.8,
                         min_size: int = 20) -> np.ndarray:
  """Felzenszwalb-Huttenlocher graph segmentation; int32 [H, W] labels 0..R-1.

  Args:
    image: [H, W] gray or [H, W, C] image (channels passed as `channel_axis=-1`).
    scale: > 0; larger values give larger segments.
    sigma: >= 0 Gaussian pre-smoothing width.
    min_size: >= 0 minimum segment size, enforced after the graph merge.
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f"image has shape {image.shape}; expected [H, W] or [H, W, C].")
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}.")
  if not sigma >= 0:
    raise ValueError(f"sigma must be >= 0, got {sigma}.")
  if not isinstance(min_size, (int, np.integer)) or min_size < 0:
    raise ValueError(f"min_size must be an int >= 0, got {min_size}.")
  channel_axis = -1 if image.ndim == 3 else None
  labels = segmentation.felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size,
                                     channel_axis=channel_axis)
  return labels.astype(np.int32)
