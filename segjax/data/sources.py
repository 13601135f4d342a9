"""Datasets by name: where their records live and what their classes are.

Each entry returns a `DatasetSpec` with a random-access source per split
(`tfds.data_source`, read without TensorFlow) and the class metadata that
metrics and visualisation need. A dataset that is not on disk raises
`DatasetNotFoundError` saying which archive to put where.
"""
import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from segjax.data.tfds_builders import DatasetNotFoundError  # noqa: F401  (re-exported)
from segjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  class_names: Tuple[str, ...]
  palette: np.ndarray  # (num_classes, 3) uint8
  ignore_index: int
  splits: Tuple[str, ...]
  # split, optionally sliced ("train[:100]") -> source; None for the classes alone
  # (`from_record`: a model restored from its checkpoint, without the dataset).
  open_split: Optional[Callable[[str], Any]]
  # Class ids that have instance annotations (`objects`), in the order of an
  # instance model's 0-based classes; () when the dataset has none.
  thing_classes: Tuple[int, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def to_record(self) -> Dict[str, Any]:
    """The class metadata as JSON-able values (what a checkpoint keeps of its dataset)."""
    return {"name": self.name, "class_names": list(self.class_names),
            "palette": np.asarray(self.palette).tolist(), "ignore_index": int(self.ignore_index),
            "thing_classes": [int(c) for c in self.thing_classes]}

  @classmethod
  def from_record(cls, record: Dict[str, Any]) -> "DatasetSpec":
    """The classes of `to_record`'s output, with no splits to read."""
    return cls(name=record["name"], class_names=tuple(record["class_names"]),
               palette=np.asarray(record["palette"], np.uint8),
               ignore_index=int(record["ignore_index"]), splits=(), open_split=None,
               thing_classes=tuple(record["thing_classes"]))

  def source(self, split: str):
    """Random-access records of `split`, which may carry a tfds slice."""
    if self.open_split is None:
      raise ValueError(f"Only the classes of dataset {self.name!r} are known here (a model "
                       f"restored from its checkpoint alone); reading split {split!r} needs "
                       "the dataset: pass its --config.")
    if split.split("[")[0] not in self.splits:
      raise ValueError(f"Dataset {self.name!r} has no split {split!r}; its splits are "
                       f"{list(self.splits)}.")
    return self.open_split(split)


DATASETS: Registry = Registry("dataset")


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def get_dataset(name: str, data_dir: str = "", manual_dir: str = "") -> DatasetSpec:
  """The `DatasetSpec` of a registered dataset; empty dirs take tfds' defaults."""
  data_dir = data_dir or default_data_dir()
  manual_dir = manual_dir or os.path.join(data_dir, "downloads", "manual")
  for value, what in ((data_dir, "config.data.data_dir (or $TFDS_DATA_DIR)"),
                      (manual_dir, "config.data.manual_dir")):
    if "://" in value:
      raise ValueError(f"{what} is {value}, but segjax reads datasets from a local disk only "
                       "(checkpoints and logs may go to gs://); copy the prepared dataset "
                       "folder to a local disk and point data_dir there.")
  return DATASETS.get(name)(data_dir=data_dir, manual_dir=manual_dir)


def dataset_classes(name: str) -> DatasetSpec:
  """The classes of dataset `name` without its records (no data needs to be on disk)."""
  if name == "segjax_shapes":
    from segjax.data import shapes
    return DatasetSpec(name=name, class_names=tuple(shapes.CLASS_NAMES),
                       palette=np.asarray(shapes.PALETTE, np.uint8),
                       ignore_index=shapes.IGNORE_INDEX, splits=(), open_split=None,
                       thing_classes=tuple(shapes.THING_CLASSES))
  if name not in _ARCHIVE_DATASETS:
    DATASETS.get(name)  # names the known datasets
  dataset = archive_dataset(name)
  return DatasetSpec(name=name, class_names=tuple(dataset.class_names),
                     palette=np.asarray(dataset.palette, np.uint8),
                     ignore_index=dataset.ignore_index, splits=(), open_split=None,
                     thing_classes=tuple(dataset.thing_classes))


@DATASETS.register("segjax_shapes")
def _shapes(data_dir: str, manual_dir: str) -> DatasetSpec:
  """The embedded procedural dataset, generated into `data_dir` on first use."""
  del manual_dir
  from segjax.data import shapes, shapes_builder
  return DatasetSpec(
      name="segjax_shapes", class_names=tuple(shapes.CLASS_NAMES),
      palette=np.asarray(shapes.PALETTE, np.uint8), ignore_index=shapes.IGNORE_INDEX,
      splits=tuple(shapes_builder.SPLITS),
      open_split=lambda split: shapes_builder.load_shapes(split, data_dir),
      thing_classes=tuple(shapes.THING_CLASSES))


# Datasets prepared from their owners' archives: name -> (module, attribute)
# of a `tfds_builders.ArchiveDataset`, imported on first use.
_ARCHIVE_DATASETS = {
    "ade20k": ("ade20k_builder", "ADE20K"),
    "voc2012": ("voc_builder", "VOC2012"),
    "voc2012_aug": ("voc_builder", "VOC2012_AUG"),
    "cityscapes": ("cityscapes_builder", "CITYSCAPES"),
    "coco_instances": ("coco_builder", "COCO_INSTANCES"),
    "coco_panoptic": ("coco_builder", "COCO_PANOPTIC"),
    "camvid": ("camvid_builder", "CAMVID"),
}


def archive_dataset(name: str):
  """The `ArchiveDataset` registered as `name`."""
  module, attribute = _ARCHIVE_DATASETS[name]
  return getattr(importlib.import_module(f"segjax.data.{module}"), attribute)


def _register_archive_dataset(name: str) -> None:
  @DATASETS.register(name)
  def _spec(data_dir: str, manual_dir: str) -> DatasetSpec:
    dataset = archive_dataset(name)
    dataset.check_available(data_dir, manual_dir)
    return DatasetSpec(
        name=name, class_names=tuple(dataset.class_names),
        palette=np.asarray(dataset.palette, np.uint8), ignore_index=dataset.ignore_index,
        splits=tuple(dataset.splits),
        open_split=lambda split: dataset.load(split, data_dir, manual_dir),
        thing_classes=tuple(dataset.thing_classes))
  _spec.__doc__ = f"{name}, prepared from its archives in the manual dir."


for _name in _ARCHIVE_DATASETS:
  _register_archive_dataset(_name)
