"""ADE20K (MIT SceneParsing, ADEChallengeData2016) as a tfds ArrayRecord dataset.

Prepared from the official archive the user places in the manual dir; images
(JPEG) and annotations (PNG, 0 = "other", 1..150 = classes) are stored as the
archive's own bytes. Labels keep the archive's ids: configs map 0 -> ignore and
the rest minus one with the `reduce_zero_label` op, as mmsegmentation does.
"""
import os

import numpy as np
import tensorflow_datasets as tfds

from segjax.data import archives
from segjax.data import tfds_builders

ARCHIVE = "ADEChallengeData2016.zip"
_SPLIT_DIRS = {"train": "training", "validation": "validation"}

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
assert len(CLASS_NAMES) == 150


class Ade20k(tfds_builders.PackagedBuilder):
  """ADE20K SceneParsing: 20,210 train and 2,000 validation images."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {ARCHIVE} (ADEChallengeData2016) in the manual dir."

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "file_name": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    archive = os.path.join(dl_manager.manual_dir, ARCHIVE)
    return {split: self._generate_examples(archive, folder)
            for split, folder in _SPLIT_DIRS.items()}

  def _generate_examples(self, archive, folder):
    with archives.open_zip(archive) as zf:
      names = set(zf.namelist())
      images = sorted(n for n in names if f"/images/{folder}/" in n and n.endswith(".jpg"))
      if not images:
        raise ValueError(f"{archive} has no images/{folder}/*.jpg; is it the SceneParsing "
                         "ADEChallengeData2016 archive?")
      for image in images:
        annotation = image.replace("/images/", "/annotations/")[:-4] + ".png"
        if annotation not in names:
          raise ValueError(f"{archive} has {image} but no annotation {annotation}.")
        stem = os.path.basename(image)[:-4]
        yield stem, {"image": zf.read(image), "label": zf.read(annotation), "file_name": stem}


def palette(num_classes: int = 150) -> np.ndarray:
  """A fixed pseudo-random palette (ADE20K has no canonical one in this package)."""
  return np.random.default_rng(150).integers(0, 256, (num_classes, 3), dtype=np.uint8)


ADE20K = tfds_builders.ArchiveDataset(
    name="ade20k", class_names=CLASS_NAMES, palette=palette(), splits=tuple(_SPLIT_DIRS),
    archives={ARCHIVE: "the MIT SceneParsing release ADEChallengeData2016 "
                       "(http://sceneparsing.csail.mit.edu)"},
    builder=Ade20k)
