"""Cityscapes (fine annotations) as a tfds ArrayRecord dataset.

Prepared from the two official archives the user places in the manual dir:
images are the archive's own PNG bytes; `label` maps gtFine labelIds to the 19
training ids (255 = ignore); `objects`, `panoptic` and `segments` come from
gtFine instanceIds the way cityscapesscripts' createPanopticImgs reads them,
in the same 19-class space. The test split is skipped: its labels are withheld.
"""
import collections
import io
import os
import posixpath
import zipfile

import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import archives
from segjax.data import tfds_builders

IMAGES_ARCHIVE = "leftImg8bit_trainvaltest.zip"
LABELS_ARCHIVE = "gtFine_trainvaltest.zip"
_SPLIT_DIRS = {"train": "train", "validation": "val"}
_IMAGE_SUFFIX = "_leftImg8bit.png"
IGNORE_INDEX = 255
# instanceIds values at or above this encode labelId * 1000 + instance index;
# below it the value is the labelId itself (stuff, or a crowd "group" region).
_INSTANCE_OFFSET = 1000

Label = collections.namedtuple(
    "Label", "name id train_id category has_instances ignore_in_eval color")

# The official Cityscapes label table (cityscapesscripts' labels.py semantics).
LABELS = (
    Label("unlabeled", 0, 255, "void", False, True, (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", False, True, (0, 0, 0)),
    Label("rectification border", 2, 255, "void", False, True, (0, 0, 0)),
    Label("out of roi", 3, 255, "void", False, True, (0, 0, 0)),
    Label("static", 4, 255, "void", False, True, (0, 0, 0)),
    Label("dynamic", 5, 255, "void", False, True, (111, 74, 0)),
    Label("ground", 6, 255, "void", False, True, (81, 0, 81)),
    Label("road", 7, 0, "flat", False, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", False, False, (244, 35, 232)),
    Label("parking", 9, 255, "flat", False, True, (250, 170, 160)),
    Label("rail track", 10, 255, "flat", False, True, (230, 150, 140)),
    Label("building", 11, 2, "construction", False, False, (70, 70, 70)),
    Label("wall", 12, 3, "construction", False, False, (102, 102, 156)),
    Label("fence", 13, 4, "construction", False, False, (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", False, True, (180, 165, 180)),
    Label("bridge", 15, 255, "construction", False, True, (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", False, True, (150, 120, 90)),
    Label("pole", 17, 5, "object", False, False, (153, 153, 153)),
    Label("polegroup", 18, 255, "object", False, True, (153, 153, 153)),
    Label("traffic light", 19, 6, "object", False, False, (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", False, False, (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", False, False, (107, 142, 35)),
    Label("terrain", 22, 9, "nature", False, False, (152, 251, 152)),
    Label("sky", 23, 10, "sky", False, False, (70, 130, 180)),
    Label("person", 24, 11, "human", True, False, (220, 20, 60)),
    Label("rider", 25, 12, "human", True, False, (255, 0, 0)),
    Label("car", 26, 13, "vehicle", True, False, (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", True, False, (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", True, False, (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", True, True, (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", True, True, (0, 0, 110)),
    Label("train", 31, 16, "vehicle", True, False, (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", True, False, (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", True, False, (119, 11, 32)),
    Label("license plate", -1, -1, "vehicle", False, True, (0, 0, 142)),
)

_TRAIN_LABELS = sorted((l for l in LABELS if not l.ignore_in_eval), key=lambda l: l.train_id)
CLASS_NAMES = tuple(l.name for l in _TRAIN_LABELS)
PALETTE = np.array([l.color for l in _TRAIN_LABELS], np.uint8)
assert [l.train_id for l in _TRAIN_LABELS] == list(range(19))

# labelId -> trainId (255 for every ignored or unknown id), and per-labelId facts.
LABEL_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, np.uint8)
_KNOWN_ID = np.zeros(256, bool)
_HAS_INSTANCES = np.zeros(256, bool)
for _label in LABELS:
  if _label.id >= 0:
    _KNOWN_ID[_label.id] = True
    _HAS_INSTANCES[_label.id] = _label.has_instances
    if not _label.ignore_in_eval:
      LABEL_TO_TRAIN_ID[_label.id] = _label.train_id


def _read_png(zf: zipfile.ZipFile, member: str) -> np.ndarray:
  try:
    return np.asarray(Image.open(io.BytesIO(zf.read(member))))
  except OSError as e:
    raise ValueError(f"{zf.filename}: {member} is not a readable PNG ({e}).") from None


def _check_annotations(label_ids, instance_ids, where: str) -> None:
  """Raises ValueError unless gtFine labelIds and instanceIds are valid and agree."""
  if label_ids.dtype != np.uint8 or label_ids.ndim != 2 or instance_ids.shape != label_ids.shape:
    raise ValueError(f"{where}: labelIds ({label_ids.dtype} {label_ids.shape}) and instanceIds "
                     f"({instance_ids.shape}) must be single-channel maps of the same size, "
                     "labelIds 8-bit.")
  unknown = np.unique(label_ids[~_KNOWN_ID[label_ids]])
  if unknown.size:
    raise ValueError(f"{where}: labelIds {unknown.tolist()} are not Cityscapes label ids "
                     "(0..33); is this gtFine_trainvaltest.zip?")
  instance_ids = instance_ids.astype(np.int64)
  semantic = np.where(instance_ids >= _INSTANCE_OFFSET, instance_ids // _INSTANCE_OFFSET,
                      instance_ids)
  disagree = int(np.count_nonzero(semantic != label_ids))
  if disagree:
    raise ValueError(f"{where}: instanceIds and labelIds name different labels at {disagree} "
                     "pixels; the gtFine files are inconsistent or corrupt.")
  bad = np.unique(instance_ids[(instance_ids >= _INSTANCE_OFFSET) & ~_HAS_INSTANCES[semantic]])
  if bad.size:
    raise ValueError(f"{where}: instanceIds {bad.tolist()} encode instances of labels that "
                     "have no instances.")


def annotations(label_ids: np.ndarray, instance_ids: np.ndarray, where: str = "") -> dict:
  """The record's label, objects, panoptic and segments from gtFine labelIds/instanceIds.

  Follows createPanopticImgs in trainId space: each instanceIds value of a kept
  class is one segment (id = that value): a thing instance (value >= 1000), a
  crowd group of a thing class (value = labelId < 1000), or a stuff class.
  Pixels whose class is ignored are VOID (0). Things also become `objects`.
  """
  _check_annotations(label_ids, instance_ids, where)
  values, inverse = np.unique(instance_ids, return_inverse=True)
  inverse = inverse.reshape(instance_ids.shape)
  areas = np.bincount(inverse.ravel(), minlength=values.size)
  regions = scipy.ndimage.find_objects(inverse + 1)  # each value's bounding slices
  segment_ids = np.zeros(values.size, np.int64)
  objects = {"box": [], "class": [], "is_crowd": [], "mask": []}
  segments = {"id": [], "class": [], "is_thing": [], "is_crowd": [], "area": []}
  for index, value in enumerate(values.tolist()):
    label_id = value // _INSTANCE_OFFSET if value >= _INSTANCE_OFFSET else value
    train_id = int(LABEL_TO_TRAIN_ID[label_id])
    if train_id == IGNORE_INDEX:
      continue
    segment_ids[index] = value
    is_thing = bool(_HAS_INSTANCES[label_id])
    is_crowd = is_thing and value < _INSTANCE_OFFSET
    for key, item in zip(segments, (value, train_id, is_thing, is_crowd, areas[index])):
      segments[key].append(item)
    if is_thing:
      rows, cols = regions[index]
      mask = np.zeros(instance_ids.shape, np.uint8)
      mask[rows, cols] = inverse[rows, cols] == index
      objects["box"].append(np.array([cols.start, rows.start, cols.stop, rows.stop],
                                     np.float32))
      objects["class"].append(train_id)
      objects["is_crowd"].append(is_crowd)
      objects["mask"].append(tfds_builders.encode_png(mask))
  panoptic = segment_ids[inverse]
  rgb = np.stack([panoptic % 256, panoptic // 256 % 256, panoptic // 65536], -1)
  return {"label": tfds_builders.encode_png(LABEL_TO_TRAIN_ID[label_ids]),
          "objects": objects, "panoptic": tfds_builders.encode_png(rgb.astype(np.uint8)),
          "segments": segments}


class Cityscapes(tfds_builders.PackagedBuilder):
  """Cityscapes gtFine: 2,975 train and 500 validation images, 19 classes."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "gtFine train/val: trainId labels, instances, panoptic."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Place {IMAGES_ARCHIVE} and {LABELS_ARCHIVE} from "
      "https://www.cityscapes-dataset.com/downloads (registration required) in the manual dir.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "file_name": tfds.features.Text(),
        "objects": tfds_builders.objects_feature(),
        "panoptic": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "segments": tfds_builders.segments_feature(),
    }))

  def _split_generators(self, dl_manager):
    images = os.path.join(dl_manager.manual_dir, IMAGES_ARCHIVE)
    labels = os.path.join(dl_manager.manual_dir, LABELS_ARCHIVE)
    return {split: self._generate_examples(images, labels, folder)
            for split, folder in _SPLIT_DIRS.items()}

  def _generate_examples(self, images_archive, labels_archive, folder):
    with archives.open_zip(images_archive) as images_zf, \
        archives.open_zip(labels_archive) as labels_zf:
      prefix = f"leftImg8bit/{folder}/"
      images = sorted(n for n in images_zf.namelist()
                      if n.startswith(prefix) and n.endswith(_IMAGE_SUFFIX))
      if not images:
        raise ValueError(f"{images_archive} has no {prefix}<city>/*{_IMAGE_SUFFIX}; is it "
                         f"{IMAGES_ARCHIVE}?")
      label_names = set(labels_zf.namelist())
      for image in images:
        stem = posixpath.basename(image)[:-len(_IMAGE_SUFFIX)]
        city_dir = posixpath.dirname(image)[len("leftImg8bit/"):]
        members = {kind: f"gtFine/{city_dir}/{stem}_gtFine_{kind}.png"
                   for kind in ("labelIds", "instanceIds")}
        missing = [m for m in members.values() if m not in label_names]
        if missing:
          raise ValueError(f"{images_archive} has {image} but {labels_archive} lacks "
                           f"{', '.join(missing)}.")
        yield stem, self._example(images_zf, labels_zf, image, members, stem)

  def _example(self, images_zf, labels_zf, image, members, stem):
    image_bytes = images_zf.read(image)
    try:
      with Image.open(io.BytesIO(image_bytes)) as decoded:
        size, mode, fmt = decoded.size, decoded.mode, decoded.format
    except OSError as e:
      raise ValueError(f"{images_zf.filename}: {image} is not a readable image ({e}).") from None
    if fmt != "PNG" or mode != "RGB":
      raise ValueError(f"{images_zf.filename}: {image} is a {fmt} {mode} image; Cityscapes "
                       "images are RGB PNGs.")
    label_ids = _read_png(labels_zf, members["labelIds"])
    if label_ids.shape != size[::-1]:
      raise ValueError(f"{image} is {size[0]}x{size[1]} but {members['labelIds']} is "
                       f"{label_ids.shape[1::-1]}.")
    record = annotations(label_ids, _read_png(labels_zf, members["instanceIds"]),
                         f"{labels_zf.filename}: {members['instanceIds']}")
    return {"image": image_bytes, "file_name": stem, **record}


CITYSCAPES = tfds_builders.ArchiveDataset(
    name="cityscapes", class_names=CLASS_NAMES, palette=PALETTE, splits=tuple(_SPLIT_DIRS),
    archives={
        IMAGES_ARCHIVE: "Cityscapes left 8-bit images, train/val/test (11GB), from "
                        "https://www.cityscapes-dataset.com/downloads (registration required)",
        LABELS_ARCHIVE: "Cityscapes fine annotations, train/val/test (241MB), from "
                        "https://www.cityscapes-dataset.com/downloads (registration required)"},
    builder=Cityscapes,
    thing_classes=tuple(l.train_id for l in _TRAIN_LABELS if l.has_instances))
