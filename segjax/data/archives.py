"""Opening the dataset builders' zip and tar archives, with a damaged one reported as one
sentence naming the file instead of a BadZipFile / ReadError / EOFError traceback.

An empty or truncated archive fails either on opening (a zip's central directory is at
its end) or while a member is read; both become `CorruptArchiveError`. TFDS writes a
dataset into a temporary folder that it renames only after the last example, so a
preparation stopped by this error leaves nothing a later run would take as complete.
"""
import contextlib
import tarfile
import zipfile
import zlib
from typing import Iterator

_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError)


class CorruptArchiveError(ValueError):
  """A dataset archive that cannot be read through."""


def _message(path: str, kind: str) -> str:
  return f"{path} is not a valid {kind} archive (empty or truncated); download it again."


@contextlib.contextmanager
def open_zip(path: str) -> Iterator[zipfile.ZipFile]:
  """zipfile.ZipFile(path), its damage reported as CorruptArchiveError."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise CorruptArchiveError(_message(path, "zip")) from e
  with archive:
    try:
      yield archive
    except _READ_ERRORS as e:
      raise CorruptArchiveError(_message(path, "zip")) from e


@contextlib.contextmanager
def open_tar(path: str, mode: str = "r") -> Iterator[tarfile.TarFile]:
  """tarfile.open(path, mode), its damage reported as CorruptArchiveError."""
  try:
    archive = tarfile.open(path, mode)
  except (tarfile.TarError, zlib.error, EOFError) as e:
    raise CorruptArchiveError(_message(path, "tar")) from e
  with archive:
    try:
      yield archive
    except _READ_ERRORS as e:
      raise CorruptArchiveError(_message(path, "tar")) from e
