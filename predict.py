"""Labels new images with a trained segjax checkpoint.

  python predict.py --config configs/unet_shapes.py --checkpoint runs/unet_shapes \
      --input photo.jpg --output out/
  python predict.py --config configs/pspnet_ade20k.py --checkpoint runs/psp \
      --input images/ --output out/ --config.inference.mode=slide
  python predict.py --config configs/unet_shapes.py --checkpoint runs/unet_shapes \
      --input photo.jpg --output out/ --crf   # dense CRF refinement

For each image writes <name>.png (a palette PNG whose pixel values are class
ids) and <name>_overlay.jpg (the image blended with the class colours), at the
image's own size. `inference.mode` "batched" is trained-size evaluation only,
so "whole" is used in its place. Instance models (Mask R-CNN) write <name>.json
(COCO results) and <name>_instances.jpg; panoptic models (Panoptic FPN) write
<name>.png (COCO panoptic ids as RGB) and one predictions.json that
`segjax.metrics.pq_compute` reads.
"""
from absl import app, flags

from segjax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir (its latest checkpoint), or one step's folder.")
_INPUT = flags.DEFINE_string("input", None, "An image, or a folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the label PNGs and overlays.")
_CRF = flags.DEFINE_bool("crf", False, "Refine predictions with the dense CRF "
                         "(config.inference.crf; whole or slide mode).")
flags.mark_flags_as_required(["config", "checkpoint", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.load_config()
  if _CRF.value:
    config.inference.crf.enabled = True

  def predict():
    from segjax.inference.commands import predict_files
    if config.inference.mode == "batched":
      config.inference.mode = "whole"
    written = predict_files(config, _CHECKPOINT.value, _INPUT.value, _OUTPUT.value)
    print(f"wrote {len(written)} files to {_OUTPUT.value}")
  cli.run(predict)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
