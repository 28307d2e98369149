"""Data mixtures: several sources with weights (--config.data.mixture, docs/configuration.md
3) as one text source.

`load_mixture` loads each source through `text_datasets.load_text_source`, which dispatches
here when data.mixture is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

from absl import logging
import numpy as np

from data_pipelines import pipeline
from data_pipelines import text_datasets


MIXTURE_FLAG = '--config.data.mixture'
# The data fields a mixture source may set (docs/configuration.md 3). A field a source leaves
# out takes the run's value (--config.data.<field>), except the three that choose the source
# (_SOURCE_SELECTORS): a source without one is the built-in corpus.
MIXTURE_SOURCE_FIELDS = (
  'text_files',
  'text_unit',
  'text_column',
  'tfds_name',
  'tfds_data_dir',
  'tfds_text_key',
  'hf_dataset',
  'hf_config',
  'hf_revision',
  'hf_text_field',
  'hf_streaming',
  'hf_max_examples',
  'train_split',
  'eval_split',
  'validation_fraction',
)
_SOURCE_SELECTORS = ('text_files', 'hf_dataset', 'tfds_name')
# Names go into metric names ('data/<name>/token_share') and log lines.
_MIXTURE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
_MIXTURE_EXAMPLE = (
  MIXTURE_FLAG + '="('
  "('wiki', 0.7, 'text_files=/data/wiki/*.txt'), "
  "('code', 0.3, 'hf_dataset=/data/code/*.jsonl', 'hf_text_field=content'))\""
)


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  """One source of --config.data.mixture.

  Attributes:
    name: the source's name (logs, metric names, its shuffle seed).
    weight: its relative weight (> 0; the weights need not sum to 1).
    settings: ((data field, value), ...) the entry sets, each value of the field's type.
  """

  name: str
  weight: float
  settings: tuple[tuple[str, Any], ...]


def _mixture_error(detail: str) -> text_datasets.DataError:
  return text_datasets.DataError(
    f'{MIXTURE_FLAG}: {detail} Write the mixture as a tuple of sources, each (name, weight, '
    f"'field=value', ...) with data fields of one source ({', '.join(MIXTURE_SOURCE_FIELDS)}), "
    f'e.g. {_MIXTURE_EXAMPLE}; leave it () for one source.'
  )


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _typed(data_config, name: str, field: str, text: str):
  """`text` as the type of data.<field> (bool, int, float or str)."""
  default = text_datasets._data_field(data_config, field, '')
  try:
    if isinstance(default, bool):
      if text.strip().lower() not in ('true', 'false', '1', '0', 'yes', 'no'):
        raise ValueError(text)
      return text.strip().lower() in ('true', '1', 'yes')
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise _mixture_error(
      f'source {name!r} sets {field}={text!r}, which is not of the type of '
      f'--config.data.{field} ({type(default).__name__}).'
    ) from None
  return text


def parse_mixture(data_config) -> list[MixtureEntry]:
  """The sources of `config.data.mixture`, checked ([] when it is empty).

  The value is a tuple of sources, each `(name, weight, 'field=value', ...)`: a unique name
  (letters, digits, '_', '.', '-'), a weight > 0, and settings of the data fields in
  MIXTURE_SOURCE_FIELDS, at most one of text_files / hf_dataset / tfds_name. One source
  typed without its trailing comma, `(('wiki', 1.0, 'text_files=...'))`, which Python reads as
  the source itself, is taken as that source.

  Args:
    data_config: the `config.data` ConfigDict.

  Returns:
    One MixtureEntry per source, in the order given (a source's index is its id).

  Raises:
    DataError: anything else, naming the source, the flag and the form.
  """
  value = text_datasets._data_field(data_config, 'mixture', ())
  if not value:
    return []
  if isinstance(value, str):
    raise _mixture_error(f'{value!r} is a string, not a tuple of sources.')
  entries = tuple(value)
  if len(entries) >= 2 and isinstance(entries[0], str) and _is_number(entries[1]):
    entries = (entries,)  # one source without the trailing comma
  parsed, names = [], set()
  for entry in entries:
    if not isinstance(entry, (tuple, list)) or len(entry) < 2 or not isinstance(entry[0], str):
      raise _mixture_error(f'{entry!r} is not a source (name, weight, ...).')
    name, weight, *settings = entry
    if not _is_number(weight):
      raise _mixture_error(f'source {name!r} has weight {weight!r}, which is not a number.')
    if not _MIXTURE_NAME.fullmatch(name):
      raise _mixture_error(
        f'the source name {name!r} may hold only letters, digits, "_", "." and "-" (it goes '
        f'into metric names).'
      )
    if name in names:
      raise _mixture_error(f'two sources are named {name!r}; give each a name of its own.')
    names.add(name)
    if not math.isfinite(weight) or weight <= 0:
      raise _mixture_error(f'source {name!r} has weight {weight!r}; weights must be > 0.')
    fields = {}
    for setting in settings:
      field, sep, text = setting.partition('=') if isinstance(setting, str) else ('', '', '')
      field = field.strip()
      if not sep:
        raise _mixture_error(f'source {name!r} has {setting!r}, which is not field=value.')
      if field not in MIXTURE_SOURCE_FIELDS:
        raise _mixture_error(
          f'source {name!r} sets {field!r}, which is not a data field of one source (the run '
          f'sets the others, e.g. --config.data.{field}=... when it is a data field).'
        )
      if field in fields:
        raise _mixture_error(f'source {name!r} sets {field} twice.')
      fields[field] = _typed(data_config, name, field, text.strip())
    chosen = [f for f in _SOURCE_SELECTORS if fields.get(f)]
    if len(chosen) > 1:
      raise _mixture_error(
        f'source {name!r} sets both {chosen[0]} and {chosen[1]}; a source reads one of them '
        f'(make two sources to read both).'
      )
    parsed.append(MixtureEntry(name, float(weight), tuple(fields.items())))
  return parsed


def _source_config(data_config, entry: MixtureEntry):
  """The data config of one mixture source: the run's, without the mixture and the run's
  source choice, with the entry's settings."""
  sub = data_config.copy_and_resolve_references()
  with sub.unlocked():
    sub.mixture = ()
    for field in _SOURCE_SELECTORS:
      sub[field] = ''
    for field, value in entry.settings:
      sub[field] = value
  return sub


def load_mixture(data_config, *, build: bool = True) -> text_datasets.TextSource | None:
  """Several sources with weights (--config.data.mixture, docs/configuration.md 3) as one
  TextSource.

  Each source is loaded as a run with that one source would load it (`load_text_source` of
  the run's data config with the source's settings): its own cache, validation split and
  fingerprints. The mixture's train and validation records are `pipeline.MixtureRecords` of
  the sources' splits, which `pipeline.make_dataset` mixes with grain (and whose uniform
  sample, the tokenizer's, draws the sources in proportion). Its fingerprints hash every
  source's name, normalised weight and fingerprint, in order: a resume over a changed source,
  weight, name or order is refused as for one source (`checkpointing.same_data`), and the
  tokenizer trained for one mixture is not taken for another.

  Args:
    data_config: the `config.data` ConfigDict, with `mixture` set.
    build: build and load the sources (False: only check the mixture and each source).

  Returns:
    The TextSource (text_key 'text', `parts` the sources), or None when `build` is False.

  Raises:
    DataError: a bad mixture (`parse_mixture`), the run's own source set as well, or a source
      that does not load (the message names the source).
  """
  entries = parse_mixture(data_config)
  own = [f for f in _SOURCE_SELECTORS if text_datasets._data_field(data_config, f, '')]
  if own:
    raise text_datasets.DataError(
      f'--config.data.{own[0]}={data_config[own[0]]!r} and {MIXTURE_FLAG} are both set; a '
      f"mixture names all its sources: make it one of them (e.g. ('main', 1.0, "
      f"'{own[0]}={data_config[own[0]]}')) or empty it with --config.data.{own[0]}=."
    )
  parts = []
  for entry in entries:
    try:
      parts.append(text_datasets.load_text_source(_source_config(data_config, entry), build=build))
    except text_datasets.DataError as e:
      raise text_datasets.DataError(f'{MIXTURE_FLAG} source {entry.name!r}: {e}') from None
  if not build:
    return None
  names = [e.name for e in entries]
  train = pipeline.MixtureRecords(
    names, [e.weight for e in entries], [p.train for p in parts], [p.text_key for p in parts]
  )
  validation = pipeline.MixtureRecords(
    names, train.weights, [p.validation for p in parts], [p.text_key for p in parts]
  )
  shares = [round(w, 12) for w in train.weights]
  for name, share, part in zip(names, shares, parts):
    logging.info(
      'mixture source %s (weight %.3g): %s, %d train / %d validation documents',
      name,
      share,
      part.name,
      len(part.train),
      len(part.validation),
    )
  listed = list(zip(names, shares, parts))
  fingerprint = hashlib.sha256(
    repr([('mixture', n, w, p.fingerprint) for n, w, p in listed]).encode()
  ).hexdigest()[:16]
  data_fingerprint = hashlib.sha256(
    repr([('mixture', n, w, p.data_fingerprint or p.fingerprint) for n, w, p in listed]).encode()
  ).hexdigest()[:16]
  name = 'mixture(' + ', '.join(f'{n} {w:.3g}: {p.name}' for n, w, p in zip(names, shares, parts))
  return text_datasets.TextSource(
    name + ')', fingerprint, train, validation, 'text', data_fingerprint, tuple(parts)
  )
