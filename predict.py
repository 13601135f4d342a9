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

Segment Anything (configs/sam_vit_b.py; the official .pth converts on the fly):

  python predict.py --config configs/sam_vit_b.py --checkpoint sam_vit_b_01ec64.pth \
      --input photos/ --output out/ --points "500,375;620,410" --point_labels "1,0"
  python predict.py ... --boxes "75,275,1725,850;425,600,700,875"
  python predict.py ... --automatic   # or no prompt at all

Prompts are in each image's own pixels. All points (and at most one box) form one prompt;
several boxes are one prompt each. Each prompt writes <name>_mask<k>.png (0/255) and all
of them <name>_overlay.jpg; the automatic mode writes <name>.json (one record per mask:
COCO RLE segmentation, area, bbox, predicted_iou, point_coords, stability_score, crop_box)
and <name>_overlay.jpg.
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
_POINTS = flags.DEFINE_string(
    "points", "", "SAM: point prompt(s) \"x,y;x,y\" in the image's pixels, together one prompt "
    "(with at most one --boxes box).")
_POINT_LABELS = flags.DEFINE_string(
    "point_labels", "", "SAM: \"1,0,...\", one per point: 1 foreground, 0 background "
    "(default all 1).")
_BOXES = flags.DEFINE_string(
    "boxes", "", "SAM: box prompt(s) \"x0,y0,x1,y1;...\", one mask each.")
_AUTOMATIC = flags.DEFINE_bool(
    "automatic", False, "SAM: masks of everything (the automatic mask generator, settings in "
    "config.inference.sam); also what SAM does with no prompt.")
flags.mark_flags_as_required(["checkpoint", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.load_optional_config()

  def predict():
    from segjax.commands.predict import predict_files
    from segjax.tasks.promptable import prompt_edit
    prompts = prompt_edit(_POINTS.value, _POINT_LABELS.value, _BOXES.value, _AUTOMATIC.value)
    written = predict_files(_CHECKPOINT.value, _INPUT.value, _OUTPUT.value, config,
                            crf=_CRF.value, edit=prompts)
    print(f"wrote {len(written)} files to {_OUTPUT.value}")
  cli.run(predict)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
