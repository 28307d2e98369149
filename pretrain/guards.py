"""What keeps a run safe while it trains: stop signals, the non-finite guard and the workdir
lock (docs/design.md 9).

- `StopSignals`: SIGTERM (how TPU VMs are preempted) and Ctrl-C become a stop request read at
  every step boundary; a second Ctrl-C exits at once. On several processes SIGTERM goes
  through JAX's preemption sync point (every host saves the same step), Ctrl-C through an
  all-gather at log steps.
- `Health`: reads each step's loss and skip flag one step late (which also bounds how far
  the host runs ahead of the device, so a stop request is served within about one step),
  counts consecutive non-finite steps and stops the run after `train.max_nonfinite_steps`,
  and reports a loss far above its running level as divergence.
- `WorkdirLock`: one run per workdir (an `fcntl` lock held by process 0).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from pretrain import metrics as metrics_lib


class RunStopped(RuntimeError):
  """The run stopped on a problem found while training (not bad input).

  Attributes:
    exit_code: what `launch.pretrain` exits with (3: non-finite steps, 4: a failed save).
  """

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- signals


class StopSignals:
  """SIGTERM and SIGINT as a stop request served at a step boundary.

  One process: a Python flag read at every step (no host round trip). Several processes:
  SIGTERM is left to JAX's preemption notifier and agreed through
  `multihost_utils.reached_preemption_sync_point(step)` (called at every step); Ctrl-C is
  agreed by an all-gather at log steps. A second Ctrl-C ends the process at once (exit 130).
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

  def should_stop(self, step: int, log_step: bool) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if not self._multiprocess:
      return self._requested.is_set()
    if multihost_utils.reached_preemption_sync_point(step):
      self.reason = 'SIGTERM'
      return True
    if jax.process_count() == 1:
      return self._requested.is_set()
    if log_step:
      agreed = bool(multihost_utils.process_allgather(np.array(self._requested.is_set())).any())
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


class Health:
  """Host-side bookkeeping of the compiled step's non-finite guard (`skipped` metric).

  Args:
    max_nonfinite_steps: consecutive skipped steps after which the run stops
      (config.train.max_nonfinite_steps).

  Attributes:
    streak: consecutive skipped steps up to the last observed one.
    skipped_total: skipped steps in this process's run.
  """

  def __init__(self, max_nonfinite_steps: int):
    self.max_nonfinite_steps = max_nonfinite_steps
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


# ----------------------------------------------------------------------------- workdir


class WorkdirLock:
  """An exclusive `fcntl` lock on `<workdir>/.lock`, held by process 0 for the run.

  The file records the holder's PID, host and start time so that a refused run can name it.
  Paths with a scheme (gs://...) are not locked (no POSIX locks there).

  Raises (from `acquire`):
    ValueError: the workdir is not a writable directory, or another run holds the lock.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, '.lock')
    self._file = None

  def acquire(self) -> 'WorkdirLock':
    if metrics_lib.is_remote(self.workdir) or jax.process_index() != 0:
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
      raise ValueError(
        f'--workdir={self.workdir} is in use by {holder}: two runs on one workdir would '
        f"overwrite each other's checkpoints. Stop that run first (or wait for it to end), "
        f'or use another --workdir.'
      ) from None
    f.seek(0)
    f.truncate()
    f.write(
      f'PID {os.getpid()} on host {socket.gethostname()} (since '
      f'{time.strftime("%Y-%m-%d %H:%M:%S")})\n'
    )
    f.flush()
    self._file = f
    return self

  def release(self):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def check_writable_dir(path: str, flag: str = '--workdir'):
  """Creates `path` if needed and checks that it is a writable directory.

  Raises:
    ValueError: naming the flag, the path and what is wrong.
  """
  if metrics_lib.is_remote(path):  # orbax and epath create what they write there
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
      f'{flag}={path} is a file, not a directory; give a directory (it is created if missing).'
    )
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
