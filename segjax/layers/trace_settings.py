"""Settings that layers read while a model is traced, set for a `with` block.

Convolution lowering, rematerialization and BatchNorm statistics are chosen by
the train step around the model call rather than threaded through every
module's attributes; each is a `TraceSetting`, a context variable whose
`scope(value)` sets it for the block (nested scopes restore the outer value).
"""
import contextlib
import contextvars
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class TraceSetting(Generic[T]):
  """A named context variable with a default, set by `with setting.scope(value):`
  and read by `setting.get()`; `check(value)` (raising ValueError) runs on entry."""

  def __init__(self, name: str, default: T, check: Optional[Callable[[T], None]] = None):
    self._var = contextvars.ContextVar(name, default=default)
    self._check = check

  def get(self) -> T:
    return self._var.get()

  @contextlib.contextmanager
  def scope(self, value: T) -> Iterator[None]:
    if self._check is not None:
      self._check(value)
    token = self._var.set(value)
    try:
      yield
    finally:
      self._var.reset(token)
