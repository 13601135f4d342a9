"""What train.py, eval.py and predict.py share: --config parsing whose mistakes
are one sentence, and configuration or data problems reported without a
traceback."""
import re
import sys
from typing import Callable

from absl import flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                         lock_config=True)
# Multi-process runs (segjax/training/distributed.py): every process gets the same
# command plus its --process_id.
DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                "Start JAX's multi-process runtime: auto (when a coordinator "
                                "is given or a SLURM / multi-host TPU cluster is detected), "
                                "on (always, letting JAX detect the cluster) or off.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "HOST:PORT of process 0 in a multi-process run.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1.")


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


def load_config():
  """The --config value, or exit with a sentence if it cannot be loaded."""
  try:
    config = CONFIG.value
    missing = [k for k in ("model", "data", "loss", "optimizer", "mesh") if k not in config]
  except OSError:
    sys.exit(f"error: cannot load the config file {flags.FLAGS['config'].config_filename!r}; "
             "check the path (e.g. configs/unet_shapes.py) and that it defines get_config().")
  if missing:
    sys.exit(f"error: the config has no section(s) {missing}; build it on "
             "configs/default.get_config().")
  return config


def load_optional_config():
  """The --config value, or None when the command was given none."""
  if flags.FLAGS["config"].value is None and not flags.FLAGS["config"].present:
    return None
  return load_config()


def add_xla_flags(flags_text: str) -> None:
  """Appends `flags_text` (config.xla_flags) to $XLA_FLAGS, leaving out any flag the
  environment sets already; call it before JAX starts its backends."""
  import os
  current = os.environ.get("XLA_FLAGS", "")
  names = {flag.split("=", 1)[0] for flag in current.split()}
  added = [flag for flag in flags_text.split() if flag.split("=", 1)[0] not in names]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()


def use_compilation_cache(setting: str, workdir: str) -> None:
  """Points JAX's persistent compilation cache at `setting` ("" = <workdir>/compilation_cache,
  "off" = no cache), unless $JAX_COMPILATION_CACHE_DIR chooses already: a resumed or restarted
  run then loads its compiled steps instead of compiling them again."""
  import os
  if setting == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax
  from segjax import paths
  try:  # local or gs://, as the workdir
    folder = paths.absolute(setting) if setting else paths.absolute(workdir) / "compilation_cache"
  except ValueError as e:
    sys.exit(f"error: {e}")
  jax.config.update("jax_compilation_cache_dir", str(folder))


def run(command: Callable[[], None]) -> None:
  """Starts the multi-process runtime if asked, then runs `command`; configuration
  and data problems exit with one sentence."""
  # Imported here so that flag errors are reported before jax starts.
  from segjax.data.sources import DatasetNotFoundError
  from segjax.training.checkpointing import CheckpointMismatchError, DamagedCheckpointError
  from segjax.training import distributed
  logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(DISTRIBUTED.value, COORDINATOR.value, NUM_PROCESSES.value,
                           PROCESS_ID.value)
    command()
  except KeyboardInterrupt:
    sys.exit("Interrupted.")
  except (DatasetNotFoundError, CheckpointMismatchError, DamagedCheckpointError, KeyError,
          ValueError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    sys.exit(f"error: {message}")
