"""TFDS builder for `segjax_shapes`, the embedded default dataset.

The scenes of `segjax.data.shapes` are written once as ArrayRecord files and
read back with `tfds.data_source`, which needs no TensorFlow and gives random
access, so the dataset works like any other tfds dataset but needs no download
and is prepared on first use in seconds. Example i of a split is drawn from
`np.random.default_rng([split_seed, i])`, so every preparation writes the same
data.
"""
import numpy as np
import tensorflow_datasets as tfds

from segjax.data import shapes, tfds_builders

# Split name -> (number of examples, seed).
SPLITS = {"train": (2048, 1), "validation": (256, 2)}
_IMAGE_KEYS = ("image", "label", "instance_ids", "panoptic")


class SegjaxShapes(tfds_builders.PackagedBuilder):
  """Synthetic scenes of textured stuff regions and occluding shapes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    size, n, s = shapes.IMAGE_SIZE, shapes.MAX_INSTANCES, shapes.MAX_SEGMENTS
    tensor = tfds.features.Tensor
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"{size}x{size} procedural scenes with semantic, instance and "
            f"COCO-style panoptic labels; classes {shapes.CLASS_NAMES}, "
            f"ignore index {shapes.IGNORE_INDEX}. See segjax/data/shapes.py."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.Image(shape=(size, size, 1)),
            "instance_ids": tfds.features.Image(shape=(size, size, 1)),
            "panoptic": tfds.features.Image(shape=(size, size, 3)),
            "boxes": tensor(shape=(n, 4), dtype=np.float32),
            "classes": tensor(shape=(n,), dtype=np.int32),
            "instance_valid": tensor(shape=(n,), dtype=np.bool_),
            "segment_ids": tensor(shape=(s,), dtype=np.int32),
            "segment_classes": tensor(shape=(s,), dtype=np.int32),
            "segment_is_thing": tensor(shape=(s,), dtype=np.bool_),
            "segment_areas": tensor(shape=(s,), dtype=np.int32),
            "segment_valid": tensor(shape=(s,), dtype=np.bool_),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {name: self._generate_examples(num_examples, seed)
            for name, (num_examples, seed) in SPLITS.items()}

  def _generate_examples(self, num_examples, seed):
    for i in range(num_examples):
      example = shapes.generate_example(np.random.default_rng([seed, i]))
      for key in _IMAGE_KEYS:
        example[key] = tfds_builders.encode_png(example[key])
      yield i, example


def load_shapes(split: str, data_dir: str):
  """Random-access source of one split, preparing the dataset on first use.

  Args:
    split: "train" or "validation", optionally with a tfds slice, e.g.
      "train[:256]".
    data_dir: tfds data directory; the dataset goes to
      `data_dir/segjax_shapes/1.0.0`.

  Returns:
    A `tfds.data_source` whose items are dicts of numpy arrays; the image
    features decode to (H, W, C) uint8, so `label` and `instance_ids` are
    (H, W, 1).
  """
  if split.split("[")[0] not in SPLITS:
    raise ValueError(
        f"Unknown split {split!r} for segjax_shapes; known splits: "
        f"{', '.join(SPLITS)}.")
  builder = SegjaxShapes(data_dir=data_dir, file_format="array_record")
  return tfds_builders.prepared_source(builder, split)
