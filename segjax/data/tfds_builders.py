"""What segjax's tfds builders share: living inside a package, and being
prepared on first use and then read with `tfds.data_source` (no TensorFlow)."""
import tensorflow_datasets as tfds


class PackagedBuilder(tfds.core.GeneratorBasedBuilder):
  """A GeneratorBasedBuilder defined inside the segjax package."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksum or metadata files live beside these builders, so tfds needs no
    # code path. Locating one would import the `importlib_resources` backport,
    # which tfds uses but does not install on Python >= 3.9
    # (https://github.com/tensorflow/datasets/issues/11212).
    return None


def prepared_source(builder: tfds.core.GeneratorBasedBuilder, split: str,
                    download_config=None):
  """Prepares `builder` if its files are missing, then opens one split."""
  if not builder.is_prepared():
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare(download_config=download_config)
    finally:
      tfds.display_progress_bar(True)
  return tfds.data_source(builder.name, split=split, data_dir=builder.data_dir_root)
