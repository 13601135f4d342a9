"""Pipelines: ops applied in order, built from a spec string, from op objects,
or from a mix of both (`compose`)."""
import ast
import inspect
from typing import List, Optional, Sequence, Union

import numpy as np

from segjax.data.transforms.common import PREPROCESS_OPS, Example, Op


class Pipeline:
  """`fn(example, rng) -> example` applying `ops` in order.

  `ops` are callables `op(example, rng) -> example`: the `BoundOp`s that
  registered factories return (`transforms.resize(scale=(512, 512))`), other
  pipelines, or plain functions. `spec` is the text the ops were parsed from
  (`parse_pipeline` passes it); such a pipeline pickles as its spec, as it
  always has. Otherwise `spec` is joined from the ops' own specs (None if an op
  is a plain function) and the pipeline pickles op by op: grain can ship it to
  worker processes when every op pickles (`BoundOp`s do, by name and arguments).
  """

  def __init__(self, ops: Sequence[Op] = (), spec: Optional[str] = None):
    ops = list(ops)
    for i, op in enumerate(ops):
      if not callable(op):
        raise ValueError(f"Pipeline: op {i} is {op!r}, not a callable op(example, rng); "
                         "build ops with their factories, e.g. transforms.pad(size=(8, 8)).")
    self._parsed = spec is not None
    if spec is None and all(isinstance(getattr(op, "spec", None), str) for op in ops):
      spec = "|".join(op.spec for op in ops if op.spec.strip())
    self.spec = spec
    self.ops = ops

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    for op in self.ops:
      example = op(example, rng)
    return example

  def __reduce__(self):
    if self._parsed:
      return parse_pipeline, (self.spec,)
    return Pipeline, (self.ops,)

  def __repr__(self) -> str:
    return f"Pipeline({self.spec!r})" if self.spec is not None else f"Pipeline({self.ops!r})"


def compose(*parts: Union[str, Op]) -> Pipeline:
  """One pipeline from spec strings, op objects and pipelines, in order, e.g.
  `compose("squeeze_labels|check_image", transforms.pad(size=(512, 512)))`; code
  that builds a pipeline need not format its arguments into a string. A spec
  string becomes a parsed pipeline among the ops."""
  ops: List[Op] = []
  for part in parts:
    if isinstance(part, str):
      if part.strip():
        ops.append(parse_pipeline(part))
    elif callable(part):
      ops.append(part)
    else:
      raise ValueError(f"compose: {part!r} is neither a spec string nor a callable op; "
                       "pass spec strings, op objects or pipelines.")
  return Pipeline(ops)


def _split_ops(node: ast.AST) -> List[ast.AST]:
  """Flattens the left-nested `a | b | c` expression into [a, b, c]."""
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _split_ops(node.left) + _split_ops(node.right)
  return [node]


def _build_op(node: ast.AST, spec: str) -> Op:
  text = ast.get_source_segment(spec, node)
  if isinstance(node, ast.Name):
    name, keywords = node.id, []
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, keywords = node.func.id, node.keywords
    if node.args or any(kw.arg is None for kw in keywords):
      raise ValueError(f"preprocessing op {name!r}: arguments must be given by keyword, "
                       f"e.g. {name}(size=(512, 512)); got {text!r}.")
  else:
    raise ValueError(f"cannot read {text!r} in preprocessing spec {spec!r}: expected "
                     "`name` or `name(key=value, ...)` between '|'.")
  factory = PREPROCESS_OPS.get(name)
  kwargs = {}
  for kw in keywords:
    try:
      kwargs[kw.arg] = ast.literal_eval(kw.value)
    except (ValueError, TypeError, SyntaxError, RecursionError):
      raise ValueError(
          f"preprocessing op {name!r}: argument `{kw.arg}` must be a Python literal, "
          f"got {ast.get_source_segment(spec, kw.value)!r}.") from None
  signature = inspect.signature(factory)
  known = ", ".join(signature.parameters) or "none"
  unknown = [k for k in kwargs if k not in signature.parameters]
  if unknown:
    raise ValueError(f"preprocessing op {name!r} got unknown argument(s) {unknown}; "
                     f"its arguments are: {known}.")
  try:
    signature.bind(**kwargs)
  except TypeError as e:
    raise ValueError(f"preprocessing op {name!r}: {e}; its arguments are: {known}.") from None
  return factory(**kwargs)


def parse_pipeline(spec: str) -> Pipeline:
  """Builds `fn(example, rng) -> example` from "op1|op2(key=literal, ...)|...".

  The spec is read with `ast` (only literals are evaluated, never code); an
  empty spec gives the identity. Unknown ops raise KeyError listing known ops;
  bad arguments raise ValueError naming the op and the argument.
  """
  if not spec.strip():
    return Pipeline([], spec)
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing spec {spec!r}: {e.msg}.") from None
  return Pipeline([_build_op(node, spec.strip()) for node in _split_ops(tree)], spec)
