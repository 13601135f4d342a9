"""Procedural scenes for the embedded default dataset `segjax_shapes`.

A 128x128 scene is a background of 1-3 textured "stuff" regions with 2-7
"thing" shapes painted on top, occluding each other in paint order. Stuff
classes differ by texture; thing classes by shape together with a fill pattern
of their own (disk solid, square striped, triangle checkered, ring dotted), in
random colours, scales and angles. A small network learns them in minutes on a
CPU, which makes the dataset a self-contained default for tests, examples and
benchmarks.

Everything is drawn with vectorised numpy from one `np.random.Generator`, so an
example is a pure function of its seed. The semantic, instance and panoptic
annotations are all derived from one instance-id map and therefore agree:

* An instance's mask is its whole visible region (`instance_ids == k + 1`);
  its box is tight around that mask, with exclusive x2/y2.
* The semantic `label` marks a 1-pixel band inside the visible boundary of each
  thing (pixels with a 4-neighbour outside that thing; the image border does not
  count) as `IGNORE_INDEX`, like the boundary of Pascal VOC. The band is only a
  marking in `label`: it stays part of the instance mask.
* The COCO-style `panoptic` map has one segment per visible thing (its mask
  minus the band) and one per stuff class present (all its regions merged);
  ignore pixels are VOID (segment id 0). Segment ids are random, distinct and
  non-zero, drawn from the same generator.
"""
import math

import numpy as np

CLASS_NAMES = ("disk", "square", "triangle", "ring", "sky", "grass", "wall")
THING_CLASSES = (0, 1, 2, 3)
STUFF_CLASSES = (4, 5, 6)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
MAX_INSTANCES = 8
MAX_SEGMENTS = MAX_INSTANCES + len(STUFF_CLASSES)
IMAGE_SIZE = 128
PALETTE = np.array(
    [(220, 20, 60), (0, 90, 230), (255, 190, 0), (150, 40, 200),
     (120, 200, 255), (40, 150, 40), (160, 100, 60)], np.uint8)
PALETTE.flags.writeable = False

_DISK, _SQUARE, _TRIANGLE, _RING = THING_CLASSES
_SKY, _GRASS, _WALL = STUFF_CLASSES
_THING_SIZE = (20.0, 56.0)  # Disk diameter, square side; see _thing_mask.
_MIN_RING_SIZE = 22.0  # Keeps ring walls a few pixels thick.
_MIN_INTERIOR = 24  # Fewest non-ignore pixels a visible thing may keep.
_MAX_ATTEMPTS = 40  # Thing placements tried per scene.
_MIN_CONTRAST = 90.0  # Wanted RGB distance of a thing's colour to the stuff's.
_NOISE = 6.0  # Amplitude of the uniform per-pixel image noise.
_ROWS, _COLS = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE].astype(np.int32)
_YY, _XX = _ROWS.astype(np.float32), _COLS.astype(np.float32)

# Images are drawn channels-first, (3, H, W) float32, where numpy is fastest.
# Textures return such an image (or one broadcastable to it) around a base
# colour of shape (3, 1, 1).


def _random_colour(rng):
  return rng.uniform(25.0, 230.0, (3, 1, 1)).astype(np.float32)


def _projection(angle):
  """Pixel coordinates projected on the direction `angle`."""
  return _XX * math.cos(angle) + _YY * math.sin(angle)


def _sky(rng, colour):
  """Smooth, mostly vertical gradient from `colour` to a nearby colour."""
  t = _projection(np.pi / 2 + rng.uniform(-0.6, 0.6)) / (1.5 * IMAGE_SIZE)
  end = np.clip(colour + rng.uniform(-90.0, 90.0, 3)[:, None, None], 0, 255)
  return colour + t * (end - colour).astype(np.float32)


def _speckle(rng, colour):
  """Strong per-pixel brightness noise around `colour`."""
  return colour + 80.0 * (rng.random(_XX.shape, np.float32) - 0.5)


def _bricks(rng, colour):
  """Staggered bricks of slightly varying shade with 2-pixel mortar joints."""
  height, width = int(rng.integers(7, 12)), int(rng.integers(14, 24))
  ys = _ROWS + int(rng.integers(height))
  row = ys // height
  xs = _COLS + int(rng.integers(width)) + (row & 1) * (width // 2)
  col = xs // width
  cols = IMAGE_SIZE // width + 3
  shades = rng.uniform(0.85, 1.15, (IMAGE_SIZE // height + 2) * cols)
  brick = colour * np.take(shades.astype(np.float32), row * cols + col)
  mortar = colour * 0.45 + (120.0 if colour.mean() < 110.0 else 0.0)
  joint = (ys - row * height < 2) | (xs - col * width < 2)
  return np.where(joint, mortar, brick)


def _stripes(rng, colour):
  """Stripes of `colour` and a darker shade, random period and direction."""
  period = rng.uniform(5.0, 10.0)
  on = np.sin(_projection(rng.uniform(0.0, np.pi)) * (2 * np.pi / period)) > 0
  return np.where(on, colour, colour * 0.5)


def _solid(rng, colour):
  del rng
  return colour


def _checker(rng, colour):
  """A rotated checkerboard of `colour` and a lighter shade."""
  period = rng.uniform(6.0, 10.0)
  angle = rng.uniform(0.0, np.pi / 2)
  u = np.floor(_projection(angle) / period).astype(np.int32)
  v = np.floor(_projection(angle + np.pi / 2) / period).astype(np.int32)
  return np.where((u + v) & 1, colour, np.clip(colour * 0.5 + 128.0, 0, 255))


def _dots(rng, colour):
  """Round dots of a darker shade on `colour`, on a random grid."""
  period = rng.uniform(6.0, 9.0)
  fx = (_COLS + rng.uniform(0, period)) % period - period / 2
  fy = (_ROWS + rng.uniform(0, period)) % period - period / 2
  return np.where(fx * fx + fy * fy <= (0.3 * period) ** 2, colour * 0.4, colour)


_STUFF_TEXTURES = {_SKY: _sky, _GRASS: _speckle, _WALL: _bricks}
# Each thing class has its own fill pattern (with random colour, scale and
# angle), so a thing is told by its shape and its pattern together.
_THING_TEXTURES = {_DISK: _solid, _SQUARE: _stripes, _TRIANGLE: _checker, _RING: _dots}


def _paint(image, mask, texture, rng, colour):
  np.copyto(image, texture(rng, colour), where=mask)


def _background(rng, image):
  """Paints 1-3 stuff regions; returns the stuff class map and base colours."""
  region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)
  num_regions = rng.integers(1, 4)
  for _ in range(num_regions - 1):
    if rng.random() < 0.6:  # A wavy, roughly horizontal boundary.
      boundary = rng.uniform(20.0, 108.0) + rng.uniform(0.0, 10.0) * np.sin(
          rng.uniform(0.02, 0.1) * _XX + rng.uniform(0.0, 2 * np.pi))
      region += _YY > boundary
    else:  # A straight boundary through a random point.
      angle = rng.uniform(0.0, 2 * np.pi)
      x, y = rng.uniform(32.0, 96.0, 2)
      region += _projection(angle) > x * math.cos(angle) + y * math.sin(angle)
  region_classes = rng.choice(STUFF_CLASSES, num_regions)
  colours = [_random_colour(rng) for _ in range(num_regions)]
  for r in range(num_regions):
    _paint(image, region == r, _STUFF_TEXTURES[region_classes[r]], rng,
           colours[r])
  return region_classes[region].astype(np.uint8), colours


def _disk(rng, dx, dy, size):
  del rng
  return dx * dx + dy * dy <= (size / 2) ** 2


def _ring(rng, dx, dy, size):
  r2 = dx * dx + dy * dy
  inner = size / 2 * rng.uniform(0.4, 0.6)
  return (r2 <= (size / 2) ** 2) & (r2 >= inner**2)


def _square(rng, dx, dy, size):
  """A square of side `size`, axis-aligned half of the time."""
  angle = rng.uniform(0.0, np.pi / 2) if rng.random() < 0.5 else 0.0
  cos, sin = math.cos(angle), math.sin(angle)
  half_extent = np.maximum(np.abs(dx * cos + dy * sin),
                           np.abs(dy * cos - dx * sin))
  return half_extent <= size / 2


def _triangle(rng, dx, dy, size):
  """An equilateral triangle of side 1.3 * size (about a square's area)."""
  inradius = 1.3 * size / (2 * math.sqrt(3))
  angle = rng.uniform(0.0, 2 * np.pi)
  mask = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
  for k in range(3):  # Inside each edge, `inradius` away from the centre.
    a = angle + 2 * np.pi * k / 3
    mask &= dx * math.cos(a) + dy * math.sin(a) <= inradius
  return mask


_SHAPES = {_DISK: _disk, _SQUARE: _square, _TRIANGLE: _triangle, _RING: _ring}


def _thing_mask(rng, cls):
  """Mask of a random thing of class `cls`; up to ~1/3 may be out of frame."""
  size = rng.uniform(*_THING_SIZE)
  if cls == _RING:
    size = max(size, _MIN_RING_SIZE)
  margin = 0.2 * size
  cx, cy = rng.uniform(-margin, IMAGE_SIZE - 1 + margin, 2).tolist()
  return _SHAPES[cls](rng, _XX - cx, _YY - cy, size)


def _boundary_band(ids):
  """Thing pixels with a 4-neighbour of another id (other thing or stuff)."""
  band = np.zeros(ids.shape, bool)
  vertical = ids[1:] != ids[:-1]
  band[1:] |= vertical
  band[:-1] |= vertical
  horizontal = ids[:, 1:] != ids[:, :-1]
  band[:, 1:] |= horizontal
  band[:, :-1] |= horizontal
  return band & (ids > 0)


def _contrasting_colour(rng, avoid):
  """A random colour, redrawn a few times if close to one of `avoid`."""
  for _ in range(10):
    colour = _random_colour(rng)
    if min(np.linalg.norm(colour - c) for c in avoid) >= _MIN_CONTRAST:
      break
  return colour


def _things(rng, image, stuff_colours):
  """Paints 2-7 things; returns the instance-id map and their classes.

  A placement is redrawn when it would leave a thing (itself or an earlier one)
  partly visible with fewer than `_MIN_INTERIOR` non-ignore pixels, so every
  kept thing is clearly visible. Fully occluded things are dropped.
  """
  ids = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  classes = []
  num_things = rng.integers(2, 8)
  for _ in range(_MAX_ATTEMPTS):
    if len(classes) == num_things:
      break
    cls = rng.choice(THING_CLASSES)
    mask = _thing_mask(rng, cls)
    candidate = np.where(mask, np.uint8(len(classes) + 1), ids)
    counts = len(classes) + 2
    visible = np.bincount(candidate.ravel(), minlength=counts)[1:]
    interior = np.bincount(
        candidate[~_boundary_band(candidate)], minlength=counts)[1:]
    if np.any((visible > 0) & (interior < _MIN_INTERIOR)):
      continue
    _paint(image, mask, _THING_TEXTURES[cls], rng, _contrasting_colour(rng, stuff_colours))
    ids = candidate
    classes.append(cls)
  visible = np.bincount(ids.ravel(), minlength=len(classes) + 1)[1:]
  kept = np.flatnonzero(visible)
  remap = np.zeros(len(classes) + 1, np.uint8)
  remap[kept + 1] = np.arange(1, kept.size + 1)
  return remap[ids], np.asarray(classes, np.int64)[kept]


def _boxes(ids, num_instances):
  boxes = np.zeros((MAX_INSTANCES, 4), np.float32)
  for k in range(num_instances):
    mask = ids == k + 1
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
  return boxes


def _padded(values, length, fill, dtype):
  out = np.full(length, fill, dtype)
  out[:len(values)] = values
  return out


def _panoptic(rng, ids, classes, label):
  """COCO-style panoptic RGB map and its padded segment table."""
  stuff = [c for c in STUFF_CLASSES if np.any(label == c)]
  segment_classes = np.concatenate([classes, stuff]).astype(np.int64)
  segment_ids = rng.choice(2**24 - 1, len(segment_classes), replace=False) + 1
  num_things = len(classes)
  pan = np.concatenate([[0], segment_ids[:num_things]])[ids]
  for segment_id, cls in zip(segment_ids[num_things:], stuff):
    pan[label == cls] = segment_id
  pan[label == IGNORE_INDEX] = 0
  areas = [np.count_nonzero(pan == s) for s in segment_ids]
  rgb = np.stack([pan % 256, pan // 256 % 256, pan // 256**2], -1)
  n = MAX_SEGMENTS
  return {
      "panoptic": rgb.astype(np.uint8),
      "segment_ids": _padded(segment_ids, n, 0, np.int32),
      "segment_classes": _padded(segment_classes, n, -1, np.int32),
      "segment_is_thing": _padded(np.arange(len(segment_ids)) < num_things,
                                  n, False, bool),
      "segment_areas": _padded(areas, n, 0, np.int32),
      "segment_valid": _padded(np.ones(len(segment_ids), bool), n, False, bool),
  }


def generate_example(rng: np.random.Generator) -> dict:
  """Draws one scene and its annotations from `rng`.

  Returns a dict of numpy arrays: `image` (H, W, 3) uint8; `label` (H, W) uint8
  class ids with `IGNORE_INDEX`; `instance_ids` (H, W) uint8, 0 for no
  instance and k for instance slot k - 1; `boxes` (MAX_INSTANCES, 4) float32
  [x1, y1, x2, y2] pixel coordinates; `classes` (MAX_INSTANCES,) int32, -1 in
  padding; `instance_valid` (MAX_INSTANCES,) bool; `panoptic` (H, W, 3) uint8
  with segment id R + 256 G + 256^2 B (0 VOID); `segment_ids`,
  `segment_classes` (-1 in padding), `segment_areas` (MAX_SEGMENTS,) int32 and
  `segment_is_thing`, `segment_valid` (MAX_SEGMENTS,) bool. Instances are in
  paint order; segments list the things (in instance order), then the stuff.
  """
  image = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
  label, stuff_colours = _background(rng, image)
  ids, classes = _things(rng, image, stuff_colours)
  num_instances = len(classes)
  label = np.where(ids > 0, np.concatenate([[0], classes])[ids], label)
  label = label.astype(np.uint8)
  label[_boundary_band(ids)] = IGNORE_INDEX
  image += _NOISE * (2 * rng.random(image.shape, np.float32) - 1)
  image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  return {
      "image": np.ascontiguousarray(image.transpose(1, 2, 0)),
      "label": label,
      "instance_ids": ids,
      "boxes": _boxes(ids, num_instances),
      "classes": _padded(classes, MAX_INSTANCES, -1, np.int32),
      "instance_valid": np.arange(MAX_INSTANCES) < num_instances,
      **_panoptic(rng, ids, classes, label),
  }
