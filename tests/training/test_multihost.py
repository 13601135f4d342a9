"""Multi-process training on this machine: the README's two-process command (2
processes x 4 CPU devices over 127.0.0.1, JAX's multi-controller runtime with
CPU collectives) ends with the same parameters as 1 process x 8 devices, and
each run's checkpoint resumes in the other process count (and sharding)."""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import unet_shapes
from segjax.commands.restore import restore
from segjax.data.sources import get_dataset
from segjax.training import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Short runs: checkpoints at steps 2 and 4, one small evaluation at the end. SGD:
# Adam's first steps (g / sqrt(v)) blow float round-off of the cross-process sums
# up to ~1e-3 differences, SGD keeps them at round-off.
OVERRIDES = ("--config.total_steps={steps}", "--config.checkpoint_every=2",
             "--config.optimizer.name=sgd",
             "--config.eval_every=100", "--config.log_every=1",
             "--config.data.eval_split=validation[:16]", "--config.data.data_dir={data_dir}")


def readme_command():
  """The environment and train.py arguments of the README's two-process example."""
  text = open(os.path.join(REPO, "README.md")).read()
  block = re.search(r"# Two processes on this machine.*?\n(.*?)\ndone", text, re.S)
  assert block, "README.md lost its two-process example"
  words = shlex.split(block.group(1).replace("\\\n", " "))
  start = words.index("do")
  env = dict(w.split("=", 1) for w in words[start + 1:] if "=" in w and not w.startswith("-")
             and words.index(w) < words.index("python"))
  args = words[words.index("train.py") + 1:words.index("&")]
  return env, args


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _set(args, flag, value):
  out, i = [], 0
  while i < len(args):
    if args[i] == flag:
      i += 2
      continue
    if args[i].startswith(flag + "="):
      i += 1
      continue
    out.append(args[i])
    i += 1
  return out + [f"{flag}={value}"]


def _launch(args, env_extra, workdir):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(PYTHONPATH=REPO, **env_extra)
  return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train(processes, workdir, data_dir, steps, extra=()):
  env, args = readme_command()
  args = _set(args, "--workdir", str(workdir))
  args += [o.format(steps=steps, data_dir=data_dir) for o in OVERRIDES] + list(extra)
  if processes == 1:
    args = [a for a in args if not a.startswith(("--coordinator_address", "--num_processes",
                                                 "--process_id"))]
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    runs = [_launch(args, env, workdir)]
  else:
    args = _set(args, "--coordinator_address", f"127.0.0.1:{_free_port()}")
    runs = [_launch(_set(args, "--process_id", str(i)), env, workdir) for i in range(2)]
  outputs = [run.communicate(timeout=600)[0] for run in runs]
  for run, output in zip(runs, outputs):
    assert run.returncode == 0, output[-4000:]
  return outputs


def _restore(workdir, data_dir):
  """(parameters and BatchNorm statistics, step) of a checkpoint, which must be the
  smoke config's model."""
  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.optimizer.name = "sgd"
  config.data.data_dir = data_dir
  restored = restore(str(workdir), config)
  return jax.device_get(restored.variables), restored.step


def _norm(tree):
  return np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(tree)))


def _relative_difference(a, b, earlier):
  """||a - b|| over parameters and BatchNorm statistics, relative to how far b moved
  since `earlier`. Cross-process sums add in another order than in-process ones:
  round-off (1e-7) that BatchNorm on this tiny network amplifies over steps."""
  diff = lambda x, y: jax.tree.map(np.subtract, (x["params"], x["batch_stats"]),
                                   (y["params"], y["batch_stats"]))
  return _norm(diff(a, b)) / _norm(diff(b, earlier))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  get_dataset("segjax_shapes", path).source("train")  # prepared once, before the runs
  return path


def test_readme_command_is_two_loopback_processes_of_four_devices():
  env, args = readme_command()
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
  joined = " ".join(args)
  assert "--coordinator_address=127.0.0.1:" in joined and "--num_processes=2" in joined
  assert "--process_id=$i" in joined


@pytest.mark.parametrize("kwargs,message", [
    (dict(coordinator_address="127.0.0.1:1234"), "needs --num_processes and --process_id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, 2\)"),
    (dict(num_processes=2, process_id=1), "need --coordinator_address"),
])
def test_distributed_settings_are_checked_before_connecting(kwargs, message, monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
               "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match=message):
    distributed.initialize("auto", **kwargs)
  assert not distributed.initialize("off", **kwargs)
  assert not distributed.initialize("auto")  # nothing asked, no cluster: one process


def test_cli_reports_a_missing_coordinator_in_one_sentence(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), "--config",
       "configs/unet_shapes.py:smoke", "--workdir", str(tmp_path), "--num_processes=2",
       "--process_id=1"], cwd=REPO, env=dict(env, PYTHONPATH=REPO), capture_output=True,
      text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: --num_processes/--process_id")


def test_two_processes_equal_one_process_and_checkpoints_cross_over(data_dir, tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  outputs = _train(2, two, data_dir, steps=4)
  _train(1, one, data_dir, steps=4)
  state_two, step = _restore(two, data_dir)
  state_one, _ = _restore(one, data_dir)
  one_at_2, _ = _restore(one / "checkpoints" / "2", data_dir)
  assert step == 4
  # Same data and same math: the first step's scalars agree to round-off ...
  logs = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (two, one)]
  first = [next(r for r in log if r["step"] == 1) for log in logs]
  assert first[0]["train/loss"] == pytest.approx(first[1]["train/loss"], rel=1e-6)
  assert first[0]["train/grad_norm"] == pytest.approx(first[1]["train/grad_norm"], rel=1e-4)
  # ... and the parameters after 4 steps are the same.
  assert _relative_difference(state_two, state_one, one_at_2) < 3e-3
  # Only process 0 logs: one metrics line per step, one table.
  assert sum("train/loss" in r for r in logs[0]) == 4
  assert "mIoU" in outputs[0] and "mIoU" not in outputs[1]

  # Resume each run in the other process count (the 1-process checkpoint into
  # FSDP shardings): both continue alike.
  shutil.copytree(two, tmp_path / "two_then_one")
  shutil.copytree(one, tmp_path / "one_then_two")
  _train(1, tmp_path / "two_then_one", data_dir, steps=6)
  _train(2, tmp_path / "one_then_two", data_dir, steps=6, extra=["--config.mesh.strategy=fsdp"])
  a, step = _restore(tmp_path / "two_then_one", data_dir)
  b, _ = _restore(tmp_path / "one_then_two", data_dir)
  assert step == 6
  assert _relative_difference(a, b, state_one) < 3e-3
  # A control: a run on other data (another seed) is far away by this measure.
  _train(1, tmp_path / "other", data_dir, steps=6, extra=["--config.seed=1"])
  other, _ = _restore(tmp_path / "other", data_dir)
  assert _relative_difference(other, b, state_one) > 0.1
