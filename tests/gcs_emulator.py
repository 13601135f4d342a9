"""A local Google Cloud Storage server for tests: gcp-storage-emulator, in memory, on
127.0.0.1, and the environment that points every storage client of a run at it.

The clients and how they find it:
  * gcsfs (etils.epath's gs:// backend, so segjax's own files and JAX's compilation
    cache) and google-cloud-storage (tensorboardX's event files): $STORAGE_EMULATOR_HOST,
    anonymous credentials ($FSSPEC_GCS_TOKEN=anon for gcsfs; google-cloud-storage
    uses anonymous ones by itself when the emulator variable is set). gcsfs's
    experimental bucket-type probe (a gRPC call the emulator does not serve, retried
    for a minute) is turned off with $GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
  * tensorstore (orbax's checkpoint arrays): $TENSORSTORE_GCS_HTTP_URL, with the fixed
    bearer token of $GOOGLE_AUTH_TOKEN_FOR_TESTING in place of Google credentials.

The emulator (2026.7.19) leaves out of its media downloads the `x-goog-generation`
header that Cloud Storage sends and tensorstore needs (it cannot read an object
without it: "Malformed StorageGeneration"), and ignores the generation conditions of
a download; `start` adds both, as Cloud Storage documents them.
"""
import contextlib
import json
import logging
import socket
import urllib.parse
import urllib.request
from http import HTTPStatus
from typing import Dict, Iterator, List

BUCKET = "test-bucket"


def _patch_downloads() -> None:
  """Media downloads answer with the object's generation, and honour ifGenerationMatch
  (412 when it differs) and ifGenerationNotMatch (304 when it is the same)."""
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.download, "segjax_patched", False):
    return
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      return original(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    match = request.query.get("ifGenerationMatch", [None])[0]
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    if match is not None and match != generation:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    if not_match is not None and not_match == generation:
      response.status = HTTPStatus.NOT_MODIFIED
      response["x-goog-generation"] = generation
      return None
    result = original(request, response, storage, *args, **kwargs)
    response["x-goog-generation"] = generation
    return result

  download.segjax_patched = True
  objects.download = download  # objects.get (?alt=media) calls it by this name
  from gcp_storage_emulator import server
  server.HANDLERS = tuple(
      (regex, {method: download if handler is original else handler
               for method, handler in handlers.items()})
      for regex, handlers in server.HANDLERS)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def start() -> Iterator[Dict[str, str]]:
  """Runs an emulator holding an empty bucket `BUCKET`; yields the environment
  variables that point the storage clients at it."""
  from gcp_storage_emulator.server import create_server
  _patch_downloads()
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  host = f"http://127.0.0.1:{port}"
  try:
    yield {"STORAGE_EMULATOR_HOST": host, "TENSORSTORE_GCS_HTTP_URL": host,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GCS_TOKEN": "anon",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
  finally:
    server.stop()


def _quote(name: str) -> str:
  return urllib.parse.quote(name, safe="")


def objects(env: Dict[str, str], prefix: str = "") -> List[str]:
  """The names of the bucket's objects under `prefix`, read over the JSON API."""
  names, token = [], ""
  while True:
    query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
    with urllib.request.urlopen(
        f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o?{query}") as response:
      page = json.load(response)
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken", "")
    if not token:
      return sorted(names)


def read(env: Dict[str, str], name: str) -> bytes:
  with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/"
                              f"{_quote(name)}?alt=media") as response:
    return response.read()


def write(env: Dict[str, str], name: str, data: bytes) -> None:
  request = urllib.request.Request(
      f"{env['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&"
      f"name={_quote(name)}", data=data, method="POST",
      headers={"Content-Type": "application/octet-stream"})
  urllib.request.urlopen(request).close()


def delete(env: Dict[str, str], name: str) -> None:
  request = urllib.request.Request(
      f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/{_quote(name)}",
      method="DELETE")
  urllib.request.urlopen(request).close()
