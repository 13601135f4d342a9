"""Trains and evaluates a segjax model.

  python train.py --config configs/unet_shapes.py --workdir runs/unet_shapes
  python train.py --config configs/pspnet_ade20k.py:smoke --workdir /tmp/x --config.total_steps=10

Running the same command again resumes from the latest checkpoint in --workdir, which may
be a Cloud Storage URL (gs://bucket/run; segjax/paths.py).
"""
from absl import app, flags

from segjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs: a local "
                               "path or a gs://bucket/folder URL.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = cli.load_config()
  cli.add_xla_flags(config.xla_flags)
  cli.use_compilation_cache(config.compilation_cache_dir, _WORKDIR.value)

  def train():
    from segjax.training.trainer import train_and_evaluate
    train_and_evaluate(config, _WORKDIR.value)
  cli.run(train)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
