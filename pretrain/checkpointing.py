"""Orbax checkpoints of the train state, the grain iterator and JSON metadata (docs/design.md 5).

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` holds params, opt_state and
step; `data` the grain iterator state (so a resumed run reads the batches an uninterrupted run
would); `meta` the resolved config, model shape, tokenizer hash, mesh and lineage. Saves are
asynchronous; orbax writes into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. A newest checkpoint that cannot be restored
(damaged or missing files) is moved aside to `<workdir>/checkpoints_damaged/` (never deleted)
once an older one restores; a save that fails raises `SaveError` at once (docs/design.md 9).

Every save records a checksum of each array of the state in `meta`, and every restore
verifies the arrays it read against them (`pretrain/checksums.py`): orbax's storage (zarr
chunks compressed with zstd, no checksum of their own) returns damaged bytes that still decode
as numbers without an error (docs/design.md 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging as std_logging
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from pretrain import checksums as checksums_lib
from pretrain import multihost
from pretrain import storage

# Model fields whose change makes a checkpoint's parameters unusable.
SHAPE_FIELDS = (
  'family',
  'vocab_size',
  'hidden_size',
  'num_layers',
  'num_heads',
  'head_dim',
  'mlp_dim',
  'type_vocab_size',
  'residual',
  'expansion_factor',
  'shared_dim',
  'chunk_size',
  'scan_layers',
  'init',
)


def model_shape(model_config) -> dict[str, Any]:
  """The subset of `config.model` that fixes the parameter tree (compared on resume)."""
  return {k: model_config[k] for k in SHAPE_FIELDS if k in model_config}


class CheckpointError(ValueError):
  """The workdir's checkpoint does not match the config; the message says what to do."""


class SaveError(RuntimeError):
  """A checkpoint save failed (full disk, lost permissions, ...); one line naming the path."""


def describe_error(e: BaseException) -> str:
  """One line for an exception: `[Errno 28] No space left on device: 'path'` or `Type: msg`
  (for orbax's 'Encountered error while reading array ...', the TensorStore error under it,
  which names the file and what is wrong)."""
  if str(e).startswith('Encountered error while reading array') and e.__cause__ is not None:
    return describe_error(e.__cause__)
  if isinstance(e, OSError) and e.strerror:
    return f'[Errno {e.errno}] {e.strerror}' + (f": '{e.filename}'" if e.filename else '')
  text = str(e).strip().splitlines()
  first = text[0] if text else ''
  return f'{type(e).__name__}: {first[:300]}'


class _AbandonedReads(std_logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' reports (`quiet_failed_reads`)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'never retrieved' not in record.getMessage()


@contextlib.contextmanager
def quiet_failed_reads():
  """Keeps a failed orbax read to the one exception it raises.

  When TensorStore fails to read an array, orbax leaves the other reads' futures unretrieved:
  asyncio logs each as 'Task exception was never retrieved' with a traceback, and Python
  prints 'Exception ignored in <coroutine>' for each when it is collected. The exception the
  caller gets names the cause; the rest is noise (dozens of tracebacks for one bad file).
  """
  asyncio_log = std_logging.getLogger('asyncio')
  level, hook = asyncio_log.level, sys.unraisablehook
  asyncio_log.setLevel(std_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  except BaseException as e:
    # The abandoned coroutines and tasks report when they are collected: collect them now,
    # silenced. The frames of the exception's tracebacks hold them, so their locals go first
    # (file and line of every frame stay).
    seen = e
    while seen is not None:
      traceback.clear_frames(seen.__traceback__)
      seen = seen.__cause__ or seen.__context__
    gc.collect()
    # Tasks still running in orbax's event-loop thread finish (and report) later: from now
    # on the asyncio logger drops those reports (they are about reads already given up on).
    if not any(isinstance(f, _AbandonedReads) for f in asyncio_log.filters):
      asyncio_log.addFilter(_AbandonedReads())
    hook = _without_coroutines(hook)
    if not getattr(sys.excepthook, 'drops_closed_loops', False):
      sys.excepthook = _without_closed_loops(sys.excepthook)
    raise
  finally:
    sys.unraisablehook = hook
    asyncio_log.setLevel(level)


def _is_closed_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc)


def _without_closed_loops(hook):
  """`hook` (sys.excepthook) minus 'Event loop is closed': TensorStore's callbacks of a failed
  read's other reads, arriving after orbax closed its event loop, print it through it."""

  def quiet(exc_type, exc, tb):
    if not _is_closed_loop(exc):
      hook(exc_type, exc, tb)

  quiet.drops_closed_loops = True
  return quiet


def _without_coroutines(hook):
  """`hook` (a sys.unraisablehook) minus the reports of abandoned coroutines (a failed read's
  other reads, collected after `quiet_failed_reads` returned) and of their callbacks that find
  orbax's event loop closed."""
  if getattr(hook, 'drops_coroutines', False):
    return hook

  def quiet(unraisable):
    if not (asyncio.iscoroutine(unraisable.object) or _is_closed_loop(unraisable.exc_value)):
      hook(unraisable)

  quiet.drops_coroutines = True
  return quiet


def checkpoint_directory(workdir: str) -> str:
  """`<workdir>/checkpoints`, absolute for a local workdir; gs:// and other remote paths go to
  orbax as they are (it writes them natively)."""
  if storage.is_remote(workdir):
    return workdir.rstrip('/') + '/checkpoints'
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


def _gather_causes(name: str, cause: str | None) -> list[str | None]:
  """Every process's `cause` (None: no failure), in process order.

  They go over the coordination service (`pretrain.multihost`), not a device collective: a
  process that failed inside a read is not in step with the device programs of the others,
  and a late or lost peer gives an error after a timeout instead of a hang.
  """
  if jax.process_count() == 1:
    return [cause]
  return [c.decode() or None for c in multihost.all_gather(name, cause or '')]


def _verdict(causes: list[str | None]) -> str | None:
  """The one verdict every process reaches from `_gather_causes`: this process's own cause,
  else the first failing process's, else None."""
  own = causes[jax.process_index()] if len(causes) > 1 else causes[0]
  if own is not None:
    return own
  for i, cause in enumerate(causes):
    if cause is not None:
      return f'it failed on process {i}: {cause}'
  return None


def _agreed(name: str, cause: str | None) -> str | None:
  """`cause`, or on several processes the verdict they all reach: failed if any failed."""
  return _verdict(_gather_causes(name, cause))


_DATA_FILE = re.compile(r'process_\d+-of-(\d+)\.json')


def _data_file(process_index: int, process_count: int) -> str:
  """The file of a checkpoint's 'data' item that holds one process's iterator position."""
  return f'process_{process_index}-of-{process_count}.json'


def _move_remote(source: str, dest: str):
  """Moves the checkpoint directory `source` (on a bucket: no rename) to `dest`, through the
  gcsfs instance etils.epath (and so orbax) uses, which keeps its listings current.

  The order is the safe one: (1) copy every object (server side), while the step is still a
  checkpoint: a copy cut short leaves the step whole in place (moved again next time);
  (2) delete `commit_success.txt`: from then on orbax lists the step as no checkpoint, and the
  copy is complete; (3) delete the rest (cut short: a leftover that is no checkpoint, which the
  next save of that step replaces). Deleting the commit file first would, if the copy were
  then cut short, leave the only whole copy of the step to be overwritten by that save.
  """
  from etils.epath import backend  # pylint: disable=g-import-not-at-top

  fs = backend.fsspec_backend.fs(source)
  root, target = fs._strip_protocol(source).rstrip('/'), fs._strip_protocol(dest).rstrip('/')  # pylint: disable=protected-access
  files = fs.find(root)
  if not files:
    raise FileNotFoundError(f'{source} holds no files')
  fs.copy(files, [target + f[len(root) :] for f in files])
  commit = f'{root}/commit_success.txt'
  if commit in files:
    fs.rm_file(commit)
  fs.rm([f for f in files if f != commit])
  fs.invalidate_cache(root)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items of this suite.

    Retention is orbax's: a preservation policy keeps a checkpoint when any of its parts does,
  the newest `keep` (`LatestN`), every step that is a multiple of `keep_every_steps`
  (`EveryNSteps`) and the `keep_best` with the lowest eval loss (`BestN`); orbax deletes the
  rest after each save. Every save given an eval loss records it in the step's orbax `metrics`
  item (`{'eval_loss': loss}`, whatever the policy: `--step=best` reads it, `eval_losses`). A
  checkpoint saved at a step without an evaluation has no metric: `BestN` ranks only those
  that have one (keep_checkpoints_without_metrics=False), so such a checkpoint is kept only by
  the other two parts.

    Args:
      workdir: run directory; checkpoints go to `<workdir>/checkpoints`.
      keep: number of most recent checkpoints kept (config.train.keep_checkpoints).
      keep_every_steps: checkpoints whose step is a multiple of it are kept for good
        (config.train.keep_every_steps; 0: none).
      keep_best: number of checkpoints with the lowest eval loss kept (config.train.keep_best;
        0: none).
      async_save: save in a background thread (the training loop blocks only for the copy to
        host memory).
      read_only: only read (the commands that read another run: nothing is created, cleaned
        up or deleted there).
      checksums: record the state's checksums at save and verify them at restore (False only
        for benchmarks/checkpoint_integrity.py's baseline).

    Attributes:
      restored_step: the step `restore_newest` resumed from (None: none yet).
  """

  def __init__(
    self,
    workdir: str,
    keep: int = 2,
    async_save: bool = True,
    read_only: bool = False,
    checksums: bool = True,
    keep_every_steps: int = 0,
    keep_best: int = 0,
  ):
    self.directory = checkpoint_directory(workdir)
    self.checksums = checksums
    self.restored_step = None
    if read_only:
      # Not orbax's read_only=True, which warns twice on every construction; without create,
      # deletion or saves nothing here writes (tests/test_checkpoint_integrity.py).
      options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=False, enable_async_checkpointing=False
      )
    else:
      policies = [ocp.checkpoint_managers.LatestN(n=keep)]
      if keep_every_steps:
        policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every_steps))
      if keep_best:
        policies.append(
          ocp.checkpoint_managers.BestN(
            get_metric_fn=self._eval_loss,
            reverse=True,  # BestN keeps the last n in sorted order: descending keeps the lowest
            n=keep_best,
            keep_checkpoints_without_metrics=False,
          )
        )
      # best_fn makes orbax write the metrics a save is given (it ranks nothing here: the
      # preservation policy decides what stays).
      options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=self._eval_loss,
        best_mode='min',
      )
      absl_logger = logging.get_absl_logger()
      if self._no_metrics_warning not in absl_logger.filters:
        absl_logger.addFilter(self._no_metrics_warning)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # The key of the eval loss in a checkpoint's orbax metrics item.
  EVAL_METRIC = 'eval_loss'

  @classmethod
  def for_run(cls, workdir: str, train_config, **kwargs) -> Checkpointer:
    """The Checkpointer of a run that writes checkpoints: retention from `train_config`
    (config.train: keep_checkpoints, keep_every_steps, keep_best)."""
    return cls(
      workdir,
      keep=train_config.keep_checkpoints,
      keep_every_steps=train_config.get('keep_every_steps', 0),
      keep_best=train_config.get('keep_best', 0),
      **kwargs,
    )

  @staticmethod
  def _eval_loss(metrics) -> float:
    return float(metrics[Checkpointer.EVAL_METRIC])

  @staticmethod
  def _no_metrics_warning(record: std_logging.LogRecord) -> bool:
    """A logging filter that drops orbax's warning on every save without metrics (a step
    that was not evaluated: expected, not a problem)."""
    return 'did not provide metrics' not in str(record.msg)

  def eval_losses(self) -> dict[int, float]:
    """{step: the eval loss recorded with it} of the checkpoints that recorded one (saved at
    a step where the evaluation ran); a metrics item that does not read counts as none."""
    losses = {}
    for step in self.all_steps():
      try:
        metrics = self._manager.metrics(step)
        loss = self._eval_loss(metrics) if isinstance(metrics, dict) else None
      except Exception:  # pylint: disable=broad-except
        loss = None
      if loss is not None and np.isfinite(loss):
        losses[step] = loss
    return losses

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def path(self, step: int) -> str:
    """`<workdir>/checkpoints/<step>`, as messages name a checkpoint."""
    return f'{self.directory}/{step}'

  def save(
    self,
    step: int,
    state,
    data_iterator,
    meta: dict[str, Any],
    force: bool = True,
    eval_loss: float | None = None,
  ):
    """Starts saving `state` (pytree of jax.Arrays), the iterator state and `meta` at `step`;
    `meta` gets the state's checksums (`checksums.checksum_record`, computed before this returns, so
    the caller may donate `state` afterwards). `eval_loss`: the loss of the evaluation at
    `step`, recorded in orbax's metrics of the step (None, or not finite: the step has
    none).

    Raises:
      SaveError: this save, or an earlier asynchronous one, failed.
    """
    if self.checksums:
      meta = dict(meta, **{checksums_lib.CHECKSUM_KEY: checksums_lib.checksum_record(state)})
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None
    if eval_loss is not None and np.isfinite(eval_loss):
      metrics = {self.EVAL_METRIC: float(eval_loss)}
    with self._save_errors(step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)

  @contextlib.contextmanager
  def _save_errors(self, step: int | None = None):
    """Turns any failure of a save (or of an earlier asynchronous one) into one SaveError;
    `step` is the save's step (None: the newest, which is the one an asynchronous failure is
    about). Does nothing more on success: `check_for_errors` runs at every step."""
    try:
      yield
    except SaveError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      step = self.latest_step() if step is None else step
      intact = [s for s in self.all_steps() if s != step]
      raise SaveError(
        f'saving checkpoint {os.path.join(self.directory, str(step))} failed: '
        f'{describe_error(e)}. The earlier checkpoints {intact} are intact; fix the cause '
        f'(free disk space, permissions) and run the same command to resume.'
      ) from e

  def check_for_errors(self):
    """Raises SaveError if an asynchronous save has failed (cheap: no waiting)."""
    with self._save_errors():
      self._manager.check_for_errors()

  def agreed_steps(self) -> list[int]:
    """The checkpoint steps, oldest first, as process 0 lists them (on several processes
    the others take process 0's list: a bucket listed at slightly different times, or a
    step committed between two listings, must not give processes different steps to try)."""
    steps = self.all_steps()
    if jax.process_count() == 1:
      return steps
    listed = multihost.all_gather('checkpoint_steps', json.dumps(steps))
    return [int(s) for s in json.loads(listed[0])]

  def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
    """The JSON metadata of `step` (default: latest), or None if there is no checkpoint.

    Read as a file (orbax's JSON item is one file, `meta/metadata`), not through orbax's
    restore, whose barriers are collectives: every process may read it alone.

    Raises:
      OSError, ValueError: the file is missing or does not hold a JSON object.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    meta = json.loads((epath.Path(self.path(step)) / 'meta' / 'metadata').read_text())
    if not isinstance(meta, dict):
      raise ValueError(f'the metadata is {type(meta).__name__}, not a JSON object')
    return meta

  def precheck(self, step: int, data_iterator=None) -> str | None:
    """Why this process cannot restore `step`, found from its files alone (no orbax read, no
    collective), or None: the metadata reads, the array store's index files are there, and
    with `data_iterator` this process's iterator file reads as JSON.

    The damage this finds is agreed before any orbax restore starts (`restore_newest`), so
    that no process enters orbax's restore, whose barriers wait for every process, while
    another has already given up on the step.
    """
    root = epath.Path(self.path(step))
    try:
      self.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      return f'its metadata (meta/metadata) does not read: {describe_error(e)}'
    for name in ('_METADATA', 'manifest.ocdbt'):
      if not (root / 'state' / name).exists():
        return f'its array index state/{name} is missing'
    if data_iterator is not None:
      name = _data_file(jax.process_index(), jax.process_count())
      try:
        json.loads((root / 'data' / name).read_text())
      except Exception as e:  # pylint: disable=broad-except
        return f'its data position data/{name} does not read: {describe_error(e)}'
    return None

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote the data position of `step` (from its iterator files'
    names, `process_<i>-of-<n>.json`), agreed across processes; None when it has none."""
    counts = set()
    try:
      for path in (epath.Path(self.path(step)) / 'data').iterdir():
        match = _DATA_FILE.fullmatch(path.name)
        if match:
          counts.add(int(match.group(1)))
    except Exception:  # pylint: disable=broad-except
      pass  # no data item: precheck reports it
    count = max(counts) if len(counts) == 1 else None
    if jax.process_count() > 1:
      count = json.loads(multihost.all_gather('checkpoint_processes', json.dumps(count))[0])
    return count

  def newest_readable_meta(self) -> tuple[int | None, dict[str, Any] | None]:
    """(step, metadata) of the newest checkpoint whose metadata reads on every process
    (damaged ones are skipped here and moved aside by `restore_newest`), or (None, None) if
    there is none."""
    for step in sorted(self.agreed_steps(), reverse=True):
      try:
        meta, cause = self.read_meta(step), None
      except Exception as e:  # pylint: disable=broad-except
        meta, cause = None, describe_error(e)
      if _agreed('checkpoint_meta', cause) is None:
        return step, meta
    return None, None

  def newest_meta(self) -> dict[str, Any] | None:
    """The metadata of `newest_readable_meta`, or None if there is none."""
    return self.newest_readable_meta()[1]

  def read(self, step: int, abstract_state, data_iterator=None, partial: bool = False):
    """Reads the state of `step` onto the shardings of `abstract_state` (ShapeDtypeStructs;
    orbax reshards across mesh shapes), and the iterator in place, without verifying it
    (`restore` does; on several processes agree on the read first, `restore_newest`).

    Args:
      partial: `abstract_state` names a part of the saved state (e.g. {'params': encoder}:
        the rest is not read).

    Returns:
      (state, meta).
    """
    if partial:
      # The manager binds an item to one handler; a part of the state is read past it, as
      # orbax's PyTree handler (the one StandardSave wraps) reads it, with the meta apart.
      meta = self.read_meta(step)
      with quiet_failed_reads():
        state = ocp.PyTreeCheckpointer().restore(
          os.path.join(self.path(step), 'state'),
          args=ocp.args.PyTreeRestore(
            abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            partial_restore=True,
          ),
        )
    else:
      items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
      if data_iterator is not None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      with quiet_failed_reads():
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      state, meta = restored['state'], restored['meta']
    if not isinstance(meta, dict):
      raise ValueError(f'the metadata is {type(meta).__name__}, not a JSON object')
    return state, meta

  def restore(self, step: int, abstract_state, data_iterator=None, partial: bool = False):
    """`read`, then the arrays verified against the checksums saved with them.

    Raises:
      checksums.ChecksumError: the arrays read differ from what was saved (the files were
        damaged).
      Exception: whatever orbax raises for a checkpoint that cannot be read.
    """
    state, meta = self.read(step, abstract_state, data_iterator, partial)
    if self.checksums:
      checksums_lib.verify_checksums(state, meta)
    return state

  def restore_newest(self, abstract_state, data_iterator=None):
    """Restores the newest checkpoint that restores; newer ones that fail are moved aside.

    A failure is taken as damage only once an older checkpoint of the same workdir restores
    (a config that no checkpoint fits moves nothing). A checkpoint whose arrays fail their
    checksum is one that fails.

    Returns:
      (step, state), or (None, None) if there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints and none restores; names the newest and why.
    """
    failures = []
    for step in sorted(self.agreed_steps(), reverse=True):
      iterator = data_iterator
      saved_by = self.saved_process_count(step) if data_iterator is not None else None
      if saved_by is not None and saved_by != jax.process_count():
        # Another slice size (a preempted v5e-32 back as v5e-16): grain keeps one position
        # file per process, and this run's processes read other shards.
        logging.warning(
          'checkpoint %s was written by %d processes and this run has %d: the model and '
          'optimizer state resume, the data is read from the start (its position is kept '
          'per process)',
          self.path(step),
          saved_by,
          jax.process_count(),
        )
        iterator = None
      state, cause = self._try_restore(step, abstract_state, iterator)
      if cause is not None:
        failures.append((step, cause))
        continue
      for bad_step, bad_cause in failures:
        self._move_aside(bad_step, bad_cause, step)
      self.restored_step = step
      return step, state
    if failures:
      step, cause = failures[0]
      raise CheckpointError(
        f'no checkpoint in {self.directory} can be restored (steps '
        f'{[s for s, _ in failures]}); the newest, {step}, fails with: {cause}. If it is '
        f'damaged, move {self.directory}/{step} away and run again; if the config changed, '
        f'pass the config that wrote it (config.json) or use a new --workdir.'
      )
    return None, None

  def _try_restore(self, step, abstract_state, data_iterator, attempts: int = 2):
    """(state, None), or (None, cause); the same answer on every process.

    On several processes every stage is agreed before the next one starts: the files of
    the step (`precheck`, no collective), then orbax's read (its barriers are collectives, so
    it starts only on a step every process found whole), then the checksums (a collective
    program). A read is tried again (`attempts` in all; a transient storage error is not
    damage) only when it failed on every process: after a failure on some processes only,
    the others may have passed orbax's barriers, and a second read would not meet them.
    """
    cause = _agreed('checkpoint_precheck', self.precheck(step, data_iterator))
    if cause is not None:
      return None, cause
    for _ in range(attempts):
      state = meta = None
      try:
        state, meta = self.read(step, abstract_state, data_iterator)
        local = None
      except Exception as e:  # pylint: disable=broad-except
        local = describe_error(e)
      causes = _gather_causes('checkpoint_read', local)
      cause = _verdict(causes)
      if cause is None and self.checksums:
        try:
          checksums_lib.verify_checksums(state, meta)
        except Exception as e:  # pylint: disable=broad-except
          local = str(e) if isinstance(e, checksums_lib.ChecksumError) else describe_error(e)
        cause = _agreed('checkpoint_checksums', local)
        return (state, None) if cause is None else (None, cause)
      if cause is None:
        return state, None
      if None in causes:  # failed on some processes only: no second read
        break
    return None, cause

  def _move_aside(self, step: int, cause: str, fallback: int):
    aside_root = os.path.join(os.path.dirname(self.directory), 'checkpoints_damaged')
    aside = os.path.join(aside_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    logging.warning(
      'checkpoint %s/%d cannot be restored (%s): moved to %s; resuming from step %d',
      self.directory,
      step,
      cause,
      aside,
      fallback,
    )
    if jax.process_index() == 0:
      try:
        if storage.is_remote(self.directory):
          _move_remote(f'{self.directory}/{step}', aside)
        else:
          epath.Path(aside_root).mkdir(parents=True, exist_ok=True)
          epath.Path(self.directory, str(step)).rename(aside)
      except Exception as e:  # pylint: disable=broad-except
        # The step stays (whole, or no longer a checkpoint) and is skipped again next time.
        logging.warning(
          'could not move %s/%d aside (%s); it stays in place',
          self.directory,
          step,
          describe_error(e),
        )
    if jax.process_count() > 1:
      # Over the coordination service, as every other agreement on restore: a timeout, not
      # a device collective that waits forever for a lost peer.
      multihost.barrier('checkpoint_move_aside')
    self._manager.reload()

  def wait(self):
    with self._save_errors():
      self._manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


# Model fields besides the shape whose change makes the same parameters compute another
# function or changes their tree (a learned position table appears or changes rows).
FUNCTION_FIELDS = (
  'norm_type',
  'use_bias',
  'mlp_activation',
  'attention_norm',
  'position_embedding',
  'max_position',
)
# Config fields (besides the model shape) a run cannot change on resume: they change the
# parameter or optimizer-state tree, or the function the parameters compute.
RESUME_FIELDS = ('objective', 'optim.name') + tuple(f'model.{k}' for k in FUNCTION_FIELDS)


def check_compatible(meta: dict[str, Any] | None, config, workdir: str):
  """Refuses to resume a checkpoint whose model shape or RESUME_FIELDS differ from `config`
  (before anything is restored, so the message names the field instead of a tree diff).

  Raises:
    CheckpointError: naming the differing fields and the ways out.
  """
  if not meta:
    return
  saved = meta.get('model_shape', {})
  current = model_shape(config.model)
  diffs = [
    f'{k}: checkpoint {saved[k]!r} vs config {current[k]!r}'
    for k in current
    if k in saved and saved[k] != current[k]
  ]
  saved_config = traverse_util.flatten_dict(meta.get('config', {}), sep='.')
  now = traverse_util.flatten_dict(config.to_dict(), sep='.')
  diffs += [
    f'{k}: checkpoint {saved_config[k]!r} vs config {now[k]!r}'
    for k in RESUME_FIELDS
    if k in saved_config and saved_config[k] != now.get(k)
  ]
  if diffs:
    raise CheckpointError(
      f'--workdir={workdir} holds a checkpoint of a different model or optimizer '
      f'({"; ".join(diffs)}). Use a new --workdir, pass the config that wrote it (its '
      f'config.json), or grow it with launch.upscale.'
    )


def same_data(meta: dict[str, Any] | None, source, config, workdir: str) -> bool:
  """Whether the checkpoint was trained on the data `source` holds now (True without a
  checkpoint or a recorded fingerprint).

  Returns:
    False when the data changed and --config.data.allow_changed_data is set: the caller then
    restores the model but starts the data iterator afresh.

  Raises:
    CheckpointError: the data changed and allow_changed_data is not set.
  """
  recorded = (meta or {}).get('data_fingerprint')
  current = source.data_fingerprint or source.fingerprint
  changed = recorded is not None and recorded != current
  if jax.process_count() > 1:  # every process takes the same branch (one may see other files)
    changed = multihost.any_flag('data_changed', changed)
  if not changed:
    return True
  if config.data.allow_changed_data:
    logging.warning(
      'the training data changed since the checkpoint was written (%s, '
      'fingerprint %s, was %s): resuming the model with the data iterator '
      'started afresh (--config.data.allow_changed_data)',
      source.name,
      current,
      recorded,
    )
    return False
  raise CheckpointError(
    f'the training data changed since the checkpoint in --workdir={workdir} was written '
    f'({source.name}: fingerprint {current}, was {recorded}; files were added, removed, '
    f'renamed or their contents changed, or a --config.data.mixture source, weight, name or '
    f'order changed). The saved data position would point into '
    f'different text. Restore the original files, pass '
    f'--config.data.allow_changed_data=true to resume the model with the data read from '
    f'the start, or use a new --workdir.'
  )


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def _code_version() -> str:
  try:
    return subprocess.run(
      ['git', 'describe', '--always', '--dirty'],
      capture_output=True,
      text=True,
      timeout=5,
      cwd=os.path.dirname(__file__),
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def checkpoint_meta(config, tokenizer, mesh, source, lineage=None) -> dict[str, Any]:
  """The JSON metadata saved with every checkpoint (docs/design.md 5).

  Args:
    source: the training data (`text_datasets.TextSource`: its name and fingerprint are kept,
      so that a resume over changed data is noticed).
  """
  return {
    'config': json.loads(config.to_json_best_effort()),
    'model_shape': model_shape(config.model),
    'family': config.model.family,
    'objective': config.objective,
    'tokenizer': {
      'sha256': tokenizer.sha256,
      'vocab_size': tokenizer.vocab_size,
      'path': getattr(tokenizer, 'path', ''),
    },
    'data_source': source.name,
    'data_fingerprint': source.data_fingerprint or source.fingerprint,
    'mesh': dict(mesh.shape),
    'code_version': _code_version(),
    'lineage': lineage or [],
  }


def adopt_growth_values(config, meta):
  """A workdir written by `launch.upscale` fixes a few values the grown weights need (LayerNorm
  eps / k, the trained DeepNorm alpha, the source run's tokenizer): apply them, so that
  `launch.pretrain` continues the grown model with the plain preset command."""
  lineage = (meta or {}).get('lineage') or []
  if not lineage:
    return
  overrides = dict(lineage[-1].get('upscale', {}).get('config_overrides', {}))
  if not config.data.tokenizer_model and meta.get('tokenizer', {}).get('path'):
    overrides['data.tokenizer_model'] = meta['tokenizer']['path']
  changed = {
    key: value
    for key, value in overrides.items()
    if traverse_util.flatten_dict(config.to_dict(), sep='.').get(key) != value
  }
  for key, value in changed.items():
    logging.info('grown checkpoint: using %s=%r (set by launch.upscale)', key, value)
  config.update_from_flattened_dict(changed)


def write_config(workdir: str, config):
  """Writes the resolved config to `<workdir>/config.json` (local or gs://)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
