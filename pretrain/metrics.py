"""The run's metric writer, console lines and metric history.

`MetricWriter` sends each step's scalars to the sinks named by `config.train.loggers`
(`pretrain/sinks.py`, docs/configuration.md 2). Only process 0 writes; every process may log
to the console. The peak FLOP/s behind MFU is `pretrain/peak.py`.
"""

from __future__ import annotations

import json
import math
import logging as logging_std
import os
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath

from pretrain import sinks


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class MetricWriter:
  """Sends scalar metrics to the run's sinks: `config.train.loggers` (without a config,
  `sinks.DEFAULT_LOGGERS`: `metrics.jsonl` and TensorBoard under `workdir`),
  docs/configuration.md 2.

  Args:
    workdir: the run directory (local or gs://).
    enabled: write at all (True on process 0 only: sinks write files and one W&B run).
    tensorboard: False leaves TensorBoard out whatever the loggers say (older callers' switch).
    config: the run's resolved ConfigDict: train.loggers, train.wandb_*, and the config W&B
      records. None: `sinks.DEFAULT_LOGGERS` and W&B's defaults.
    loggers: overrides config.train.loggers (comma-separated names, or a sequence).
    start_step: the step this run starts from (the restored step; 0 for a fresh start); W&B
      continues the workdir's run only when it is > 0.

  Raises:
    sinks.LoggerError: an unknown logger, or a sink that cannot start (wandb missing, W&B
      login).
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
      loggers = config.train.loggers if config is not None else sinks.DEFAULT_LOGGERS
    names = sinks.parse_loggers(loggers)
    if not tensorboard:
      names = tuple(n for n in names if n != 'tensorboard')
    self.sinks: list[sinks.Sink] = []
    if not enabled:
      return
    try:
      for name in names:
        self.sinks.append(sinks.SINKS[name].open(workdir, config, int(start_step)))
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
