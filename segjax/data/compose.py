"""Pipelines built from op objects: `compose(op("resize", scale=(512, 512)), "pad(...)")`.

Internal code names ops and their arguments as values instead of formatting op strings;
the composed `Pipeline` still pickles as its spec text (what grain ships to its workers),
which each `Op` writes from its literal arguments.
"""
from typing import Any, Dict, NamedTuple, Union

import numpy as np

from segjax.data import transforms


class Op(NamedTuple):
  """A registered preprocessing op and its keyword arguments (Python literals)."""
  name: str
  kwargs: Dict[str, Any]

  def spec(self) -> str:
    if not self.kwargs:
      return self.name
    args = ", ".join(f"{k}={_literal(v)!r}" for k, v in self.kwargs.items())
    return f"{self.name}({args})"


def op(name: str, **kwargs) -> Op:
  """The op `name` of the preprocessing registry with `kwargs`."""
  return Op(name, kwargs)


def _literal(value: Any) -> Any:
  """numpy scalars and arrays as plain Python values, so that their repr is a literal."""
  if isinstance(value, np.ndarray):
    return _literal(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (tuple, list)):
    return tuple(_literal(v) for v in value)
  return value


def compose(*parts: Union[Op, str, None]) -> transforms.Pipeline:
  """One pipeline of `Op`s and spec strings, in order; empty parts are skipped."""
  specs = [p.spec() if isinstance(p, Op) else p.strip() for p in parts if p]
  return transforms.parse_pipeline("|".join(s for s in specs if s))
