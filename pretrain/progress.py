"""What a person watching a run sees: the periodic log lines (`TrainLog`), a progress bar on a
terminal (`ProgressBar`) and the closing run summary (`run_summary`).

Log lines are identical whether or not the bar is shown; on a terminal (or with
`--config.train.progress=on`) a tqdm bar with step, loss, tokens/s and ETA stays below them.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from data_pipelines import objectives
import models
import optim
from pretrain import metrics as metrics_lib
from pretrain import peak
from pretrain import storage

PROGRESS_MODES = ('auto', 'on', 'off')


class ProgressBar:
  """A tqdm bar on stderr, or nothing.

  Args:
    mode: config.train.progress: 'on', 'off', or 'auto' (on when stderr is a terminal).
    start, total: the first and the last step.
  """

  def __init__(self, mode: str, start: int, total: int):
    enabled = mode == 'on' or (mode == 'auto' and sys.stderr.isatty())
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm(
        total=total,
        initial=start,
        unit='step',
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
        smoothing=0.1,
      )

  @property
  def enabled(self) -> bool:
    return self._bar is not None

  def advance(self):
    if self._bar is not None:
      self._bar.update(1)

  def show(self, scalars: dict[str, float]):
    """Puts the last logged loss and throughput (when measured) on the bar."""
    if self._bar is not None:
      rate = f' | {scalars["tokens_per_sec"]:,.0f} tok/s' if 'tokens_per_sec' in scalars else ''
      self._bar.set_postfix_str(f'loss {scalars["loss"]:.4f}{rate}', refresh=False)

  def log(self, fmt: str, *args):
    """An INFO line printed above the bar (the bar is cleared and redrawn around it)."""
    if self._bar is not None:
      self._bar.clear()
    logging.info(fmt, *args)
    if self._bar is not None:
      self._bar.refresh()

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class TrainLog:
  """Step metrics between two log lines, throughput and MFU (device-to-host only at log
  steps). `add` after every step; `write(writer, step)` at a log step.

  Throughput is timed over the steps since the last log line, leaving out a run's first step
  (compilation): a log line right after that step has no timed step, so it has no tokens/s,
  MFU or ETA (rather than a rate of 0 and an ETA of thousands of hours).

  Args:
    config: the run's config; bar: where the lines go (ProgressBar, possibly disabled).
  """

  def __init__(self, config, bar: ProgressBar | None = None):
    self.num_steps = config.train.num_train_steps
    self.tokens_per_step = config.data.global_batch_size * config.data.seq_len
    num_predictions = (
      objectives.max_predictions(config.data.seq_len, config.data.mask_rate)
      if config.objective == 'mlm'
      else config.data.seq_len
    )
    self.flops_per_step = models.flops_per_token(config, num_predictions) * self.tokens_per_step
    self.peak = peak.peak_flops(config.train.peak_flops_per_device, config.model.dtype)
    self.schedule = optim.learning_rate_schedule(config)
    self.accumulation = max(config.optim.accumulation_steps, 1)
    self.bar = bar or ProgressBar('off', 0, 0)
    self.pending, self.window_start, self.window_steps = [], time.time(), 0

  def add(self, step_metrics, first: bool, state):
    self.pending.append(step_metrics)
    self.bar.advance()
    if first:  # the first step includes compilation: report it apart from throughput
      jax.block_until_ready(state)
      self.bar.log('first step (compilation included) took %.1f s', time.time() - self.window_start)
      self.window_start, self.window_steps = time.time(), -1
    self.window_steps += 1

  def write(self, writer: metrics_lib.MetricWriter, step: int):
    if not self.pending:
      return
    fetched = jax.device_get(self.pending)
    elapsed = max(time.time() - self.window_start, 1e-9)
    sums = {k: sum(m[k] for m in fetched) for k in ('loss_sum', 'correct_sum', 'weight_sum')}
    scalars = metrics_lib.summarize(sums)
    del scalars['perplexity']
    scalars['grad_norm'] = float(np.mean([m['grad_norm'] for m in fetched]))
    skipped = sum(int(m['skipped']) for m in fetched)
    if skipped:
      scalars['skipped_steps'] = skipped
    # The rate of the last optimizer update (updates = micro-steps // accumulation).
    scalars['learning_rate'] = float(self.schedule(max(step // self.accumulation - 1, 0)))
    if self.window_steps > 0:
      scalars['tokens_per_sec'] = self.window_steps * self.tokens_per_step / elapsed
      scalars['steps_per_sec'] = self.window_steps / elapsed
      if self.peak:
        scalars['mfu'] = self.flops_per_step * scalars['steps_per_sec'] / self.peak
    scalars.update({k: float(v) for k, v in fetched[-1].items() if k.startswith(('eg/', 'optim/'))})
    writer.write(step, 'train', scalars)
    self.bar.show(scalars)
    line = metrics_lib.log_line(step, self.num_steps, scalars)
    if self.window_steps > 0:
      eta = (self.num_steps - step) / scalars['steps_per_sec']
      line += f' | ETA {metrics_lib.format_duration(eta)}'
    self.bar.log('%s', line)
    self.pending, self.window_start, self.window_steps = [], time.time(), 0


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """'START,COUNT' (config.train.profile_steps) -> (start, count); '' -> None.

  Raises:
    ValueError: not two integers with START >= 1 and COUNT >= 1 (message names the flag).
  """
  if not spec:
    return None
  try:
    start, count = (int(v) for v in str(spec).split(','))
  except ValueError:
    start = count = 0
  if start < 1 or count < 1:
    raise ValueError(
      f'--config.train.profile_steps={spec!r}; give START,COUNT (e.g. 10,5: '
      f'trace steps 10 to 14; START after the first step keeps compilation out).'
    )
  return start, count


class StepProfiler:
  """A `jax.profiler` trace of steps [START, START + COUNT) under `<workdir>/profile`, from
  config.train.profile_steps ('' = off). TensorBoard's profile plugin opens the directory;
  Perfetto (ui.perfetto.dev) opens the `*.trace.json.gz` inside."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse_profile_steps(spec)
    self.directory = os.path.join(workdir, 'profile')
    self.active = False

  def before_step(self, step: int):
    """Call before dispatching step `step + 1` (steps are counted from 1)."""
    if self.window and step + 1 == self.window[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state):
    """Call after step `step`; stops the trace (waiting for the device) after the window."""
    if self.active and step >= sum(self.window) - 1:
      self.stop(state)

  def stop(self, state=None):
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    logging.info(
      'profile of steps %d-%d written to %s (tensorboard --logdir %s, Profile tab; '
      'or open the .trace.json.gz in ui.perfetto.dev)',
      self.window[0],
      sum(self.window) - 1,
      self.directory,
      self.directory,
    )


def resume_command(argv: Sequence[str] | None = None, drop: Sequence[str] = ()) -> str:
  """The command that continues this run: the launching command line when it was
  `launch.pretrain`, else a template.

  Args:
    argv: the command line (default sys.argv).
    drop: flags that take a value to leave out (e.g. '--config.train.num_train_steps', which
      the caller sets anew), in either spelling: `--flag=value` or `--flag value`.

  Returns:
    A shell command line.
  """
  argv = list(sys.argv if argv is None else argv)
  if not (argv and argv[0].replace(os.sep, '/').endswith('launch/pretrain.py')):
    return 'python -m launch.pretrain --config=<the same config> --workdir=<this workdir>'
  names = {f.lstrip('-') for f in drop}
  kept, args = [], iter(argv[1:])
  for arg in args:
    name, equals, _ = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name in names:
      if not equals:
        next(args, None)  # the two-word form: the value is the next word
      continue
    kept.append(arg)
  return shlex.join(['python', '-m', 'launch.pretrain', *kept])


def run_summary(
  *,
  workdir: str,
  start_step: int,
  step: int,
  num_steps: int,
  tokens: int,
  seconds: float,
  evals: list[dict[str, Any]],
  latest_checkpoint: int | None,
  stopped_by: str = '',
) -> str:
  """The block printed when a run ends (done, or stopped by a signal).

  Args:
    evals: every evaluation of this run, as {'step', 'loss', 'accuracy', ...}.
    stopped_by: 'SIGTERM' / 'Ctrl-C' when the run stopped early, else ''.
  """
  workdir = workdir if storage.is_remote(workdir) else os.path.abspath(workdir)
  state = f'stopped by {stopped_by} at' if stopped_by else 'at'
  lines = [
    f'run summary ({state} step {step} of {num_steps})',
    f'  steps        {start_step} -> {step} ({step - start_step} this run, {tokens:,} tokens)',
    f'  wall time    {metrics_lib.format_duration(seconds)} '
    f'({tokens / max(seconds, 1e-9):,.0f} tokens/s overall)',
  ]
  if evals:
    final, best = evals[-1], min(evals, key=lambda e: e['loss'])
    lines.append(
      f'  eval         final loss {final["loss"]:.4f}, acc {final["accuracy"]:.4f} '
      f'(step {final["step"]}); best loss {best["loss"]:.4f} (step {best["step"]})'
    )
  lines += [
    f'  checkpoints  {os.path.join(workdir, "checkpoints")} (latest: {latest_checkpoint})',
    f'  metrics      {os.path.join(workdir, "metrics.jsonl")}; plots: python -m '
    f'launch.report {workdir}',
    f'  tensorboard  tensorboard --logdir {os.path.join(workdir, "tensorboard")}',
    f'  config       {os.path.join(workdir, "config.json")}',
  ]
  if step < num_steps:
    lines.append(f'  resume       {resume_command()}')
  else:
    # The new step count replaces the one on the command line (a flag given twice reads as a
    # mistake, whichever absl keeps).
    command = resume_command(drop=['--config.train.num_train_steps'])
    # A run resumed with fewer steps than its checkpoint has stands at `step`, not num_steps.
    done = max(step, num_steps)
    lines.append(f'  continue     {command} --config.train.num_train_steps=<more than {done}>')
  return '\n'.join(lines)
