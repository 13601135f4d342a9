"""Device mesh and parameter sharding rules taken from the config.

The mesh has named axes (`config.mesh.axes`, e.g. (("data", -1),) for pure data
parallelism over every device; -1 takes the remaining devices; with several
processes the mesh spans every process's devices). Batches are sharded over
`config.mesh.batch_axes` along their leading dimension. Parameters, their
optimizer state and the BatchNorm statistics are placed by
`config.mesh.param_rules`: a list of (regex over the '/'-joined path in the
train state, spec) pairs, first match wins, no match = replicated. A spec is
PartitionSpec entries, e.g. ("conv.*/kernel", (None, None, None, "data")), or
"fsdp": the leaf's largest dimension divisible by the size of the "data" axis
is sharded over it (leaves under `fsdp_min_size` elements stay replicated).
`config.mesh.strategy = "fsdp"` appends the rule (".*", "fsdp"): parameters and
optimizer state sharded along the data axis (ZeRO-3 / FSDP), gathered by XLA
where a layer needs them; "data_parallel" (the default) replicates them.
"""
import math
import re
from typing import Any, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def create_mesh(axes: Sequence[Tuple[str, int]], devices=None) -> Mesh:
  """A Mesh with the named axes sizes; one size may be -1 (all remaining devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may have size -1, got {list(axes)}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(f"{devices.size} devices cannot be split into mesh axes {list(axes)}.")
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) != devices.size:
    raise ValueError(f"Mesh axes {dict(zip(names, sizes))} need {math.prod(sizes)} devices, "
                     f"but {devices.size} are available.")
  return Mesh(devices.reshape(sizes), names)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
  """Shards the leading (batch) dimension over `batch_axes`."""
  return NamedSharding(mesh, P(tuple(batch_axes)))


def path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


STRATEGIES = ("data_parallel", "fsdp")


def param_rules(mesh_config) -> Tuple[Tuple[str, Any], ...]:
  """The config's `param_rules`, followed by the catch-all FSDP rule when
  `mesh.strategy` is "fsdp"."""
  if mesh_config.strategy not in STRATEGIES:
    raise ValueError(f"Unknown mesh.strategy {mesh_config.strategy!r}; use one of "
                     f"{list(STRATEGIES)}.")
  rules = tuple((pattern, spec) for pattern, spec in mesh_config.param_rules)
  return rules + (((".*", "fsdp"),) if mesh_config.strategy == "fsdp" else ())


def fsdp_spec(shape: Sequence[int], axes: Sequence[str], mesh: Mesh, min_size: int) -> P:
  """Shards the largest dimension of `shape` divisible by the size of `axes`;
  replicates leaves smaller than `min_size` elements or with no such dimension."""
  size = math.prod(mesh.shape[a] for a in axes)
  if size == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  spec = [None] * len(shape)
  spec[dim] = tuple(axes) if len(axes) > 1 else axes[0]
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Tuple[str, Any]],
                   fsdp_axes: Sequence[str] = ("data",), fsdp_min_size: int = 2 ** 14) -> Any:
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) from the rules.

  A rule whose spec does not fit the leaf (wrong rank, or a dimension not
  divisible by the mesh axis size) is an error naming the parameter, rather than
  a silent fallback to replication.
  """
  compiled = [(re.compile(pattern), spec if isinstance(spec, str) else tuple(spec))
              for pattern, spec in rules]
  for pattern, spec in compiled:
    if isinstance(spec, str) and spec != "fsdp":
      raise ValueError(f"Unknown sharding spec {spec!r} in rule {pattern.pattern!r}; use "
                       "PartitionSpec entries or 'fsdp'.")

  def leaf_sharding(path, leaf):
    name = path_name(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        shape = getattr(leaf, "shape", ())
        if spec == "fsdp":
          return NamedSharding(mesh, fsdp_spec(shape, fsdp_axes, mesh, fsdp_min_size))
        if len(spec) > len(shape):
          raise ValueError(f"Sharding rule {pattern.pattern!r} -> {spec} has more entries than "
                           f"parameter {name} has dimensions {tuple(shape)}.")
        for dim, axis in zip(shape, spec):
          if axis is not None:
            size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
            if dim % size:
              raise ValueError(f"Parameter {name} of shape {tuple(shape)} cannot be sharded by "
                               f"rule {pattern.pattern!r} -> {spec}: {dim} is not divisible by "
                               f"{size}.")
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)
