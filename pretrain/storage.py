"""Workdir paths on a bucket: which paths are remote, and a google-cloud-storage client for
gs:// ones (docs/buckets.md).
"""

from __future__ import annotations

import threading


def is_remote(path: str) -> bool:
  """Whether `path` has a scheme (gs://, s3://): written through etils.epath, not `open`."""
  return '://' in str(path)


def gcs_location(path: str) -> tuple[str, str] | None:
  """(bucket, object name) of a gs:// path ('gs://b/run/x' -> ('b', 'run/x')); None for any
  other path."""
  path = str(path)
  if not path.startswith('gs://'):
    return None
  bucket, _, name = path[len('gs://') :].partition('/')
  return bucket, name.strip('/')


_gcs_client = None
_gcs_client_lock = threading.Lock()


def gcs_client(shared: bool = True):
  """A google-cloud-storage client (STORAGE_EMULATOR_HOST points it at an emulator): this
  process's shared one (made once), or with `shared=False` a new one (for another thread: a
  client's HTTP session is not meant to be shared between threads). No project: object reads
  and writes need none, and a machine whose credentials name none can still write its bucket.
  """
  from google.cloud import storage  # pylint: disable=g-import-not-at-top

  if not shared:
    return storage.Client(project=None)
  global _gcs_client
  with _gcs_client_lock:
    if _gcs_client is None:
      _gcs_client = storage.Client(project=None)
    return _gcs_client
