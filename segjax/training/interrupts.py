"""Stopping a run cleanly on SIGTERM (pre-emption) or Ctrl-C.

Inside `StopRequest()` the first SIGTERM or SIGINT only records that a stop was asked
for: the train loop finishes its current step, saves a checkpoint and returns. A second
Ctrl-C aborts at once (KeyboardInterrupt). With several processes `requested()` is a
collective: every process stops at the same step when any one of them was signalled, so
that they all take part in the same final save.
"""
import signal
import threading
from typing import Dict, Optional

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager catching SIGTERM / SIGINT for the train loop (main thread only)."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous: Dict[int, object] = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for number in _SIGNALS:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}

  def _handle(self, number: int, frame) -> None:
    if self.signal_name is not None and number == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: abort now
    self.signal_name = self.signal_name or signal.Signals(number).name

  def requested(self) -> bool:
    """Whether this process (or, with several processes, any process) was signalled."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    if flags.any() and self.signal_name is None:
      self.signal_name = "a signal to another process"
    return bool(flags.any())
