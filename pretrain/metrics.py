"""Metric sinks and MFU bookkeeping.

`MetricWriter` sends each step's scalars to the sinks named by `config.train.loggers`: one
`Sink` subclass each (`metrics.jsonl`, TensorBoard via tensorboardX, Weights & Biases), listed
in SINKS (docs/configuration.md 2). Only process 0 writes; every process may log to the
console.
"""

from __future__ import annotations

import importlib.util
import json
import math
import logging as logging_std
import os
import platform
import secrets
import shutil
import socket
import string
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax

# Dense bfloat16 peak FLOP/s of one JAX device, keyed by the exact `device.device_kind`.
# The strings are the ones jax reports (TPU: jax/_src/pallas/mosaic/tpu_info.py maps the same
# names to chip versions; GPU: the CUDA device name). Figures: Google Cloud TPU "System
# architecture" pages (per chip; v2 and v3 chips have two TensorCores, each its own device,
# so half the chip's figure), NVIDIA datasheets (tensor-core BF16 without sparsity, i.e. half
# the "with sparsity" figure; V100 has no bf16: its FP16 tensor-core figure).
PEAK_FLOPS_BY_DEVICE_KIND = {
  'TPU v2': 45e12 / 2,
  'TPU v3': 123e12 / 2,
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,
  'TPU v5e': 197e12,  # v5e
  'TPU v5': 459e12,
  'TPU v5p': 459e12,  # v5p
  'TPU v6 lite': 918e12,
  'TPU v6e': 918e12,  # v6e (Trillium)
  'NVIDIA H200': 989e12,  # H200 SXM
  'NVIDIA H200 NVL': 835e12,
  'NVIDIA H100 80GB HBM3': 989e12,  # H100 SXM
  'NVIDIA H100 PCIe': 756e12,
  'NVIDIA H100 NVL': 835e12,
  'NVIDIA A100-SXM4-40GB': 312e12,
  'NVIDIA A100-SXM4-80GB': 312e12,
  'NVIDIA A100-PCIE-40GB': 312e12,
  'NVIDIA A100 80GB PCIe': 312e12,
  'NVIDIA L40S': 362e12,
  'NVIDIA L4': 121e12,
  'Tesla V100-SXM2-16GB': 125e12,
  'Tesla V100-SXM2-32GB': 125e12,
  'Tesla V100-PCIE-16GB': 112e12,
  'Tesla V100-PCIE-32GB': 112e12,
}


def peak_flops_per_device(device_kind: str) -> float:
  """The dense bf16 peak FLOP/s of one device of `device_kind` (exact match), or 0.0 if the
  table does not know it (no substring guessing: 'NVIDIA L40S' is not an 'L4')."""
  return PEAK_FLOPS_BY_DEVICE_KIND.get(device_kind.strip(), 0.0)


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def matmul_peak_cache_path() -> str:
  """Where measured matmul peaks are cached: $XDG_CACHE_HOME (or ~/.cache)/encoder-pretrain/."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'encoder-pretrain', 'matmul_peak.json')


def measured_matmul_peak(dtype: str = 'float32', size: int = 2048, refresh: bool = False) -> float:
  """FLOP/s of a large jitted [size, size] x [size, size] matmul on this process's first device.

  The best of 5 timed runs of 4 chained matmuls (2 size^3 FLOPs each), after compilation. On
  CPU this is the rate of all cores together (XLA's CPU matmuls use every core), the realistic
  ceiling for MFU there (docs/design.md 10). The result is cached in
  `matmul_peak_cache_path()` keyed by platform, processor, core count, jax version, dtype and
  size, so a run measures it once per machine (about a second); `refresh` measures again and
  keeps the higher of the two (a measurement on a busy machine is low, never high).

  Args:
    dtype: a jnp dtype name ('float32', 'bfloat16').
    size: the matrix side (2048: large enough to reach the CPU's peak, 64 MiB in float32).

  Returns:
    FLOP/s (float).
  """
  # This process's own device: jax.devices()[0] belongs to process 0, and on any other process
  # the matmul would run there (or nowhere) and time nothing.
  device = jax.local_devices()[0]
  key = '|'.join(
    [
      device.platform,
      device.device_kind,
      _cpu_model(),
      str(os.cpu_count()),
      jax.__version__,
      dtype,
      str(size),
    ]
  )
  path = matmul_peak_cache_path()
  cache = {}
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    pass
  if not refresh and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
    return float(cache[key])
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jax.device_put(jnp.ones((size, size), dtype) / size, device)

  @jax.jit
  def chain(x):
    for _ in range(4):  # x stays ~1/size-scaled: no overflow, no denormals
      x = x @ a
    return x

  jax.block_until_ready(chain(a))
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(chain(a))
    best = min(best, time.perf_counter() - start)
  # A machine busy with other work measures low, and a low peak inflates every MFU after it:
  # keep the best rate ever measured here, so a quiet re-measurement (refresh) corrects it.
  previous = cache.get(key)
  flops = max(
    4 * 2 * size**3 / best, float(previous) if isinstance(previous, (int, float)) else 0.0
  )
  cache[key] = flops
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(cache, f, indent=1)
    os.replace(tmp, path)
  except OSError as e:  # a read-only home only costs a re-measure next time
    logging.warning('could not cache the measured matmul peak in %s: %s', path, e)
  return flops


def peak_flops(configured: float = 0.0, dtype: str = 'float32') -> float:
  """Total peak FLOP/s of all devices of this job (MFU's denominator).

  Args:
    configured: per-device peak from config.train.peak_flops_per_device; 0 = look up.
    dtype: the compute dtype (config.model.dtype); used for the CPU measurement.

  Returns:
    Peak FLOP/s summed over all devices: the configured figure x devices; on CPU the measured
    `dtype` matmul rate of this host (however many fake devices share its cores) x processes;
    on TPU/GPU the dense bf16 table figure x devices. 0 if unknown (MFU is then not reported).
  """
  devices = jax.devices()
  if configured > 0:
    return configured * len(devices)
  if devices[0].platform == 'cpu':
    return measured_matmul_peak(dtype) * jax.process_count()
  flops = peak_flops_per_device(devices[0].device_kind)
  if not flops:
    logging.warning(
      'MFU not reported: device kind %r is not in the peak FLOP/s table '
      '(pretrain/metrics.py); set --config.train.peak_flops_per_device',
      devices[0].device_kind,
    )
  return flops * len(devices)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


# A remote workdir's metrics.jsonl and TensorBoard events go to the bucket at most this often
# (and at close): GCS allows about one write per second to an object, and each upload sends
# only what is new (metrics.jsonl lines appended by object composition, TensorBoard events as
# one new object each), so the bytes sent stay proportional to what the run logs.
REMOTE_UPLOAD_SECONDS = 30.0


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


def _failure_kind(e: BaseException) -> str:
  """What a failed upload is, for warning once per kind: the exception class and the HTTP
  status where there is one ('Forbidden 403')."""
  code = getattr(e, 'code', None)
  return f'{type(e).__name__} {code}' if isinstance(code, int) else type(e).__name__


# ----------------------------------------------------------------------------- sinks

# What --config.train.loggers means when no config is given (older callers, tests).
DEFAULT_LOGGERS = 'tensorboard,jsonl'
# W&B project when the config names none (docs/configuration.md 2).
DEFAULT_WANDB_PROJECT = 'encoder-pretrain'
# `<workdir>/wandb_run.json`: {'id': W&B run id, 'last_step': the last step sent to it}.
WANDB_RUN_FILE = 'wandb_run.json'


class LoggerError(ValueError):
  """A bad --config.train.loggers, or a sink that cannot start; the message says the fix."""


def read_lines(path) -> list[dict]:
  """The JSON object lines of `path` (an etils path, e.g. a run's metrics.jsonl), torn lines
  (a kill mid-write) skipped; [] when the file is missing or unreadable."""
  try:
    text = path.read_text()
  except Exception:  # pylint: disable=broad-except
    return []
  out = []
  for line in text.splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict):
      out.append(record)
  return out


class Sink:
  """One destination of scalar metrics (docs/configuration.md 2).

  A new sink is one subclass (`write`, and `close` if it holds anything; `open` if it needs
  the config or the start step) plus its name in SINKS. `MetricWriter` calls `write` with
  non-decreasing steps, and per step first the 'train' scalars, then any others ('eval',
  'probe'); only on process 0.
  """

  @classmethod
  def open(cls, workdir: str, config, start_step: int) -> Sink:
    """The sink of a run.

    Args:
      workdir: the run directory (local or gs://).
      config: the run's resolved ConfigDict, or None (the defaults).
      start_step: the step the run starts from (the restored step; 0 for a fresh start).
    """
    del config, start_step
    return cls(workdir)

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """Records `scalars` ({name: value}) of `split` ('train', 'eval', ...) at `step`."""
    raise NotImplementedError

  def write_text(self, tag: str, text: str) -> None:
    """Free text under `tag`; sinks without a place for text ignore it."""
    del tag, text

  def close(self) -> None:
    """Flushes and releases what the sink holds."""


class JsonlSink(Sink):
  """`<workdir>/metrics.jsonl`: one line {'step', 'split', 'time' (seconds since the epoch),
  **scalars} per write; `launch.report` reads it and `truncate_history` keeps it honest.

  A local workdir gets each line appended and flushed. A remote one (a bucket has no appends)
  gets the lines written since its last upload at most every REMOTE_UPLOAD_SECONDS and at
  close. On gs:// they are appended by object composition: the new lines go up as a temporary
  object, `compose([metrics.jsonl, tmp])` replaces metrics.jsonl (with a generation-match
  precondition, so a retried compose cannot append twice) and the temporary is deleted; each
  line is sent once. Where an append fails, and on other schemes, the whole file is rewritten
  through `etils.epath`. A failed upload is a warning (once per kind of failure), never the end
  of the run; its lines go with the next upload.
  """

  def __init__(self, workdir: str):
    path = epath.Path(workdir) / 'metrics.jsonl'
    self._file = None
    self._remote = is_remote(workdir)
    if self._remote:
      self._remote_path, self._uploaded, self._warned = path, 0.0, set()
      self._gcs = gcs_location(str(path))
      # gs://: the lines not uploaded yet, and the object's (generation, size) as this sink
      # last wrote it (None: not read yet; generation 0: no object). Elsewhere: every line.
      self._generation = self._size = None
      self._appends = 0
      if self._gcs is None:
        self._lines = path.read_text().splitlines(True) if path.exists() else []
      else:
        self._lines = []
    else:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(path, 'a', encoding='utf-8')

  def write(self, step, split, scalars):
    record = {'step': int(step), 'split': split, 'time': time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    line = json.dumps(record) + '\n'
    if self._remote:
      self._lines.append(line)
      if time.time() - self._uploaded >= REMOTE_UPLOAD_SECONDS:
        self._upload()
    else:
      self._file.write(line)
      self._file.flush()

  def _upload(self):
    self._uploaded = time.time()
    if self._gcs is not None and not self._lines:
      return
    try:
      if self._gcs is None:
        self._remote_path.write_text(''.join(self._lines))
      else:
        data = ''.join(self._lines).encode('utf-8')
        try:
          self._append(data)
        except Exception:  # pylint: disable=broad-except
          self._rewrite(data)
        self._lines = []
    except Exception as e:  # pylint: disable=broad-except
      kind = _failure_kind(e)
      if kind not in self._warned:
        self._warned.add(kind)
        logging.warning(
          'could not write %s (%s); retrying at the next upload (this warning is not repeated '
          'for this kind of failure)',
          self._remote_path,
          e,
        )

  def _rewrite(self, data: bytes):
    """The fallback of a failed append: the whole file rewritten through etils.epath (the
    way other schemes go; it also works where google-cloud-storage has no credentials, and
    turns a composite object back into a plain one). If the object already ends with `data`
    at the size an append would give, the append went through and nothing is written."""
    old = self._remote_path.read_bytes() if self._remote_path.exists() else b''
    if self._size is not None and len(old) == self._size + len(data) and old.endswith(data):
      self._generation = None
      return
    self._remote_path.write_bytes(old + data)
    self._generation = self._size = None  # read again at the next append

  def _stat(self, bucket, name: str) -> tuple[int, int]:
    blob = bucket.get_blob(name)
    return (0, 0) if blob is None else (int(blob.generation), int(blob.size))

  def _append(self, data: bytes):
    """Appends `data` to the gs:// metrics.jsonl (creates it if there is none)."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    bucket_name, name = self._gcs
    bucket = gcs_client().bucket(bucket_name)
    if self._generation is None:
      self._generation, self._size = self._stat(bucket, name)
    dest = bucket.blob(name)
    try:
      if self._generation == 0:
        dest.upload_from_string(data, content_type='text/plain', if_generation_match=0)
      else:
        tmp = bucket.blob(f'{name}.append-{os.getpid()}-{self._appends}')
        self._appends += 1
        tmp.upload_from_string(data, content_type='text/plain', if_generation_match=0)
        try:
          dest.compose([bucket.blob(name), tmp], if_generation_match=self._generation)
        finally:
          try:
            tmp.delete()
          except Exception:  # pylint: disable=broad-except
            pass  # a stray temporary object; metrics.jsonl itself is whole
    except exceptions.PreconditionFailed:
      # The object is not the one this sink last wrote: a retried request whose first try
      # went through (then it holds exactly our lines more), or another writer.
      expected = self._size + len(data)
      self._generation, self._size = self._stat(bucket, name)
      if self._size == expected:
        return
      raise
    self._generation, self._size = int(dest.generation), int(dest.size)

  def close(self):
    if self._remote:
      self._upload()
    if self._file is not None:
      self._file.close()


class TensorBoardSink(Sink):
  """TensorBoard events under `<workdir>/tensorboard` (tensorboardX): scalar `<split>/<name>`
  at the step.

  A local workdir gets one event file, flushed at every write. A remote one: tensorboardX
  writes a local temporary file; at most every REMOTE_UPLOAD_SECONDS (and at close) that file
  is closed, uploaded as its own object `tensorboard/events.out.tfevents.<seconds>.
  <microseconds>.<host>.<pid>` (the time it was started: TensorBoard reads a directory's event
  files in name order) and a new one is started, so each event is sent once. A failed upload
  is a warning (once per kind of failure), never the end of the run: the file is kept and goes
  up at the next upload, before any newer one.
  """

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._summary_writer = SummaryWriter
    self._remote = is_remote(workdir)
    if not self._remote:
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      return
    self._remote_dir = str(workdir).rstrip('/') + '/tensorboard'
    self._gcs = gcs_location(self._remote_dir)
    self._local = tempfile.mkdtemp(prefix='tensorboard-')
    self._pending: list[tuple[str, str]] = []  # (closed local file, object name), oldest first
    self._warned = set()
    self._files = 0
    self._uploaded = 0.0
    self._open()

  def _open(self):
    self._files += 1
    self._started = time.time()
    self._dir = os.path.join(self._local, f'{self._files:06d}')
    self._tb = self._summary_writer(self._dir)
    self._dirty = False

  def _finish_file(self):
    """Closes the current local file; queues it for upload if it holds any event."""
    self._tb.close()
    if not self._dirty:
      shutil.rmtree(self._dir, ignore_errors=True)
      return
    seconds, micros = divmod(int(self._started * 1e6), 1_000_000)
    name = f'events.out.tfevents.{seconds:010d}.{micros:06d}.{socket.gethostname()}.{os.getpid()}'
    for f in sorted(os.listdir(self._dir)):
      self._pending.append((os.path.join(self._dir, f), name))

  def _put(self, local: str, name: str):
    if self._gcs is None:
      (epath.Path(self._remote_dir) / name).write_bytes(epath.Path(local).read_bytes())
      return
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    bucket, prefix = self._gcs
    try:
      gcs_client().bucket(bucket).blob(f'{prefix}/{name}').upload_from_filename(
        local, content_type='application/octet-stream', if_generation_match=0
      )
    except exceptions.PreconditionFailed:  # it exists: a retried upload whose first try landed
      pass

  def _upload_pending(self):
    """Uploads the closed files in order; stops at the first failure (a warning)."""
    self._uploaded = time.time()
    while self._pending:
      local, name = self._pending[0]
      try:
        self._put(local, name)
      except Exception as e:  # pylint: disable=broad-except
        kind = _failure_kind(e)
        if kind not in self._warned:
          self._warned.add(kind)
          logging.warning(
            'could not upload TensorBoard events to %s/%s (%s); training goes on, the events '
            'are kept and retried at the next upload (this warning is not repeated for this '
            'kind of failure)',
            self._remote_dir,
            name,
            e,
          )
        return
      shutil.rmtree(os.path.dirname(local), ignore_errors=True)
      self._pending.pop(0)

  def write(self, step, split, scalars):
    for k, v in scalars.items():
      self._tb.add_scalar(f'{split}/{k}', float(v), int(step))
    if not self._remote:
      self._tb.flush()
      return
    self._dirty = True
    if time.time() - self._uploaded >= REMOTE_UPLOAD_SECONDS:
      self._finish_file()
      self._open()
      self._upload_pending()

  def write_text(self, tag, text):
    self._tb.add_text(tag, text, 0)
    if self._remote:
      self._dirty = True

  def close(self):
    if not self._remote:
      self._tb.close()
      return
    self._finish_file()
    self._upload_pending()
    if self._pending:
      logging.warning(
        'TensorBoard events not uploaded to %s are left in %s (upload them by hand)',
        self._remote_dir,
        self._local,
      )
    else:
      shutil.rmtree(self._local, ignore_errors=True)


def new_wandb_run_id() -> str:
  """A new W&B run id: 8 random base-36 characters, as W&B makes them (its generator is not
  public API)."""
  return ''.join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(8))


def _split_names(value: str) -> list[str]:
  return [v.strip() for v in str(value).split(',') if v.strip()]


class WandbSink(Sink):
  """Weights & Biases (`pip install 'encoder-pretrain[wandb]'`): the scalars TensorBoard gets
  (`<split>/<name>` at the run's step), the resolved config once at start, and project,
  entity, run name and tags from `config.train.wandb_*`. W&B's own files go under
  `<workdir>/wandb` (a remote workdir: under $WANDB_DIR, else the current directory); with
  WANDB_MODE=offline nothing leaves the machine and `wandb sync <workdir>/wandb/offline-run-*`
  uploads later.

  Resume: `<workdir>/wandb_run.json` keeps the run id and the last step sent. A resumed run
  (start_step > 0) continues that W&B run (`wandb.init(id=..., resume='allow')`); a fresh
  start (step 0) begins a new one. W&B cannot take back history (online it drops steps below
  its last one with a warning; an offline directory would hold them twice), so steps up to the
  last one sent, which the killed run logged after its last checkpoint, are not sent again:
  W&B keeps the killed run's values for them while `metrics.jsonl` has the resumed run's
  (docs/configuration.md 2). The record is written before each step is sent, so a step is sent
  at most once; on a remote workdir it is rewritten at most every REMOTE_UPLOAD_SECONDS (and
  at close), and W&B online drops the few steps a resume may send again.

  Errors after the start (W&B's service gone, a full disk) are a warning, never the end of the
  run.
  """

  @classmethod
  def open(cls, workdir, config, start_step):
    t = config.train if config is not None else None
    get = lambda field, default: getattr(t, field, default) if t is not None else default
    return cls(
      workdir,
      project=get('wandb_project', DEFAULT_WANDB_PROJECT),
      entity=get('wandb_entity', ''),
      name=get('wandb_run_name', ''),
      tags=_split_names(get('wandb_tags', '')),
      config=json.loads(config.to_json_best_effort()) if config is not None else None,
      start_step=start_step,
    )

  def __init__(
    self,
    workdir: str,
    *,
    project: str = DEFAULT_WANDB_PROJECT,
    entity: str = '',
    name: str = '',
    tags: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    start_step: int = 0,
  ):
    """Starts (or continues) the W&B run of `workdir`.

    Args:
      workdir: the run directory (local or gs://).
      project, entity: where the run goes ('' entity: the API key's default entity).
      name: the run's display name ('' = the workdir's name).
      tags: the run's tags.
      config: the resolved config (nested dict), logged once at start.
      start_step: the restored step (0 for a fresh start: a new W&B run).

    Raises:
      LoggerError: wandb is not installed, or the run did not start (no login, no network
        while online), as one paragraph naming the fixes.
    """
    wandb = _import_wandb()
    self._record_path = epath.Path(workdir) / WANDB_RUN_FILE
    self._remote = is_remote(workdir)
    if not self._remote:
      os.makedirs(workdir, exist_ok=True)
    self._saved = 0.0
    record = self._read_record()
    if start_step > 0 and record.get('id'):
      run_id = str(record['id'])
      self._last = max(int(record.get('last_step', 0)), start_step)
    else:
      if record.get('id'):
        logging.info(
          'a fresh start in %s: a new W&B run (the previous one, %s, is left as it is)',
          workdir,
          record['id'],
        )
      run_id, self._last = new_wandb_run_id(), start_step
    self.run_id = run_id
    self._skip_through = self._last  # steps the W&B run already has
    self._save_record(force=True)
    name = name or str(workdir).rstrip('/').rsplit('/', 1)[-1]
    local_dir = None if self._remote else str(workdir)
    try:
      self._run = wandb.init(
        project=project or DEFAULT_WANDB_PROJECT,
        entity=entity or None,
        name=name,
        tags=list(tags) or None,
        id=run_id,
        resume='allow',
        dir=local_dir,
        config=dict(config) if config is not None else None,
        # Each writer owns its run (a fine-tuning sweep opens one per learning rate and seed).
        reinit='create_new',
      )
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise LoggerError(
        f'--config.train.loggers includes wandb, but the W&B run did not start ({first}). '
        f'Log in once (`wandb login`, or set WANDB_API_KEY), or log without a network with '
        f'WANDB_MODE=offline and upload later with `wandb sync '
        f'{local_dir or "."}/wandb/offline-run-*`, or drop wandb from --config.train.loggers.'
      ) from None
    # Online, a resumed W&B run knows its own last step (a record may lag behind it).
    if getattr(self._run, 'resumed', False):
      self._skip_through = max(self._skip_through, int(self._run.starting_step) - 1)
    self._warned_skip = self._warned_error = False

  def _read_record(self) -> dict[str, Any]:
    try:
      record = json.loads(self._record_path.read_text()) if self._record_path.exists() else {}
    except (OSError, ValueError) as e:  # a torn record: start a new W&B run, keep training
      logging.warning('ignoring %s (%s): a new W&B run starts', self._record_path, e)
      return {}
    return record if isinstance(record, dict) else {}

  def _save_record(self, force: bool = False):
    if self._remote and not force and time.time() - self._saved < REMOTE_UPLOAD_SECONDS:
      return
    text = json.dumps({'id': self.run_id, 'last_step': self._last})
    try:
      if self._remote:
        self._record_path.write_text(text)
      else:
        tmp = self._record_path.parent / f'{WANDB_RUN_FILE}.{os.getpid()}.tmp'
        tmp.write_text(text)
        tmp.replace(self._record_path)
    except OSError as e:
      logging.warning(
        'could not write %s (%s); a resume may start a new W&B run', self._record_path, e
      )
    self._saved = time.time()

  def write(self, step, split, scalars):
    step = int(step)
    if step <= self._skip_through:
      if not self._warned_skip:
        logging.warning(
          'W&B run %s already has steps up to %d (logged after the checkpoint this run '
          "resumed from); not sending them again (metrics.jsonl has this run's values)",
          self.run_id,
          self._skip_through,
        )
        self._warned_skip = True
      return
    if step > self._last:
      self._last = step
      self._save_record()
    try:
      self._run.log({f'{split}/{k}': float(v) for k, v in scalars.items()}, step=step)
    except Exception as e:  # pylint: disable=broad-except
      if not self._warned_error:
        logging.warning('W&B could not log step %d (%s); training goes on', step, e)
        self._warned_error = True

  def close(self):
    self._save_record(force=True)
    try:
      self._run.finish()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('W&B run %s did not finish cleanly (%s)', self.run_id, e)


# Every sink by its name in --config.train.loggers; a new sink is one entry here.
SINKS: dict[str, type[Sink]] = {
  'tensorboard': TensorBoardSink,
  'jsonl': JsonlSink,
  'wandb': WandbSink,
}


def _import_wandb():
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise LoggerError(_NO_WANDB) from None
  return wandb


_NO_WANDB = (
  '--config.train.loggers includes wandb, but the wandb package is not installed; install it '
  "with `pip install 'encoder-pretrain[wandb]'` (or `pip install wandb`), or drop wandb from "
  '--config.train.loggers.'
)


def parse_loggers(value: str | Sequence[str]) -> tuple[str, ...]:
  """The sink names of --config.train.loggers (comma-separated, or a sequence), in order,
  each once; '' = none (the console only).

  Raises:
    LoggerError: a name that is not in SINKS.
  """
  names = _split_names(value) if isinstance(value, str) else [str(v).strip() for v in value]
  names = list(dict.fromkeys(n.lower() for n in names if n))
  unknown = [n for n in names if n not in SINKS]
  if unknown:
    raise LoggerError(
      f'--config.train.loggers={value!r}: {unknown[0]!r} is not a logger; use a '
      f'comma-separated list of {", ".join(SINKS)} (default {DEFAULT_LOGGERS!r}; empty: the '
      f'console only), e.g. --config.train.loggers={DEFAULT_LOGGERS},wandb.'
    )
  return tuple(names)


def validate_loggers(train_config) -> tuple[str, ...]:
  """Checks `config.train.loggers` before any work starts (every process gives the same
  answer): known names, and wandb installed where it is asked for.

  Returns:
    The sink names.

  Raises:
    LoggerError: an unknown name, or wandb without the wandb package.
  """
  names = parse_loggers(train_config.loggers)
  if 'wandb' in names and importlib.util.find_spec('wandb') is None:
    raise LoggerError(_NO_WANDB)
  return names


class MetricWriter:
  """Sends scalar metrics to the run's sinks: `config.train.loggers` (without a config,
  DEFAULT_LOGGERS: `metrics.jsonl` and TensorBoard under `workdir`), docs/configuration.md 2.

  Args:
    workdir: the run directory (local or gs://).
    enabled: write at all (True on process 0 only: sinks write files and one W&B run).
    tensorboard: False leaves TensorBoard out whatever the loggers say (older callers' switch).
    config: the run's resolved ConfigDict: train.loggers, train.wandb_*, and the config W&B
      records. None: DEFAULT_LOGGERS and W&B's defaults.
    loggers: overrides config.train.loggers (comma-separated names, or a sequence).
    start_step: the step this run starts from (the restored step; 0 for a fresh start); W&B
      continues the workdir's run only when it is > 0.

  Raises:
    LoggerError: an unknown logger, or a sink that cannot start (wandb missing, W&B login).
  """

  def __init__(
    self,
    workdir: str,
    enabled: bool = True,
    tensorboard: bool = True,
    *,
    config=None,
    loggers: str | Sequence[str] | None = None,
    start_step: int = 0,
  ):
    if loggers is None:
      loggers = config.train.loggers if config is not None else DEFAULT_LOGGERS
    names = parse_loggers(loggers)
    if not tensorboard:
      names = tuple(n for n in names if n != 'tensorboard')
    self.sinks: list[Sink] = []
    if not enabled:
      return
    try:
      for name in names:
        self.sinks.append(SINKS[name].open(workdir, config, int(start_step)))
    except BaseException:
      self.close()
      raise

  def write(self, step: int, split: str, scalars: Mapping[str, float]):
    """Sends {name: value} of `split` ('train', 'eval', ...) at `step` to every sink."""
    for sink in self.sinks:
      sink.write(step, split, scalars)

  def write_text(self, tag: str, text: str):
    for sink in self.sinks:
      sink.write_text(tag, text)

  def close(self):
    """Closes every sink (all of them, even if one fails; the first failure is raised)."""
    error = None
    for sink in self.sinks:
      try:
        sink.close()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    self.sinks = []
    if error is not None:
      raise error


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
  """loss, accuracy and perplexity from summed metrics ({'loss_sum', 'correct_sum',
  'weight_sum'}; perplexity capped at exp(50))."""
  w = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / w
  return {
    'loss': loss,
    'accuracy': float(sums['correct_sum']) / w,
    'perplexity': math.exp(min(loss, 50.0)),
  }


def truncate_history(workdir: str, step: int) -> int:
  """Keeps `metrics.jsonl` honest on (re)start: lines past `step` (the restored step; 0 for a
  fresh start) came from a run whose checkpoints are gone or older, so they move to
  `metrics.dropped.jsonl` (appended, never deleted) with a warning. Torn lines (not a whole
  metrics record: a process killed while writing one) are dropped with a warning of their own;
  they hold no record to keep, and the next write would otherwise be glued onto them.

  Args:
    workdir: the run directory (local or gs://).
    step: the restored step (0 for a fresh start).

  Returns:
    The number of lines taken out of `metrics.jsonl` (moved or torn).
  """
  root = epath.Path(workdir)
  path = root / 'metrics.jsonl'
  if not path.exists():
    return 0
  lines = path.read_text().splitlines(True)
  keep, drop, torn = [], [], []
  for line in lines:
    try:
      later = int(json.loads(line)['step']) > step
    except (ValueError, KeyError, TypeError):
      torn.append(line)
      continue
    (drop if later else keep).append(line)
  if torn:
    logging.warning(
      '%s had %d torn line(s) (not a whole metrics record: a run was killed '
      'while writing it), e.g. %r; dropped them, the other lines are intact',
      path,
      len(torn),
      torn[-1].rstrip('\n')[:80],
    )
  if drop:
    logging.warning(
      '%s had %d line(s) past the restored step %d (written after that '
      'checkpoint by a run that was killed, or whose checkpoints are gone); moved '
      'them to metrics.dropped.jsonl',
      path,
      len(drop),
      step,
    )
    dropped = root / 'metrics.dropped.jsonl'
    before = dropped.read_text() if dropped.exists() else ''
    dropped.write_text(before + ''.join(l if l.endswith('\n') else l + '\n' for l in drop))
  unterminated = bool(keep) and not keep[-1].endswith('\n')
  if unterminated:  # killed just before its newline: the next line must not be glued on
    keep[-1] += '\n'
  if drop or torn or unterminated:
    tmp = root / 'metrics.jsonl.tmp'
    tmp.write_text(''.join(keep))
    tmp.replace(path)
  return len(drop) + len(torn)


def log_line(step: int, num_steps: int, scalars: Mapping[str, Any]) -> str:
  """One console line: 'step 100/600 | loss 5.123 | acc 0.210 | lr 1.2e-03 | ...'."""
  parts = [f'step {step}/{num_steps}']
  fmt = {
    'loss': '{:.4f}',
    'accuracy': '{:.4f}',
    'learning_rate': '{:.2e}',
    'grad_norm': '{:.3f}',
    'tokens_per_sec': '{:,.0f}',
    'mfu': '{:.1%}',
    'perplexity': '{:.2f}',
  }
  names = {'tokens_per_sec': 'tokens/s', 'learning_rate': 'lr', 'accuracy': 'acc'}
  for k, v in scalars.items():
    if k in fmt:
      parts.append(f'{names.get(k, k)} {fmt[k].format(v)}')
  return ' | '.join(parts)


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO records that orbax, grain and TFDS send through the shared 'absl' logger."""

  _NOISY = (
    f'{os.sep}orbax{os.sep}',
    f'{os.sep}grain{os.sep}',
    f'{os.sep}tensorflow_datasets{os.sep}',
    f'{os.sep}etils{os.sep}',
  )

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
      n in record.pathname for n in self._NOISY
    )


def quiet_library_logs():
  """Keeps the console to this suite's lines (library warnings still show)."""
  logging_std.getLogger('absl').addFilter(_LibraryInfoFilter())
