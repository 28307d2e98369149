"""Fine-tuning tasks: their data (a GLUE task from TFDS by name, or local TSV / CSV / JSONL
files), their labels, the names of their metrics (computed by pretrain/task_metrics.py), and
the padded batches the classifier reads (docs/finetuning.md 3-4).

  task = tasks.load(tasks.TaskOptions(train_file='train.tsv', dev_file='dev.tsv'))
  train = tasks.encode(task.train, tokenizer, max_seq_len=128)
  batch = tasks.make_batch(train, indices, max_seq_len=128, tokenizer=tokenizer)

Inputs are BERT's: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, truncated longest-first to
max_seq_len, token type 0 up to the first [SEP] and 1 after it, one example per row, padded
with segment id 0. Every bad input raises `TaskError` naming the config field (as its flag,
`--config.finetune.<field>`) or the file (and line), and the fix. NumPy only: no jax here
(docs/design.md 3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from typing import Sequence
from urllib import parse as urlparse

import numpy as np

KINDS = ('classification', 'regression')
FORMATS = ('auto', 'tsv', 'csv', 'jsonl')
METRICS = ('accuracy', 'f1', 'matthews', 'pearson', 'spearman')
CLASSIFICATION_METRICS = ('accuracy', 'f1', 'matthews')
REGRESSION_METRICS = ('pearson', 'spearman')
# TaskError messages name a TaskOptions field as the flag that sets it: FLAG + field name.
FLAG = '--config.finetune.'


class TaskError(ValueError):
  """Bad task input (config fields, files, labels); the message names the field's flag
  (`--config.finetune.<field>`) or the file, and the fix."""


# ----------------------------------------------------------------------------- GLUE


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """How a GLUE task of TFDS (`glue/<name>`) reads: its text features, kind, GLUE metric and
  the split used as dev (Wang et al. 2019, Table 1)."""

  text_keys: tuple[str, ...]
  metric: str
  kind: str = 'classification'
  dev_split: str = 'validation'


GLUE_TASKS = {
  'cola': GlueTask(('sentence',), 'matthews'),
  'sst2': GlueTask(('sentence',), 'accuracy'),
  'mrpc': GlueTask(('sentence1', 'sentence2'), 'f1'),
  'qqp': GlueTask(('question1', 'question2'), 'f1'),
  'stsb': GlueTask(('sentence1', 'sentence2'), 'pearson', 'regression'),
  'mnli': GlueTask(('premise', 'hypothesis'), 'accuracy', dev_split='validation_matched'),
  'qnli': GlueTask(('question', 'sentence'), 'accuracy'),
  'rte': GlueTask(('sentence1', 'sentence2'), 'accuracy'),
  'wnli': GlueTask(('sentence1', 'sentence2'), 'accuracy'),
}


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass
class TaskOptions:
  """Where a task's data comes from and how to read it (the `config.finetune` fields of the
  same names).

  Attributes:
    task: 'glue/<name>' (a key of GLUE_TASKS, downloaded by TFDS), or '' for local files.
    train_file, dev_file: local files (dev_file: the split the metric is reported on).
    file_format: 'tsv', 'csv', 'jsonl' or 'auto' (from the extension; .txt is TSV).
    header: TSV/CSV: the first line holds column names.
    label_column, text_column, text_pair_column: TSV/CSV: a 0-based index or (with header)
      a name; JSONL: field names. '' = the default: TSV/CSV label 0 and text 1, JSONL 'label'
      and 'sentence'; text_pair_column '' = single-text task.
    task_type: 'classification' or 'regression'.
    label_names: classification: the label values in id order (e.g. ('neg', 'pos'); the
      second is F1's positive class); () = the sorted distinct training labels.
    metric: the dev metric that picks the best learning rate ('' = the task's: GLUE's, else
      accuracy / pearson).
    tfds_data_dir: where TFDS keeps GLUE ('' = the TFDS default, ~/tensorflow_datasets).
  """

  task: str = ''
  train_file: str = ''
  dev_file: str = ''
  file_format: str = 'auto'
  header: bool = False
  label_column: str = ''
  text_column: str = ''
  text_pair_column: str = ''
  task_type: str = 'classification'
  label_names: tuple[str, ...] = ()
  metric: str = ''
  tfds_data_dir: str = ''

  @classmethod
  def from_config(cls, section) -> 'TaskOptions':
    """The task-data fields of a config section (`config.finetune`, pretrain/config.py); a
    label_names given as one comma-separated string on the command line is split."""
    names = tuple(section.label_names)
    if len(names) == 1 and ',' in names[0]:
      names = tuple(n.strip() for n in names[0].split(','))
    fields = {f.name for f in dataclasses.fields(cls)} - {'label_names'}
    return cls(label_names=names, **{f: section[f] for f in fields})


@dataclasses.dataclass
class Split:
  """The examples of one split.

  Attributes:
    texts: the first texts; pairs: the second texts (None for single-text tasks).
    labels: int32 [N] label ids (classification) or float32 [N] targets (regression).
  """

  texts: list[str]
  pairs: list[str] | None
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)


@dataclasses.dataclass
class Task:
  """A loaded task.

  Attributes:
    name: 'glue/sst2', or the training file's name.
    kind: 'classification' or 'regression'.
    label_names: the label values in id order (classification), () for regression.
    metric: the dev metric that picks the best learning rate.
    train, dev: the splits.
    fingerprint: a hash of the data and the reading options (recorded with checkpoints).
  """

  name: str
  kind: str
  label_names: tuple[str, ...]
  metric: str
  train: Split
  dev: Split
  fingerprint: str = ''

  @property
  def num_outputs(self) -> int:
    """C: the classifier's outputs (labels, or 1 for regression)."""
    return len(self.label_names) if self.kind == 'classification' else 1

  @property
  def metrics(self) -> tuple[str, ...]:
    """Every metric reported for this kind of task."""
    return CLASSIFICATION_METRICS if self.kind == 'classification' else REGRESSION_METRICS

  @property
  def is_pair(self) -> bool:
    return self.train.pairs is not None


def fingerprint(*parts) -> str:
  """A 16-hex-digit digest of JSON-serialisable parts: what makes two tasks the same task."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- TFDS GLUE


def _check_reachable(url: str, task: str, timeout: float = 5.0):
  """Fails fast (TaskError) when the download host is unreachable, instead of TFDS's minutes
  of retries."""
  host = urlparse.urlparse(url).hostname or ''
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
  except OSError as e:
    raise TaskError(
      f'--config.finetune.task={task} must be downloaded by TFDS from {host}, which this '
      f'machine cannot reach ({e.strerror or e}). Prepare it once on a machine with internet '
      f'access (run the same command there, or `tfds build glue/{task.split("/", 1)[1]}`) '
      f'and copy the TFDS directory here with --config.finetune.tfds_data_dir=DIR, or export '
      f'the task to TSV files and pass --config.finetune.train_file / '
      f'--config.finetune.dev_file.'
    ) from None


def _records(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def _decode(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def load_glue(options: TaskOptions) -> Task:
  """A GLUE task from TFDS (`glue/<name>`), downloaded and built as array_record on first use
  (needs internet once; TFDS caches it under --config.finetune.tfds_data_dir).

  Raises:
    TaskError: an unknown task name; a download that cannot happen (offline), with the way
      to prepare the data elsewhere.
  """
  name = options.task.split('/', 1)[1] if '/' in options.task else ''
  if options.task.split('/', 1)[0] != 'glue' or name not in GLUE_TASKS:
    raise TaskError(
      f'--config.finetune.task={options.task} is not a known task; give '
      f'glue/<name> with name in {", ".join(GLUE_TASKS)}, or local files with '
      f'--config.finetune.train_file and --config.finetune.dev_file (and no '
      f'--config.finetune.task).'
    )
  spec = GLUE_TASKS[name]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    import tensorflow_datasets.text.glue  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  builder = tfds.builder(
    options.task, data_dir=options.tfds_data_dir or None, file_format='array_record'
  )
  if not builder.is_prepared():
    _check_reachable(builder.builder_config.data_url, options.task)
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise TaskError(
        f'preparing --config.finetune.task={options.task} with TFDS failed '
        f'({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); check '
        f'the network and --config.finetune.tfds_data_dir, or use local '
        f'files.'
      ) from None
  splits = {}
  for split in ('train', spec.dev_split):
    records = _records(builder.as_data_source(split=split))
    texts = [_decode(r[spec.text_keys[0]]) for r in records]
    pairs = [_decode(r[spec.text_keys[1]]) for r in records] if len(spec.text_keys) > 1 else None
    dtype = np.int32 if spec.kind == 'classification' else np.float32
    splits[split] = Split(texts, pairs, np.asarray([r['label'] for r in records], dtype))
  names = tuple(builder.info.features['label'].names) if spec.kind == 'classification' else ()
  return Task(
    name=options.task,
    kind=spec.kind,
    label_names=names,
    metric=options.metric or spec.metric,
    train=splits['train'],
    dev=splits[spec.dev_split],
    fingerprint=fingerprint(options.task, str(builder.version)),
  )


def load(options: TaskOptions) -> Task:
  """The task of `options`: GLUE by name (`options.task`) or local files.

  Raises:
    TaskError: bad options or data (see task_files.load, load_glue).
  """
  if options.task_type not in KINDS:
    raise TaskError(
      f'--config.finetune.task_type={options.task_type!r}; choose classification or regression.'
    )
  if options.metric and options.metric not in METRICS:
    raise TaskError(
      f'--config.finetune.metric={options.metric!r}; choose one of {", ".join(METRICS)}.'
    )
  # Local files live in a module of their own, built on this module's types (imported here,
  # not at the top, since it imports this module).
  from data_pipelines import task_files  # pylint: disable=g-import-not-at-top

  task = load_glue(options) if options.task else task_files.load(options)
  if task.metric not in task.metrics:
    raise TaskError(
      f'--config.finetune.metric={task.metric} does not apply to a {task.kind} '
      f'task; choose one of {", ".join(task.metrics)}.'
    )
  return task


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class Encoded:
  """A split as token ids: inputs [CLS] a [SEP] (b [SEP]) per example (int32 arrays, at most
  max_seq_len long), the index where token type 1 starts (len(ids) for single texts), and
  the labels."""

  ids: list[np.ndarray]
  type_starts: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


def _truncate(a: np.ndarray, b: np.ndarray | None, budget: int):
  """BERT's longest-first truncation of a (and b) to `budget` tokens together."""
  if b is None:
    return a[:budget], None
  la, lb = len(a), len(b)
  while la + lb > budget:
    if la > lb:
      la -= 1
    else:
      lb -= 1
  return a[:la], b[:lb]


def hold_out(split: Split, fraction: float) -> tuple[Split, Split]:
  """(train, validation): `split` without and with a held-out `fraction` of its examples,
  for choosing the step and learning rate on data the dev metric is not reported on
  (docs/finetuning.md 5). The held-out examples are fixed by a permutation seeded with a
  constant, so every run of a comparison (seeds, learning rates, inits) holds out the same.

  Args:
    split: the training examples (N of them); fraction: in (0, 1).

  Returns:
    (train, validation) splits in the original order, of N - k and k = round(N * fraction)
    examples.

  Raises:
    TaskError: either part would be empty.
  """
  n = len(split)
  k = int(round(n * fraction))
  if not 0 < k < n:
    raise TaskError(
      f'--config.finetune.validation_fraction={fraction} holds out {k} of {n} training '
      f'examples; choose a fraction that leaves examples on both sides (e.g. 0.1), or 0.'
    )
  held = np.zeros(n, bool)
  held[np.random.default_rng(0).permutation(n)[:k]] = True

  def take(mask):
    idx = np.flatnonzero(mask)
    pairs = None if split.pairs is None else [split.pairs[i] for i in idx]
    return Split([split.texts[i] for i in idx], pairs, split.labels[idx])

  return take(~held), take(held)


def encode(split: Split, tokenizer, max_seq_len: int) -> Encoded:
  """Tokenizes a split into model inputs (see `Encoded`).

  Args:
    tokenizer: any tokenizer of data_pipelines/tokenizer.py (encode(text) -> int32 ids;
      cls_id, sep_id attributes).
    max_seq_len: n, tokens per row including [CLS] and [SEP]s (>= 4).

  Raises:
    TaskError: max_seq_len < 4.
  """
  if max_seq_len < 4:
    raise TaskError(
      f'--config.finetune.max_seq_len={max_seq_len} must be >= 4 ([CLS], [SEP]s and text).'
    )
  cls_id = np.array([getattr(tokenizer, 'cls_id', 2)], np.int32)
  sep_id = np.array([getattr(tokenizer, 'sep_id', 3)], np.int32)
  ids, starts = [], []
  for i, text in enumerate(split.texts):
    a = tokenizer.encode(text)
    b = tokenizer.encode(split.pairs[i]) if split.pairs is not None else None
    a, b = _truncate(a, b, max_seq_len - (3 if b is not None else 2))
    row = [cls_id, a, sep_id]
    if b is not None:
      row += [b, sep_id]
    ids.append(np.concatenate(row).astype(np.int32))
    starts.append(len(a) + 2)
  return Encoded(ids, np.asarray(starts, np.int32), split.labels)


def make_batch(
  encoded: Encoded, indices: Sequence[int], max_seq_len: int, tokenizer=None
) -> dict[str, np.ndarray]:
  """Rows of `encoded` at `indices` (-1: a filler row of weight 0 that pads the last
  evaluation batch) as padded arrays.

  Returns:
    {'inputs', 'segment_ids', 'positions', 'token_types'}: int32 [b, n];
    'labels': int32 or float32 [b]; 'weights': float32 [b] (0 for filler rows).
  """
  b, n = len(indices), max_seq_len
  pad_id = getattr(tokenizer, 'pad_id', 0)
  inputs = np.full((b, n), pad_id, np.int32)
  segment_ids = np.zeros((b, n), np.int32)
  positions = np.zeros((b, n), np.int32)
  token_types = np.zeros((b, n), np.int32)
  labels = np.zeros((b,), encoded.labels.dtype)
  weights = np.zeros((b,), np.float32)
  for row, i in enumerate(indices):
    ids = encoded.ids[i] if i >= 0 else encoded.ids[0][:1]  # filler: [CLS] alone
    length = len(ids)
    inputs[row, :length] = ids
    segment_ids[row, :length] = 1
    positions[row, :length] = np.arange(length)
    if i >= 0:
      token_types[row, encoded.type_starts[i] : length] = 1
      labels[row] = encoded.labels[i]
      weights[row] = 1.0
  return {
    'inputs': inputs,
    'segment_ids': segment_ids,
    'positions': positions,
    'token_types': token_types,
    'labels': labels,
    'weights': weights,
  }


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of one epoch: a permutation fixed by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(num_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """The example indices of training step `step` (0-based): positions step * B .. (step + 1) *
  B - 1 of the endless sequence of epoch permutations, so a resumed run needs only the step
  to read the batches an uninterrupted run would."""
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = epoch_order(num_examples, seed, int(epoch))[offsets[mask]]
  return out
