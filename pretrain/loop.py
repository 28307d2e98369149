"""The one training loop, shared by pretraining (`pretrain/train.py`) and fine-tuning
(`pretrain/finetune.py`), docs/design.md 4.

  run = loop.Run(config=..., state=..., train_step=..., ckpt=..., writer=..., ...)
  result = loop.train_loop(run, signals, next_batch=lambda step: ..., evaluate=lambda step: ...)

The caller owns what differs (where a step's batch comes from, what an evaluation measures);
the loop owns what is the same: stepping with the host at most one step ahead of the
device, the non-finite guard (`guards.Health`), stop requests (`guards.StopSignals`), the
profiler window, and the periodic work, each a `Hook` with a cadence that is forced at the
end: log lines (every train.log_every_steps and at the last step of this run), evaluation
(every train.eval_every_steps and at train.num_train_steps), then any extra hooks, then a
checkpoint (every train.checkpoint_every_steps, at the last step and on a stop request; a
failed asynchronous save is checked for at every step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any, Callable, Sequence

from absl import logging
import jax

from pretrain import checkpointing
from pretrain import guards
from pretrain import metrics as metrics_lib
from pretrain import multihost
from pretrain import progress

State = dict[str, Any]  # {'step': int32 [], 'params': pytree, 'opt_state': pytree}


@dataclasses.dataclass(frozen=True)
class Hook:
  """Periodic work: `fn(step)` after every `every`-th step (0: never) and after each step in
  `at` (the forced ones, e.g. the last step).

  Attributes:
    fn: `step -> Any`, called after the update of step `step` - 1 (so `step` steps are done).
    every: the period in steps; 0 turns the periodic calls off.
    at: steps where it runs regardless of the period.
  """

  fn: Callable[[int], Any]
  every: int
  at: tuple[int, ...] = ()

  def due(self, step: int) -> bool:
    """Whether the hook runs after `step` steps."""
    return (self.every > 0 and step % self.every == 0) or step in self.at


@dataclasses.dataclass(kw_only=True)
class Run:
  """What the loop needs of a run, set up by the caller (`train.prepare`,
  `finetune.prepare_run`).

  Attributes:
    config, workdir: the resolved ConfigDict (its `train` section drives the loop) and the
      run directory.
    run_setup: mesh, model structure, optimizer, shardings (`train.Setup`).
    ckpt: the workdir's checkpoints; meta: the JSON metadata saved with each of them.
    state: the train state (restored or fresh); start_step: its step.
    train_step: the compiled `(state, batch, base_key) -> (state, metrics)`;
      eval_step: the compiled evaluation step (its signature is the caller's).
    writer: metrics.jsonl + TensorBoard.
    train_iter: the checkpointed data iterator (None when the data order is a function of
      the step, as in fine-tuning).
    lock: this run's hold on the workdir (None when the caller holds it); released by close.
    evals: every evaluation of this run (dicts with 'step').
    bar: the terminal progress bar (disabled unless train.progress asks for it).
    stopped_by: 'SIGTERM' or 'Ctrl-C' if the loop stopped on a signal.
  """

  config: Any
  workdir: str
  run_setup: Any
  ckpt: checkpointing.Checkpointer
  meta: dict[str, Any]
  state: State
  start_step: int
  train_step: Callable
  eval_step: Callable
  writer: metrics_lib.MetricWriter
  train_iter: Any = None
  lock: guards.WorkdirLock | None = None
  evals: list = dataclasses.field(default_factory=list)
  stopped_by: str = ''
  bar: progress.ProgressBar = dataclasses.field(
    default_factory=lambda: progress.ProgressBar('off', 0, 0)
  )

  def close(self):
    """Waits for the last save, closes the writer and releases the workdir.

    Raises:
      guards.RunStopped: the last (asynchronous) save failed (exit code 4).
    """
    self.bar.close()
    try:
      with stop_on_failed_save():
        self.ckpt.close()
    finally:
      self.writer.close()
      if hasattr(self.train_iter, 'close'):
        self.train_iter.close()  # stops the input pipeline's prefetch thread
      if self.lock is not None:
        self.lock.release()


@dataclasses.dataclass(frozen=True)
class LoopResult:
  """What `train_loop` did.

  Attributes:
    eval_result: the last evaluation ({} if there was none, e.g. stopped by a signal first).
    step: the step reached; steps_done: steps taken by this call; tokens_done: the tokens
      they consumed (global_batch_size * seq_len each).
  """

  eval_result: dict[str, float]
  step: int
  steps_done: int
  tokens_done: int


def restore_or_init(
  ckpt: checkpointing.Checkpointer,
  abstract_state: State,
  init: Callable[[], State],
  workdir: str,
  train_iter: Any = None,
  config: Any = None,
) -> tuple[State, int, metrics_lib.MetricWriter]:
  """The newest checkpoint of `workdir` that restores (with the data iterator's position
  when `train_iter` is given), else `init()`; then the metrics writer, with the history past
  the restored step dropped first.

  Args:
    config: the run's resolved config; its train.loggers choose the writer's sinks (None:
      metrics.jsonl and TensorBoard).

  Returns:
    (state, its step, the writer: enabled on process 0 only).

  Raises:
    train.InputError (through checkpointing): no checkpoint can be restored.
  """
  start_step, state = ckpt.restore_newest(abstract_state, train_iter)
  if start_step is None:
    state, start_step = init(), 0
  else:
    logging.info('resuming from %s/%d', ckpt.directory, start_step)
  if jax.process_index() == 0:  # before the writer opens metrics.jsonl for appending
    metrics_lib.truncate_history(workdir, start_step)
  writer = metrics_lib.MetricWriter(
    workdir, enabled=jax.process_index() == 0, config=config, start_step=start_step
  )
  return state, start_step, writer


# Config sections whose change on a resume can make the first steps non-finite.
_NUMERIC_SECTIONS = ('optim.', 'model.')


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'optim.learning_rate': value} of nested JSON objects."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def resume_changes(run: Run, restored: int | None) -> tuple[str, ...]:
  """The optim.* and model.* fields that differ between the config the restored checkpoint
  was written with and this run's ('optim.learning_rate: 0.002 -> 1e+38'); () for a fresh
  start, or when its metadata does not say."""
  if restored is None:
    return ()
  try:
    saved = run.ckpt.read_meta(restored).get('config', {})
  except Exception:  # pylint: disable=broad-except
    return ()
  before, now = _flatten(saved), _flatten(json.loads(run.config.to_json_best_effort()))
  return tuple(
    f'{key}: {before[key]!r} -> {now.get(key)!r}'
    for key in sorted(before)
    if key.startswith(_NUMERIC_SECTIONS) and before[key] != now.get(key)
  )


@contextlib.contextmanager
def stop_on_failed_save():
  """A failed save (this one, or an earlier asynchronous one) stops the run: exit code 4."""
  try:
    yield
  except checkpointing.SaveError as e:
    raise guards.RunStopped(str(e), guards.EXIT_SAVE_FAILED) from None


def agree_on_failure(name: str, failure: BaseException | None) -> None:
  """Returns when no process failed; else every process raises, together.

  On several processes the failures are gathered over the coordination service
  (`pretrain.multihost`): a failure seen by one process (its save, its metrics write) must
  stop every process at the same point, or the others would wait forever in their next
  collective. The failing process raises its own exception; the others raise
  `guards.RunStopped` naming it, with its exit code (1 for an exception that has none).

  Args:
    name: the agreement's name (the same on every process, at the same point of the loop).
    failure: this process's exception, or None.
  """
  if jax.process_count() == 1:
    if failure is not None:
      raise failure
    return
  code = getattr(failure, 'exit_code', 1)
  text = '' if failure is None else f'{code}\n{type(failure).__name__}: {failure}'
  values = [v.decode() for v in multihost.all_gather(name, text)]
  failed = [(i, v) for i, v in enumerate(values) if v]
  if not failed:
    return
  if failure is not None:
    raise failure
  process, value = failed[0]
  code, _, message = value.partition('\n')
  raise guards.RunStopped(f'process {process} stopped the run: {message}', int(code))


def _failure(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
  """(fn(), None), or (None, the exception it raised) for an Exception."""
  try:
    return fn(), None
  except Exception as e:  # pylint: disable=broad-except
    return None, e


def save(run: Run, step: int, health: guards.Health | None = None, force: bool = False) -> bool:
  """Starts an asynchronous checkpoint of run.state, the data iterator and the metadata,
  unless the last step was non-finite (a run that is going wrong must not rotate out good
  checkpoints) and `force` is off (a stop on a signal saves anyway: skipped updates left the
  state as it was). The eval loss of `step`, when it was evaluated, goes with it
  (`Checkpointer.save`).

  Returns:
    Whether a save was started.

  Raises:
    guards.RunStopped: the save (or an earlier asynchronous one) failed (exit code 4).
  """
  if health is not None and not health.healthy and not force:
    logging.warning(
      'not saving step %d: its update was non-finite (%d in a row); the last '
      'good checkpoint stays the newest',
      step,
      health.streak,
    )
    return False
  with stop_on_failed_save():
    run.ckpt.save(step, run.state, run.train_iter, run.meta, eval_loss=_eval_loss(run, step))
  return True


def _eval_loss(run: Run, step: int) -> float | None:
  """The loss of the evaluation that ran at `step` (before its save: the eval hook runs
  first), recorded with the checkpoint for train.keep_best and --step=best; None when no
  evaluation ran at `step`."""
  last = run.evals[-1] if run.evals else {}
  return last.get('loss') if last.get('step') == step else None


def _check_saves(run: Run):
  """Raises guards.RunStopped (exit code 4) if an asynchronous save has failed."""
  with stop_on_failed_save():
    run.ckpt.check_for_errors()


def train_loop(
  run: Run,
  signals: guards.StopSignals,
  next_batch: Callable[[int], dict[str, jax.Array]],
  evaluate: Callable[[int], dict[str, float]],
  *,
  flops_per_step: float | None = None,
  hooks: Sequence[Hook] = (),
  evaluate_at_stop: bool = True,
) -> LoopResult:
  """Steps from run.start_step to train.num_train_steps (or train.stop_after_steps, SIGTERM,
  Ctrl-C) with the periodic hooks (module docstring).

  Args:
    run: what the caller set up; run.state is replaced step by step.
    signals: the stop requests (installed by the caller, which also covers set-up and the
      final wait).
    next_batch: `step -> the global batch` of that step (0-based, on the run's mesh).
    evaluate: `step -> metrics`: evaluates run.state and writes the result.
    flops_per_step: model FLOPs of one step for MFU (None: `progress.TrainLog`'s count for
      the pretraining objective).
    hooks: extra periodic work, run after the evaluation of a step.
    evaluate_at_stop: evaluate at the end when this run evaluated nothing yet and no signal
      stopped it (pretraining's train.stop_after_steps); fine-tuning evaluates only at the
      end of training.

  Returns:
    A LoopResult.

  Raises:
    guards.RunStopped: train.max_nonfinite_steps non-finite steps in a row (exit code 3), a
      failed save (exit code 4), or a bucket workdir's lease taken over by another run (exit
      code 5).
  """
  t = run.config.train
  num_steps = t.num_train_steps
  stop_at = min(num_steps, run.start_step + t.stop_after_steps) if t.stop_after_steps else num_steps
  run.bar = progress.ProgressBar(t.progress, run.start_step, stop_at)
  log = progress.TrainLog(run.config, run.bar)
  if flops_per_step is not None:
    log.flops_per_step = flops_per_step
  logging.info(
    'training steps %d -> %d of %d (%s tokens/step, %.3g FLOPs/step)',
    run.start_step,
    stop_at,
    num_steps,
    f'{log.tokens_per_step:,}',
    log.flops_per_step,
  )
  if run.start_step >= num_steps:
    logging.info(
      'the checkpoint is already at step %d of %d: evaluating only (raise '
      '--config.train.num_train_steps to train further)',
      run.start_step,
      num_steps,
    )
  log_hook = Hook(lambda step: log.write(run.writer, step), t.log_every_steps, (stop_at,))
  eval_hook = Hook(evaluate, t.eval_every_steps, (num_steps,))
  restored = getattr(run.ckpt, 'restored_step', None)
  # A resumed run whose first steps all fail names its checkpoint as suspect, or the config
  # change made for this resume (guards.Health).
  health = guards.Health(
    t.max_nonfinite_steps,
    run.ckpt.path(restored) if restored is not None else '',
    resume_changes(run, restored),
  )
  save_hook = Hook(
    functools.partial(save, run, health=health), t.checkpoint_every_steps, (stop_at,)
  )
  base_key = jax.random.key(run.config.seed)
  profiler = progress.StepProfiler(t.profile_steps, run.workdir)
  eval_result, step, previous = None, run.start_step, None
  # This process's failure (a save, a metrics write) since the last agreement point.
  failure = None
  if signals.should_stop(step, True, run.start_step):
    # Asked to stop during set-up (restore, compile): nothing new to save, no step to take.
    run.stopped_by = signals.reason
    logging.warning('stopped before step %d after %s during set-up', step, signals.reason)
    stop_at = step
  try:
    batch = None
    while step < stop_at:
      fresh, failed = _failure(functools.partial(next_batch, step))
      if step == run.start_step:
        # Agreed before the first step: a process without a batch has none to reuse.
        agree_on_failure('first_batch', failed)
      elif failed is not None and jax.process_count() > 1:
        # This process's data failed: it reuses its last batch (the step must run on every
        # process) until the next agreement point, where all stop before any save.
        failure = failure or failed
        fresh = batch
      elif failed is not None:
        raise failed
      batch = fresh
      profiler.before_step(step)
      run.state, step_metrics = run.train_step(run.state, batch, base_key)
      log.add(step_metrics, first=step == run.start_step, state=run.state)
      step += 1
      signals.current_step = step
      profiler.after_step(step, run.state)
      if previous is not None:
        # Waits for the previous step: the host stays at most one step ahead of the device,
        # so a stop request is served within about one step (docs/design.md 9).
        health.observe(step - 1, previous)
      previous = step_metrics
      log_step = log_hook.due(step)
      if log_step:
        # A failed metrics write (process 0's) is agreed with the save check below.
        failure = failure or _failure(functools.partial(log_hook.fn, step))[1]
      # Agreed before the evaluation: a preemption's grace period is for the save.
      stop = signals.should_stop(step, log_step, run.start_step)
      # An evaluation's or a hook's failure on one process (process 0's metrics write) is
      # agreed with the others, as a failed save is.
      if eval_hook.due(step) and not stop:
        result, failed = _failure(functools.partial(eval_hook.fn, step))
        eval_result, failure = (eval_result if failed else result), failure or failed
      for hook in hooks:
        if hook.due(step) and not stop:
          failure = failure or _failure(functools.partial(hook.fn, step))[1]
      saved, save_step = False, save_hook.due(step) or stop
      if not save_step:
        failure = failure or _failure(functools.partial(_check_saves, run))[1]
      if run.lock is not None:  # a bucket workdir's lease taken over by another run: exit 5
        failure = failure or _failure(run.lock.check)[1]
      if (failure is not None and jax.process_count() == 1) or log_step or save_step:
        # At the same points on every process (log and save steps, an agreed stop), and
        # before a save: after a failure no process starts one (it would rotate out a good
        # checkpoint).
        agree_on_failure('loop_failure', failure)
      if save_step:
        health.observe(step, step_metrics)
        saved, failure = _failure(functools.partial(save_hook.fn, step, force=stop))
        agree_on_failure('save_failure', failure)
      if stop:
        run.stopped_by = signals.reason
        logging.warning(
          'stopped at step %d after %s; %s',
          step,
          signals.reason,
          'checkpoint saved (run the same command to resume)' if saved else 'no checkpoint saved',
        )
        break
    if previous is not None:
      health.observe(step, previous)
    if eval_result is None and evaluate_at_stop and not run.stopped_by:
      # Not after a stop signal: a preemption's grace period is for the save, not for an eval.
      eval_result, failed = _failure(functools.partial(evaluate, step))
      agree_on_failure('final_evaluation', failed)
  finally:
    profiler.stop()
  if health.skipped_total:
    logging.warning(
      '%d step(s) had a non-finite loss or gradient; their updates were skipped',
      health.skipped_total,
    )
  steps_done = step - run.start_step
  return LoopResult(eval_result or {}, step, steps_done, steps_done * log.tokens_per_step)
