"""COCO 2017 instance and panoptic segmentation as tfds ArrayRecord datasets.

Prepared from the archives cocodataset.org distributes, placed in the manual
dir. Images are the archives' own JPEG bytes. Class ids are contiguous training
ids in COCO category-id order: the 80 thing classes 0..79 (the same in both
datasets) and, for panoptic, the 53 stuff classes 80..132.

coco_instances keeps every image, including the ~1% without annotations (their
`objects` are empty; detectron2 drops them from its training set, a filter that
belongs in the input pipeline), and every annotation as written, including
boxes of zero width or height (the transforms drop empty boxes). Masks are
rasterised from polygons / RLE by `coco_masks`, bit-identical to pycocotools.

coco_panoptic stores the panoptic PNG as-is (id = R + 256 G + 256^2 B, 0 = VOID)
with its `segments`, a semantic `label` computed from them (255 = VOID), and
`objects` for the thing segments so Mask R-CNN-style heads can train on it.
"""
import collections
import io
import json
import os
import shutil
import tempfile
import zipfile
from typing import Dict, Iterable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import archives
from segjax.data import coco_masks
from segjax.data import tfds_builders

IMAGE_ARCHIVES = {"train": "train2017.zip", "validation": "val2017.zip"}
INSTANCES_ARCHIVE = "annotations_trainval2017.zip"
PANOPTIC_ARCHIVE = "panoptic_annotations_trainval2017.zip"
# Split -> the folder / file stem COCO uses for it.
_SPLIT_STEMS = {"train": "train2017", "validation": "val2017"}
IGNORE_INDEX = 255

# The 133 COCO panoptic categories (panopticapi's panoptic_coco_categories):
# (COCO category id, name, is thing). The things are also the 80 instance
# categories, with the same ids and names.
CATEGORIES = (
    (1, "person", True), (2, "bicycle", True), (3, "car", True), (4, "motorcycle", True),
    (5, "airplane", True), (6, "bus", True), (7, "train", True), (8, "truck", True),
    (9, "boat", True), (10, "traffic light", True), (11, "fire hydrant", True),
    (13, "stop sign", True), (14, "parking meter", True), (15, "bench", True),
    (16, "bird", True), (17, "cat", True), (18, "dog", True), (19, "horse", True),
    (20, "sheep", True), (21, "cow", True), (22, "elephant", True), (23, "bear", True),
    (24, "zebra", True), (25, "giraffe", True), (27, "backpack", True), (28, "umbrella", True),
    (31, "handbag", True), (32, "tie", True), (33, "suitcase", True), (34, "frisbee", True),
    (35, "skis", True), (36, "snowboard", True), (37, "sports ball", True), (38, "kite", True),
    (39, "baseball bat", True), (40, "baseball glove", True), (41, "skateboard", True),
    (42, "surfboard", True), (43, "tennis racket", True), (44, "bottle", True),
    (46, "wine glass", True), (47, "cup", True), (48, "fork", True), (49, "knife", True),
    (50, "spoon", True), (51, "bowl", True), (52, "banana", True), (53, "apple", True),
    (54, "sandwich", True), (55, "orange", True), (56, "broccoli", True), (57, "carrot", True),
    (58, "hot dog", True), (59, "pizza", True), (60, "donut", True), (61, "cake", True),
    (62, "chair", True), (63, "couch", True), (64, "potted plant", True), (65, "bed", True),
    (67, "dining table", True), (70, "toilet", True), (72, "tv", True), (73, "laptop", True),
    (74, "mouse", True), (75, "remote", True), (76, "keyboard", True), (77, "cell phone", True),
    (78, "microwave", True), (79, "oven", True), (80, "toaster", True), (81, "sink", True),
    (82, "refrigerator", True), (84, "book", True), (85, "clock", True), (86, "vase", True),
    (87, "scissors", True), (88, "teddy bear", True), (89, "hair drier", True),
    (90, "toothbrush", True),
    (92, "banner", False), (93, "blanket", False), (95, "bridge", False),
    (100, "cardboard", False), (107, "counter", False), (109, "curtain", False),
    (112, "door-stuff", False), (118, "floor-wood", False), (119, "flower", False),
    (122, "fruit", False), (125, "gravel", False), (128, "house", False), (130, "light", False),
    (133, "mirror-stuff", False), (138, "net", False), (141, "pillow", False),
    (144, "platform", False), (145, "playingfield", False), (147, "railroad", False),
    (148, "river", False), (149, "road", False), (151, "roof", False), (154, "sand", False),
    (155, "sea", False), (156, "shelf", False), (159, "snow", False), (161, "stairs", False),
    (166, "tent", False), (168, "towel", False), (171, "wall-brick", False),
    (175, "wall-stone", False), (176, "wall-tile", False), (177, "wall-wood", False),
    (178, "water-other", False), (180, "window-blind", False), (181, "window-other", False),
    (184, "tree-merged", False), (185, "fence-merged", False), (186, "ceiling-merged", False),
    (187, "sky-other-merged", False), (188, "cabinet-merged", False),
    (189, "table-merged", False), (190, "floor-other-merged", False),
    (191, "pavement-merged", False), (192, "mountain-merged", False),
    (193, "grass-merged", False), (194, "dirt-merged", False), (195, "paper-merged", False),
    (196, "food-other-merged", False), (197, "building-other-merged", False),
    (198, "rock-merged", False), (199, "wall-other-merged", False), (200, "rug-merged", False),
)
THING_CATEGORIES = tuple((cid, name) for cid, name, thing in CATEGORIES if thing)
assert len(CATEGORIES) == 133 and len(THING_CATEGORIES) == 80
assert [c[0] for c in CATEGORIES] == sorted(c[0] for c in CATEGORIES)
INSTANCE_CLASS_NAMES = tuple(name for _, name in THING_CATEGORIES)
PANOPTIC_CLASS_NAMES = tuple(name for _, name, _ in CATEGORIES)
# COCO category id -> training id.
_INSTANCE_CLASS = {cid: index for index, (cid, _) in enumerate(THING_CATEGORIES)}
_PANOPTIC_CLASS = {cid: index for index, (cid, _, _) in enumerate(CATEGORIES)}
_IS_THING = {cid: thing for cid, _, thing in CATEGORIES}


def _common_features():
  return {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "file_name": tfds.features.Text(),
      "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
      "objects": tfds_builders.objects_feature(),
  }


def _box(bbox, where: str) -> np.ndarray:
  """COCO [x, y, w, h] -> [x1, y1, x2, y2]."""
  if len(bbox) != 4:
    raise ValueError(f"{where}: bbox {bbox} is not [x, y, width, height].")
  x, y, w, h = (float(v) for v in bbox)
  return np.array([x, y, x + w, y + h], np.float32)


def _read_member(zf: zipfile.ZipFile, member: str, archive: str) -> bytes:
  try:
    return zf.read(member)
  except KeyError:
    raise ValueError(f"{archive} has no member {member}; is it the complete COCO 2017 "
                     "archive?") from None


def _read_json(archive: str, member: str) -> dict:
  with archives.open_zip(archive) as zf:
    try:
      with zf.open(member) as f:
        return json.load(f)
    except KeyError:
      raise ValueError(f"{archive} has no {member}; is it the COCO 2017 annotation "
                       "archive?") from None


def _check_image(data: bytes, height: int, width: int, where: str) -> None:
  """The image header (read without decoding) matches the JSON's size."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      size = image.size
  except Exception as err:  # PIL raises several types for unreadable files.
    raise ValueError(f"{where} is not a readable image: {err}") from err
  if size != (width, height):
    raise ValueError(f"{where} is {size[0]}x{size[1]} (width x height), but the annotation "
                     f"JSON says {width}x{height}.")


def _check_categories(categories: Iterable[dict], expected: Iterable[tuple], where: str,
                      with_isthing: bool) -> None:
  """Raises unless the JSON's categories are exactly segjax's table."""
  found = {(c["id"], c["name"]) + ((bool(c["isthing"]),) if with_isthing else ())
           for c in categories}
  expected = set(expected)
  if found != expected:
    raise ValueError(
        f"The categories in {where} differ from segjax's COCO table, so the training ids "
        f"would be wrong. Only in the JSON: {sorted(found - expected)}; only in segjax: "
        f"{sorted(expected - found)}.")


def _group_by_image(annotations: Iterable[dict]) -> Dict[int, list]:
  groups = collections.defaultdict(list)
  for annotation in annotations:
    groups[annotation["image_id"]].append(annotation)
  return groups


def _training_id(class_of: Dict[int, int], category_id: int, where: str) -> int:
  if category_id not in class_of:
    raise ValueError(f"{where} has category_id {category_id}, which is not a category of this "
                     "dataset.")
  return class_of[category_id]


def _stem(file_name: str) -> str:
  return os.path.splitext(os.path.basename(file_name))[0]


class CocoInstances(tfds_builders.PackagedBuilder):
  """COCO 2017 instances: 118,287 train and 5,000 validation images, 80 classes."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "instances_{train,val}2017 with masks from polygons and RLE."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Place {IMAGE_ARCHIVES['train']}, {IMAGE_ARCHIVES['validation']} and "
      f"{INSTANCES_ARCHIVE} from cocodataset.org in the manual dir.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict(_common_features()))

  def _split_generators(self, dl_manager):
    manual = dl_manager.manual_dir
    return {split: self._generate_examples(os.path.join(manual, IMAGE_ARCHIVES[split]),
                                           os.path.join(manual, INSTANCES_ARCHIVE), stem)
            for split, stem in _SPLIT_STEMS.items()}

  def _generate_examples(self, image_archive, annotation_archive, stem):
    json_member = f"annotations/instances_{stem}.json"
    data = _read_json(annotation_archive, json_member)
    where = f"{annotation_archive}:{json_member}"
    _check_categories(data["categories"], THING_CATEGORIES, where, with_isthing=False)
    annotations = _group_by_image(data["annotations"])
    with archives.open_zip(image_archive) as zf:
      for image in sorted(data["images"], key=lambda im: im["id"]):
        member = f"{stem}/{image['file_name']}"
        jpeg = _read_member(zf, member, image_archive)
        height, width = image["height"], image["width"]
        _check_image(jpeg, height, width, f"{image_archive}:{member}")
        objects = []
        for annotation in annotations.pop(image["id"], []):
          what = f"{where} annotation {annotation['id']}"
          try:
            mask = coco_masks.annotation_to_mask(annotation["segmentation"], height, width)
          except ValueError as err:
            raise ValueError(f"{what}: {err}") from err
          objects.append({
              "box": _box(annotation["bbox"], what),
              "class": np.int32(_training_id(_INSTANCE_CLASS, annotation["category_id"], what)),
              "is_crowd": np.bool_(annotation["iscrowd"]),
              "mask": tfds_builders.encode_png(mask[..., None]),
          })
        yield image["id"], {"image": jpeg, "file_name": _stem(image["file_name"]),
                            "image_id": np.int64(image["id"]), "objects": objects}
    if annotations:
      raise ValueError(f"{where} has annotations for image ids not in its image list: "
                       f"{sorted(annotations)[:10]}.")


class CocoPanoptic(tfds_builders.PackagedBuilder):
  """COCO 2017 panoptic: 118,287 train and 5,000 validation images, 133 classes."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "panoptic_{train,val}2017 with semantic labels and thing masks."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Place {IMAGE_ARCHIVES['train']}, {IMAGE_ARCHIVES['validation']} and "
      f"{PANOPTIC_ARCHIVE} from cocodataset.org in the manual dir.")

  def _info(self):
    features = _common_features()
    features.update({
        "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "panoptic": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "segments": tfds_builders.segments_feature(),
    })
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    manual = dl_manager.manual_dir
    return {split: self._generate_examples(os.path.join(manual, IMAGE_ARCHIVES[split]),
                                           os.path.join(manual, PANOPTIC_ARCHIVE), stem)
            for split, stem in _SPLIT_STEMS.items()}

  def _generate_examples(self, image_archive, panoptic_archive, stem):
    json_member = f"annotations/panoptic_{stem}.json"
    data = _read_json(panoptic_archive, json_member)
    where = f"{panoptic_archive}:{json_member}"
    _check_categories(data["categories"], CATEGORIES, where, with_isthing=True)
    annotations = {a["image_id"]: a for a in data["annotations"]}
    # The PNGs are in a zip inside the zip; copy it out once so that it can be
    # read at random (a compressed member cannot seek).
    nested = f"annotations/panoptic_{stem}.zip"
    with tempfile.TemporaryDirectory(dir=self.data_dir_root) as tmp:
      png_archive = os.path.join(tmp, os.path.basename(nested))
      with archives.open_zip(panoptic_archive) as outer:
        try:
          with outer.open(nested) as src, open(png_archive, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        except KeyError:
          raise ValueError(f"{panoptic_archive} has no nested {nested}; is it the COCO 2017 "
                           "panoptic annotation archive?") from None
      with archives.open_zip(image_archive) as images, archives.open_zip(png_archive) as pngs:
        for image in sorted(data["images"], key=lambda im: im["id"]):
          if image["id"] not in annotations:
            raise ValueError(f"{where} has image {image['id']} ({image['file_name']}) but no "
                             "annotation for it.")
          yield image["id"], _panoptic_example(
              stem, image, annotations[image["id"]], images, image_archive, pngs,
              f"{panoptic_archive}:{nested}")


def _panoptic_example(stem, image, annotation, images, image_archive, pngs, png_archive):
  """One panoptic record; checks that the PNG and the JSON's segments agree."""
  height, width = image["height"], image["width"]
  image_member = f"{stem}/{image['file_name']}"
  png_member = f"panoptic_{stem}/{annotation['file_name']}"
  jpeg = _read_member(images, image_member, image_archive)
  _check_image(jpeg, height, width, f"{image_archive}:{image_member}")
  png = _read_member(pngs, png_member, png_archive)
  where = f"{png_archive}:{png_member}"
  _check_image(png, height, width, where)
  with Image.open(io.BytesIO(png)) as decoded:
    if decoded.mode != "RGB":
      raise ValueError(f"{where} is a {decoded.mode} PNG; COCO panoptic PNGs are RGB "
                       "(id = R + 256 G + 256^2 B).")
    rgb = np.asarray(decoded, np.int64)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
  present, inverse = np.unique(ids, return_inverse=True)
  lut = np.full(present.size, IGNORE_INDEX, np.uint8)
  index_of = {int(i): n for n, i in enumerate(present)}
  inverse = inverse.reshape(height, width)
  segments, objects = [], []
  for info in annotation["segments_info"]:
    segment_id = int(info["id"])
    what = f"{where} segment {segment_id} of image {image['id']}"
    if segment_id == 0:
      raise ValueError(f"{what}: id 0 is VOID in COCO panoptic PNGs and cannot be a segment.")
    if segment_id not in index_of:
      raise ValueError(f"{what} is listed in the JSON but has no pixel in the PNG.")
    class_id = _training_id(_PANOPTIC_CLASS, info["category_id"], what)
    is_thing = _IS_THING[info["category_id"]]
    lut[index_of[segment_id]] = class_id
    segments.append({"id": np.int32(segment_id), "class": np.int32(class_id),
                     "is_thing": np.bool_(is_thing), "is_crowd": np.bool_(info["iscrowd"]),
                     "area": np.int32(info["area"])})
    if is_thing:
      mask = (inverse == index_of[segment_id]).astype(np.uint8)
      objects.append({"box": _box(info["bbox"], what), "class": np.int32(class_id),
                      "is_crowd": np.bool_(info["iscrowd"]),
                      "mask": tfds_builders.encode_png(mask[..., None])})
  listed = {int(s["id"]) for s in segments} | {0}
  unlisted = sorted(set(index_of) - listed)
  if unlisted:
    raise ValueError(f"{where} has segment ids {unlisted[:10]} that the JSON does not list "
                     f"for image {image['id']}.")
  label = lut[inverse]
  return {"image": jpeg, "file_name": _stem(image["file_name"]),
          "image_id": np.int64(image["id"]), "objects": objects, "panoptic": png,
          "segments": segments, "label": tfds_builders.encode_png(label[..., None])}


def palette(num_classes: int, seed: int) -> np.ndarray:
  """A fixed pseudo-random palette (COCO has no canonical one for its class ids)."""
  return np.random.default_rng(seed).integers(0, 256, (num_classes, 3), dtype=np.uint8)


_IMAGE_SOURCES = {
    IMAGE_ARCHIVES["train"]: "COCO 2017 train images, train2017/<id>.jpg "
                             "(http://images.cocodataset.org/zips/train2017.zip)",
    IMAGE_ARCHIVES["validation"]: "COCO 2017 validation images, val2017/<id>.jpg "
                                  "(http://images.cocodataset.org/zips/val2017.zip)",
}

COCO_INSTANCES = tfds_builders.ArchiveDataset(
    name="coco_instances", class_names=INSTANCE_CLASS_NAMES, palette=palette(80, 80),
    splits=tuple(_SPLIT_STEMS),
    archives={**_IMAGE_SOURCES, INSTANCES_ARCHIVE: (
        "COCO 2017 train/val annotations, annotations/instances_{train,val}2017.json "
        "(http://images.cocodataset.org/annotations/annotations_trainval2017.zip)")},
    builder=CocoInstances, thing_classes=tuple(range(len(INSTANCE_CLASS_NAMES))))

COCO_PANOPTIC = tfds_builders.ArchiveDataset(
    name="coco_panoptic", class_names=PANOPTIC_CLASS_NAMES, palette=palette(133, 133),
    splits=tuple(_SPLIT_STEMS),
    archives={**_IMAGE_SOURCES, PANOPTIC_ARCHIVE: (
        "COCO 2017 panoptic annotations, annotations/panoptic_{train,val}2017.json and the "
        "PNG zips annotations/panoptic_{train,val}2017.zip (http://images.cocodataset.org/"
        "annotations/panoptic_annotations_trainval2017.zip)")},
    builder=CocoPanoptic,
    thing_classes=tuple(index for index, (_, _, thing) in enumerate(CATEGORIES) if thing))
