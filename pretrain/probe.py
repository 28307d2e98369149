"""A linear probe during pretraining: is the encoder getting more useful? (docs/finetuning.md 8)

  probe = probe_lib.make(config, tokenizer, run_setup)   # None when config.probe is off
  result = probe(params, step)        # {'accuracy', 'train_accuracy', 'seconds'}

Every `probe.every_steps` steps (0: with every evaluation) the frozen encoder embeds a small
labelled task (`probe.train_file` / `probe.dev_file`, the fine-tuning file formats:
`data_pipelines/tasks.py`): the final hidden states mean-pooled over each example's tokens,
as fine-tuning's default pooling reads them. A logistic regression (scikit-learn, features
standardised) is fitted on the training examples and scored on the dev examples; the dev
accuracy goes to metrics.jsonl / TensorBoard as split 'probe' and to `launch.report`'s plots.

Cost: a forward pass over at most `max_train_examples + max_dev_examples` rows of
`max_seq_len` tokens, about (rows x max_seq_len) / (3 x tokens trained between probes) of the
training time, plus the fit (well under a second at the defaults); the log line prints the
measured share.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import tasks
from pretrain import mesh as mesh_lib


@dataclasses.dataclass
class Probe:
  """A probe task encoded with the run's tokenizer, and the compiled feature extractor.

  Attributes:
    train, dev: the encoded splits (at most max_*_examples each).
    features: the compiled `(params, batch) -> float32 [b, d]` mean-pooled final hidden
      states, replicated on every process.
    batch_size: rows per call (the run's global_batch_size); seq_len: tokens per row.
    tokenizer: the run's tokenizer (pad id for batches).
    task_name: for the log line.
  """

  train: tasks.Encoded
  dev: tasks.Encoded
  features: Callable
  batch_size: int
  seq_len: int
  mesh: jax.sharding.Mesh
  tokenizer: object
  task_name: str
  _last: float = dataclasses.field(default_factory=time.time)

  def embed(self, params, encoded: tasks.Encoded) -> np.ndarray:
    """float32 [N, d] features of every example (the last call padded with filler rows)."""
    n, b, out = len(encoded), self.batch_size, []
    for start in range(0, n, b):
      indices = list(range(start, min(start + b, n)))
      indices += [-1] * (b - len(indices))
      batch = tasks.make_batch(encoded, indices, self.seq_len, self.tokenizer)
      batch = {k: batch[k] for k in ('inputs', 'segment_ids', 'positions', 'token_types')}
      # Every process calls the same program on the same global batch (its own rows of it).
      out.append(np.asarray(jax.device_get(self.features(params, _global(batch, self.mesh)))))
    return np.concatenate(out)[:n]

  def __call__(self, params, step: int) -> dict[str, float]:
    """Fits and scores the probe on `params` (the encoder is frozen: nothing is updated).

    Returns:
      {'accuracy': dev accuracy, 'train_accuracy', 'seconds': the probe's wall time,
       'time_fraction': its share of the wall time since the previous probe}.
    """
    from sklearn import linear_model  # pylint: disable=g-import-not-at-top
    from sklearn import pipeline as sk_pipeline  # pylint: disable=g-import-not-at-top
    from sklearn import preprocessing  # pylint: disable=g-import-not-at-top

    began = time.time()
    x_train, x_dev = self.embed(params, self.train), self.embed(params, self.dev)
    model = sk_pipeline.make_pipeline(
      preprocessing.StandardScaler(), linear_model.LogisticRegression(max_iter=1000)
    )
    model.fit(x_train, self.train.labels)
    seconds = time.time() - began
    result = {
      'accuracy': float(model.score(x_dev, self.dev.labels)),
      'train_accuracy': float(model.score(x_train, self.train.labels)),
      'seconds': seconds,
      'time_fraction': seconds / max(time.time() - self._last, 1e-9),
    }
    self._last = time.time()
    logging.info(
      'probe step %d | %s dev accuracy %.4f (train %.4f) | %.1f s, %.1f%% of the time since '
      'the last probe',
      step,
      self.task_name,
      result['accuracy'],
      result['train_accuracy'],
      seconds,
      100 * result['time_fraction'],
    )
    return result


def _global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """The global batch from the full NumPy batch every process holds: the rows this process's
  devices address (`mesh_lib.local_rows`, docs/design.md 13)."""
  return mesh_lib.global_batch(mesh_lib.local_rows(batch, mesh), mesh)


def validate(p) -> None:
  """Checks `config.probe` (ValueError naming the field)."""
  if bool(p.train_file) != bool(p.dev_file):
    raise ValueError(
      '--config.probe.train_file and --config.probe.dev_file go together: give both '
      '(a small labelled task: TSV, CSV or JSONL), or neither (no probe).'
    )
  for field in ('every_steps', 'max_train_examples', 'max_dev_examples'):
    if p[field] < 0:
      raise ValueError(f'--config.probe.{field}={p[field]} must be >= 0.')
  if p.train_file and p.max_seq_len < 4:
    raise ValueError(f'--config.probe.max_seq_len={p.max_seq_len} must be >= 4.')


def make(config, tokenizer, run_setup) -> Probe | None:
  """The probe of `config.probe`, or None when no files are given.

  Args:
    config: the run's ConfigDict; tokenizer: the run's tokenizer; run_setup: `train.Setup`
      (the pretraining model's graphdef, shardings and mesh).

  Raises:
    tasks.TaskError: the probe files cannot be read (names the file and the fix).
  """
  p = config.probe
  if not p.train_file:
    return None
  options = tasks.TaskOptions(
    train_file=p.train_file,
    dev_file=p.dev_file,
    label_column=p.label_column,
    text_column=p.text_column,
  )
  task = tasks.load(options)
  if task.kind != 'classification':
    raise tasks.TaskError(f'--config.probe.train_file={p.train_file}: the probe needs labels.')

  def first(split: tasks.Split, limit: int) -> tasks.Split:
    # The first examples: the files' own order, the same at every probe.
    pairs = split.pairs[:limit] if split.pairs is not None else None
    return tasks.Split(split.texts[:limit], pairs, split.labels[:limit])

  train = tasks.encode(first(task.train, p.max_train_examples), tokenizer, p.max_seq_len)
  dev = tasks.encode(first(task.dev, p.max_dev_examples), tokenizer, p.max_seq_len)
  graphdef, mesh = run_setup.graphdef, run_setup.mesh

  def features(params, batch):
    model = nnx.merge(graphdef, params)
    hidden = model.encode(
      batch['inputs'], batch['segment_ids'], batch['positions'], token_types=batch['token_types']
    )
    mask = (batch['segment_ids'] > 0).astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

  compiled = mesh_lib.jit(
    features,
    mesh,
    config.mesh.logical_axis_rules,
    in_shardings=(run_setup.state_shardings['params'], mesh_lib.batch_sharding(mesh)),
    out_shardings=mesh_lib.replicated(mesh),
  )
  logging.info(
    'probe: %s, %d train / %d dev examples of %d tokens, every %s',
    task.name,
    len(train),
    len(dev),
    p.max_seq_len,
    f'{p.every_steps} steps' if p.every_steps else 'evaluation',
  )
  return Probe(
    train, dev, compiled, config.data.global_batch_size, p.max_seq_len, mesh, tokenizer, task.name
  )
