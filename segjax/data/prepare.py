"""Prepares a dataset from its archives once, ahead of training.

  python -m segjax.data.prepare voc2012_aug --manual_dir ~/archives

Reads the archives in the manual dir, writes the ArrayRecord files to the tfds
data dir and prints each split's size. Training prepares a missing dataset on
first use as well; this command does it up front (and on one host of a pod,
before the others start).
"""
import argparse
import sys

from segjax.data.sources import DATASETS, DatasetNotFoundError, get_dataset


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("dataset", help=f"one of {', '.join(DATASETS.names())}")
  parser.add_argument("--data_dir", default="",
                      help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default="",
                      help="folder with the archives (default: <data_dir>/downloads/manual)")
  args = parser.parse_args(argv)
  try:
    dataset = get_dataset(args.dataset, args.data_dir, args.manual_dir)
    sizes = {split: len(dataset.source(split)) for split in dataset.splits}
  except (DatasetNotFoundError, KeyError, ValueError) as e:
    print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  print(f"{dataset.name}: {dataset.num_classes} classes; " +
        ", ".join(f"{split} {n:,}" for split, n in sizes.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
