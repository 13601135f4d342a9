"""predict.py: label new images with a trained model, from its checkpoint alone.

Each image goes through the task's predictor at its own size; the task's writer
writes its files (semantic: <stem>.png of class ids + <stem>_overlay.jpg; instance:
<stem>.json COCO results + <stem>_instances.jpg; panoptic: <stem>.png COCO panoptic
ids + one predictions.json).
"""
import glob
import os
from typing import List, Optional

import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from segjax.commands.restore import restore

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def image_files(path: str) -> List[str]:
  """`path` itself if it is an image, else the images directly inside it, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ValueError(f"--input {path} is neither an image nor a folder.")
  files = sorted(f for f in glob.glob(os.path.join(path, "*"))
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"--input folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
  return files


def read_image(path: str) -> np.ndarray:
  """An RGB uint8 image, or a ValueError naming a file that is not one."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError) as e:
    raise ValueError(f"Cannot read {path} as an image ({e}); is it a corrupt or "
                     "non-image file?") from e


def _crf_on(config: ml_collections.ConfigDict) -> None:
  config.inference.crf.enabled = True


def predict_files(checkpoint: str, input_path: str, output_dir: str,
                  config: Optional[ml_collections.ConfigDict] = None,
                  crf: bool = False) -> List[str]:
  """Labels every input image with the model of `checkpoint` (its own config unless
  `config` is given; `crf` turns on the dense CRF refinement); returns the written
  paths."""
  files = image_files(input_path)
  restored = restore(checkpoint, config, edit=_crf_on if crf else None, for_prediction=True)
  config, task, dataset = restored.config, restored.task, restored.dataset
  predictor = task.predictor(config, dataset, restored.model, restored.variables)
  os.makedirs(output_dir, exist_ok=True)
  writer = task.writer(output_dir, dataset, restored.model)
  written = []
  for path in tqdm(files, unit="image"):
    image = read_image(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    written += writer.write(predictor(image), image, stem)
  return written + writer.close()
