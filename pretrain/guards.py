"""What keeps a run safe while it trains: stop signals, the non-finite guard and the workdir
lock (docs/design.md 9).

- `StopSignals`: SIGTERM (how TPU VMs are preempted) and Ctrl-C become a stop request read at
  every step boundary; a second Ctrl-C exits at once. On several processes SIGTERM goes
  through JAX's preemption sync point (every host saves the same step), Ctrl-C through an
  agreement over the coordination service at log steps (`multihost.any_flag`).
- `Health`: reads each step's loss and skip flag one step late (which also bounds how far
  the host runs ahead of the device, so a stop request is served within about one step),
  counts consecutive non-finite steps and stops the run after `train.max_nonfinite_steps`,
  and reports a loss far above its running level as divergence.
- `WorkdirLock`: one run per workdir, held by process 0: an `fcntl` lock, on gs:// a lease
  object refreshed while the run lives.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils

from pretrain import multihost
from pretrain import storage


class RunStopped(RuntimeError):
  """The run stopped on a problem found while training (not bad input).

  Attributes:
    exit_code: what `launch.pretrain` exits with (3: non-finite steps, 4: a failed save, 5:
      another run took over the workdir's lease).
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_WORKDIR_TAKEN = 5  # another run took over a bucket workdir's lease (docs/buckets.md)
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- signals


class StopSignals:
  """SIGTERM and SIGINT as a stop request served at a step boundary.

  One process: a Python flag read at every step (no host round trip). Several processes:
  SIGTERM is left to JAX's preemption notifier and agreed through
  `multihost_utils.reached_preemption_sync_point(step)` (called at every step); Ctrl-C is
  agreed at log steps (`multihost.any_flag`, over the coordination service). A second Ctrl-C
  ends the process at once (exit 130).
  Handlers are installed only from the main thread and restored by `restore()`.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._interrupts = 0
    self.current_step = 0  # set by the loop, for the log line
    self.reason = ''
    self._previous = {}
    # With JAX's distributed runtime started (several processes, or a one-host TPU VM) its
    # preemption notifier owns SIGTERM from initialisation on; a Python handler would take
    # it away, and signals before the loop would be lost to neither.
    self._multiprocess = jax.process_count() > 1 or _distributed_runtime_started()
    if threading.current_thread() is not threading.main_thread():
      return
    signals = [signal.SIGINT] + ([] if self._multiprocess else [signal.SIGTERM])
    for signum in signals:
      previous = signal.signal(signum, self._handle)
      # None: a handler installed outside Python, which Python cannot put back.
      self._previous[signum] = signal.SIG_DFL if previous is None else previous

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        # At once, as asked: no waiting for a save in flight (orbax only renames complete
        # checkpoints, so the newest complete one stays the resume point).
        print(
          'second Ctrl-C: exiting now without a checkpoint (exit code 130)',
          file=sys.stderr,
          flush=True,
        )
        os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access
      self.reason = 'Ctrl-C'
      logging.warning(
        'Ctrl-C at step %d: saving a checkpoint at the next step boundary, then '
        'stopping (press Ctrl-C again to exit at once)',
        self.current_step,
      )
    else:
      self.reason = 'SIGTERM'
      logging.warning(
        'SIGTERM at step %d: saving a checkpoint at the next step boundary, then stopping',
        self.current_step,
      )
    self._requested.set()

  def should_stop(self, step: int, log_step: bool, start_step: int = 0) -> bool:
    """Whether to save and stop after `step` (the same answer on every process).

    Args:
      step: the step just taken (`start_step` before the first one: a request during set-up
        is served before any step).
      log_step: whether it is a log step (where a Ctrl-C is agreed across processes).
      start_step: the step this process started from (the restored checkpoint's).
    """
    if not self._multiprocess:
      return self._requested.is_set()
    # JAX's preemption sync point is one past the largest step id any process reported; ids
    # counted from this process's start (0 before the first step) let a notice received
    # during restore or compile, before any report, be served at once, also in a resumed run
    # (absolute steps would never meet the sync point 1 it then sets).
    if multihost_utils.reached_preemption_sync_point(step - start_step):
      self.reason = 'SIGTERM'
      return True
    if jax.process_count() == 1:
      return self._requested.is_set()
    if log_step:
      # Through the coordination service (a bounded wait, no device program next to the
      # step in flight): a peer that is gone raises multihost.AgreementError, not a hang.
      agreed = multihost.any_flag('stop_request', self._requested.is_set())
      self.reason = self.reason or ('Ctrl-C' if agreed else '')
      return agreed
    return False

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _distributed_runtime_started() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    return distributed.global_state.client is not None
  except (ImportError, AttributeError):
    return False


# ----------------------------------------------------------------------------- health

# A loss this far above its running level (and by at least DIVERGENCE_MIN_GAP nats) is
# reported as divergence; the level is an EMA over finite steps, trusted after WARM steps.
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_MIN_GAP = 1.0
_EMA_DECAY = 0.95
_EMA_WARM_STEPS = 20
_REPORT_EVERY_STEPS = 100


# A run resumed from a checkpoint whose first this many steps (at most max_nonfinite_steps)
# are all non-finite stops at once: the config changed for the resume, or else the checkpoint
# (values that passed or predate its checksums), not the learning rate, is the likely cause.
SUSPECT_STEPS = 3


class Health:
  """Host-side bookkeeping of the compiled step's non-finite guard (`skipped` metric).

  Args:
    max_nonfinite_steps: consecutive skipped steps after which the run stops
      (config.train.max_nonfinite_steps).
    resumed_from: the checkpoint the run restored (`<workdir>/checkpoints/<step>`; '' for a
      fresh start): its first `SUSPECT_STEPS` steps all non-finite stop the run naming it.
    resume_changes: the optim / model fields changed since that checkpoint was written
      ('optim.learning_rate: 0.002 -> 0.02'), named as the likelier cause when there are any.

  Attributes:
    streak: consecutive skipped steps up to the last observed one.
    skipped_total: skipped steps in this process's run.
  """

  def __init__(
    self, max_nonfinite_steps: int, resumed_from: str = '', resume_changes: tuple[str, ...] = ()
  ):
    self.max_nonfinite_steps = max_nonfinite_steps
    self.resumed_from = resumed_from
    self.resume_changes = tuple(resume_changes)
    self._suspect_steps = min(SUSPECT_STEPS, max_nonfinite_steps)
    self._finite_seen_since_start = False
    self.streak = 0
    self.skipped_total = 0
    self._level = None
    self._finite_seen = 0
    self._last_report = -_REPORT_EVERY_STEPS
    self._observed = 0

  def observe(self, step: int, step_metrics) -> None:
    """Reads step `step`'s {'loss_sum', 'weight_sum', 'skipped'} (blocks until that step is
    done); each step is counted once however often it is passed.

    Raises:
      RunStopped: max_nonfinite_steps consecutive steps were skipped (exit code 3).
    """
    if step <= self._observed:
      return
    self._observed = step
    m = jax.device_get({k: step_metrics[k] for k in ('loss_sum', 'weight_sum', 'skipped')})
    loss = float(m['loss_sum']) / max(float(m['weight_sum']), 1.0)
    if m['skipped']:
      self.streak += 1
      self.skipped_total += 1
      logging.warning(
        'step %d: non-finite loss or gradient (loss %s); the update was skipped '
        '(%d in a row, the run stops at %d)',
        step,
        loss,
        self.streak,
        self.max_nonfinite_steps,
      )
      if (
        self.resumed_from
        and not self._finite_seen_since_start
        and self.streak >= self._suspect_steps
      ):
        raise RunStopped(
          _resume_message(step, self.streak, self.resumed_from, self.resume_changes), EXIT_NONFINITE
        )
      if self.streak >= self.max_nonfinite_steps:
        raise RunStopped(
          f'stopped at step {step}: {self.streak} consecutive steps had a non-finite loss or '
          f'gradient, so their updates were skipped and nothing was saved since the last '
          f'good checkpoint. The learning rate is likely too high for this model: lower '
          f'--config.optim.learning_rate (or raise warmup_steps / set grad_clip_norm) and '
          f'run the same command to resume from the last good checkpoint.',
          EXIT_NONFINITE,
        )
      return
    self.streak = 0
    self._finite_seen_since_start = True
    self._check_divergence(step, loss)

  def _check_divergence(self, step: int, loss: float):
    level = self._level
    if (
      level is not None
      and self._finite_seen >= _EMA_WARM_STEPS
      and loss > max(DIVERGENCE_FACTOR * level, level + DIVERGENCE_MIN_GAP)
      and step - self._last_report >= _REPORT_EVERY_STEPS
    ):
      self._last_report = step
      logging.warning(
        'step %d: loss %.4g is %.1fx its running level %.4g: the run may be '
        'diverging (lower --config.optim.learning_rate if it persists)',
        step,
        loss,
        loss / max(level, 1e-9),
        level,
      )
    self._finite_seen += 1
    self._level = loss if level is None else _EMA_DECAY * level + (1 - _EMA_DECAY) * loss

  @property
  def healthy(self) -> bool:
    """False while the last observed step was skipped (its state must not be saved)."""
    return self.streak == 0


def _resume_message(step: int, streak: int, checkpoint: str, changes: tuple[str, ...]) -> str:
  """Why a run whose first steps after a resume were all non-finite stopped, and what to do:
  the config change made for this resume if there is one, else the checkpoint is suspect."""
  root, _, name = checkpoint.rstrip('/').rpartition('/')
  aside = f'{root.rpartition("/")[0]}/checkpoints_damaged/'
  fall_back = (
    f'move {checkpoint} into {aside} and run the same command to resume from the checkpoint '
    f'before step {name}'
  )
  head = (
    f'stopped at step {step}: {streak} consecutive steps had a non-finite loss or gradient, '
    f'the first steps after resuming from {checkpoint}; their updates were skipped and '
    f'nothing was saved after it.'
  )
  if changes:
    shown = '; '.join(changes[:4]) + ('; ...' if len(changes) > 4 else '')
    return (
      f'{head} The config differs from the one that wrote that checkpoint ({shown}): that '
      f'change is the likely cause (a learning rate too high for this model); undo it and run '
      f'the same command to resume. If it is not the cause, the checkpoint is suspect: '
      f'{fall_back}.'
    )
  return (
    f"{head} Its model and optimizer config are this run's, so that checkpoint is suspect: "
    f'it holds damaged values its checksums did not catch, or state saved from a run that was '
    f'already going wrong. To fall back, {fall_back}.'
  )


# ----------------------------------------------------------------------------- workdir


# A gs:// workdir's lease (`<workdir>/.lease`) lasts this long past its last refresh; the
# holder refreshes it every LEASE_TTL_SECONDS / 3, so a killed run's lease is taken over at
# most this long after the kill (at once by a run on the same host, where the holder's PID is
# seen to be gone).
LEASE_TTL_SECONDS = 120.0
LEASE_FILE = '.lease'


def _holder() -> str:
  return (
    f'PID {os.getpid()} on host {socket.gethostname()} (since {time.strftime("%Y-%m-%d %H:%M:%S")})'
  )


def _in_use(workdir: str, holder: str) -> ValueError:
  return ValueError(
    f'--workdir={workdir} is in use by {holder}: two runs on one workdir would '
    f"overwrite each other's checkpoints. Stop that run first (or wait for it to end), "
    f'or use another --workdir.'
  )


def _pid_namespace() -> str:
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return ''


class WorkdirLock:
  """One run per workdir, held by process 0 for the run (other processes do nothing here).

  A local workdir: an exclusive `fcntl` lock on `<workdir>/.lock`, whose file records the
  holder's PID, host and start time so that a refused run can name it. A gs:// workdir (no
  POSIX locks there): a lease, the object `<workdir>/.lease` ({'holder', 'expires', ...}),
  created with a generation-match precondition (only one of two racing runs gets it) and
  refreshed from a daemon thread every LEASE_TTL_SECONDS / 3; `release` deletes it. A lease
  past its expiry (a run that was killed), or one whose holder is a PID gone from this host,
  is taken over with a warning. Other schemes (s3://) are not locked.

  Raises (from `acquire`):
    ValueError: the workdir is not a writable directory, or another run holds the lock.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, '.lock')
    self._file = None
    self._lease = None

  def acquire(self) -> 'WorkdirLock':
    if jax.process_index() != 0:
      return self
    if storage.is_remote(self.workdir):
      location = storage.gcs_location(self.workdir.rstrip('/') + '/' + LEASE_FILE)
      if location is not None:
        try:
          self._lease = _Lease(self.workdir, *location).acquire()
        except ValueError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          # As for a local lock the filesystem refuses: the run itself is not at stake.
          logging.warning(
            'cannot take the lease %s/%s (%s): running without the one-run-per-workdir guard',
            self.workdir.rstrip('/'),
            LEASE_FILE,
            e,
          )
      return self
    check_writable_dir(self.workdir)
    f = open(self.path, 'a+', encoding='utf-8')
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if not isinstance(e, BlockingIOError):  # e.g. ENOLCK on some network filesystems
        f.close()
        logging.warning(
          'cannot lock %s (%s): running without the one-run-per-workdir guard',
          self.path,
          e.strerror or e,
        )
        return self
      f.seek(0)
      holder = f.read().strip() or 'another process'
      f.close()
      raise _in_use(self.workdir, holder) from None
    f.seek(0)
    f.truncate()
    f.write(_holder() + '\n')
    f.flush()
    self._file = f
    return self

  def check(self):
    """Raises RunStopped (exit code 5) once another run has taken over this run's lease (it
    could not be refreshed for LEASE_TTL_SECONDS): the loop agrees on it and stops every
    process before its next save, which would rotate out the other run's checkpoints. A
    no-op for local workdirs and on processes other than 0."""
    if self._lease is not None and self._lease.lost:
      raise RunStopped(self._lease.lost, EXIT_WORKDIR_TAKEN)

  def release(self):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    if self._lease is not None:
      self._lease.release()
      self._lease = None


class _Lease:
  """The lease object gs://<bucket>/<name> of `workdir` (see WorkdirLock)."""

  def __init__(self, workdir: str, bucket: str, name: str):
    self.workdir = workdir
    self.uri = f'gs://{bucket}/{name}'
    # Its own client: the refresh thread uses it while the training thread uploads metrics.
    self._blob = storage.gcs_client(shared=False).bucket(bucket).blob(name)
    self._generation = 0
    self._stop = threading.Event()
    self._thread = None
    # Why the lease is no longer this run's ('' while it is): set by the refresh thread.
    self.lost = ''

  def _record(self) -> str:
    now = time.time()
    return json.dumps(
      {
        'holder': self._holder,
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'pid_namespace': _pid_namespace(),
        'expires': now + LEASE_TTL_SECONDS,
        'expires_utc': time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now + LEASE_TTL_SECONDS)),
      }
    )

  def _read(self) -> tuple[int, dict | None]:
    """(generation, record) of the lease object; (0, None) if there is none; a record that
    does not parse is {}."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    blob = self._blob.bucket.get_blob(self._blob.name)
    if blob is None:
      return 0, None
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return self._read()  # replaced or deleted in between: read the new one
    try:
      record = json.loads(data)
    except ValueError:
      record = {}
    return int(blob.generation), record if isinstance(record, dict) else {}

  def _stale(self, record: dict) -> str:
    """Why the lease in `record` may be taken over ('' if it is live)."""
    try:
      expires = float(record['expires'])
    except (KeyError, TypeError, ValueError):
      return 'it is unreadable'
    if expires < time.time():
      when = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(expires))
      return f'it expired at {when} UTC (a run that was killed)'
    same_process_space = (
      record.get('host') == socket.gethostname()
      and record.get('pid_namespace')
      and record.get('pid_namespace') == _pid_namespace()
    )
    if same_process_space and isinstance(record.get('pid'), int):
      try:
        os.kill(record['pid'], 0)
      except ProcessLookupError:
        return f'its process {record["pid"]} is gone from this host (a run that was killed)'
      except OSError:
        pass  # it exists (another user's): live
    return ''

  def acquire(self) -> '_Lease':
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    self._holder = _holder()
    for _ in range(5):
      generation, record = self._read()
      if record is not None:
        why = self._stale(record)
        if not why:
          raise _in_use(self.workdir, str(record.get('holder') or 'another run'))
        logging.warning(
          'taking over the lease %s of %s: %s', self.uri, record.get('holder', '?'), why
        )
      try:
        self._blob.upload_from_string(
          self._record(), content_type='application/json', if_generation_match=generation
        )
      except exceptions.PreconditionFailed:  # another run wrote it in between: read again
        continue
      self._generation = int(self._blob.generation)
      self._thread = threading.Thread(target=self._refresh, name='workdir-lease', daemon=True)
      self._thread.start()
      return self
    raise ValueError(f'could not take the lease {self.uri}: it kept changing; try again')

  def _refresh(self):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    warned = set()
    while not self._stop.wait(LEASE_TTL_SECONDS / 3):
      try:
        self._blob.upload_from_string(
          self._record(), content_type='application/json', if_generation_match=self._generation
        )
        self._generation = int(self._blob.generation)
      except exceptions.PreconditionFailed:
        try:
          holder = (self._read()[1] or {}).get('holder') or 'another run'
        except Exception:  # pylint: disable=broad-except
          holder = 'another run'
        self.lost = (
          f'the lease {self.uri} was taken over by {holder} (this run could not refresh it '
          f'for {LEASE_TTL_SECONDS:g} s): stopped without saving, so neither run rotates out '
          "the other's checkpoints. Let one run finish, then resume the other with its command."
        )
        logging.error('%s', self.lost)
        return
      except Exception as e:  # pylint: disable=broad-except
        kind = type(e).__name__
        if kind not in warned:
          warned.add(kind)
          logging.warning(
            'could not refresh the lease %s (%s); retrying (it expires %g s after its last '
            'refresh)',
            self.uri,
            e,
            LEASE_TTL_SECONDS,
          )

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    if self.lost:
      return  # the object is the other run's now
    try:
      self._blob.delete(if_generation_match=self._generation)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('could not delete the lease %s (%s); it expires by itself', self.uri, e)


def _is_local_dir_path(path: str, flag: str) -> bool:
  """False for a remote path (orbax and epath create what they write there); True for a local
  one that is not a file.

  Raises:
    ValueError: `path` is a file.
  """
  if storage.is_remote(path):
    return False
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
      f'{flag}={path} is a file, not a directory; give a directory (it is created if missing).'
    )
  return True


def check_dir_can_be_written(path: str, flag: str = '--workdir'):
  """Checks, without creating or writing anything, that `path` is a writable directory or
  can be created as one: for commands whose bad input must leave no trace (export, convert,
  upscale, report write their output only once everything else is checked).

  Raises:
    ValueError: naming the flag, the path and what is wrong (a file, under a file, not
      writable).
  """
  if not _is_local_dir_path(path, flag):
    return
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(
      f'{flag}={path} is under {parent}, which is a file; give a directory path you can write to.'
    )
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'{flag}={path}: {parent} is not writable; give a directory you can write to.')


def check_writable_dir(path: str, flag: str = '--workdir'):
  """Creates `path` if needed and checks that it is a writable directory.

  Raises:
    ValueError: naming the flag, the path and what is wrong.
  """
  if not _is_local_dir_path(path, flag):
    return
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test_{os.getpid()}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(
      f'{flag}={path} is not a writable directory ({e.strerror or e}); give a '
      f'directory you can write to.'
    ) from None


# What `check_workdir_kind` looks for: a pretraining run keeps its checkpoints at the top of its
# workdir; a fine-tuning sweep keeps results.json there and one directory per learning rate and
# seed (pretrain/finetune.py).
_KINDS = ('pretraining', 'fine-tuning')


def _workdir_kind(workdir: str) -> str | None:
  """'pretraining', 'fine-tuning' or None (empty, new, or neither) for `workdir`."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  root = epath.Path(workdir)
  try:
    checkpoints = root / 'checkpoints'
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      return 'pretraining'
    if (root / 'results.json').exists() or any(root.glob('lr*_seed*')):
      return 'fine-tuning'
  except OSError:  # unreadable: check_writable_dir and the lock say what is wrong
    return None
  return None


def check_workdir_kind(workdir: str, kind: str, flag: str = '--workdir'):
  """Refuses a workdir that holds a run of the other kind (every process gives the same
  answer: process 0's finding is shared through an agreement, so no process raises alone).

  A fine-tuning sweep written into a pretraining run would replace its config.json and
  metrics.jsonl (and `launch.report` would show the fine-tuning losses as the run's); a
  pretraining run started in a sweep's directory would move the sweep's metrics aside.

  Args:
    workdir: the directory the command is about to write (local or gs://).
    kind: 'pretraining' or 'fine-tuning': what the command writes.
    flag: the flag that named `workdir`, for the message.

  Raises:
    ValueError: `workdir` holds a run of the other kind; the message names the flag, what is
      there and the fix (a directory of its own).
  """
  if kind not in _KINDS:
    raise ValueError(f'kind={kind!r}; use one of {_KINDS}')
  found = _workdir_kind(workdir) if jax.process_index() == 0 else None
  found = multihost.all_gather('workdir_kind', found or '')[0].decode() or None
  if found is None or found == kind:
    return
  what = (
    'its checkpoints/ are at the top'
    if found == 'pretraining'
    else 'results.json or lr*_seed*/ directories are at the top'
  )
  raise ValueError(
    f'{flag}={workdir} holds a {found} run ({what}); {kind} there would overwrite its '
    f'config.json and metrics.jsonl. Give the {kind} run a directory of its own, e.g. '
    f'{flag}={workdir.rstrip("/")}_{"finetune" if kind == "fine-tuning" else "pretrain"}.'
  )
