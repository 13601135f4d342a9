"""Input pipeline: per-process shards, worker processes, and predictions
scored at the labels' original size."""
import numpy as np
import pytest
import torch

import jax.numpy as jnp
from segjax.data import pipeline
from segjax.inference import predict_at_original_size


@pytest.mark.parametrize("size,count", [(10, 2), (11, 2), (7, 3), (1, 2)])
def test_process_shards_are_disjoint_and_cover_the_split(size, count):
  source = list(range(size))
  shards = [list(pipeline.process_slice(source, i, count)) for i in range(count)]
  seen = [x for shard in shards for x in shard]
  assert sorted(seen) == source and len(seen) == len(set(seen))
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_process_index_out_of_range_is_an_error():
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    pipeline.process_slice([1, 2, 3], 2, 2)


def _records(n=12):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
           "label": rng.integers(0, 3, (8, 8, 1), dtype=np.uint8)} for _ in range(n)]


def _take(iterator, n):
  return [next(iterator)["image"].copy() for _ in range(n)]


def test_worker_processes_give_the_same_batches_and_resume_from_a_step():
  ops = "squeeze_labels|random_flip|random_crop(size=(6, 6))"
  source = _records()
  threads = pipeline.train_iterator(source, ops, 4, seed=3)
  workers = pipeline.train_iterator(source, ops, 4, seed=3, num_workers=2)
  try:
    expected = _take(threads, 5)
    got = _take(workers, 5)
  finally:
    workers.close()
  resumed = pipeline.train_iterator(source, ops, 4, seed=3, num_workers=2, start_step=2)
  try:
    again = _take(resumed, 3)
  finally:
    resumed.close()
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(expected[2:], again):
    np.testing.assert_array_equal(a, b)


def test_processes_read_their_rows_of_the_same_global_batches():
  """Two processes' local batches, stacked in process order, are the one-process
  global batches (same examples, same augmentation), past an epoch boundary."""
  ops = "squeeze_labels|random_flip|random_crop(size=(6, 6))"
  source = _records()
  whole = _take(pipeline.train_iterator(source, ops, 4, seed=5, process_count=1,
                                        process_index=0), 6)
  halves = [_take(pipeline.train_iterator(source, ops, 4, seed=5, process_count=2,
                                          process_index=p), 6) for p in range(2)]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(batch, np.concatenate([halves[0][step], halves[1][step]]))
  # Epochs are reshuffled, and the two processes never read the same rows.
  assert len(source) < 6 * 4
  with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
    pipeline.train_iterator(source, ops, 4, seed=5, process_count=3, process_index=0)


@pytest.mark.parametrize("resized,original", [((10, 14), (23, 31)), ((20, 16), (7, 9)),
                                              ((12, 12), (12, 12)), ((9, 30), (40, 33))])
def test_predictions_at_original_size_match_torch_interpolate(resized, original):
  """mmseg's rule: bilinear (align_corners=False) resize of the valid logits to
  the original size, then argmax; the padding beyond either size is ignored."""
  logits = np.random.default_rng(1).normal(size=(2, 24, 32, 5)).astype(np.float32)
  sizes = lambda s: jnp.asarray([s, s])
  ours = np.asarray(predict_at_original_size(jnp.asarray(logits), sizes(resized),
                                             sizes(original), (45, 40)))
  assert ours.shape == (2, 45, 40)
  valid = torch.from_numpy(logits[:, :resized[0], :resized[1]]).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(valid, size=original, mode="bilinear",
                                             align_corners=False).argmax(1).numpy()
  np.testing.assert_array_equal(ours[:, :original[0], :original[1]], expected)
