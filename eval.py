"""Evaluates a trained segjax checkpoint on the config's eval split.

  python eval.py --config configs/unet_shapes.py --checkpoint runs/unet_shapes
  python eval.py --config configs/pspnet_ade20k.py --checkpoint runs/psp \
      --config.inference.mode=slide --config.inference.flip=True \
      --config.inference.scales='(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)'

  python eval.py --config configs/maskrcnn_shapes.py --checkpoint runs/maskrcnn_shapes

Prints the per-class table (COCO box and mask AP for Mask R-CNN, computed by
pycocotools) and writes every metric as JSON (--output, default
<checkpoint>/eval_<split>.json for a workdir).
"""
import os

from absl import app, flags

from segjax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir (its latest checkpoint), or one step's folder.")
_OUTPUT = flags.DEFINE_string("output", "", "Metrics JSON path.")
_CRF = flags.DEFINE_bool("crf", False, "Refine predictions with the dense CRF "
                         "(config.inference.crf; whole or slide mode).")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.load_config()
  if _CRF.value:
    config.inference.crf.enabled = True

  def evaluate():
    from segjax.data.sources import get_dataset
    from segjax.inference.commands import evaluate_checkpoint
    from segjax.metrics import format_iou_table
    from segjax.metrics.coco import IOU_TYPES, format_coco_table
    from segjax.metrics.panoptic import format_pq_table
    output = _OUTPUT.value or os.path.join(
        _CHECKPOINT.value if os.path.isdir(os.path.join(_CHECKPOINT.value, "checkpoints"))
        else os.path.dirname(os.path.abspath(_CHECKPOINT.value)),
        f"eval_{config.data.eval_split.split('[')[0]}.json")
    metrics = evaluate_checkpoint(config, _CHECKPOINT.value, output)
    print(f"step {metrics['step']}, {metrics['split']}, inference {metrics['mode']}:")
    if "pq" in metrics:  # a panoptic model: PQ as panopticapi's pq_compute
      print(format_pq_table(metrics["pq"], metrics["categories"]))
    elif "bbox" in metrics:  # an instance model: COCO AP through pycocotools
      print(format_coco_table({k: v for k, v in metrics.items() if k in IOU_TYPES}))
    else:
      names = get_dataset(config.data.name, config.data.data_dir,
                          config.data.manual_dir).class_names
      print(format_iou_table(metrics, names))
    print(f"metrics written to {output}")
  cli.run(evaluate)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
