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

import csv
import dataclasses
import hashlib
import json
import math
import os
import socket
import threading
from typing import Any, Sequence
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


# ----------------------------------------------------------------------------- local files


def _file_format(path: str, file_format: str) -> str:
  if file_format not in FORMATS:
    raise TaskError(
      f'--config.finetune.file_format={file_format!r}; choose one of {", ".join(FORMATS)}.'
    )
  if file_format != 'auto':
    return file_format
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.csv',):
    return 'csv'
  if ext in ('.jsonl', '.json', '.ndjson'):
    return 'jsonl'
  if ext in ('.tsv', '.txt', '.tab'):
    return 'tsv'
  raise TaskError(
    f'cannot tell the format of {path} from its extension; pass '
    f'--config.finetune.file_format=tsv, csv or jsonl.'
  )


def _read_rows(path: str, fmt: str, flag: str) -> list[tuple[int, Any]]:
  """(line number, row) pairs of a file (rows: lists for TSV/CSV, dicts for JSONL), skipping
  blank lines (a header stays the first row). Raises TaskError for a missing file, bad
  encoding or bad JSON."""
  if not path:
    raise TaskError(
      f'{flag} is empty; give the path of a TSV, CSV or JSONL file (or '
      f'--config.finetune.task=glue/<name>).'
    )
  if not os.path.isfile(path):
    raise TaskError(
      f'{flag}={path} does not exist (or is not a file); give the path of a TSV, CSV or JSONL file.'
    )
  try:
    with open(path, encoding='utf-8-sig', newline='') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise TaskError(f'{flag}={path} is not UTF-8 text ({e}); convert it to UTF-8.') from None
  rows = []
  if fmt == 'jsonl':
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise TaskError(
          f'line {number} of {path} is not JSON ({e}); a JSONL file holds one '
          f'JSON object per line (as the CLUE tasks ship).'
        ) from None
      if not isinstance(record, dict):
        raise TaskError(
          f'line {number} of {path} is a JSON {type(record).__name__}, not an '
          f'object with named fields.'
        )
      rows.append((number, record))
    return rows
  # TSV: no quoting (GLUE's files hold bare quotes); CSV: standard quoting.
  kwargs = dict(delimiter='\t', quoting=csv.QUOTE_NONE) if fmt == 'tsv' else {}
  for number, row in enumerate(_csv_rows(text, **kwargs), 1):
    if not any(cell.strip() for cell in row):
      continue
    rows.append((number, row))
  return rows


_CSV_LIMIT_LOCK = threading.Lock()


def _csv_rows(text: str, **kwargs) -> list[list[str]]:
  """csv.reader's rows of the lines of `text`, however long a field (a document in a text
  column): the csv module refuses a field over csv.field_size_limit() characters (131,072 by
  default), so the limit is raised to the length of the text (no field is longer) while it is
  parsed, and put back after (under a lock: concurrent calls do not put back a limit another
  still needs)."""
  with _CSV_LIMIT_LOCK:
    previous = csv.field_size_limit()
    try:
      csv.field_size_limit(max(previous, len(text) + 1))
    except OverflowError:  # over a C long (32 bits on Windows): the largest one
      csv.field_size_limit(2**31 - 1)
    try:
      return list(csv.reader(text.splitlines(), **kwargs))
    finally:
      csv.field_size_limit(previous)


def _column(
  ref: str, default: str, header: list[str] | None, width: int, flag: str, path: str
) -> int:
  """A TSV/CSV column reference (index, or name with a header) -> 0-based index."""
  ref = str(ref if ref != '' else default).strip()
  if header is not None and ref in header:
    return header.index(ref)
  try:
    index = int(ref)
  except ValueError:
    if header is None:
      raise TaskError(
        f'{flag}={ref} names a column but {path} is read without a header; '
        f'pass --config.finetune.header=true if its first line holds column '
        f'names, or give a 0-based column index.'
      ) from None
    raise TaskError(
      f'{flag}={ref} is not a column of {path}; its header has '
      f'{", ".join(header)} (or give a 0-based index).'
    ) from None
  if not 0 <= index < width:
    names = f' ({", ".join(header)})' if header else ''
    raise TaskError(
      f'{flag}={ref} does not exist in {path}: its rows have {width} column(s)'
      f'{names}, indices 0-{width - 1}; give the right column (TSV/CSV columns '
      f'are 0-based).'
    )
  return index


def _read_local(path: str, options: TaskOptions, flag: str):
  """(texts, pairs or None, raw labels as strings, line numbers) of one local file."""
  fmt = _file_format(path, options.file_format)
  rows = _read_rows(path, fmt, flag)
  if fmt != 'jsonl' and options.header and rows:
    header = [h.strip() for h in rows[0][1]]
    rows = rows[1:]
  else:
    header = None
  if not rows:
    raise TaskError(
      f'{flag}={path} has no examples (the file is empty'
      f'{" or holds only its header" if header else ""}); give a file with one '
      f'example per line.'
    )
  pair_ref = options.text_pair_column
  texts, pairs, labels, lines = [], [] if pair_ref != '' else None, [], []
  if fmt == 'jsonl':
    keys = {
      'label_column': options.label_column or 'label',
      'text_column': options.text_column or 'sentence',
    }
    if pair_ref != '':
      keys['text_pair_column'] = pair_ref
    first = rows[0][1]
    for field, key in keys.items():
      if key not in first:
        raise TaskError(
          f'{FLAG}{field}={key} is not a field of {path}: its first record has '
          f'{", ".join(map(str, first))}; pass the field name.'
        )
    for number, record in rows:
      for field, key in keys.items():
        if key not in record:
          raise TaskError(f'line {number} of {path} has no field {key!r} ({FLAG}{field}).')
      texts.append(str(record[keys['text_column']]))
      if pairs is not None:
        pairs.append(str(record[keys['text_pair_column']]))
      labels.append(_label_text(record[keys['label_column']]))
      lines.append(number)
    return texts, pairs, labels, lines
  width = len(rows[0][1]) if header is None else len(header)
  label_col = _column(options.label_column, '0', header, width, f'{FLAG}label_column', path)
  text_col = _column(options.text_column, '1', header, width, f'{FLAG}text_column', path)
  pair_col = (
    _column(pair_ref, '', header, width, f'{FLAG}text_pair_column', path)
    if pair_ref != ''
    else None
  )
  needed = max(c for c in (label_col, text_col, pair_col) if c is not None) + 1
  for number, row in rows:
    if len(row) < needed:
      raise TaskError(
        f'line {number} of {path} has {len(row)} column(s) but the column fields need '
        f'{needed} ({FLAG}label_column={options.label_column or 0}, {FLAG}text_column='
        f'{options.text_column or 1}'
        f'{f", {FLAG}text_pair_column=" + pair_ref if pair_ref != "" else ""}); fix the '
        f'line, or the fields (TSV columns are separated by tabs, 0-based).'
      )
    texts.append(row[text_col])
    if pairs is not None:
      pairs.append(row[pair_col])
    labels.append(row[label_col].strip())
    lines.append(number)
  return texts, pairs, labels, lines


def _label_text(value) -> str:
  if isinstance(value, bool):
    return str(int(value))
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value).strip()


def _as_integer(text: str) -> int | None:
  try:
    value = float(text)
  except ValueError:
    return None
  return int(value) if math.isfinite(value) and value.is_integer() else None


def _is_number(text: str) -> bool:
  try:
    return math.isfinite(float(text))
  except ValueError:
    return False


# A label column with more distinct values than this (and more than half the rows) holds text.
MAX_DISTINCT_LABELS = 100


def _label_vocabulary(
  labels: list[str], lines: list[int], options: TaskOptions, path: str
) -> tuple[str, ...]:
  """The label names in id order for classification (see TaskOptions.label_names)."""
  for label, number in zip(labels, lines):
    if label == '':
      raise TaskError(
        f'line {number} of {path} has an empty label ({FLAG}label_column='
        f'{options.label_column or 0}); every example needs one.'
      )
  if options.label_names:
    return tuple(options.label_names)
  distinct = sorted(set(labels))
  numeric = [l for l in distinct if _is_number(l)]
  fractional = [l for l in numeric if _as_integer(l) is None]
  if fractional:
    number = lines[labels.index(fractional[0])]
    raise TaskError(
      f'--config.finetune.label_column={options.label_column or 0} of {path} holds '
      f'{fractional[0]!r} (line {number}): classification labels must be integers or '
      f'names. For a numeric target pass --config.finetune.task_type=regression; otherwise '
      f'check the column.'
    )
  if len(distinct) > MAX_DISTINCT_LABELS and len(distinct) > len(labels) / 2:
    raise TaskError(
      f'--config.finetune.label_column={options.label_column or 0} of {path} has '
      f'{len(distinct)} distinct values in {len(labels)} rows (e.g. {distinct[0][:40]!r}): '
      f'that is text, not class labels. Point --config.finetune.label_column at the label '
      f'column (and --config.finetune.text_column at the text); for a numeric target pass '
      f'--config.finetune.task_type=regression.'
    )
  if len(numeric) == len(distinct):
    return tuple(str(v) for v in sorted({_as_integer(l) for l in distinct}))
  return tuple(distinct)


def _label_ids(
  labels: list[str], lines: list[int], names: tuple[str, ...], path: str, options: TaskOptions
) -> np.ndarray:
  index = {name: i for i, name in enumerate(names)}
  ids = []
  for label, number in zip(labels, lines):
    key = label if label in index else str(_as_integer(label))
    if key not in index:
      raise TaskError(
        f'line {number} of {path} has the label {label!r}, which is not among the '
        f'{len(names)} labels {", ".join(names[:10])}{" ..." if len(names) > 10 else ""} '
        f'({f"from {FLAG}label_names" if options.label_names else "of the training file"}); '
        f'fix the label or list every label with --config.finetune.label_names.'
      )
    ids.append(index[key])
  return np.asarray(ids, np.int32)


def _targets(labels: list[str], lines: list[int], path: str, options: TaskOptions) -> np.ndarray:
  out = []
  for label, number in zip(labels, lines):
    if not _is_number(label):
      raise TaskError(
        f'line {number} of {path} has the target {label!r} in '
        f'--config.finetune.label_column={options.label_column or 0}: a '
        f'regression task needs numbers; check the column, or use '
        f'--config.finetune.task_type=classification for named labels.'
      )
    out.append(float(label))
  return np.asarray(out, np.float32)


def _fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def load_local(options: TaskOptions) -> Task:
  """A task from local files (see TaskOptions).

  Raises:
    TaskError: a missing or empty file, a column that does not exist, a row without the
      columns the fields name, labels that are not integers or names (classification) or not
      numbers (regression), a dev label absent from training.
  """
  if not options.dev_file:
    raise TaskError(
      '--config.finetune.dev_file is empty; give the held-out file the metric is '
      'computed on (same layout as --config.finetune.train_file).'
    )
  train = _read_local(options.train_file, options, f'{FLAG}train_file')
  dev = _read_local(options.dev_file, options, f'{FLAG}dev_file')
  if options.task_type == 'classification':
    names = _label_vocabulary(train[2], train[3], options, options.train_file)
    if len(names) < 2:
      raise TaskError(
        f'--config.finetune.train_file={options.train_file} has only the label '
        f'{names[0]!r}; classification needs at least two (or use '
        f'--config.finetune.label_names to list them).'
      )
    labels = [
      _label_ids(s[2], s[3], names, path, options)
      for s, path in ((train, options.train_file), (dev, options.dev_file))
    ]
    metric = options.metric or 'accuracy'
  else:
    names = ()
    labels = [
      _targets(s[2], s[3], path, options)
      for s, path in ((train, options.train_file), (dev, options.dev_file))
    ]
    metric = options.metric or 'pearson'
  name = os.path.basename(os.path.dirname(os.path.abspath(options.train_file))) or 'task'
  reading = {k: v for k, v in dataclasses.asdict(options).items() if k != 'metric'}
  fingerprint = _fingerprint(
    _file_digest(options.train_file), _file_digest(options.dev_file), reading
  )
  return Task(
    name=name,
    kind=options.task_type,
    label_names=names,
    metric=metric,
    train=Split(train[0], train[1], labels[0]),
    dev=Split(dev[0], dev[1], labels[1]),
    fingerprint=fingerprint,
  )


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
    fingerprint=_fingerprint(options.task, str(builder.version)),
  )


def load(options: TaskOptions) -> Task:
  """The task of `options`: GLUE by name (`options.task`) or local files.

  Raises:
    TaskError: bad options or data (see load_local, load_glue).
  """
  if options.task_type not in KINDS:
    raise TaskError(
      f'--config.finetune.task_type={options.task_type!r}; choose classification or regression.'
    )
  if options.metric and options.metric not in METRICS:
    raise TaskError(
      f'--config.finetune.metric={options.metric!r}; choose one of {", ".join(METRICS)}.'
    )
  task = load_glue(options) if options.task else load_local(options)
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
