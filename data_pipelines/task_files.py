"""Fine-tuning tasks from local TSV / CSV / JSONL files (docs/finetuning.md 3): columns or
fields, labels and their vocabulary, regression targets, and the task's fingerprint.

  task = task_files.load(tasks.TaskOptions(train_file='train.tsv', dev_file='dev.tsv'))

`tasks.load` calls it for options without a GLUE task name. Every bad input raises
`tasks.TaskError` naming the config field (as its flag) or the file and line, and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import threading
from typing import Any

import numpy as np

from data_pipelines import tasks


def _file_format(path: str, file_format: str) -> str:
  if file_format not in tasks.FORMATS:
    raise tasks.TaskError(
      f'--config.finetune.file_format={file_format!r}; choose one of {", ".join(tasks.FORMATS)}.'
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
  raise tasks.TaskError(
    f'cannot tell the format of {path} from its extension; pass '
    f'--config.finetune.file_format=tsv, csv or jsonl.'
  )


def _read_rows(path: str, fmt: str, flag: str) -> list[tuple[int, Any]]:
  """(line number, row) pairs of a file (rows: lists for TSV/CSV, dicts for JSONL), skipping
  blank lines (a header stays the first row). Raises tasks.TaskError for a missing file, bad
  encoding or bad JSON."""
  if not path:
    raise tasks.TaskError(
      f'{flag} is empty; give the path of a TSV, CSV or JSONL file (or '
      f'--config.finetune.task=glue/<name>).'
    )
  if not os.path.isfile(path):
    raise tasks.TaskError(
      f'{flag}={path} does not exist (or is not a file); give the path of a TSV, CSV or JSONL file.'
    )
  try:
    with open(path, encoding='utf-8-sig', newline='') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise tasks.TaskError(f'{flag}={path} is not UTF-8 text ({e}); convert it to UTF-8.') from None
  rows = []
  if fmt == 'jsonl':
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise tasks.TaskError(
          f'line {number} of {path} is not JSON ({e}); a JSONL file holds one '
          f'JSON object per line (as the CLUE tasks ship).'
        ) from None
      if not isinstance(record, dict):
        raise tasks.TaskError(
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
      raise tasks.TaskError(
        f'{flag}={ref} names a column but {path} is read without a header; '
        f'pass --config.finetune.header=true if its first line holds column '
        f'names, or give a 0-based column index.'
      ) from None
    raise tasks.TaskError(
      f'{flag}={ref} is not a column of {path}; its header has '
      f'{", ".join(header)} (or give a 0-based index).'
    ) from None
  if not 0 <= index < width:
    names = f' ({", ".join(header)})' if header else ''
    raise tasks.TaskError(
      f'{flag}={ref} does not exist in {path}: its rows have {width} column(s)'
      f'{names}, indices 0-{width - 1}; give the right column (TSV/CSV columns '
      f'are 0-based).'
    )
  return index


def _read_local(path: str, options: tasks.TaskOptions, flag: str):
  """(texts, pairs or None, raw labels as strings, line numbers) of one local file."""
  fmt = _file_format(path, options.file_format)
  rows = _read_rows(path, fmt, flag)
  if fmt != 'jsonl' and options.header and rows:
    header = [h.strip() for h in rows[0][1]]
    rows = rows[1:]
  else:
    header = None
  if not rows:
    raise tasks.TaskError(
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
    _check_distinct(keys, path)
    first = rows[0][1]
    for field, key in keys.items():
      if key not in first:
        raise tasks.TaskError(
          f'{tasks.FLAG}{field}={key} is not a field of {path}: its first record has '
          f'{", ".join(map(str, first))}; pass the field name.'
        )
    for number, record in rows:
      for field, key in keys.items():
        if key not in record:
          raise tasks.TaskError(
            f'line {number} of {path} has no field {key!r} ({tasks.FLAG}{field}).'
          )
      texts.append(str(record[keys['text_column']]))
      if pairs is not None:
        pairs.append(str(record[keys['text_pair_column']]))
      labels.append(_label_text(record[keys['label_column']]))
      lines.append(number)
    return texts, pairs, labels, lines
  width = len(rows[0][1]) if header is None else len(header)
  label_col = _column(options.label_column, '0', header, width, f'{tasks.FLAG}label_column', path)
  text_col = _column(options.text_column, '1', header, width, f'{tasks.FLAG}text_column', path)
  pair_col = (
    _column(pair_ref, '', header, width, f'{tasks.FLAG}text_pair_column', path)
    if pair_ref != ''
    else None
  )
  _check_distinct(
    {'label_column': label_col, 'text_column': text_col, 'text_pair_column': pair_col}, path
  )
  needed = max(c for c in (label_col, text_col, pair_col) if c is not None) + 1
  for number, row in rows:
    if len(row) < needed:
      raise tasks.TaskError(
        f'line {number} of {path} has {len(row)} column(s) but the column fields need '
        f'{needed} ({tasks.FLAG}label_column={options.label_column or 0}, {tasks.FLAG}text_column='
        f'{options.text_column or 1}'
        f'{f", {tasks.FLAG}text_pair_column=" + pair_ref if pair_ref != "" else ""}); fix the '
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
  labels: list[str], lines: list[int], options: tasks.TaskOptions, path: str
) -> tuple[str, ...]:
  """The label names in id order for classification (see tasks.TaskOptions.label_names)."""
  for label, number in zip(labels, lines):
    if label == '':
      raise tasks.TaskError(
        f'line {number} of {path} has an empty label ({tasks.FLAG}label_column='
        f'{options.label_column or 0}); every example needs one.'
      )
  if options.label_names:
    return tuple(options.label_names)
  distinct = sorted(set(labels))
  numeric = [l for l in distinct if _is_number(l)]
  fractional = [l for l in numeric if _as_integer(l) is None]
  if fractional:
    number = lines[labels.index(fractional[0])]
    raise tasks.TaskError(
      f'--config.finetune.label_column={options.label_column or 0} of {path} holds '
      f'{fractional[0]!r} (line {number}): classification labels must be integers or '
      f'names. For a numeric target pass --config.finetune.task_type=regression; otherwise '
      f'check the column.'
    )
  if len(distinct) > MAX_DISTINCT_LABELS and len(distinct) > len(labels) / 2:
    raise tasks.TaskError(
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
  labels: list[str], lines: list[int], names: tuple[str, ...], path: str, options: tasks.TaskOptions
) -> np.ndarray:
  index = {name: i for i, name in enumerate(names)}
  ids = []
  for label, number in zip(labels, lines):
    key = label if label in index else str(_as_integer(label))
    if key not in index:
      raise tasks.TaskError(
        f'line {number} of {path} has the label {label!r}, which is not among the '
        f'{len(names)} labels {", ".join(names[:10])}{" ..." if len(names) > 10 else ""} '
        f'({f"from {tasks.FLAG}label_names" if options.label_names else "of the training file"}); '
        f'fix the label or list every label with --config.finetune.label_names.'
      )
    ids.append(index[key])
  return np.asarray(ids, np.int32)


def _targets(
  labels: list[str], lines: list[int], path: str, options: tasks.TaskOptions
) -> np.ndarray:
  out = []
  for label, number in zip(labels, lines):
    if not _is_number(label):
      raise tasks.TaskError(
        f'line {number} of {path} has the target {label!r} in '
        f'--config.finetune.label_column={options.label_column or 0}: a '
        f'regression task needs numbers; check the column, or use '
        f'--config.finetune.task_type=classification for named labels.'
      )
    out.append(float(label))
  return np.asarray(out, np.float32)


def _file_digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def load(options: tasks.TaskOptions) -> tasks.Task:
  """A task from local files (see tasks.TaskOptions).

  Raises:
    tasks.TaskError: a missing or empty file, a column that does not exist, a row without the
      columns the fields name, labels that are not integers or names (classification) or not
      numbers (regression), a dev label absent from training.
  """
  if not options.dev_file:
    raise tasks.TaskError(
      '--config.finetune.dev_file is empty; give the held-out file the metric is '
      'computed on (same layout as --config.finetune.train_file).'
    )
  train = _read_local(options.train_file, options, f'{tasks.FLAG}train_file')
  dev = _read_local(options.dev_file, options, f'{tasks.FLAG}dev_file')
  if options.task_type == 'classification':
    names = _label_vocabulary(train[2], train[3], options, options.train_file)
    if len(names) < 2:
      raise tasks.TaskError(
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
  fingerprint = tasks.fingerprint(
    _file_digest(options.train_file), _file_digest(options.dev_file), reading
  )
  return tasks.Task(
    name=name,
    kind=options.task_type,
    label_names=names,
    metric=metric,
    train=tasks.Split(train[0], train[1], labels[0]),
    dev=tasks.Split(dev[0], dev[1], labels[1]),
    fingerprint=fingerprint,
  )


def column_texts(path: str, column: str, flag: str) -> list[tuple[int, str]]:
  """(line number, text) of every row of a table file whose `column` holds non-blank text:
  pretraining text from a fine-tuning file (docs/finetuning.md 9). The format follows the
  extension (.csv CSV, .jsonl/.json/.ndjson JSONL, anything else TSV); for TSV/CSV an integer
  `column` is a 0-based index into header-less rows, and a name reads the first line as the
  header. Rows that lack the column are skipped, as blank texts are.

  Raises:
    tasks.TaskError: the file is missing or not UTF-8, a JSONL line is not an object, or
      `column` names no column of the file (the message names `flag` and the fix).
  """
  ext = os.path.splitext(path)[1].lower()
  fmt = 'csv' if ext == '.csv' else 'jsonl' if ext in ('.jsonl', '.json', '.ndjson') else 'tsv'
  rows = _read_rows(path, fmt, flag)
  column = str(column).strip()
  if fmt == 'jsonl':
    if rows and not any(column in record for _, record in rows):
      raise tasks.TaskError(
        f'{flag}={column} is not a field of {path}: its first record has '
        f'{", ".join(map(str, rows[0][1]))}; pass the field that holds the text.'
      )
    values = [(number, record.get(column)) for number, record in rows]
    return [(n, str(v)) for n, v in values if v is not None and str(v).strip()]
  try:
    index = int(column)
  except ValueError:
    header = [h.strip() for h in rows[0][1]] if rows else []
    if column not in header:
      raise tasks.TaskError(
        f'{flag}={column} is not a column of {path}: read as a header, its first line has '
        f'{", ".join(header) or "nothing"}; give a header name or a 0-based column index.'
      ) from None
    index, rows = header.index(column), rows[1:]
  if index < 0 or (rows and all(len(row) <= index for _, row in rows)):
    width = max((len(row) for _, row in rows), default=0)
    raise tasks.TaskError(
      f'{flag}={column} does not exist in {path}: its rows have at most {width} column(s), '
      f'0-based indices 0-{width - 1} (TSV columns are separated by tabs).'
    )
  return [(n, row[index]) for n, row in rows if len(row) > index and row[index].strip()]


def _check_distinct(columns: dict, path: str):
  """Raises TaskError if two of the label / text / text-pair fields name the same column (a
  label read as the text: the task then scores perfectly, and says nothing of the encoder).
  `columns`: field name -> resolved column (index or key; None: unused)."""
  seen = {}
  for field, column in columns.items():
    if column is None:
      continue
    if column in seen:
      raise tasks.TaskError(
        f'{tasks.FLAG}{seen[column]} and {tasks.FLAG}{field} both name column {column!r} of '
        f'{path}; each must name its own column (TSV columns are 0-based).'
      )
    seen[column] = field
