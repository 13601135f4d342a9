"""Datasets by name: where their records live and what their classes are.

Each entry returns a `DatasetSpec` with a random-access source per split
(`tfds.data_source`, read without TensorFlow) and the class metadata that
metrics and visualisation need. A dataset that is not on disk raises
`DatasetNotFoundError` saying which archive to put where.
"""
import dataclasses
import os
from typing import Any, Callable, Tuple

import numpy as np

from segjax.registry import Registry


class DatasetNotFoundError(FileNotFoundError):
  """A dataset that must be prepared from files the user provides is missing."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  class_names: Tuple[str, ...]
  palette: np.ndarray  # (num_classes, 3) uint8
  ignore_index: int
  splits: Tuple[str, ...]
  open_split: Callable[[str], Any]  # split, optionally sliced ("train[:100]") -> source

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def source(self, split: str):
    """Random-access records of `split`, which may carry a tfds slice."""
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
  return DATASETS.get(name)(data_dir=data_dir, manual_dir=manual_dir)


@DATASETS.register("segjax_shapes")
def _shapes(data_dir: str, manual_dir: str) -> DatasetSpec:
  """The embedded procedural dataset, generated into `data_dir` on first use."""
  del manual_dir
  from segjax.data import shapes, shapes_builder
  return DatasetSpec(
      name="segjax_shapes", class_names=tuple(shapes.CLASS_NAMES),
      palette=np.asarray(shapes.PALETTE, np.uint8), ignore_index=shapes.IGNORE_INDEX,
      splits=tuple(shapes_builder.SPLITS),
      open_split=lambda split: shapes_builder.load_shapes(split, data_dir))


def ade20k_palette(num_classes: int = 150) -> np.ndarray:
  """A fixed pseudo-random palette (ADE20K has no canonical one in this package)."""
  return np.random.default_rng(150).integers(0, 256, (num_classes, 3), dtype=np.uint8)


ADE20K_ARCHIVE = "ADEChallengeData2016.zip"


@DATASETS.register("ade20k")
def _ade20k(data_dir: str, manual_dir: str) -> DatasetSpec:
  """ADE20K (SceneParsing, 150 classes), prepared from the official archive."""
  archive = os.path.join(manual_dir, ADE20K_ARCHIVE)
  prepared = os.path.isdir(os.path.join(data_dir, "ade20k"))
  if not prepared and not os.path.exists(archive):
    raise DatasetNotFoundError(
        f"ADE20K is not prepared and its archive is missing: put {ADE20K_ARCHIVE} (the "
        f"SceneParsing release, ADEChallengeData2016) at {archive}, or set "
        f"--config.data.manual_dir to the folder holding it, then run the same command again.")
  from segjax.data import ade20k_builder
  return DatasetSpec(
      name="ade20k", class_names=ade20k_builder.CLASS_NAMES, palette=ade20k_palette(),
      ignore_index=255,
      splits=("train", "validation"),
      open_split=lambda split: ade20k_builder.load_ade20k(split, data_dir, manual_dir))
