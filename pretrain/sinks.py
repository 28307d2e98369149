"""Where a run's metrics go: one `Sink` subclass per name in `config.train.loggers`
(`metrics.jsonl`, TensorBoard via tensorboardX, Weights & Biases), listed in SINKS
(docs/configuration.md 2); on a gs:// workdir each uploads what is new at most every
REMOTE_UPLOAD_SECONDS (docs/buckets.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import string
import tempfile
import time
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath

from pretrain import storage

# A remote workdir's metrics.jsonl and TensorBoard events go to the bucket at most this often
# (and at close): GCS allows about one write per second to an object, and each upload sends
# only what is new (metrics.jsonl lines appended by object composition, TensorBoard events as
# one new object each), so the bytes sent stay proportional to what the run logs.
REMOTE_UPLOAD_SECONDS = 30.0


def _failure_kind(e: BaseException) -> str:
  """What a failed upload is, for warning once per kind: the exception class and the HTTP
  status where there is one ('Forbidden 403')."""
  code = getattr(e, 'code', None)
  return f'{type(e).__name__} {code}' if isinstance(code, int) else type(e).__name__


def _warn_once_per_kind(warned: set[str], e: BaseException, message: str, *args):
  """logging.warning(message, *args) unless a failure of e's kind was warned of already (a
  bucket that refuses writes would otherwise warn at every upload); records the kind in
  `warned`."""
  kind = _failure_kind(e)
  if kind not in warned:
    warned.add(kind)
    logging.warning(message, *args)


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
  **scalars} per write; `launch.report` reads it and `metrics.truncate_history` keeps it honest.

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
    self._remote = storage.is_remote(workdir)
    if self._remote:
      self._remote_path, self._uploaded, self._warned = path, 0.0, set()
      self._gcs = storage.gcs_location(str(path))
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
      _warn_once_per_kind(
        self._warned,
        e,
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
    bucket = storage.gcs_client().bucket(bucket_name)
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
    self._remote = storage.is_remote(workdir)
    if not self._remote:
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      return
    self._remote_dir = str(workdir).rstrip('/') + '/tensorboard'
    self._gcs = storage.gcs_location(self._remote_dir)
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
      storage.gcs_client().bucket(bucket).blob(f'{prefix}/{name}').upload_from_filename(
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
        _warn_once_per_kind(
          self._warned,
          e,
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
    self._remote = storage.is_remote(workdir)
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
