"""grain input pipelines that feed globally sharded batches to the train step.

Each process reads only its own slice of the index space (`[i::n]`), applies
the preprocessing ops (seeded per element, so a run is reproducible and its
iterator can be checkpointed), batches locally, and the per-process batches
are assembled into global `jax.Array`s sharded on the batch axis.
"""
from typing import Any, Dict, Iterator

import grain
import jax
import numpy as np

from segjax.data import transforms

MODEL_KEYS = ("image", "label")


def process_slice(source) -> grain.MapDataset:
  """This process's share of a random-access source."""
  return grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]


def local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f"Batch size {global_batch_size} is not divisible by the number of "
                     f"processes {jax.process_count()}.")
  return global_batch_size // jax.process_count()


def _select(keys):
  return lambda example: {k: example[k] for k in keys}


def example_shapes(source, ops: str) -> Dict[str, tuple]:
  """Shapes of the model inputs that `ops` makes from the first record."""
  example = transforms.parse_pipeline(ops)(source[0], np.random.default_rng(0))
  return {k: example[k].shape for k in MODEL_KEYS}


def train_iterator(source, ops: str, global_batch_size: int, seed: int,
                   num_threads: int = 2) -> grain.DatasetIterator:
  """An endless, per-epoch reshuffled iterator of local numpy batches.

  Its `get_state()`/`set_state()` position is saved with the checkpoints.
  """
  pipeline = transforms.parse_pipeline(ops)
  ds = process_slice(source).shuffle(seed=seed).repeat()
  ds = ds.random_map(pipeline, seed=seed).map(_select(MODEL_KEYS))
  ds = ds.batch(local_batch_size(global_batch_size), drop_remainder=True)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(read))


def eval_batches(source, ops: str, global_batch_size: int,
                 ignore_index: int) -> Iterator[Dict[str, np.ndarray]]:
  """One pass over a split in local batches of a fixed shape.

  Missing slots of the last batch are filled with blank images whose labels are
  all `ignore_index`, so they add nothing to the metrics; every process yields
  the same number of batches, as global arrays require. The eval ops must give
  every example the same shape (e.g. end with `pad`).
  """
  pipeline = transforms.parse_pipeline(ops)
  local = local_batch_size(global_batch_size)
  num_batches = -(-len(source) // global_batch_size)
  template = _select(MODEL_KEYS)(pipeline(source[0], np.random.default_rng(0)))
  blank = {"image": np.zeros_like(template["image"]),
           "label": np.full_like(template["label"], ignore_index)}
  mine = process_slice(source).random_map(pipeline, seed=0).map(_select(MODEL_KEYS))
  it = iter(mine.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))
  for _ in range(num_batches):
    examples = [e for e, _ in zip(it, range(local))]
    examples += [blank] * (local - len(examples))
    yield {k: np.stack([e[k] for e in examples]) for k in MODEL_KEYS}


def to_global(local_batch: Dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Any:
  """Assembles per-process numpy batches into global arrays sharded on axis 0."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
