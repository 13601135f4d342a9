"""What a run writes: TensorBoard scalars and text, a JSON-lines metrics file, prediction
panels and profiler traces (process 0 only), into a local or gs:// workdir
(segjax/paths.py)."""
import json
import shutil
import tempfile
import time
from typing import Dict, List, Optional

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from segjax import paths, visualization


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` in the workdir (process 0 only).

  The JSON-lines log holds one record per step and kind of scalars, also across resumed
  runs: records of steps after `resume_step` (written after the checkpoint a run resumes
  from, so about to be written again) are dropped at start, and a record of `resume_step`
  written again (the evaluation of a finished run) replaces the one there.

  A bucket's objects cannot be appended to: in a gs:// workdir the whole file is
  uploaded again, at most every `cloud_flush_seconds` and when the writer closes.
  """
  cloud_flush_seconds = 30.0

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    if self.active:
      workdir = paths.path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._path = workdir / "metrics.jsonl"
      self._cloud, self._jsonl, self._uploaded = paths.is_url(workdir), None, 0.0
      self._lines, self._at_resume = self._kept_lines(resume_step), {}
      for index, line in enumerate(self._lines):
        record = json.loads(line)
        if record["step"] == resume_step:
          self._at_resume[(record["step"], frozenset(record))] = index
      self._rewrite()

  def _kept_lines(self, resume_step: int) -> List[str]:
    """The existing records up to `resume_step` (a torn last line left out)."""
    kept = []
    if self._path.exists():
      for line in self._path.read_text().splitlines():
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get("step", resume_step + 1) <= resume_step:
          kept.append(line)
    return kept

  def _rewrite(self) -> None:
    """Writes all lines (whole or not at all); locally, then appends to the file."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    paths.write_text(self._path, "".join(line + "\n" for line in self._lines))
    self._uploaded = time.monotonic()
    if not self._cloud:
      self._jsonl = self._path.open("a")

  def scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    line = json.dumps({"step": step, **scalars})
    index = self._at_resume.pop((step, frozenset(["step", *scalars])), None)
    if index is not None:  # this step's record again: replace it
      self._lines[index] = line
      self._rewrite()
      return
    self._lines.append(line)
    if self._cloud:
      if time.monotonic() - self._uploaded >= self.cloud_flush_seconds:
        self._rewrite()
      return
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
      if self._cloud:
        self._rewrite()
      else:
        self._jsonl.close()


class Profiler:
  """Traces train steps [first, first + count) to <workdir>/profile (process 0).

  For a gs:// workdir the trace is written to a local temporary folder and then
  uploaded: the profiler's own cloud writer follows none of the storage clients'
  settings (credentials, endpoint) that the rest of the run uses."""

  def __init__(self, workdir: str, first: int, count: int):
    self.directory = str(paths.path(workdir) / "profile")
    self.first, self.last = first, first + count - 1
    self.active = count > 0 and jax.process_index() == 0
    self._local = None

  def before(self, step: int) -> None:
    if self.active and step == self.first:
      if paths.is_url(self.directory):
        self._local = tempfile.mkdtemp(prefix="segjax_profile_")
      jax.profiler.start_trace(self._local or self.directory)

  def after(self, step: int, state) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      if self._local is not None:
        paths.upload_tree(self._local, self.directory)
        shutil.rmtree(self._local)
      tqdm.write(f"Profiler trace of steps {self.first}-{self.last} written to "
                 f"{self.directory}.")
