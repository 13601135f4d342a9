"""Seconds per image of segjax's whole-image inference against mmsegmentation's
`inference_model`, PSPNet R50-D8 ADE20K at its test resize, same CPU, same run.

  python benchmarks/mmseg_inference.py --photos coffee,astronaut --repeats 3

mmseg builds pspnet_r50-d8_4xb4-80k_ade20k-512x512 from the config it ships
(random weights, random BatchNorm statistics; the speed does not depend on
them); its checkpoint loads into segjax's `pspnet` with `load_peer_checkpoint`.
Each photograph (skimage.data) is labelled by mmseg's `inference_model` from a
PNG file (its test pipeline: load, keep-ratio resize to (2048, 512), normalize,
whole inference, logits resized back, argmax) and by segjax's
`SemanticPredictor` from the decoded image with configs/pspnet_ade20k.py's
test settings (whole, exact shapes: the same computation). The table gives the
mean of `--repeats` calls after the first (segjax's first call, in brackets,
includes compilation), mmseg's time divided by segjax's (above 1: segjax is
faster) and the fraction of pixels labelled alike. mmseg runs on CPU PyTorch
with all cores; segjax on the default JAX backend with train.py's XLA flags.
`--json PATH` also writes the table as benchmarks/report.py's JSON.
"""
import argparse
import os
import sys
import tempfile
import time

import report

report.use_train_defaults()  # also puts the repository root on sys.path

import cv2  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import pspnet_ade20k  # noqa: E402
from segjax.convert import load_peer_checkpoint  # noqa: E402
from segjax.inference import SemanticPredictor  # noqa: E402
from segjax.models import build_model  # noqa: E402

CONFIG = "pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py"


def timed(fn, repeats):
  """(first call's seconds, mean seconds of `repeats` later calls, last result)."""
  start = time.perf_counter()
  result = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return first, float(np.mean(times)), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--photos", default="coffee,astronaut",
                      help="comma-separated skimage.data images")
  parser.add_argument("--repeats", type=int, default=3)
  report.add_json_argument(parser)
  args = parser.parse_args()
  try:
    from tests import mmseg_reference
    mmseg = mmseg_reference.import_mmseg()
  except BaseException as e:  # pytest.skip raises an exception outside BaseException's Exception
    sys.exit(f"error: mmsegmentation is needed as the reference "
             f"(pip install --no-deps -r requirements-reference.txt): {e}")
  import skimage.data
  import torch
  torch.set_num_threads(os.cpu_count())

  mm = mmseg_reference.init_model(CONFIG)
  config = pspnet_ade20k.get_config()
  model = build_model(config.model.name, 150, config.model.options)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "pspnet.pth")
    torch.save({"meta": {}, "state_dict": mm.state_dict()}, path)
    variables = load_peer_checkpoint(path, model)
    predictor = SemanticPredictor(
        model, variables, 150, mean=config.data.mean, std=config.data.std,
        mode=config.inference.mode, scale=tuple(config.inference.scale),
        exact_shapes=config.inference.exact_shapes)

    device = jax.devices()[0]
    print(f"PSPNet R50-D8, 150 classes, test resize {tuple(config.inference.scale)}; jax "
          f"{jax.__version__} on {device.platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, mmseg {mmseg.__version__}; {os.cpu_count()} CPUs")
    table = report.Table(["photo", "resized to", "segjax s (1st)", "mmseg s (1st)",
                          "ratio (mmseg s / segjax s)", "agree"])
    for name in args.photos.split(","):
      image = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
      file = os.path.join(tmp, f"{name}.png")
      cv2.imwrite(file, image[..., ::-1])
      resized = "x".join(map(str, mmseg.apis.inference_model(mm, file).metainfo["img_shape"]))
      ours_first, ours_s, ours = timed(lambda: predictor.predict(image), args.repeats)
      ref_first, ref_s, ref = timed(
          lambda: mmseg.apis.inference_model(mm, file).pred_sem_seg.data[0].numpy(),
          args.repeats)
      table.add(f"{name} {image.shape[0]}x{image.shape[1]}", resized,
                f"{ours_s:.2f} ({ours_first:.1f})", f"{ref_s:.2f} ({ref_first:.1f})",
                f"{ref_s / ours_s:.2f}", f"{float((ours == ref).mean()):.4f}")
  table.finish(
      args.json, benchmark="Whole-image inference: PSPNet-R50 ADE20K against mmsegmentation",
      setup=("pspnet_r50-d8_4xb4-80k_ade20k-512x512 built by mmseg 1.2.2 from its config "
             "(random weights and BatchNorm statistics), loaded into segjax's pspnet with "
             "load_peer_checkpoint; skimage.data photographs, keep-ratio test resize to "
             "(2048, 512). segjax: SemanticPredictor with configs/pspnet_ade20k.py's test "
             "settings (whole, exact shapes), from the decoded image; mmseg: inference_model "
             "from a PNG file (its whole test pipeline, decoding included). Seconds per image, "
             f"mean of {args.repeats} calls after the first (in brackets; segjax's includes "
             "compilation); 'agree': fraction of pixels labelled alike."))


if __name__ == "__main__":
  main()
