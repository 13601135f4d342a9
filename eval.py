"""Evaluates a trained segjax checkpoint on the config's eval split.

  python eval.py --config configs/unet_shapes.py --checkpoint runs/unet_shapes
  python eval.py --config configs/pspnet_ade20k.py --checkpoint runs/psp \
      --config.inference.mode=slide --config.inference.flip=True \
      --config.inference.scales='(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)'

  python eval.py --config configs/maskrcnn_shapes.py --checkpoint runs/maskrcnn_shapes

Prints the model's task's table (per-class IoU for semantic models, COCO box and
mask AP by pycocotools for instance models, PQ for panoptic ones) and writes
every metric as JSON (--output, default <checkpoint>/eval_<split>.json for a
workdir). --checkpoint may also be a peer's weights file (.pth, .safetensors)
or a converted .npz for the config's architecture.
"""
from absl import app, flags

from segjax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir (its latest checkpoint), one step's folder, or a "
    "weights file (.pth, .safetensors, .npz) for the config's architecture.")
_OUTPUT = flags.DEFINE_string("output", "", "Metrics JSON path (local or gs://).")
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
    from segjax.commands.evaluate import default_output, evaluate_checkpoint
    checkpoint = _CHECKPOINT.value
    output = _OUTPUT.value or default_output(checkpoint, config.data.eval_split)
    def report(metrics, table):
      print(f"step {metrics['step']}, {metrics['split']}, inference {metrics['mode']}:")
      print(table, flush=True)
    evaluate_checkpoint(config, checkpoint, output, report=report)
    print(f"metrics written to {output}")
  cli.run(evaluate)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
