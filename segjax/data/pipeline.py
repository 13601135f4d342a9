"""grain input pipelines that feed globally sharded batches to the train step.

Each process reads only its own rows of each global batch, applies the
preprocessing ops (seeded per example position, so a run is reproducible and
resumes from its step alone), batches locally, and the per-process batches are
assembled into global `jax.Array`s sharded on the batch axis. Decoding and
augmentation run in reader threads, or with `num_workers > 0` in that many
grain worker processes (the order and the random draws are the same either
way). Evaluation reads records i, i + n, ... in process i of n.
"""
import itertools
from typing import Any, Dict, Iterator, Optional, Union

import grain
from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np

from segjax.data import transforms

MODEL_KEYS = ("image", "label")
# Training keys batched when the ops make them (`unet_weights`).
OPTIONAL_TRAIN_KEYS = ("pixel_weights",)
# Instance models (Mask R-CNN): the image and padded instance rows; crowd flags and
# (image-sized or box-cropped) masks when the ops make them.
INSTANCE_KEYS = ("image", "boxes", "classes", "instance_valid")
OPTIONAL_INSTANCE_KEYS = ("is_crowd", "masks", "box_masks")
# Eval-only keys a test-time `resize(resize_labels=False)` adds, so predictions
# can be scored against labels at their original size.
SIZE_KEYS = ("original_size", "resized_size")


def process_slice(source, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> grain.MapDataset:
  """Process `process_index`'s share (default: this process) of a random-access
  source: records i, i + n, i + 2n, ... of n processes, disjoint across
  processes and together the whole source."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count}).")
  return grain.MapDataset.source(source)[index::count]


def local_batch_size(global_batch_size: int, process_count: Optional[int] = None) -> int:
  """Each process's share of the global batch (default: of this run's processes)."""
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(f"Batch size {global_batch_size} is not divisible by the number of "
                     f"processes {count}.")
  return global_batch_size // count


def _select(keys, optional=()):
  return lambda example: {k: example[k] for k in keys + tuple(k for k in optional
                                                              if k in example)}


def as_pipeline(ops: Union[str, transforms.Pipeline]) -> transforms.Pipeline:
  """A pipeline given as itself or as its spec text."""
  return ops if isinstance(ops, transforms.Pipeline) else transforms.parse_pipeline(ops)


def example_shapes(source, ops, keys=MODEL_KEYS) -> Dict[str, tuple]:
  """Shapes of the model inputs `keys` that `ops` (a Pipeline or its spec) makes from the
  first record."""
  ops = as_pipeline(ops)
  example = ops(source[0], np.random.default_rng(0))
  missing = [k for k in keys if k not in example]
  if missing:
    raise ValueError(f"The data ops {ops.spec!r} give examples without {missing} (they have "
                     f"{sorted(example)}); the model needs {list(keys)}.")
  return {k: example[k].shape for k in keys}


def train_iterator(source, ops, global_batch_size: int, seed: int,
                   num_threads: int = 2, num_workers: int = 0, keys=MODEL_KEYS,
                   optional_keys=OPTIONAL_TRAIN_KEYS, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator:
  """An endless iterator of this process's rows of every global batch, as numpy
  arrays of `keys` (and of those `optional_keys` the ops make), from step `start_step`.

  The global example order (reshuffled each epoch) and every example's random
  augmentation depend only on `seed` and the example's position, so the global
  batches are the same for any number of processes and any `num_workers`, and a
  resumed run continues exactly where it stopped from its step alone. Global batch
  s is positions [s * B, (s + 1) * B); process p reads only its rows
  [p * B / n, (p + 1) * B / n) of it, so nothing is decoded twice.
  `process_index` / `process_count` default to this process and the run's count.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if num_workers < 0 or num_threads < 1:
    raise ValueError(f"data.num_workers must be >= 0 and data.num_threads >= 1, got "
                     f"{num_workers} and {num_threads}.")
  pipeline = as_pipeline(ops)
  local = local_batch_size(global_batch_size, count)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.random_map(pipeline, seed=seed).map(_select(tuple(keys), tuple(optional_keys)))
  # Chunks of `local` consecutive positions; chunk c belongs to process c % n.
  ds = ds.batch(local, drop_remainder=True)
  ds = ds[index::count][start_step:]
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  ds = ds.to_iter_dataset(read)
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def eval_batches(source, ops, global_batch_size: int, ignore_index: int,
                 keys=MODEL_KEYS, optional_keys=()) -> Iterator[Dict[str, np.ndarray]]:
  """One pass over a split in local batches of a fixed shape.

  Missing slots of the last batch are filled with blank examples (labels all
  `ignore_index`, no valid instance), so they add nothing to the metrics; every
  process yields the same number of batches, as global arrays require: batch
  i's slot j is a real example iff i * local + j < len(process_slice(source)).
  The eval ops must give every example the same shape (e.g. end with `pad`).
  """
  pipeline = as_pipeline(ops)
  local = local_batch_size(global_batch_size)
  num_batches = -(-len(source) // global_batch_size)
  first = pipeline(source[0], np.random.default_rng(0))
  keys = tuple(keys) + tuple(k for k in tuple(optional_keys) + SIZE_KEYS if k in first)
  template = _select(keys)(first)
  blank = {k: np.zeros_like(v) for k, v in template.items()}
  if "label" in blank:
    blank["label"] = np.full_like(template["label"], ignore_index)
  mine = process_slice(source).random_map(pipeline, seed=0).map(_select(keys))
  it = iter(mine.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))
  for _ in range(num_batches):
    examples = list(itertools.islice(it, local))
    examples += [blank] * (local - len(examples))
    yield {k: np.stack([e[k] for e in examples]) for k in keys}


def eval_slots(source, global_batch_size: int, batch_index: int):
  """Which rows of `eval_batches`' batch `batch_index`, gathered from every process in
  process order (`to_host`), are real examples, and their index in the split.

  Returns (real [global batch] bool, split_index [global batch] int): process p's slot j
  holds its example batch_index * local + j, which is record p + that * process_count.
  """
  count = jax.process_count()
  local = local_batch_size(global_batch_size)
  sizes = np.asarray([len(process_slice(source, p, count)) for p in range(count)])
  slot = np.tile(np.arange(local), count) + batch_index * local
  process = np.repeat(np.arange(count), local)
  return slot < sizes[process], process + slot * count


def to_host(tree) -> Any:
  """Global arrays -> numpy arrays of the whole global batch, on every process."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def to_global(local_batch: Dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Any:
  """Assembles per-process numpy batches into global arrays sharded on axis 0."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
