"""What a run writes: TensorBoard scalars and text, a JSON-lines metrics file, prediction
panels and profiler traces (process 0 only)."""
import json
import os
from typing import Dict, Optional

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from segjax import visualization


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl` in the workdir (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def scalars(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
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
