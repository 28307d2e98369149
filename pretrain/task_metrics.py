"""Fine-tuning metrics on a whole dev split (docs/finetuning.md 2): accuracy, F1 and Matthews
correlation of class predictions (scikit-learn), Pearson and Spearman correlation of
regression scores (scipy).

  scores = task_metrics.compute_metrics(task, outputs, task.dev.labels)

Degenerate inputs give 0.0 instead of NaN, a warning or an exception: no examples, one
class predicted, constant scores (the first evaluations of a run often are). scikit-learn
and scipy are imported on first use (`import sklearn.metrics` alone takes ~0.7 s).
`aggregate` and `results_table` summarise a sweep over learning rates and seeds.
"""

from __future__ import annotations

import os
from typing import Any
import warnings

import numpy as np

from data_pipelines import tasks


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  """The fraction of predictions equal to their labels.

  Args:
    predictions: int [N] predicted class ids.
    labels: int [N] true class ids.

  Returns:
    A float in [0, 1]; 0.0 when N = 0.

  Source: sklearn.metrics.accuracy_score.
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if not len(labels):
    return 0.0
  return float(metrics.accuracy_score(labels, predictions))


def f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
  """F1 = 2 TP / (2 TP + FP + FN): with two classes, F1 of class 1 (the second label name:
  GLUE's MRPC / QQP F1, sklearn's average='binary'); with more, the unweighted mean of every
  class's F1 (average='macro'). A class never true nor predicted scores 0 (zero_division=0).

  Args:
    predictions: int [N] predicted class ids.
    labels: int [N] true class ids.
    num_classes: C, the classes 0..C-1 averaged over (None: the largest id seen + 1, at
      least 2).

  Returns:
    A float in [0, 1]; 0.0 when N = 0.

  Source: sklearn.metrics.f1_score(labels=range(C), average=None, zero_division=0), then
  class 1's value (C = 2) or the mean (C > 2).
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if not len(labels):
    return 0.0
  k = num_classes or int(max(predictions.max(), labels.max()) + 1)
  k = max(k, 2)
  per_class = metrics.f1_score(
    labels, predictions, labels=list(range(k)), average=None, zero_division=0
  )
  return float(per_class[1]) if k == 2 else float(np.mean(per_class))


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation, multi-class (Gorodkin 2004's R_K; GLUE's CoLA metric): from the
  confusion counts, (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))
  with c correct, s examples, p_k / t_k predicted / true counts of class k.

  Args:
    predictions: int [N] predicted class ids.
    labels: int [N] true class ids.

  Returns:
    A float in [-1, 1]; 0.0 when a factor of the denominator is 0 (one class predicted, or
    one class true) and when N = 0.

  Source: sklearn.metrics.matthews_corrcoef.
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  predictions, labels = np.asarray(predictions), np.asarray(labels)
  # One class in both (sklearn warns that it cannot size the confusion matrix) or none.
  if len(np.union1d(predictions, labels)) < 2:
    return 0.0
  return float(metrics.matthews_corrcoef(labels, predictions))


def _is_constant(x: np.ndarray) -> bool:
  return bool(np.all(x == x[0]))


def pearson(scores: np.ndarray, targets: np.ndarray) -> float:
  """Pearson's r of regression scores and targets (GLUE's STS-B metric).

  Args:
    scores: float [N] model outputs.
    targets: float [N] true values.

  Returns:
    A float in [-1, 1]; 0.0 when either is constant or N < 2; NaN when an input holds NaN.

  Source: scipy.stats.pearsonr(...).statistic (its NearConstantInputWarning silenced).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    warnings.simplefilter('ignore', stats.NearConstantInputWarning)
    return _correlation(stats.pearsonr, scores, targets)


def spearman(scores: np.ndarray, targets: np.ndarray) -> float:
  """Spearman's rho: Pearson's r of the ranks, tied values given their average rank.

  Args:
    scores: float [N] model outputs.
    targets: float [N] true values.

  Returns:
    A float in [-1, 1]; 0.0 when either is constant or N < 2; NaN when an input holds NaN.

  Source: scipy.stats.spearmanr(...).statistic.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  return _correlation(stats.spearmanr, scores, targets)


def _correlation(statistic, scores: np.ndarray, targets: np.ndarray) -> float:
  """`statistic(x, y).statistic` in float64, 0.0 when either input is constant or N < 2."""
  x, y = np.asarray(scores, np.float64), np.asarray(targets, np.float64)
  if len(x) < 2 or _is_constant(x) or _is_constant(y):
    return 0.0
  return float(statistic(x, y).statistic)


def compute_metrics(task: tasks.Task, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Every metric of the task's kind (`task.metrics`) on dev outputs.

  Args:
    task: the data_pipelines.tasks.Task (its kind and, for F1, num_outputs C).
    outputs: float [N, C] logits (classification: the argmax is the prediction), or [N, 1] /
      [N] scores (regression).
    labels: int [N] class ids (classification) or float [N] targets (regression).

  Returns:
    {'accuracy', 'f1', 'matthews'} or {'pearson', 'spearman'}: Python floats.

  Source: the functions above (scikit-learn / scipy).
  """
  outputs = np.asarray(outputs, np.float64)
  labels = np.asarray(labels)
  if task.kind == 'classification':
    predictions = np.argmax(outputs, axis=-1)
    return {
      'accuracy': accuracy(predictions, labels),
      'f1': f1(predictions, labels, task.num_outputs),
      'matthews': matthews(predictions, labels),
    }
  scores = outputs.reshape(len(labels), -1)[:, 0]
  return {'pearson': pearson(scores, labels), 'spearman': spearman(scores, labels)}


# ----------------------------------------------------------------------------- sweep results


def _std(values) -> float:
  """Sample standard deviation (ddof 1; 0 for one value)."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(
  task: tasks.Task, runs: list[dict[str, Any]], config, from_workdir: str, from_step: int | None
) -> dict[str, Any]:
  """results.json of a fine-tuning sweep (pretrain/finetune.py).

  Args:
    task: the task; runs: one dict per (learning rate, seed) run with 'learning_rate',
      'seed', 'num_steps' and 'dev' ({metric: value}); config: the sweep's config
      (`finetune.learning_rates`, `finetune.seeds`, `model.family`); from_workdir, from_step:
      the pretraining run and step ('' / None: random init).

  Returns:
    Per learning rate the mean and std over seeds of every dev metric, the best learning rate
    by the task metric's mean (on the held-out training examples when every run has a
    'validation' result, finetune.validation_fraction > 0; else on dev: 'selected_on'
    says which), and its mean and std as top-level numbers (what `launch.report` tables).
  """
  ft, sweep = config.finetune, []
  metric = task.metric
  selected_on = 'validation' if runs and all(r.get('validation') for r in runs) else 'dev'
  for lr in ft.learning_rates:
    mine = [r for r in runs if r['learning_rate'] == float(lr)]
    values = {m: [r['dev'][m] for r in mine] for m in task.metrics}
    row = {
      'learning_rate': float(lr),
      'seeds': [r['seed'] for r in mine],
      'dev': values,
      'mean': {m: float(np.mean(v)) for m, v in values.items()},
      'std': {m: _std(v) for m, v in values.items()},
    }
    if selected_on == 'validation':
      row['validation_mean'] = float(np.mean([r['validation'][metric] for r in mine]))
      row['selected_steps'] = [r.get('selected_step') for r in mine]
    sweep.append(row)
  best = max(
    sweep, key=lambda s: s['validation_mean'] if selected_on == 'validation' else s['mean'][metric]
  )
  return {
    'task': task.name,
    'kind': task.kind,
    'metric': metric,
    'init': 'pretrained' if from_workdir else 'random',
    'from_workdir': os.path.abspath(from_workdir) if from_workdir else '',
    'from_step': from_step,
    'family': config.model.family,
    'train_examples': len(task.train),
    'dev_examples': len(task.dev),
    'num_steps': runs[0]['num_steps'] if runs else 0,
    'best_learning_rate': best['learning_rate'],
    'selected_on': selected_on,
    'num_seeds': len(ft.seeds),
    f'dev_{metric}_mean': best['mean'][metric],
    f'dev_{metric}_std': best['std'][metric],
    'best': {'learning_rate': best['learning_rate'], 'mean': best['mean'], 'std': best['std']},
    'sweep': sweep,
    'runs': runs,
  }


def results_table(results: dict[str, Any]) -> str:
  """A Markdown table of the sweep: per learning rate, mean +- std of every dev metric over
  the seeds and the task metric of each seed; the best row is marked."""
  metrics = list(results['sweep'][0]['mean']) if results['sweep'] else []
  metric = results['metric']
  lines = [
    f'{results["task"]} ({results["init"]} init, {results["num_steps"]} steps, '
    f'{results["num_seeds"]} seed(s); '
    + (
      f'held-out training examples pick the step and learning rate by {metric})'
      if results.get('selected_on') == 'validation'
      else f'dev {metric} picks the learning rate)'
    ),
    '| learning rate | '
    + ' | '.join(f'{m} (mean ± std)' for m in metrics)
    + f' | {metric} per seed |',
    '|---' * (len(metrics) + 2) + '|',
  ]
  for row in results['sweep']:
    mark = ' (best)' if row['learning_rate'] == results['best_learning_rate'] else ''
    cells = [f'{row["mean"][m]:.4f} ± {row["std"][m]:.4f}' for m in metrics]
    seeds = ', '.join(f'{v:.4f}' for v in row['dev'][metric])
    lines.append(f'| {row["learning_rate"]:g}{mark} | ' + ' | '.join(cells) + f' | {seeds} |')
  return '\n'.join(lines)
