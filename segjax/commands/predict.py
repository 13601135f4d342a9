"""predict.py: label new images with a trained model, from its checkpoint alone.

Each image goes through the task's predictor at its own size; the task's writer
writes its files (semantic: <stem>.png of class ids + <stem>_overlay.jpg; instance:
<stem>.json COCO results + <stem>_instances.jpg; panoptic: <stem>.png COCO panoptic
ids + one predictions.json; promptable (SAM): <stem>_mask<k>.png per prompt +
<stem>_overlay.jpg, or with no prompt <stem>.json of COCO RLE masks + <stem>_overlay.jpg).
"""
import io
import os
import sys
from typing import Callable, List, Optional

import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from segjax import images, paths
from segjax.commands.restore import restore

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def image_files(path: str) -> List[str]:
  """`path` itself if it is an image, else the images directly inside it, sorted (local
  or gs://)."""
  folder = paths.path(path)
  if folder.is_file():
    return [path]
  if not folder.is_dir():
    raise ValueError(f"--input {path} is neither an image nor a folder.")
  files = sorted(str(f) for f in folder.iterdir()
                 if not f.name.startswith(".") and f.name.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"--input folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
  return files


def read_image(path: str) -> np.ndarray:
  """An RGB uint8 image (16-bit and [0, 1] float images scaled, not clipped), or a
  ValueError naming a file that is not one."""
  try:
    data = paths.read_bytes(path)
  except paths.storage_errors() as e:
    raise ValueError(f"Cannot read {path} ({getattr(e, 'strerror', '') or e}).") from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      return images.to_rgb8(image, path)
  except images.UnsupportedImageError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot read {path} as an image ({e}); is it a corrupt or "
                     "non-image file?") from e


def _crf_on(config: ml_collections.ConfigDict) -> None:
  config.inference.crf.enabled = True


class SkippedImagesError(ValueError):
  """Some input images could not be read; the others were labelled."""


def output_stems(files: List[str]) -> List[str]:
  """The output name stem of each input: its name without the extension, or with it
  (photo.jpg, photo.png) where two inputs share a stem, so that no outputs collide."""
  names = [paths.path(f).name for f in files]
  stems = [os.path.splitext(name)[0] for name in names]
  shared = {s for s in stems if stems.count(s) > 1}
  return [name if s in shared else s for name, s in zip(names, stems)]


def _check_output_folder(files: List[str], output_dir: str) -> None:
  """Refuses an output folder holding input images: predictions there (<stem>.png, ...)
  could overwrite them."""
  def folder(path):
    if paths.is_url(path):
      return str(paths.path(path)).rstrip("/")
    return os.path.realpath(path)
  output = folder(output_dir)
  inside = [f for f in files if folder(str(paths.path(f).parent)) == output]
  if inside:
    raise ValueError(f"--output {output_dir} holds input images ({paths.path(inside[0]).name}"
                     f"{f' and {len(inside) - 1} more' if len(inside) > 1 else ''}), which "
                     "predictions could overwrite; choose another output folder.")


def _edits(*edits: Optional[Callable[[ml_collections.ConfigDict], None]]):
  """The config edits given (None: none), applied in order, as one edit (or None)."""
  edits = [e for e in edits if e is not None]
  if not edits:
    return None

  def edit(config):
    for e in edits:
      e(config)
  return edit


def predict_files(checkpoint: str, input_path: str, output_dir: str,
                  config: Optional[ml_collections.ConfigDict] = None,
                  crf: bool = False,
                  edit: Optional[Callable[[ml_collections.ConfigDict], None]] = None
                  ) -> List[str]:
  """Labels every input image with the model of `checkpoint` (its own config unless
  `config` is given; `crf` turns on the dense CRF refinement; `edit(config)` changes the
  config before it is checked, e.g. SAM's prompts, `promptable.prompt_edit`); returns the
  written paths.

  Output names never collide (`output_stems`) and never land on an input file. An image
  that cannot be read is skipped with a warning and the rest are labelled; then
  SkippedImagesError lists the skipped ones (and how many files were written)."""
  files = image_files(input_path)
  _check_output_folder(files, output_dir)
  restored = restore(checkpoint, config, edit=_edits(_crf_on if crf else None, edit),
                     for_prediction=True)
  config, task, dataset = restored.config, restored.task, restored.dataset
  predictor = task.predictor(config, dataset, restored.model, restored.variables)
  paths.path(output_dir).mkdir(parents=True, exist_ok=True)
  writer = task.writer(output_dir, dataset, restored.model)
  written, skipped = [], []
  for path, stem in zip(tqdm(files, unit="image"), output_stems(files)):
    try:
      image = read_image(path)
    except ValueError as e:
      tqdm.write(f"warning: skipping {path}: {e}", file=sys.stderr)
      skipped.append(path)
      continue
    written += writer.write(predictor(image), image, stem)
  written = list(dict.fromkeys(written + writer.close()))  # each file once
  if skipped:
    raise SkippedImagesError(
        f"wrote {len(written)} files to {output_dir} but skipped {len(skipped)} of "
        f"{len(files)} images that could not be read: {', '.join(skipped)}.")
  return written
