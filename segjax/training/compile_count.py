"""Counts the XLA programs a run compiles, by function name.

JAX reports every backend compilation (a persistent-cache hit included) as a
`/jax/core/compile/backend_compile_duration` event with the jitted function's name;
`CompileCounter` listens to those events through `jax.monitoring` while it is
entered. A run should compile a fixed, small set of programs: the train step once,
each evaluation program once per input shape. A name counted more often than its
shapes allow is a recompilation (a changed sharding, dtype or weak type between
calls), which on an accelerator costs minutes.
"""
import collections
import threading
from typing import Dict

from jax import monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def function_name(name: str) -> str:
  """"train_step" of JAX's "jit(train_step)"."""
  return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


class CompileCounter:
  """Context manager: `counts[name]` is the number of programs compiled for jitted function
  `name` (e.g. "train_step") inside the `with` block."""

  def __init__(self):
    self.counts: Dict[str, int] = collections.Counter()
    self._lock = threading.Lock()

  def _listen(self, event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.counts[function_name(str(kwargs.get("fun_name", "?")))] += 1

  def __enter__(self) -> "CompileCounter":
    monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    monitoring.unregister_event_duration_listener(self._listen)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    """"N XLA programs compiled: name x count, ..." (most frequent first)."""
    parts = ", ".join(f"{name} x{count}" for name, count in self.counts.most_common())
    return f"{self.total} XLA programs compiled" + (f": {parts}" if parts else "")
