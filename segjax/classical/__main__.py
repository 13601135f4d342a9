"""`python -m segjax.classical METHOD --input IMAGE --output DIR [options]`.

Runs one classical segmentation method on an image file (read with PIL as RGB) and writes
  DIR/<stem>_<method>_labels.png   the label ids (uint8, or uint16 when a label exceeds 255),
  DIR/<stem>_<method>_overlay.png  the image blended with one colour per label (random but
                                   seeded, so a label keeps its colour between runs) and the
                                   region boundaries drawn in white,
then prints one line with the number of regions (distinct label ids, so the unreached label 0
of region growing counts as one) and both paths. `METHOD --help` lists a method's options.
Flags are spelled as train.py's absl flags are: `--flag_name value` or `--flag_name=value`,
and `--noflag` turns a boolean off. Bad arguments are argparse usage errors; an unreadable
image or a value the method rejects is a one-sentence error; both exit with status 2.
"""
import argparse
import os
import sys

import jax
import numpy as np
from PIL import Image

from segjax import images
from segjax.classical.affinity import FEATURES
from segjax.classical.clustering import FEATURE_MODES, KERNELS, kmeans_segment, mean_shift_segment
from segjax.classical.min_cut import min_cut_segment
from segjax.classical.normalized_cut import normalized_cut_segment
from segjax.classical.region_growing import region_grow, seeds_from_points
from segjax.classical.split_merge import PREDICATES, split_and_merge
from segjax.classical.thresholding import (apply_thresholds, multi_otsu_thresholds, otsu_threshold,
                                          to_gray)
from segjax.classical.watershed import felzenszwalb_segment, watershed_segment

PROG = "python -m segjax.classical"
_OVERLAY_ALPHA = 0.5
_COLOR_SEED = 0
_BOUNDARY_COLOR = (255, 255, 255)
_MAX_UINT16_LABEL = 65535


class UserError(Exception):
  """A problem with the input that the user can fix; reported as one sentence."""


def _checked(convert, ok, requirement: str):
  """An argparse type: `convert(text)`, which must satisfy `ok`; else 'expected <requirement>'."""

  def parse(text: str):
    try:
      value = convert(text)
    except ValueError:
      value = None
    if value is None or not ok(value):
      raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
    return value

  return parse


_positive_int = _checked(int, lambda value: value >= 1, "an integer >= 1")
_nonnegative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda value: value > 0, "a number > 0")
_nonnegative_float = _checked(float, lambda value: value >= 0, "a number >= 0")


def _points(text: str) -> np.ndarray:
  """'r,c;r,c' -> int [S, 2] (row, col) points."""
  try:
    points = [tuple(int(v) for v in pair.split(",")) for pair in text.split(";") if pair.strip()]
  except ValueError:
    points = []
  if not points or any(len(p) != 2 for p in points):
    raise argparse.ArgumentTypeError(f"expected integer points 'row,col;row,col', got {text!r}")
  return np.asarray(points, np.int64)


def _centre(image: np.ndarray) -> np.ndarray:
  return np.asarray([[image.shape[0] // 2, image.shape[1] // 2]], np.int64)


def _unit_rgb(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / 255


def _downscale(image: np.ndarray, max_size: int) -> np.ndarray:
  """The image area-averaged so its longer side is at most max_size (0: unchanged)."""
  height, width = image.shape[:2]
  if max_size == 0 or max(height, width) <= max_size:
    return image
  scale = max_size / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _upsample_nearest(labels: np.ndarray, shape) -> np.ndarray:
  """labels resized to shape [H, W] by nearest neighbour (pixel centres)."""
  rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0],
                    labels.shape[0] - 1).astype(np.int64)
  cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1],
                    labels.shape[1] - 1).astype(np.int64)
  return labels[rows[:, None], cols[None, :]]


def _gray_levels(image: np.ndarray) -> np.ndarray:
  """uint8 BT.601 luma, so the Otsu histograms have one bin per gray level."""
  return np.clip(np.round(np.asarray(to_gray(image))), 0, 255).astype(np.uint8)


def _otsu(image, args):
  del args  # Otsu has no options.
  gray = _gray_levels(image)
  return np.asarray(apply_thresholds(gray, otsu_threshold(gray)[None]))


def _multi_otsu(image, args):
  gray = _gray_levels(image)
  thresholds = np.asarray(multi_otsu_thresholds(gray, classes=args.classes))
  if np.isnan(thresholds).any():
    raise UserError(f"the image has fewer than {args.classes} distinct gray levels; use fewer "
                     "--classes.")
  return np.asarray(apply_thresholds(gray, thresholds))


def _kmeans(image, args):
  return kmeans_segment(_unit_rgb(image), args.k, jax.random.key(args.seed), mode=args.features,
                        position_weight=args.position_weight,
                        max_iterations=args.max_iterations)


def _mean_shift(image, args):
  small = _downscale(image, args.max_size)
  labels = mean_shift_segment(_unit_rgb(small), args.bandwidth, mode=args.features,
                              position_weight=args.position_weight,
                              max_iterations=args.max_iterations, kernel=args.kernel)
  return _upsample_nearest(np.asarray(labels), image.shape[:2])


def _region_growing(image, args):
  points = _centre(image) if args.seeds is None else args.seeds
  seeds = seeds_from_points(image.shape, points)
  return region_grow(image.astype(np.float32), seeds, args.threshold, adaptive=args.adaptive,
                     connectivity=args.connectivity)


def _split_merge(image, args):
  return split_and_merge(image, predicate=args.predicate, max_variance=args.max_variance,
                         max_range=args.max_range, min_block=args.min_block)


def _normalized_cut(image, args):
  small = _downscale(image, args.max_size)
  labels = normalized_cut_segment(_unit_rgb(small), args.segments,
                                  sigma_position=args.sigma_position,
                                  sigma_feature=args.sigma_feature, radius=args.radius,
                                  features=args.features, max_ncut=args.max_ncut)
  return _upsample_nearest(np.asarray(labels), image.shape[:2])


def _min_cut(image, args):
  shape = image.shape[:2]
  points = _centre(image) if args.foreground is None else args.foreground
  foreground = seeds_from_points(shape, points) > 0
  if args.background is None:
    background = np.ones(shape, bool)
    background[1:-1, 1:-1] = False
    background &= ~foreground
  else:
    background = seeds_from_points(shape, args.background) > 0
  mask = min_cut_segment(_unit_rgb(image), foreground, background, sigma=args.sigma,
                         lambda_=args.lambda_, num_bins=args.bins)
  return mask.astype(np.int32)


def _watershed(image, args):
  return watershed_segment(image, markers=args.markers, compactness=args.compactness, h=args.h,
                           connectivity=args.connectivity)


def _felzenszwalb(image, args):
  return felzenszwalb_segment(image, scale=args.scale, sigma=args.sigma, min_size=args.min_size)


def _add_max_size(parser, default: int) -> None:
  parser.add_argument(
      "--max_size", type=_nonnegative_int, default=default,
      help="the method builds N x N pixel matrices, so an image whose longer side exceeds this "
           "is first downscaled (area average) to that side; the labels are upsampled back to "
           "the input size by nearest neighbour. 0: never downscale (default %(default)s)")


def _add_features(parser) -> None:
  parser.add_argument("--features", choices=FEATURE_MODES, default="color",
                      help="cluster on RGB in [0, 1] (color) or RGB plus the pixel position "
                           "scaled to [0, position_weight] (color_position) (default "
                           "%(default)s)")
  parser.add_argument("--position_weight", type=_nonnegative_float, default=1.0,
                      help="scale of the position features (default %(default)s)")


def _configure_multi_otsu(parser):
  parser.add_argument("--classes", type=_positive_int, default=3,
                      help="number of gray classes, >= 2 (default %(default)s)")


def _configure_kmeans(parser):
  parser.add_argument("--k", type=_positive_int, default=3,
                      help="number of clusters (default %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="random seed of the k-means++ seeding (default %(default)s)")
  parser.add_argument("--max_iterations", type=_positive_int, default=100,
                      help="most Lloyd iterations (default %(default)s)")
  _add_features(parser)


def _configure_mean_shift(parser):
  parser.add_argument("--bandwidth", type=_positive_float, default=0.2,
                      help="kernel radius (flat) or standard deviation (gaussian) in feature "
                           "units, RGB in [0, 1] (default %(default)s)")
  parser.add_argument("--kernel", choices=KERNELS, default="flat",
                      help="mean-shift kernel (default %(default)s)")
  parser.add_argument("--max_iterations", type=_positive_int, default=50,
                      help="most shift steps (default %(default)s)")
  _add_features(parser)
  _add_max_size(parser, 64)


def _configure_region_growing(parser):
  parser.add_argument("--seeds", type=_points, default=None, metavar="POINTS",
                      help="seed pixels 'row,col;row,col', one region each, labelled 1, 2, ...; "
                           "label 0 is what no region reached (default: the image centre)")
  parser.add_argument("--threshold", type=_nonnegative_float, default=20.0,
                      help="a pixel joins a neighbouring region when its channel mean (0..255) "
                           "is within this of the region's mean (default %(default)s)")
  parser.add_argument("--adaptive", action="store_true", default=True,
                      help="shrink each region's threshold by its std / mean ratio (the "
                           "default; --noadaptive turns it off)")
  parser.add_argument("--noadaptive", dest="adaptive", action="store_false",
                      help="a fixed threshold for every region")
  parser.add_argument("--connectivity", type=int, choices=(4, 8), default=4,
                      help="pixel neighbourhood (default %(default)s)")


def _configure_split_merge(parser):
  parser.add_argument("--predicate", choices=PREDICATES, default="variance",
                      help="homogeneity test on the channel mean, 0..255 (default "
                           "%(default)s)")
  parser.add_argument("--max_variance", type=_nonnegative_float, default=100.0,
                      help="largest variance of a homogeneous region (default %(default)s)")
  parser.add_argument("--max_range", type=_nonnegative_float, default=40.0,
                      help="largest max - min of a homogeneous region, for --predicate range "
                           "(default %(default)s)")
  parser.add_argument("--min_block", type=_positive_int, default=2,
                      help="smallest quadtree block side (default %(default)s)")


def _configure_normalized_cut(parser):
  parser.add_argument("--segments", type=_positive_int, default=2,
                      help="number of segments, by recursive two-way cuts (default "
                           "%(default)s)")
  parser.add_argument("--features", choices=FEATURES, default="intensity",
                      help="gray value or Shi & Malik's HSV cone, RGB in [0, 1] (default "
                           "%(default)s)")
  parser.add_argument("--sigma_feature", type=_positive_float, default=0.1,
                      help="feature scale of the affinities (default %(default)s)")
  parser.add_argument("--sigma_position", type=_positive_float, default=4.0,
                      help="spatial scale of the affinities, pixels of the (downscaled) image "
                           "(default %(default)s)")
  parser.add_argument("--radius", type=_positive_float, default=5.0,
                      help="pixels this far apart (in the downscaled image) are not linked "
                           "(default %(default)s)")
  parser.add_argument("--max_ncut", type=_nonnegative_float, default=None,
                      help="reject splits with a larger Ncut (in [0, 2]; default: accept all)")
  _add_max_size(parser, 32)


def _configure_min_cut(parser):
  parser.add_argument("--foreground", type=_points, default=None, metavar="POINTS",
                      help="object seed pixels 'row,col;row,col' (default: the image centre)")
  parser.add_argument("--background", type=_points, default=None, metavar="POINTS",
                      help="background seed pixels 'row,col;row,col' (default: the image "
                           "border)")
  parser.add_argument("--sigma", type=_positive_float, default=0.1,
                      help="contrast scale of the neighbour links, RGB in [0, 1] (default "
                           "%(default)s)")
  parser.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=_nonnegative_float,
                      default=0.0,
                      help="weight of the seed-histogram region term; 0 cuts on boundaries "
                           "only (default %(default)s)")
  parser.add_argument("--bins", type=_positive_int, default=16,
                      help="gray histogram bins of the region term (default %(default)s)")


def _configure_watershed(parser):
  parser.add_argument("--markers", type=_positive_int, default=None,
                      help="number of markers placed by scikit-image (default: the h-minima of "
                           "the gradient, one per flat region)")
  parser.add_argument("--h", type=_positive_float, default=None,
                      help="depth of the h-minima markers, gradient of the [0, 1] gray image "
                           "(default: 5%% of the gradient's range)")
  parser.add_argument("--compactness", type=_nonnegative_float, default=0.0,
                      help="larger values give more regular basins (default %(default)s)")
  parser.add_argument("--connectivity", type=int, choices=(1, 2), default=1,
                      help="1: 4-neighbours, 2: 8-neighbours (default %(default)s)")


def _configure_felzenszwalb(parser):
  parser.add_argument("--scale", type=_positive_float, default=100.0,
                      help="larger values give larger segments (default %(default)s)")
  parser.add_argument("--sigma", type=_nonnegative_float, default=0.8,
                      help="Gaussian pre-smoothing width in pixels (default %(default)s)")
  parser.add_argument("--min_size", type=_nonnegative_int, default=20,
                      help="smallest segment in pixels (default %(default)s)")


# name: (run, add its options or None, one-line description).
METHODS = {
    "otsu": (_otsu, None, "Otsu threshold of the 8-bit gray image: 0 dark, 1 bright."),
    "multi_otsu": (_multi_otsu, _configure_multi_otsu,
                   "multi-Otsu thresholds of the 8-bit gray image: 0..classes-1, dark to "
                   "bright."),
    "kmeans": (_kmeans, _configure_kmeans, "k-means clusters of the pixel colours."),
    "mean_shift": (_mean_shift, _configure_mean_shift,
                   "mean-shift clusters of the pixel colours (O(N^2); see --max_size)."),
    "region_growing": (_region_growing, _configure_region_growing,
                       "seeded region growing on the channel mean."),
    "split_merge": (_split_merge, _configure_split_merge,
                    "quadtree split and greedy merge into homogeneous regions."),
    "normalized_cut": (_normalized_cut, _configure_normalized_cut,
                       "recursive normalized cuts (N x N affinities, O(N^3) per cut; see "
                       "--max_size)."),
    "min_cut": (_min_cut, _configure_min_cut,
                "seeded s-t minimum cut: 0 background, 1 foreground."),
    "watershed": (_watershed, _configure_watershed,
                  "marker watershed of the Sobel gradient (scikit-image)."),
    "felzenszwalb": (_felzenszwalb, _configure_felzenszwalb,
                     "Felzenszwalb-Huttenlocher graph segmentation (scikit-image)."),
}


def build_parser() -> argparse.ArgumentParser:
  """The argument parser: one sub-command per method, all taking --input and --output."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--input", required=True, metavar="IMAGE",
                      help="image file readable by PIL (converted to 8-bit RGB)")
  common.add_argument("--output", required=True, metavar="DIR",
                      help="directory for <stem>_<method>_labels.png and _overlay.png "
                           "(created if missing)")
  parser = argparse.ArgumentParser(
      prog=PROG, usage=f"{PROG} METHOD --input IMAGE --output DIR [method options]",
      description="Segment an image with a classical method; writes the label ids and a "
                  "coloured overlay. `METHOD --help` lists a method's options.")
  methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True, prog=PROG)
  for name, (_, configure, description) in METHODS.items():
    sub = methods.add_parser(name, parents=[common], help=description, description=description)
    if configure is not None:
      configure(sub)
  return parser


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file; UserError naming the file if it cannot be read."""
  try:
    with Image.open(path) as image:
      return images.to_rgb8(image, f"input image {path!r}")
  except images.UnsupportedImageError as error:
    raise UserError(f"{error}") from None
  except FileNotFoundError:
    raise UserError(f"input image {path!r} does not exist.") from None
  except IsADirectoryError:
    raise UserError(f"input {path!r} is a directory, not an image file.") from None
  except PermissionError:
    raise UserError(f"input image {path!r} cannot be read (permission denied).") from None
  except Image.UnidentifiedImageError:
    raise UserError(f"input {path!r} is not an image file PIL can read.") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    reason = " ".join(str(error).split()).rstrip(".")
    raise UserError(f"input image {path!r} is corrupt or truncated ({reason}).") from None


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3]: image blended with a seeded random colour per label, boundaries drawn."""
  colors = np.random.default_rng(_COLOR_SEED).integers(0, 256, (int(labels.max()) + 1, 3))
  blended = (1 - _OVERLAY_ALPHA) * image + _OVERLAY_ALPHA * colors[labels]
  out = np.round(blended).astype(np.uint8)
  boundary = np.zeros(labels.shape, bool)
  boundary[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  boundary[:-1] |= labels[:-1] != labels[1:]
  out[boundary] = _BOUNDARY_COLOR
  return out


def label_image(labels: np.ndarray) -> np.ndarray:
  """The label ids as uint8, or uint16 when a label exceeds 255."""
  largest = int(labels.max())
  if largest > _MAX_UINT16_LABEL:
    raise UserError(f"the segmentation has label {largest}, more than a 16-bit PNG holds; "
                     "choose options that give fewer regions.")
  return labels.astype(np.uint8 if largest <= 255 else np.uint16)


def segment(method: str, image: np.ndarray, args: argparse.Namespace) -> np.ndarray:
  """int64 [H, W] label ids of one method; UserError for values the method rejects."""
  method_fn = METHODS[method][0]
  try:
    labels = np.asarray(method_fn(image, args)).astype(np.int64)
  except ValueError as error:
    raise UserError(f"{method}: {' '.join(str(error).split())}") from None
  return labels


def run(args: argparse.Namespace) -> str:
  """Segments args.input with args.method, writes both PNGs, returns the summary line."""
  image = read_image(args.input)
  labels = segment(args.method, image, args)
  ids = label_image(labels)
  stem = os.path.splitext(os.path.basename(args.input))[0]
  labels_path = os.path.join(args.output, f"{stem}_{args.method}_labels.png")
  overlay_path = os.path.join(args.output, f"{stem}_{args.method}_overlay.png")
  try:
    os.makedirs(args.output, exist_ok=True)
    Image.fromarray(ids).save(labels_path)
    Image.fromarray(overlay(image, labels)).save(overlay_path)
  except OSError as error:
    raise UserError(f"cannot write to output directory {args.output!r} "
                     f"({error.strerror or error}).") from None
  count = len(np.unique(labels))
  return f"{args.method}: {count} regions -> {labels_path}, {overlay_path}"


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  try:
    print(run(args))
  except UserError as error:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
