"""Size buckets: batched whole-image evaluation of images of many sizes with few
compiled shapes and little padding.

Padding every test image to one static shape that fits them all (2048x2048 for
ADE20K's keep-ratio resize to (2048, 512)) spends most of the work on padding: a
typical 512x683 image is 1/12 of it. Instead each image, after the test resize, is
padded bottom/right to its *bucket*, the images are grouped by bucket and each
batch holds images of one bucket only (a bucket's partial last batch runs at the
smallest power-of-two batch that holds it, its free slots blank, counting for
nothing). A bucket is either

* the resized shape rounded up to a multiple of `size_divisor` (mmseg's `Pad`
  `size_divisor`, detectron2's `size_divisibility`; 1 means no padding at all, one
  bucket per distinct resized shape), or
* the smallest (by area, then height) of an explicit list of `shapes` that holds
  the image: the number of compiled shapes is then at most the list's length.

The model program is compiled once per bucket and batch size (at most
1 + log2(batch size) per bucket); `plan` says in advance which batches there will be.
"""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

Shape = Tuple[int, int]


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= `value`."""
  return -(-int(value) // int(multiple)) * int(multiple)


class Buckets:
  """Which padded (h, w) shape an image of a given (resized) size is batched at.

  Args:
    size_divisor: > 0 pads each dimension up to a multiple of it (1: no padding).
    shapes: (h, w) bucket shapes; an image goes to the smallest that holds it.
  Exactly one of the two must be given.
  """

  def __init__(self, size_divisor: int = 0, shapes: Sequence[Sequence[int]] = ()):
    if (not isinstance(size_divisor, (int, np.integer)) or isinstance(size_divisor, bool)
        or size_divisor < 0):
      raise ValueError(f"inference.size_divisor must be an integer >= 0, got {size_divisor!r}.")
    shapes = tuple(shapes)
    for shape in shapes:
      if (not isinstance(shape, (tuple, list)) or len(shape) != 2 or
          not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape)):
        raise ValueError(f"inference.buckets must be (height, width) pairs of positive "
                         f"integers, got {shapes!r}.")
    if bool(size_divisor) == bool(shapes):
      raise ValueError("Set either inference.size_divisor (> 0) or inference.buckets (a list "
                       "of (height, width) shapes) for batched whole-image evaluation, not "
                       f"both (got size_divisor={size_divisor}, buckets={shapes}).")
    self.size_divisor = int(size_divisor)
    # Smallest first: the first that holds an image is its bucket.
    self.shapes = tuple(sorted({(int(h), int(w)) for h, w in shapes},
                               key=lambda s: (s[0] * s[1], s[0])))

  def __call__(self, height: int, width: int) -> Shape:
    """The bucket of an image of `height` x `width`."""
    if self.size_divisor:
      return round_up(height, self.size_divisor), round_up(width, self.size_divisor)
    for h, w in self.shapes:
      if height <= h and width <= w:
        return h, w
    raise ValueError(f"A test-resized image of {height}x{width} (HxW) fits none of "
                     f"inference.buckets {list(self.shapes)}; add a bucket at least that "
                     "large (or use inference.size_divisor).")

  @property
  def bound(self):
    """The most bucket shapes (None: one per distinct size); each compiles once per batch
    size it is run at."""
    return len(self.shapes) if self.shapes else None


class Batch(NamedTuple):
  """One batch of a plan: its bucket, the (process-local) record indices in it and its
  number of slots (the records, then blank slots)."""
  shape: Shape
  indices: Tuple[int, ...]
  slots: int


def slots_for(count: int, batch_size: int) -> int:
  """Slots of a batch of `count` records: `batch_size`, or for a bucket's last, partial
  batch the smallest power of two >= count (at most `batch_size`), so blank slots cost
  less than the records and each bucket compiles at most 1 + log2(batch_size) shapes."""
  return min(batch_size, 1 << (count - 1).bit_length())


def plan(sizes: Sequence[Shape], buckets: Buckets, batch_size: int) -> List[Batch]:
  """Batches of at most `batch_size` records of one bucket each, covering every record
  once: `sizes[i]` is record i's (resized) size. Buckets come in order of shape, the
  records of a bucket in index order, so the plan depends on the sizes alone."""
  if batch_size < 1:
    raise ValueError(f"The evaluation batch size must be positive, got {batch_size}.")
  groups: Dict[Shape, List[int]] = {}
  for i, (h, w) in enumerate(sizes):
    groups.setdefault(buckets(h, w), []).append(i)
  batches = []
  for shape, members in sorted(groups.items()):
    for start in range(0, len(members), batch_size):
      indices = tuple(members[start:start + batch_size])
      batches.append(Batch(shape, indices, slots_for(len(indices), batch_size)))
  return batches


def padded_pixels(batches: Sequence[Batch]) -> int:
  """Pixels the model sees over a plan (blank slots of partial batches included)."""
  return sum(batch.slots * batch.shape[0] * batch.shape[1] for batch in batches)
