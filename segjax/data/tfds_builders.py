"""What segjax's tfds builders share: living inside a package, being prepared
on first use from archives the user placed in the manual dir, and then being
read with `tfds.data_source` (no TensorFlow).

A dataset prepared from archives is described by an `ArchiveDataset`: its
class metadata, its splits, the archives it needs (each with a sentence saying
what it is and where it comes from) and its builder. `segjax.data.sources`
registers these under their names.
"""
import dataclasses
import os
from typing import Callable, Mapping, Tuple

import cv2
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds


class DatasetNotFoundError(FileNotFoundError):
  """A dataset that must be prepared from files the user provides is missing."""


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 (H, W), (H, W, 1) or RGB (H, W, 3) array, as
  tfds Image features take them without TensorFlow (OpenCV: faster than PIL)."""
  array = np.ascontiguousarray(array, np.uint8)
  if array.ndim == 3 and array.shape[-1] == 3:
    array = np.ascontiguousarray(array[..., ::-1])  # OpenCV writes BGR order
  ok, encoded = cv2.imencode(".png", array)
  if not ok:
    raise ValueError(f"Cannot PNG-encode an array of shape {array.shape}.")
  return encoded.tobytes()


def objects_feature() -> tfds.features.Sequence:
  """Per-instance records of instance datasets, as `transforms.unpack_instances`
  reads them: box x1, y1, x2, y2 in pixels (x2, y2 exclusive), training class id,
  crowd flag and an image-sized 0/1 mask."""
  return tfds.features.Sequence({
      "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "class": tfds.features.Tensor(shape=(), dtype=np.int32),
      "is_crowd": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
  })


def segments_feature() -> tfds.features.Sequence:
  """Per-segment records of panoptic datasets (ids as in the `panoptic` PNG)."""
  return tfds.features.Sequence({
      "id": tfds.features.Tensor(shape=(), dtype=np.int32),
      "class": tfds.features.Tensor(shape=(), dtype=np.int32),
      "is_thing": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "is_crowd": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "area": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


class PackagedBuilder(tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder defined inside the segjax package."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksum or metadata files live beside these builders, so tfds needs no
    # code path. Locating one would import the `importlib_resources` backport,
    # which tfds uses but does not install on Python >= 3.9
    # (https://github.com/tensorflow/datasets/issues/11212).
    return None


def prepared_source(builder: tfds.core.GeneratorBasedBuilder, split: str,
                    download_config=None):
  """Prepares `builder` if its files are missing, then opens one split.

  With several processes, process 0 prepares while the others wait, so they do
  not write the same files at once; a process that still finds no dataset
  afterwards (a disk of its own) prepares its own copy.
  """
  def prepare():
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare(download_config=download_config)
    finally:
      tfds.display_progress_bar(True)

  if jax.process_count() > 1:
    if jax.process_index() == 0 and not builder.is_prepared():
      prepare()
    multihost_utils.sync_global_devices(f"segjax prepared {builder.name}")
  if not builder.is_prepared():
    prepare()
  return tfds.data_source(builder.name, split=split, data_dir=builder.data_dir_root)


@dataclasses.dataclass(frozen=True)
class ArchiveDataset:
  """A dataset prepared once from the owners' archives, then read from ArrayRecord.

  Attributes:
    name: registry name, e.g. "voc2012_aug".
    class_names: training classes, in label-id order.
    palette: (num_classes, 3) uint8 colours for visualisation.
    splits: split names the builder writes.
    archives: file name in the manual dir -> what it is and where to get it.
    builder: the `PackagedBuilder` subclass (or a factory taking `data_dir`)
      that prepares the dataset from `dl_manager.manual_dir`.
    ignore_index: label value that marks unlabelled pixels.
    thing_classes: class ids of the `objects` (instance annotations); () if none.
  """
  name: str
  class_names: Tuple[str, ...]
  palette: np.ndarray
  splits: Tuple[str, ...]
  archives: Mapping[str, str]
  builder: Callable[..., tfds.core.GeneratorBasedBuilder]
  ignore_index: int = 255
  thing_classes: Tuple[int, ...] = ()

  def make_builder(self, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    return self.builder(data_dir=data_dir, file_format="array_record")

  def check_available(self, data_dir: str, manual_dir: str) -> None:
    """Raises `DatasetNotFoundError` naming every archive still missing, unless
    the dataset is already prepared in `data_dir`."""
    builder = self.make_builder(data_dir)
    if builder.is_prepared():
      return
    missing = [f"  {os.path.join(manual_dir, name)}: {what}"
               for name, what in self.archives.items()
               if not os.path.exists(os.path.join(manual_dir, name))]
    if missing:
      raise DatasetNotFoundError(
          f"Dataset {self.name!r} is not prepared in {data_dir} and these files are missing:\n"
          + "\n".join(missing) + "\nPlace them there, or point the manual dir at the folder "
          "that holds them (--config.data.manual_dir for train.py, --manual_dir for "
          "`python -m segjax.data.prepare`), and run the command again. The dataset is "
          "prepared once, then read from " + os.path.join(data_dir, builder.name) + ".")

  def load(self, split: str, data_dir: str, manual_dir: str):
    """Random-access source of `split` (a tfds slice such as "train[:100]" is
    allowed), preparing the dataset from the archives on first use."""
    if split.split("[")[0] not in self.splits:
      raise ValueError(f"Dataset {self.name!r} has no split {split!r}; its splits are "
                       f"{list(self.splits)}.")
    self.check_available(data_dir, manual_dir)
    return prepared_source(self.make_builder(data_dir), split,
                           tfds.download.DownloadConfig(manual_dir=manual_dir))
