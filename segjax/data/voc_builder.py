"""Pascal VOC 2012 semantic segmentation as tfds ArrayRecord datasets.

"voc2012" holds the official train (1,464) and val (1,449) segmentation
splits. "voc2012_aug" holds the usual 10,582-image "train_aug" split, which
adds the Semantic Boundaries Dataset (SBD) annotations, plus the same
validation split. Both are prepared from the owners' archives in the manual
dir, read member by member without extracting them.

Labels are class ids 0..20 with 255 marking VOC's object boundaries (ignored).
VOC's palette PNGs already store the ids as palette indices; they are read as
indices (never as colours) and stored as grayscale PNGs, because the numpy
decoder tfds uses would expand a palette PNG to RGB. Images keep the archives'
own JPEG bytes.
"""
import io
import os
import tarfile
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import archives
from segjax.data import tfds_builders

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
_VOC_ROOT = "VOCdevkit/VOC2012/"
_SBD_ROOT = "benchmark_RELEASE/dataset/"
_VOC_SPLIT_FILES = {"train": "train", "validation": "val"}

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
IGNORE_INDEX = 255

_ARCHIVE_SOURCES = {
    VOC_ARCHIVE: "the Pascal VOC 2012 trainval archive "
                 "(http://host.robots.ox.ac.uk/pascal/VOC/voc2012/)",
    SBD_ARCHIVE: "the Semantic Boundaries Dataset release benchmark.tgz "
                 "(http://home.bharathh.info/pubs/codes/SBD/download.html)",
}

Label = Tuple[bytes, Tuple[int, int]]  # grayscale PNG bytes and the map's (height, width)


def voc_colormap(num_colors: int = 256) -> np.ndarray:
  """The VOC devkit colormap: bit k of a class index feeds bit 7 - k // 3 of
  channel k % 3 (red, green, blue), so 1 -> (128, 0, 0) and 255 -> (224, 224, 192)."""
  colors = np.zeros((num_colors, 3), np.uint8)
  for index in range(num_colors):
    for bit in range(8 * 3):
      if index >> bit & 1:
        colors[index, bit % 3] |= 1 << (7 - bit // 3)
  return colors


PALETTE = voc_colormap(len(CLASS_NAMES))


def _features(builder):
  return tfds.core.DatasetInfo(
      builder=builder, homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "file_name": tfds.features.Text(),
      }))


def _member_name(member: tarfile.TarInfo) -> str:
  return member.name[2:] if member.name.startswith("./") else member.name


def _read_ids(tar: tarfile.TarFile, member: tarfile.TarInfo) -> List[str]:
  """Image ids of a split list, one per line, in order and without repeats."""
  lines = tar.extractfile(member).read().decode("utf-8").split()
  return list(dict.fromkeys(lines))


def _encode_label(label: np.ndarray, member: str, archive: str) -> Label:
  """Checks that every value is a class id or the ignore index, then PNG-encodes."""
  bad = np.unique(label[((label < 0) | (label >= len(CLASS_NAMES))) & (label != IGNORE_INDEX)])
  if bad.size:
    raise ValueError(f"{member} in {archive} has label values {bad[:10].tolist()}, which are "
                     f"neither VOC class ids 0..{len(CLASS_NAMES) - 1} nor {IGNORE_INDEX}; "
                     "the archive is not the original release or is damaged.")
  return tfds_builders.encode_png(label), label.shape


def _voc_label(data: bytes, member: str, archive: str) -> Label:
  """Class ids of a SegmentationClass PNG: its palette indices, never its colours."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.mode not in ("P", "L"):
        raise ValueError(f"{member} in {archive} is a {image.mode!r} image; VOC labels are "
                         "palette PNGs whose indices are the class ids. Use the original "
                         "archive, not colour-converted labels.")
      label = np.asarray(image)
  except OSError as e:
    raise ValueError(f"cannot decode {member} in {archive}: {e}") from e
  return _encode_label(label, member, archive)


def _sbd_label(data: bytes, member: str, archive: str) -> Label:
  """Class ids of an SBD cls/<id>.mat: the field GTcls.Segmentation (HxW, 0..20)."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(data), struct_as_record=False, squeeze_me=True,
                           variable_names=["GTcls"])
  except (ValueError, TypeError, OSError, NotImplementedError,
          scipy.io.matlab.MatReadError) as e:
    raise ValueError(f"cannot read {member} in {archive} as a MATLAB file: {e}") from e
  label = getattr(mat.get("GTcls"), "Segmentation", None)
  if (not isinstance(label, np.ndarray) or label.ndim != 2
      or not np.issubdtype(label.dtype, np.integer)):
    raise ValueError(f"{member} in {archive} has no 2-D integer GTcls.Segmentation; is "
                     f"{archive} the SBD benchmark release?")
  return _encode_label(label, member, archive)


def _record(image_id: str, image: bytes, image_member: str, image_archive: str,
            label: Label) -> dict:
  """The stored example, after checking that the image header gives the label's size."""
  try:
    with Image.open(io.BytesIO(image)) as decoded:
      width, height = decoded.size
  except OSError as e:
    raise ValueError(f"cannot decode image {image_member} in {image_archive}: {e}") from e
  if (height, width) != label[1]:
    raise ValueError(f"image {image_member} in {image_archive} is {height}x{width} but its "
                     f"label for {image_id!r} is {label[1][0]}x{label[1][1]}.")
  return {"image": image, "label": label[0], "file_name": image_id}


class _VocIndex:
  """Where each image, label and split list of the VOC tar is.

  Built in one pass over the member headers; split lists and the (small)
  label PNGs are read into memory, images stay in the archive and are read
  later in archive order, so even a compressed tar is only read forward.
  """

  def __init__(self, archive: str):
    self.archive = archive
    self.images: Dict[str, tarfile.TarInfo] = {}
    self.labels: Dict[str, bytes] = {}
    self.split_ids: Dict[str, List[str]] = {}
    with archives.open_tar(archive) as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, _, base = _member_name(member).rpartition("/")
        stem, ext = os.path.splitext(base)
        if folder == _VOC_ROOT + "JPEGImages" and ext == ".jpg":
          self.images[stem] = member
        elif folder == _VOC_ROOT + "SegmentationClass" and ext == ".png":
          self.labels[stem] = tar.extractfile(member).read()
        elif folder == _VOC_ROOT + "ImageSets/Segmentation" and ext == ".txt":
          self.split_ids[stem] = _read_ids(tar, member)

  def ids(self, split_file: str) -> List[str]:
    """Ids listed in ImageSets/Segmentation/<split_file>.txt."""
    if split_file not in self.split_ids:
      raise ValueError(f"{_VOC_ROOT}ImageSets/Segmentation/{split_file}.txt is missing from "
                       f"{self.archive}; is it the VOC2012 trainval archive {VOC_ARCHIVE}?")
    return self.split_ids[split_file]

  def image_member(self, image_id: str) -> str:
    return f"{_VOC_ROOT}JPEGImages/{image_id}.jpg"

  def label(self, image_id: str) -> Label:
    member = f"{_VOC_ROOT}SegmentationClass/{image_id}.png"
    if image_id not in self.labels:
      raise ValueError(f"{member} is missing from {self.archive}.")
    return _voc_label(self.labels[image_id], member, self.archive)

  def check_images(self, ids: Iterable[str]) -> None:
    for image_id in ids:
      if image_id not in self.images:
        raise ValueError(f"{self.image_member(image_id)} is missing from {self.archive}.")

  def examples(self, ids: Iterable[str], label_of: Callable[[str], Label]) -> Iterator:
    """(id, record) for `ids`, reading their images in archive order."""
    with archives.open_tar(self.archive) as tar:
      for image_id in sorted(ids, key=lambda i: self.images[i].offset_data):
        image = tar.extractfile(self.images[image_id]).read()
        yield image_id, _record(image_id, image, self.image_member(image_id), self.archive,
                                label_of(image_id))


def _voc_split(index: _VocIndex, split_file: str) -> Iterator:
  """One official VOC split, labelled by SegmentationClass."""
  ids = index.ids(split_file)
  index.check_images(ids)
  for image_id in ids:
    if image_id not in index.labels:
      index.label(image_id)  # Raises, naming the missing member.
  return index.examples(ids, index.label)


class _SbdIndex:
  """SBD's split lists, the labels of the ids it may have to supply, and
  which images it holds, from one streaming pass over benchmark.tgz."""

  def __init__(self, archive: str, skip_labels: Iterable[str]):
    self.archive = archive
    self.images = set()
    self.labels: Dict[str, Label] = {}
    self.split_ids: Dict[str, List[str]] = {}
    skip_labels = set(skip_labels)
    with archives.open_tar(archive, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        name = _member_name(member)
        folder, _, base = name.rpartition("/")
        stem, ext = os.path.splitext(base)
        if folder == _SBD_ROOT + "img" and ext == ".jpg":
          self.images.add(stem)
        elif folder == _SBD_ROOT + "cls" and ext == ".mat" and stem not in skip_labels:
          self.labels[stem] = _sbd_label(tar.extractfile(member).read(), name, archive)
        elif folder + "/" == _SBD_ROOT and ext == ".txt":
          self.split_ids[stem] = _read_ids(tar, member)
    for split_file in ("train", "val"):
      if split_file not in self.split_ids:
        raise ValueError(f"{_SBD_ROOT}{split_file}.txt is missing from {archive}; is it the "
                         f"SBD release {SBD_ARCHIVE}?")

  def image_examples(self, ids: Iterable[str], label_of: Callable[[str], Label]) -> Iterator:
    """(id, record) for `ids`, streaming their images from benchmark.tgz."""
    pending = set(ids)
    if not pending:
      return
    with archives.open_tar(self.archive, "r|*") as tar:
      for member in tar:
        name = _member_name(member)
        stem, ext = os.path.splitext(os.path.basename(name))
        if (member.isfile() and stem in pending and ext == ".jpg"
            and os.path.dirname(name) == _SBD_ROOT + "img"):
          pending.remove(stem)
          yield stem, _record(stem, tar.extractfile(member).read(), name, self.archive,
                              label_of(stem))


class Voc2012(tfds_builders.PackagedBuilder):
  """Pascal VOC 2012 segmentation: 1,464 train and 1,449 validation images."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official train and val segmentation splits."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Place {VOC_ARCHIVE} (Pascal VOC 2012 trainval) in the "
                                  "manual dir.")

  def _info(self):
    return _features(self)

  def _split_generators(self, dl_manager):
    index = _VocIndex(os.path.join(dl_manager.manual_dir, VOC_ARCHIVE))
    return {split: self._generate_examples(index, split_file)
            for split, split_file in _VOC_SPLIT_FILES.items()}

  def _generate_examples(self, index, split_file):
    """The split listed in ImageSets/Segmentation/<split_file>.txt."""
    return _voc_split(index, split_file)


class Voc2012Aug(tfds_builders.PackagedBuilder):
  """Pascal VOC 2012 with SBD: 10,582 train_aug and 1,449 validation images."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "train_aug (VOC train + SBD train/val minus VOC val) and VOC val."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Place {VOC_ARCHIVE} (Pascal VOC 2012 trainval) and "
                                  f"{SBD_ARCHIVE} (SBD) in the manual dir.")

  def _info(self):
    return _features(self)

  def _split_generators(self, dl_manager):
    index = _VocIndex(os.path.join(dl_manager.manual_dir, VOC_ARCHIVE))
    return {"train_aug": self._generate_examples(
                index, os.path.join(dl_manager.manual_dir, SBD_ARCHIVE)),
            "validation": _voc_split(index, "val")}

  def _generate_examples(self, voc, sbd_archive):
    """train_aug: (SBD train + SBD val + VOC train) minus VOC val, sorted by id.

    Labels come from VOC's SegmentationClass where it has the image (keeping
    its 255 boundaries), else from SBD; images from the VOC tar where it has
    them, else from SBD.
    """
    val = set(voc.ids("val"))
    sbd = _SbdIndex(sbd_archive, skip_labels=set(voc.labels) | val)
    sbd_ids = set(sbd.split_ids["train"]) | set(sbd.split_ids["val"])
    ids = sorted((sbd_ids | set(voc.ids("train"))) - val)
    from_sbd = []
    for image_id in ids:
      if image_id not in voc.labels:
        if image_id not in sbd_ids:
          voc.label(image_id)  # Raises, naming the missing VOC member.
        if image_id not in sbd.labels:
          raise ValueError(f"{_SBD_ROOT}cls/{image_id}.mat is missing from {sbd_archive}.")
      if image_id not in voc.images:
        if image_id not in sbd_ids:
          voc.check_images([image_id])  # Raises, naming the missing VOC member.
        if image_id not in sbd.images:
          raise ValueError(f"{_SBD_ROOT}img/{image_id}.jpg is missing from {sbd_archive} and "
                           f"{voc.image_member(image_id)} from {voc.archive}.")
        from_sbd.append(image_id)

    def label_of(image_id):
      # SBD labels are dropped once stored, so memory shrinks as records are written.
      return voc.label(image_id) if image_id in voc.labels else sbd.labels.pop(image_id)

    yield from voc.examples([i for i in ids if i in voc.images], label_of)
    yield from sbd.image_examples(from_sbd, label_of)


VOC2012 = tfds_builders.ArchiveDataset(
    name="voc2012", class_names=CLASS_NAMES, palette=PALETTE, splits=tuple(_VOC_SPLIT_FILES),
    archives={VOC_ARCHIVE: _ARCHIVE_SOURCES[VOC_ARCHIVE]}, builder=Voc2012)

VOC2012_AUG = tfds_builders.ArchiveDataset(
    name="voc2012_aug", class_names=CLASS_NAMES, palette=PALETTE,
    splits=("train_aug", "validation"), archives=_ARCHIVE_SOURCES, builder=Voc2012Aug)
