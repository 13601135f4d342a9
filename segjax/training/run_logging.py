"""What a run writes: TensorBoard scalars and text, and a JSON-lines metrics file."""
import json
import os
from typing import Dict

import jax
import numpy as np
from tensorboardX import SummaryWriter


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

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()
