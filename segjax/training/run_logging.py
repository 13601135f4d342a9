"""What a run writes: TensorBoard scalars and text, a JSON-lines metrics file, prediction
panels and profiler traces (process 0 only)."""
import json
import os
from typing import Dict, List, Optional

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from segjax import visualization


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` in the workdir (process 0 only).

  The JSON-lines log holds one record per step and kind of scalars, also across resumed
  runs: records of steps after `resume_step` (written after the checkpoint a run resumes
  from, so about to be written again) are dropped at start, and a record of `resume_step`
  written again (the evaluation of a finished run) replaces the one there.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._path = os.path.join(workdir, "metrics.jsonl")
      self._lines, self._at_resume = self._kept_lines(resume_step), {}
      for index, line in enumerate(self._lines):
        record = json.loads(line)
        if record["step"] == resume_step:
          self._at_resume[(record["step"], frozenset(record))] = index
      self._rewrite()

  def _kept_lines(self, resume_step: int) -> List[str]:
    """The existing records up to `resume_step` (a torn last line left out)."""
    kept = []
    if os.path.exists(self._path):
      with open(self._path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:
            continue
          if isinstance(record, dict) and record.get("step", resume_step + 1) <= resume_step:
            kept.append(line.rstrip("\n"))
    return kept

  def _rewrite(self) -> None:
    with open(self._path + ".tmp", "w") as f:
      f.writelines(line + "\n" for line in self._lines)
    os.replace(self._path + ".tmp", self._path)
    self._jsonl = open(self._path, "a")

  def scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    line = json.dumps({"step": step, **scalars})
    index = self._at_resume.pop((step, frozenset(["step", *scalars])), None)
    if index is not None:  # this step's record again: replace it
      self._jsonl.close()
      self._lines[index] = line
      self._rewrite()
      return
    self._lines.append(line)
    self._jsonl.write(line + "\n")
    self._jsonl.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    if self.active:
      self._tb.add_text(tag, text, step)

  def panel(self, directory: str, step: int, image: Optional[np.ndarray]) -> None:
    """Saves an evaluation's prediction panel as <directory>/predictions/step_<step>.png."""
    if self.active:
      visualization.save_step_panel(directory, step, image)

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()


class Profiler:
  """Traces train steps [first, first + count) to <workdir>/profile (process 0)."""

  def __init__(self, workdir: str, first: int, count: int):
    self.directory = os.path.join(workdir, "profile")
    self.first, self.last = first, first + count - 1
    self.active = count > 0 and jax.process_index() == 0

  def before(self, step: int) -> None:
    if self.active and step == self.first:
      jax.profiler.start_trace(self.directory)

  def after(self, step: int, state) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      tqdm.write(f"Profiler trace of steps {self.first}-{self.last} written to "
                 f"{self.directory}.")
