"""Multi-process (multi-host) start-up: JAX's multi-controller runtime.

Every process runs the same `train.py` command. `initialize` connects them
through `jax.distributed.initialize` before any device is used; afterwards
`jax.devices()` lists every process's devices, the mesh spans them all, each
process feeds its own rows of every global batch, only process 0 writes logs,
and checkpoints are written and read collectively by all processes.

Where the processes learn about each other, first match wins:
1. the flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
   (`segjax.cli`, shared by train.py, eval.py and predict.py);
2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
3. a cluster JAX detects by itself (Cloud TPU pod slices, SLURM with more than
   one task, Open MPI): `--distributed=auto` (the default) starts it for SLURM
   and multi-host TPU slices, `--distributed=on` always asks JAX to detect.
`--distributed=off` keeps a single process.
"""
import os
from typing import Optional


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from None


def _cluster_detected() -> bool:
  """SLURM with several tasks, or a Cloud TPU slice spanning several hosts."""
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None) -> bool:
  """Starts the multi-process runtime when asked or detected; returns whether it did.

  Must run before anything touches a jax device.
  """
  import jax  # pylint: disable=import-outside-toplevel
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if mode == "off":
    return False
  if coordinator_address:
    missing = [name for name, value in (("--num_processes", num_processes),
                                        ("--process_id", process_id)) if value is None]
    if missing and mode != "on":
      raise ValueError(f"--coordinator_address={coordinator_address} needs {' and '.join(missing)}"
                       " (or JAX_NUM_PROCESSES / JAX_PROCESS_ID) on every process.")
    if num_processes is not None and process_id is not None and not (
        0 <= process_id < num_processes):
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                       f"--num_processes={num_processes}.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if mode == "on" or _cluster_detected():
    jax.distributed.initialize()
    return True
  if num_processes not in (None, 1) or process_id not in (None, 0):
    raise ValueError("--num_processes/--process_id need --coordinator_address=HOST:PORT of "
                     "process 0 (or JAX_COORDINATOR_ADDRESS).")
  return False

