"""Pictures and a table from run directories (`python -m launch.report`).

Reads each run's `metrics.jsonl` (and `config.json` for tokens per step, `results.json` of a
fine-tuning run where present) and draws, with one curve per run and a legend: training and
evaluation loss against steps and against tokens seen, the learning rate, tokens/s and MFU.
`summary_table` gives the Markdown table (final and best losses, tokens, wall time, MFU).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import numpy as np


class ReportError(ValueError):
  """A run directory without usable metrics; the message names it."""


@dataclasses.dataclass
class RunHistory:
  """One run's metrics.

  Attributes:
    name: the label in legends and tables (the directory's name unless given).
    train, eval: the lines of each split, in step order ({'step', 'time', 'loss', ...}).
    probe: the linear probe's lines ({'step', 'accuracy', ...}; docs/finetuning.md 8).
    data: a data mixture's lines ({'step', '<source>/token_share', ...};
      docs/configuration.md 3).
    tokens_per_step: global_batch_size * seq_len from config.json (0 if unknown).
    results: the run's results.json (fine-tuning), or None.
  """

  name: str
  train: list[dict[str, float]]
  eval: list[dict[str, float]]
  tokens_per_step: int
  results: dict[str, Any] | None = None
  probe: list[dict[str, float]] = dataclasses.field(default_factory=list)
  data: list[dict[str, float]] = dataclasses.field(default_factory=list)

  def column(self, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in `split` where present."""
    lines = [l for l in getattr(self, split) if key in l]
    return (np.array([l['step'] for l in lines], float), np.array([l[key] for l in lines], float))


def _is_record(record) -> bool:
  """Whether a parsed metrics.jsonl line is one the plots can use: a JSON object whose
  "step" is an integer and whose other values, "split" aside, are numbers (or null)."""
  if not isinstance(record, dict):
    return False
  step = record.get('step')
  if not isinstance(step, int) or isinstance(step, bool):
    return False
  return all(
    v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    for k, v in record.items()
    if k not in ('step', 'split')
  )


def load_run(run_dir: str, name: str | None = None) -> RunHistory:
  """Reads a run directory.

  Raises:
    ReportError: it has no metrics.jsonl with at least one line.
  """
  root = epath.Path(run_dir)
  path = root / 'metrics.jsonl'
  if not path.exists():
    raise ReportError(
      f'{run_dir} has no metrics.jsonl: give run directories written by '
      f'launch.pretrain (or launch.upscale followed by training).'
    )
  lines, skipped = [], 0
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:  # a torn last line of a killed run
      record = None
    if _is_record(record):
      lines.append(record)
    elif line.strip():
      skipped += 1
  if skipped:
    logging.warning(
      '%s: skipped %d line(s) that are not metrics records (a JSON object with an integer '
      '"step" and numeric values; a line torn by a kill, or edited by hand)',
      path,
      skipped,
    )
  if not lines:
    raise ReportError(f'{path} is empty: the run has not logged a step yet.')
  tokens_per_step = 0
  if (root / 'config.json').exists():
    data = json.loads((root / 'config.json').read_text()).get('data', {})
    tokens_per_step = int(data.get('global_batch_size', 0)) * int(data.get('seq_len', 0))
  results = None
  if (root / 'results.json').exists():
    results = json.loads((root / 'results.json').read_text())
  by_split = {
    s: sorted((l for l in lines if l.get('split') == s), key=lambda l: l['step'])
    for s in ('train', 'eval', 'probe', 'data')
  }
  return RunHistory(
    name or str(run_dir).rstrip('/').rsplit('/', 1)[-1],
    by_split['train'],
    by_split['eval'],
    tokens_per_step,
    results,
    by_split['probe'],
    by_split['data'],
  )


def _figure(title: str, xlabel: str, ylabel: str):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')  # files only: no display on a pod or in CI
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 3.2))
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  return fig, ax


def plot_loss(runs: list[RunHistory], x: str = 'step'):
  """Training (solid) and evaluation (dashed, dots) loss of every run vs `x` ('step' or
  'tokens'); returns the matplotlib Figure."""
  fig, ax = _figure('loss', 'tokens seen' if x == 'tokens' else 'step', 'loss')
  for i, run in enumerate(runs):
    color = f'C{i % 10}'
    scale = run.tokens_per_step if x == 'tokens' else 1
    steps, loss = run.column('train', 'loss')
    if len(steps):
      ax.plot(steps * scale, loss, color=color, label=f'{run.name} train')
    steps, loss = run.column('eval', 'loss')
    if len(steps):
      ax.plot(
        steps * scale,
        loss,
        color=color,
        linestyle='--',
        marker='o',
        markersize=3,
        label=f'{run.name} eval',
      )
  ax.legend(fontsize=8)
  return fig


def plot_train_scalar(runs: list[RunHistory], key: str, title: str, ylabel: str):
  """One training scalar (learning_rate, tokens_per_sec, mfu, grad_norm) vs step."""
  fig, ax = _figure(title, 'step', ylabel)
  for i, run in enumerate(runs):
    steps, values = run.column('train', key)
    if len(steps):
      ax.plot(steps, values, color=f'C{i % 10}', label=run.name)
  ax.legend(fontsize=8)
  return fig


def plot_probe(runs: list[RunHistory]):
  """The linear probe's dev accuracy (solid) and train accuracy (dotted) of every run vs
  tokens seen (vs step when a run's config.json does not give its tokens per step),
  docs/finetuning.md 8."""
  tokens = all(run.tokens_per_step for run in runs)
  fig, ax = _figure(
    'linear probe during pretraining', 'tokens seen' if tokens else 'step', 'probe accuracy'
  )
  for i, run in enumerate(runs):
    color, scale = f'C{i % 10}', run.tokens_per_step if tokens else 1
    steps, values = run.column('probe', 'accuracy')
    if len(steps):
      ax.plot(steps * scale, values, color=color, marker='o', markersize=3, label=f'{run.name} dev')
    steps, values = run.column('probe', 'train_accuracy')
    if len(steps):
      ax.plot(steps * scale, values, color=color, linestyle=':', label=f'{run.name} train')
  ax.legend(fontsize=8)
  return fig


def plot_mixture(runs: list[RunHistory]):
  """Each mixture source's share of the documents (solid) and tokens (dashed) read so far vs
  step; the document shares settle at the weights, the token shares differ by document
  length (docs/configuration.md 3)."""
  fig, ax = _figure('data mixture: share read so far', 'step', 'share')
  styles = {'document_share': '-', 'token_share': '--'}
  for i, run in enumerate(runs):
    keys = sorted({k for line in run.data for k in line if k.endswith(tuple(styles))})
    for j, key in enumerate(keys):
      source, _, kind = key.rpartition('/')
      steps, values = run.column('data', key)
      label = f'{run.name} {source} {kind.split("_")[0]}s'
      color = f'C{(i * 4 + j // 2) % 10}'
      ax.plot(steps, values, color=color, linestyle=styles[kind], label=label)
  ax.legend(fontsize=8)
  return fig


PLOTS = {
  'loss_vs_step.png': lambda runs: plot_loss(runs, 'step'),
  'loss_vs_tokens.png': lambda runs: plot_loss(runs, 'tokens'),
  'learning_rate.png': lambda runs: plot_train_scalar(
    runs, 'learning_rate', 'learning rate', 'learning rate'
  ),
  'tokens_per_sec.png': lambda runs: plot_train_scalar(
    runs, 'tokens_per_sec', 'throughput', 'tokens/s'
  ),
  'mfu.png': lambda runs: plot_train_scalar(runs, 'mfu', 'model FLOPs utilisation', 'MFU'),
  'probe_accuracy.png': plot_probe,
  'data_mixture.png': plot_mixture,
}


def summary_table(runs: list[RunHistory]) -> str:
  """A Markdown table: steps, tokens, final train loss, final and best eval loss, wall time,
  median tokens/s and MFU per run (and fine-tuning results where a run has them)."""
  header = (
    '| run | steps | tokens | final train loss | final eval loss | best eval loss '
    '(step) | wall time | tokens/s | MFU |\n|---|---|---|---|---|---|---|---|---|'
  )
  rows = [header]
  fmt = lambda v, f='{:.4f}': '–' if v is None else f.format(v)
  for run in runs:
    last = run.train[-1] if run.train else {}
    steps = max([l['step'] for l in run.train + run.eval] or [0])
    evals = [l for l in run.eval if 'loss' in l]
    best = min(evals, key=lambda l: l['loss']) if evals else None
    times = [l['time'] for l in run.train + run.eval if 'time' in l]
    wall = (max(times) - min(times)) if len(times) > 1 else None
    rate = [l['tokens_per_sec'] for l in run.train if 'tokens_per_sec' in l]
    mfu = [l['mfu'] for l in run.train if 'mfu' in l]
    rows.append(
      f'| {run.name} | {steps} | {steps * run.tokens_per_step:,} | {fmt(last.get("loss"))} | '
      f'{fmt(evals[-1]["loss"] if evals else None)} | '
      f'{fmt(best["loss"] if best else None)}{" (%d)" % best["step"] if best else ""} | '
      f'{fmt(wall, "{:.0f} s")} | {fmt(float(np.median(rate)) if rate else None, "{:,.0f}")} | '
      f'{fmt(float(np.median(mfu)) if mfu else None, "{:.1%}")} |'
    )
  with_results = [r for r in runs if r.results]
  if with_results:
    rows.append('\n| run | fine-tuning results |\n|---|---|')
    for run in with_results:
      scalars = {k: v for k, v in run.results.items() if isinstance(v, (int, float))}
      rows.append(f'| {run.name} | ' + ', '.join(f'{k} {v:.4g}' for k, v in scalars.items()) + ' |')
  return '\n'.join(rows) + '\n'


def write_report(run_dirs: list[str], out_dir: str, names: list[str] | None = None) -> list[str]:
  """Writes the PNG plots and `summary.md` of `run_dirs` into `out_dir`.

  Returns:
    The paths written.

  Raises:
    ReportError: a run directory has no metrics (named).
  """
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  names = names or [None] * len(run_dirs)
  runs = [load_run(d, n) for d, n in zip(run_dirs, names)]
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for filename, make in PLOTS.items():
    fig = make(runs)
    if any(ax.get_lines() for ax in fig.axes):
      path = os.path.join(out_dir, filename)
      fig.savefig(path, dpi=110, bbox_inches='tight')
      written.append(path)
    plt.close(fig)
  path = os.path.join(out_dir, 'summary.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(summary_table(runs))
  return written + [path]
