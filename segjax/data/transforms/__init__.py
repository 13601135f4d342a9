"""Host-side numpy preprocessing for segmentation, composed from a string.

A spec such as
  "squeeze_labels|random_resize(scale=(2048, 512))|random_crop(size=(512, 512))"
names registered ops separated by "|"; each op is a factory taking Python
literal keyword arguments and returning `fn(example, rng) -> example`, where
rng is the `np.random.Generator` grain's `random_map` passes in. Code builds
the same ops from their factories, `resize(scale=(2048, 512))`, and chains
them, with spec strings if it likes, by `compose` (see `parsing`).

An example is a dict of numpy arrays. Spatial keys:
  image: (H, W, 3), resized bilinearly, padded with 0.
  label: (H, W) class ids, padded with the ignore index.
  instance_ids: (H, W), padded with 0.
  panoptic: (H, W, 3) COCO ids R + 256 G + 256^2 B (0 = VOID), padded with 0.
  masks: (N, H, W) uint8 0/1, one per instance row, padded with 0.
Label maps and masks are only ever resized with nearest neighbour, so ids
never blend. Per-instance rows (`unpack_instances` makes them from the tfds
`objects` sequence):
  boxes: (N, 4) float32 x1, y1, x2, y2 in pixels (x2, y2 exclusive).
  classes: (N,) int32; is_crowd: (N,) bool.
  instance_valid: (N,) bool.
Every geometric op moves boxes and masks with the image; an instance whose box
becomes empty, or whose mask has no pixel left, turns invalid and its box and
mask rows are zeroed. N never changes except in `pad_instances`, which moves
the valid rows first and pads to a fixed count. Per-segment rows of panoptic
datasets (from the tfds `segments` sequence), all (S,):
  segment_ids, segment_classes, segment_areas: int32;
  segment_is_thing, segment_is_crowd, segment_valid: bool.
`resize(resize_labels=False)` adds `original_size` and `resized_size`, int32
(2,) (H, W). It and `mirror_pad` leave `image` at another size than the
maps; geometric ops after them raise rather than misalign the two, and only
`pad(label_size=...)` accepts the difference. Other keys pass through
untouched.

Ops never write into their input arrays or dict: grain may hand the same
source element to the pipeline again in a later epoch.
"""
# Modules by kind of op: common (registry, keys, checks), geometric, photometric,
# instances (instance and panoptic segment rows), labels, parsing (Pipeline).
# Importing them registers their ops; their public names are re-exported here.
from segjax.data.transforms.common import (
    INSTANCE_KEYS, LABEL_KEYS, PREPROCESS_OPS, SEGMENT_KEYS, BoundOp, Example, Op, register_op)
from segjax.data.transforms.geometric import (
    elastic, keep_ratio_size, mirror_pad, pad, random_crop, random_flip, random_resize,
    random_short_side, resize)
from segjax.data.transforms.instances import (
    crop_masks, instance_masks, pad_instances, panoptic_semantic, thing_classes,
    unpack_instances)
from segjax.data.transforms.labels import (
    check_image, check_labels, keep, reduce_zero_label, squeeze_labels, unet_weights)
from segjax.data.transforms.parsing import Pipeline, compose, parse_pipeline
from segjax.data.transforms.photometric import normalize, photometric_distortion

__all__ = [
    "INSTANCE_KEYS", "LABEL_KEYS", "PREPROCESS_OPS", "SEGMENT_KEYS", "BoundOp", "Example", "Op",
    "Pipeline", "check_image", "check_labels", "compose", "crop_masks", "elastic",
    "instance_masks", "keep", "keep_ratio_size", "mirror_pad", "normalize", "pad",
    "pad_instances", "panoptic_semantic", "parse_pipeline", "photometric_distortion",
    "random_crop", "random_flip", "random_resize", "random_short_side", "reduce_zero_label",
    "register_op", "resize", "squeeze_labels", "thing_classes", "unet_weights",
    "unpack_instances",
]
