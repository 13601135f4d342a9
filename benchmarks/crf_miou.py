"""How much the dense CRF (`--crf`) changes a trained model's mIoU.

  python benchmarks/crf_miou.py --config configs/unet_shapes.py --checkpoint runs/unet_shapes

The CRF's weights are chosen on a held-out slice of the training split (--tune-split;
a small grid around pydensecrf's defaults, as DeepLab tuned its CRF on held-out
images), then the model is scored on --eval-split without the CRF, with the config's
setting (config.inference.crf) and with the chosen one. Predictions are whole-image,
at the original size. Prints mIoU, aAcc, the changes and the CRF's time per image;
the reference is the same model's plain argmax in the same run.
"""
import argparse
import importlib.util
import itertools
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from segjax.commands.restore import restore  # noqa: E402
from segjax.inference import per_image  # noqa: E402
from segjax.inference.semantic import refine_with_crf  # noqa: E402
from segjax.metrics import confusion_matrix, segmentation_metrics  # noqa: E402

GRID = {"bilateral_weight": (3.0, 10.0), "bilateral_srgb": (13.0, 30.0),
        "bilateral_sxy": (30.0, 80.0)}


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  config.unlock()
  return config


def examples(config, dataset, split):
  """(image uint8, label) pairs of a split, prepared as eval.py prepares them."""
  prepare = per_image.label_pipeline(config, dataset)
  source = dataset.source(split)
  for i in range(len(source)):
    example = prepare(source[i], np.random.default_rng(0))
    yield example["image"], example["label"]


def score(pairs, num_classes, ignore_index):
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for labels, truth in pairs:
    confusion += np.asarray(confusion_matrix(labels, truth, num_classes, ignore_index))
  metrics = segmentation_metrics(confusion)
  return 100 * metrics["mIoU"], 100 * metrics["aAcc"]


def refine(probabilities, image, options):
  return np.asarray(refine_with_crf(probabilities, image, options)).argmax(-1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="config file[:variant]")
  parser.add_argument("--checkpoint", required=True, help="training workdir or step folder")
  parser.add_argument("--data-dir", default="", help="tfds data dir (config's by default)")
  parser.add_argument("--tune-split", default="train[:48]")
  parser.add_argument("--eval-split", default="")
  args = parser.parse_args()
  config = load_config(args.config)
  if args.data_dir:
    config.data.data_dir = args.data_dir
  config.inference.mode = "whole"
  restored = restore(args.checkpoint, config, open_dataset=True)
  dataset, step = restored.dataset, restored.step
  config.inference.crf.enabled = False  # the predictor gives the plain probabilities
  predictor = per_image.make_predictor(config, restored.model, restored.variables,
                                       dataset.num_classes)
  config.inference.crf.enabled = True
  default = per_image.crf_options(config)
  n, ignore = dataset.num_classes, dataset.ignore_index

  tune = [(image, label, predictor.probabilities(image))
          for image, label in examples(config, dataset, args.tune_split)]
  results = []
  for values in itertools.product(*GRID.values()):
    options = dict(default, **dict(zip(GRID, values)))
    miou, _ = score(((refine(p, x, options), y) for x, y, p in tune), n, ignore)
    results.append((miou, options))
  plain_tune, _ = score(((p.argmax(-1), y) for _, y, p in tune), n, ignore)
  best_tune, best = max(results, key=lambda r: r[0])

  eval_split = args.eval_split or config.data.eval_split
  held_out = [(image, label, predictor.probabilities(image))
              for image, label in examples(config, dataset, eval_split)]
  rows = [("no CRF", score(((p.argmax(-1), y) for _, y, p in held_out), n, ignore), 0.0)]
  for name, options in (("CRF, config setting", default), ("CRF, tuned setting", best)):
    refine(held_out[0][2], held_out[0][0], options)  # compile
    start = time.perf_counter()
    refined = [(refine(p, x, options), y) for x, y, p in held_out]
    seconds = (time.perf_counter() - start) / len(held_out)
    rows.append((name, score(refined, n, ignore), seconds))

  print(f"{config.model.name} checkpoint step {step}, {dataset.name}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs)")
  print(f"tuning on {args.tune_split} ({len(tune)} images): no CRF {plain_tune:.2f} mIoU, "
        f"best of {len(results)} settings {best_tune:.2f}")
  print("tuned setting: " + ", ".join(f"{k}={best[k]}" for k in GRID))
  print(f"scored on {eval_split} ({len(held_out)} images), whole-image at original size:")
  base = rows[0][1][0]
  for name, (miou, aacc), seconds in rows:
    extra = (f"  change {miou - base:+.2f} mIoU  CRF {1000 * seconds:6.1f} ms/image"
             if seconds else "")
    print(f"  {name:22s} mIoU {miou:6.2f}  aAcc {aacc:6.2f}{extra}")


if __name__ == "__main__":
  main()
