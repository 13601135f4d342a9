"""One path type for every file of a run: local paths and gs:// bucket URLs alike.

`path(value)` is an `etils.epath.Path`: pathlib's API on a local disk, and on Google
Cloud Storage through gcsfs (TensorFlow is no dependency, so epath takes its fsspec
backend). orbax and tensorstore read and write checkpoints in buckets themselves, and
tensorboardX writes gs:// event files with google-cloud-storage. URLs of any other
scheme are refused with a sentence: some writer (TensorBoard, the profiler) would
otherwise fall back on a local folder named after the URL.

Writes are whole or absent: a local file is written to a temporary file in its folder
and renamed; a cloud object appears only when its upload completes, so it is written
directly (a bucket has no rename: gcsfs would copy and delete).
"""
import contextlib
import io
import os
import shutil
import tempfile
from typing import Iterator, Union

from etils import epath

SCHEMES = ("gs",)
PathLike = Union[str, os.PathLike]


def is_url(value: PathLike) -> bool:
  """Whether `value` is a scheme://... URL rather than a local path."""
  return "://" in os.fspath(value)


def path(value: PathLike) -> epath.Path:
  """`value` as an epath.Path; ValueError for a URL scheme segjax does not support."""
  text = os.fspath(value)
  scheme, sep, _ = text.partition("://")
  if sep and scheme not in SCHEMES:
    raise ValueError(f"{text}: segjax reads and writes run files on local disks and in "
                     f"{', '.join(s + '://' for s in SCHEMES)} buckets only; give a local path "
                     "or a gs://bucket/folder URL.")
  return epath.Path(text)


def absolute(value: PathLike) -> epath.Path:
  """`path(value)`, made absolute (and ~ expanded) when it is local."""
  if is_url(value):
    return path(value)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def storage_errors() -> tuple:
  """The exceptions a failed read or write raises: OSError, and gcsfs's HttpError (a
  bucket's error that gcsfs does not map onto an OSError)."""
  try:
    from gcsfs.retry import HttpError
  except ImportError:
    return (OSError,)
  return (OSError, HttpError)


def write_bytes(target: PathLike, data: bytes) -> None:
  """Writes `data` to `target`, whole or not at all (see the module docstring)."""
  target = path(target)
  if is_url(target):
    target.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
    os.replace(tmp, os.fspath(target))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(target: PathLike, text: str) -> None:
  write_bytes(target, text.encode("utf-8"))


def save_image(image, target: PathLike, **options) -> None:
  """Saves a PIL image (format from `target`'s suffix; `options` as PIL's save takes)."""
  buffer = io.BytesIO()
  image.save(buffer, format=epath.Path(os.fspath(target)).suffix.lstrip(".").upper()
             .replace("JPG", "JPEG"), **options)
  write_bytes(target, buffer.getvalue())


def read_bytes(source: PathLike) -> bytes:
  return path(source).read_bytes()


@contextlib.contextmanager
def local_copy(source: PathLike) -> Iterator[str]:
  """The name of a local file with `source`'s content, for readers that need one
  (torch.load, safetensors): `source` itself when local, else a temporary copy."""
  if not is_url(source):
    yield os.fspath(source)
    return
  source = path(source)
  with tempfile.TemporaryDirectory(prefix="segjax_") as folder:
    local = os.path.join(folder, source.name)
    with open(local, "wb") as out, source.open("rb") as f:
      shutil.copyfileobj(f, out, 1 << 24)
    yield local


def upload_tree(local_folder: str, target: PathLike) -> None:
  """Copies the files under `local_folder` to the same places under `target`."""
  target = path(target)
  for root, _, files in os.walk(local_folder):
    relative = os.path.relpath(root, local_folder)
    folder = target if relative == "." else target / relative
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        (folder / name).write_bytes(f.read())


def move_tree(source: PathLike, target: PathLike) -> None:
  """Moves the folder `source` to `target` (which must not exist). Local: one rename.
  In a bucket, where folders are name prefixes: a server-side copy of every object,
  then the removal of the originals, so that nothing is lost if it is cut off."""
  source, target = path(source), path(target)
  if not is_url(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(os.fspath(source), os.fspath(target))
    return
  # epath's own gcsfs instance, so that its cached listings (which orbax's step list
  # reads) see the move.
  from etils.epath import backend
  fs = backend.fsspec_backend.fs(os.fspath(source))
  fs.copy(os.fspath(source), os.fspath(target), recursive=True)
  fs.rm(os.fspath(source), recursive=True)
  fs.invalidate_cache()
