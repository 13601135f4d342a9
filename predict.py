"""Labels new images with a trained segjax checkpoint; the checkpoint is enough.

  python predict.py --checkpoint runs/unet_shapes --input photo.jpg --output out/
  python predict.py --checkpoint runs/psp --input images/ --output out/ \
      --config configs/pspnet_ade20k.py --config.inference.mode=slide
  python predict.py --checkpoint runs/unet_shapes --input photo.jpg --output out/ --crf
  python predict.py --config configs/pspnet_ade20k.py --checkpoint pspnet_ade20k.pth \
      --input images/ --output out/   # a peer's weights file for the config's model

The model, its classes, test-time ops and normalization come from the checkpoint's
record (no dataset and no optimizer are needed); --config replaces the recorded
config (other inference settings; required for weights files and for checkpoints
older than the record). For each image a semantic model writes <name>.png (a
palette PNG whose pixel values are class ids) and <name>_overlay.jpg at the
image's own size; `inference.mode` "batched" is trained-size evaluation only, so
"whole" is used in its place. Instance models (Mask R-CNN) write <name>.json (COCO
results) and <name>_instances.jpg; panoptic models (Panoptic FPN) write <name>.png
(COCO panoptic ids as RGB) and one predictions.json that
`segjax.metrics.pq_compute` reads.
"""
from absl import app, flags

from segjax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir (its latest checkpoint), one step's folder, or a "
    "weights file (.pth, .safetensors, .npz) for --config's architecture.")
_INPUT = flags.DEFINE_string("input", None, "An image, or a folder of images (local or gs://).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the predictions (local or gs://).")
_CRF = flags.DEFINE_bool("crf", False, "Refine predictions with the dense CRF "
                         "(config.inference.crf; whole or slide mode).")
flags.mark_flags_as_required(["checkpoint", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.load_optional_config()

  def predict():
    from segjax.commands.predict import predict_files
    written = predict_files(_CHECKPOINT.value, _INPUT.value, _OUTPUT.value, config,
                            crf=_CRF.value)
    print(f"wrote {len(written)} files to {_OUTPUT.value}")
  cli.run(predict)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
