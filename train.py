"""Trains and evaluates a segjax model.

  python train.py --config configs/unet_shapes.py --workdir runs/unet_shapes
  python train.py --config configs/pspnet_ade20k.py:smoke --workdir /tmp/x --config.total_steps=10

Running the same command again resumes from the latest checkpoint in --workdir.
"""
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _flag_error(error: BaseException, argv) -> str:
  """One sentence for a mistake in --config or a --config.* override."""
  text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
  if "Traceback" in text:  # raised inside the config file's get_config
    text = text.rsplit("Error: ", 1)[-1]
  unknown = re.match(r"^[\"']*(\w+)[\"']*\s*(Did you mean .*)?$", text)
  if unknown:
    key, hint = unknown.groups()
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0].split(".")), "")
    text = f"unknown config key {key!r}" + (f" in {flag}" if flag else "") + (
        f"; {hint[0].lower()}{hint[1:].rstrip(chr(39) + '?')}?" if hint else "")
  return f"error: {text}"


def parse_flags(argv):
  """absl flag parsing, with config-file and override mistakes as one sentence."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    sys.exit(_flag_error(e.__cause__ or e, argv))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Imported here so that flag errors are reported before jax starts.
  from segjax.data.sources import DatasetNotFoundError
  from segjax.training.checkpointing import CheckpointMismatchError
  from segjax.training.trainer import train_and_evaluate
  logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    missing = [k for k in ("model", "data", "loss", "optimizer", "mesh") if k not in config]
  except OSError:
    sys.exit(f"error: cannot load the config file {flags.FLAGS['config'].config_filename!r}; "
             "check the path (e.g. configs/unet_shapes.py) and that it defines get_config().")
  if missing:
    sys.exit(f"error: the config has no section(s) {missing}; build it on "
             "configs/default.get_config().")
  try:
    train_and_evaluate(config, _WORKDIR.value)
  except (DatasetNotFoundError, CheckpointMismatchError, KeyError, ValueError) as e:
    # Configuration and data problems: one sentence, no traceback.
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    sys.exit(f"error: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
