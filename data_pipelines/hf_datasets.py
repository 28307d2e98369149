"""A Hugging Face dataset as a text source (--config.data.hf_dataset, docs/configuration.md 1).

`load_hf_source` reads the Arrow files of the `datasets` library by random access (a streamed
dataset is written to the cache first, `_stream_to_cache`); `text_datasets.load_text_source`
dispatches here.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time

from absl import logging
import numpy as np

from data_pipelines import text_datasets


# Local file extensions and the `datasets` packaged builder that reads them; a compression
# suffix (.gz, ...) is looked through, `datasets` decompresses.
HF_FILE_BUILDERS = {
  '.txt': 'text',
  '.text': 'text',
  '.json': 'json',
  '.jsonl': 'json',
  '.parquet': 'parquet',
  '.csv': 'csv',
}
_COMPRESSIONS = ('.gz', '.bz2', '.xz', '.zst', '.lz4')
# Examples per Arrow record batch when a stream is written to the cache.
_STREAM_BATCH = 1000
_HF_FLAG = '--config.data.hf_dataset'


def _import_datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise text_datasets.DataError(
      f'{_HF_FLAG} needs the Hugging Face `datasets` package; install it with `pip install '
      f"'encoder-pretrain[hf]'` (or `pip install datasets`), or give the text another way "
      f'(--config.data.text_files, --config.data.tfds_name).'
    ) from None
  datasets.disable_progress_bars()  # the suite's own lines only, as for TFDS
  return datasets


def _extension(path: str) -> str:
  path = path.lower()
  for suffix in _COMPRESSIONS:
    if path.endswith(suffix):
      path = path[: -len(suffix)]
  return os.path.splitext(path)[1]


@dataclasses.dataclass
class HFSpec:
  """What --config.data.hf_dataset names.

  Attributes:
    path: the first argument of `datasets.load_dataset`: a packaged builder ('json', 'text',
      'parquet', 'csv') for local files, a local directory, or a Hub name.
    data_files: the local files given by glob (None for a directory or a Hub name).
    files: every local file read (the globbed files, or a directory's files); [] on the Hub.
    builder: the packaged builder of local files ('' when `datasets` infers it).
  """

  path: str
  data_files: list[str] | None
  files: list[str]
  builder: str

  @property
  def local(self) -> bool:
    return bool(self.files)


def resolve_hf_dataset(value: str) -> HFSpec:
  """Sorts --config.data.hf_dataset into local files (a glob, or a path with an extension),
  a local directory, or a Hub name (anything else).

  Raises:
    DataError: a local glob that matches nothing, an empty directory, a file type `datasets`
      has no builder for here, or files of several types.
  """
  expanded = os.path.expanduser(value.strip())
  if os.path.isdir(expanded):
    files = sorted(
      f
      for f in glob.glob(os.path.join(glob.escape(expanded), '**', '*'), recursive=True)
      if os.path.isfile(f)
    )
    if not files:
      raise text_datasets.DataError(
        f'{_HF_FLAG}={value!r} is an empty directory; give a directory of data files, '
        f'files by glob (e.g. {expanded.rstrip("/")}/*.jsonl), or a Hub dataset name.'
      )
    builders = {HF_FILE_BUILDERS.get(_extension(f)) for f in files}
    return HFSpec(expanded, None, files, builders.pop() if len(builders) == 1 else '')
  patterns = [p.strip() for p in value.split(',') if p.strip()]
  local = any(
    os.path.exists(os.path.expanduser(p))
    or any(c in p for c in '*?[')
    or _extension(p) in HF_FILE_BUILDERS
    or p.startswith(('/', './', '../', '~'))
    for p in patterns
  )
  if not local:
    return HFSpec(value.strip(), None, [], '')
  files = text_datasets.expand_globs(value, flag=_HF_FLAG)
  unknown = [f for f in files if _extension(f) not in HF_FILE_BUILDERS]
  if unknown:
    raise text_datasets.DataError(
      f'{_HF_FLAG}={value!r} matches {unknown[0]}, which is not a file type read here; give '
      f'.txt, .json/.jsonl, .parquet or .csv files (optionally compressed), or use '
      f'--config.data.text_files for other text files.'
    )
  builders = sorted({HF_FILE_BUILDERS[_extension(f)] for f in files})
  if len(builders) > 1:
    raise text_datasets.DataError(
      f'{_HF_FLAG}={value!r} matches files of several types ({", ".join(builders)}); give '
      f'files of one type (e.g. only *.jsonl).'
    )
  return HFSpec(builders[0], files, files, builders[0])


def _load_hf(data_config, spec: HFSpec, streaming: bool):
  """`datasets.load_dataset` of every split: a DatasetDict (IterableDatasetDict if
  `streaming`)."""
  datasets = _import_datasets()
  kwargs = {}
  if spec.data_files:
    kwargs['data_files'] = spec.data_files
  if spec.builder == 'text':  # documents as for local text files
    kwargs['sample_by'] = 'document' if data_config.text_unit == 'file' else 'line'
  # An explicit data.cache_dir keeps downloads with the suite's other caches (tests write
  # nothing to ~/.cache); otherwise `datasets`' own cache (HF_HOME, HF_DATASETS_CACHE).
  cache_dir = os.path.join(data_config.cache_dir, 'huggingface') if data_config.cache_dir else None
  value = text_datasets._data_field(data_config, 'hf_dataset', '')
  try:
    loaded = datasets.load_dataset(
      spec.path,
      text_datasets._data_field(data_config, 'hf_config', '') or None,
      revision=text_datasets._data_field(data_config, 'hf_revision', '') or None,
      streaming=streaming,
      cache_dir=cache_dir,
      **kwargs,
    )
  except Exception as e:  # datasets raises many types (not found, config, network, parsing)
    first = (str(e).strip().splitlines() or [''])[0][:300]
    where = (
      'Check that the files parse as their extension says'
      if spec.local
      else 'A Hub name needs the network (or the dataset in the datasets cache and '
      'HF_DATASETS_OFFLINE=1), the config name where the dataset has several '
      '(--config.data.hf_config), and a revision that exists (--config.data.hf_revision); '
      'local files are given by glob with their extension'
    )
    raise text_datasets.DataError(
      f'{_HF_FLAG}={value!r} could not be read by the datasets library '
      f'({type(e).__name__}: {first}). {where}.'
    ) from None
  if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
    loaded = {data_config.train_split: loaded}
  return loaded


def _check_splits(data_config, splits, name: str) -> bool:
  """Whether data.eval_split is a split (else validation is held out of the training split).

  Raises:
    DataError: data.train_split is not a split.
  """
  if data_config.train_split not in splits:
    raise text_datasets.DataError(
      f'--config.data.train_split={data_config.train_split!r} is not a split of {name}; it '
      f'has {", ".join(sorted(splits))}.'
    )
  held_out = data_config.eval_split not in splits
  if held_out:
    logging.info(
      '%s has no %r split: holding out %.1f%% of %r for validation',
      name,
      data_config.eval_split,
      100 * data_config.validation_fraction,
      data_config.train_split,
    )
  return not held_out


def _check_text_column(features, field: str, name: str):
  """Raises DataError unless `field` is a string column of `features` (None: unknown)."""
  if features is None:
    return
  columns = list(features)
  if field not in columns:
    raise text_datasets.DataError(
      f'--config.data.hf_text_field={field!r} is not a column of {name}; it has '
      f'{", ".join(columns)}. Set the flag to the column holding the text.'
    )
  dtype = getattr(features[field], 'dtype', None)
  if dtype not in ('string', 'large_string'):
    raise text_datasets.DataError(
      f'--config.data.hf_text_field={field!r} of {name} holds {features[field]}, not text; '
      f'set the flag to a string column.'
    )


def _index_hash(rows: np.ndarray) -> np.ndarray:
  """splitmix64 of each example index (uint64 [n]): a fixed pseudo-random number per place in
  a split, so a downloaded and a streamed copy hold out the same examples."""
  x = rows.astype(np.uint64)
  with np.errstate(over='ignore'):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def hold_out(rows: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices into (train, validation): an index is held out iff its hash is
  below `fraction` of the range; as for local files, a small split that hashes nothing into
  validation holds out its lowest-hash example, and one that hashes everything keeps the
  highest-hash example for training.

  Args:
    rows: int64 [n] indices of the non-blank examples, n >= 2.
    fraction: data.validation_fraction.

  Returns:
    (train rows, validation rows), int64, each in increasing order.
  """
  h = _index_hash(rows)
  held = h < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
  if not held.any():
    held[np.argmin(h)] = True
  if held.all():
    held[np.argmax(h)] = False
  return rows[~held], rows[held]


def _nonblank_rows(dataset, field: str, limit: int) -> np.ndarray:
  """int64 indices of the first `limit` (0: all) rows whose `field` is not blank or missing;
  one vectorised pass over the Arrow column."""
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top

  n = len(dataset) if not limit else min(limit, len(dataset))
  column = dataset.data.column(field).slice(0, n)
  blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ''), True)
  return np.flatnonzero(~np.asarray(blank.to_numpy(zero_copy_only=False), bool)).astype(np.int64)


class HFRecords(collections.abc.Sequence):
  """Random access to chosen rows of a `datasets.Dataset` (Arrow, memory-mapped) as records
  {'text': str}: what the grain pipeline and the tokenizer sample read.

  Args:
    dataset: a `datasets.Dataset`.
    field: its text column.
    rows: int64 [n] row numbers in `dataset`; record i is row rows[i].
  """

  def __init__(self, dataset, field: str, rows: np.ndarray):
    self._dataset = dataset.select_columns([field])
    self._field = field
    self._rows = np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return HFRecords(self._dataset, self._field, self._rows[index])
    return {'text': self._dataset[int(self._rows[index])][self._field] or ''}

  def __repr__(self) -> str:
    return f'HFRecords({len(self)} of {len(self._dataset)} rows, field {self._field!r})'


def _hf_settings(data_config) -> tuple:
  """The settings that decide which records a source holds (not hf_streaming: a streamed and
  a downloaded copy hold the same records)."""
  return (
    'hf',
    text_datasets._data_field(data_config, 'hf_dataset', ''),
    text_datasets._data_field(data_config, 'hf_config', ''),
    text_datasets._data_field(data_config, 'hf_revision', ''),
    text_datasets._data_field(data_config, 'hf_text_field', 'text'),
    text_datasets._data_field(data_config, 'hf_max_examples', 0),
    data_config.text_unit,
    data_config.train_split,
    data_config.eval_split,
    data_config.validation_fraction,
  )


def _stream_to_cache(data_config, spec: HFSpec, name: str, directory: str) -> dict:
  """Writes the first data.hf_max_examples examples of the training split (and of the eval
  split, if the dataset has one) to `<directory>/{train,validation}.arrow`: one large_string
  column 'text', blank examples kept as '' so that a row number is the example's index in its
  split. The directory appears whole (written under a temporary name, then renamed); if
  another process renamed its copy first, that copy is used.

  Returns:
    The directory's `content.json`: {'examples': {split: rows}, 'sha256': of the texts}.

  Raises:
    DataError: bad splits, a missing or non-text column, or a stream that cannot be read.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  for old in glob.glob(glob.escape(directory) + '.tmp-*'):  # killed writers' leftovers
    try:
      if time.time() - text_datasets._newest_change(old) >= text_datasets.STALE_BUILD_SECONDS:
        shutil.rmtree(old, ignore_errors=True)
    except OSError:
      pass
  streams = _load_hf(data_config, spec, streaming=True)
  has_eval = _check_splits(data_config, list(streams), name)
  outputs = {'train': data_config.train_split}
  if has_eval:
    outputs['validation'] = data_config.eval_split
  field = text_datasets._data_field(data_config, 'hf_text_field', 'text')
  limit = text_datasets._data_field(data_config, 'hf_max_examples', 0)
  tmp = f'{directory}.tmp-{os.getpid()}-{time.time_ns()}'
  os.makedirs(tmp)
  digest, counts = hashlib.sha256(), {}
  schema = pa.schema([('text', pa.large_string())])
  try:
    for out, split in outputs.items():
      stream = streams[split]
      _check_text_column(getattr(stream, 'features', None), field, name)
      if limit:
        stream = stream.take(limit)
      texts, count = [], 0
      with pa.OSFile(os.path.join(tmp, f'{out}.arrow'), 'wb') as f:
        with pa.ipc.new_stream(f, schema) as writer:
          for example in stream:
            if field not in example:
              raise text_datasets.DataError(
                f'--config.data.hf_text_field={field!r} is not a column of {name} (example '
                f'{count} of {split!r} has {", ".join(example)}); set it to the text column.'
              )
            text = example[field]
            if text is not None and not isinstance(text, str):
              raise text_datasets.DataError(
                f'--config.data.hf_text_field={field!r} of {name} holds '
                f'{type(text).__name__} values, not text; set it to a string column.'
              )
            texts.append(text or '')
            digest.update(texts[-1].encode('utf-8', 'surrogatepass') + b'\0')
            count += 1
            if len(texts) == _STREAM_BATCH:
              writer.write_batch(pa.record_batch([pa.array(texts, pa.large_string())], schema))
              texts = []
          if texts:
            writer.write_batch(pa.record_batch([pa.array(texts, pa.large_string())], schema))
      counts[out] = count
      digest.update(f'\0{out}:{count}\0'.encode())
    content = {'examples': counts, 'sha256': digest.hexdigest()[:16], 'source': name}
    with open(os.path.join(tmp, 'content.json'), 'w', encoding='utf-8') as f:
      json.dump(content, f)
    try:
      os.rename(tmp, directory)
    except OSError:
      if not os.path.isdir(directory):
        raise
      # Another process wrote the same examples first; use its copy.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return content


def _hf_records(train, validation, field: str, limit: int, fraction: float, name: str):
  """(train records, validation records) of loaded splits (`validation` None: held out of
  `train` by `hold_out`).

  Raises:
    DataError: a split without non-blank examples.
  """
  train_rows = _nonblank_rows(train, field, limit)
  if validation is None:
    if len(train_rows) < 2:
      raise text_datasets.DataError(
        f'{name} holds {len(train_rows)} non-blank example(s) in its training split: too few '
        f'to hold out a validation part. Give more examples (a real run needs many thousands), '
        f'raise --config.data.hf_max_examples, or name an eval split with '
        f'--config.data.eval_split.'
      )
    train_rows, val_rows = hold_out(train_rows, fraction)
    validation = train
  else:
    val_rows = _nonblank_rows(validation, field, limit)
  for split, rows in (('train_split', train_rows), ('eval_split', val_rows)):
    if not len(rows):
      raise text_datasets.DataError(
        f'{name}: the --config.data.{split} split has no non-blank text in its column '
        f'--config.data.hf_text_field={field!r}; check the column and the split.'
      )
  return HFRecords(train, field, train_rows), HFRecords(validation, field, val_rows)


def load_hf_source(data_config, *, build: bool = True) -> text_datasets.TextSource | None:
  """A Hugging Face dataset (--config.data.hf_dataset) as a TextSource.

  Downloaded (the default): `datasets.load_dataset` prepares Arrow files in its cache and the
  records are rows of them, read by random access. Streamed (data.hf_streaming): the first
  data.hf_max_examples examples of each split are written once to
  `<cache_dir>/hf_stream/<name>_<fingerprint>/` (`_stream_to_cache`) and read the same way,
  so the grain iterator's saved position (an index into the records) resumes at the exact
  example, and a streamed copy holds the same records as a downloaded one. Either way blank
  examples are skipped, and without data.eval_split, validation is held out of the training
  split by a hash of each example's index (`hold_out`).

  Fingerprints: local files as for data.text_files (the cache key with modification times,
  the resume check with content only); a downloaded Hub dataset by its name, config,
  revision and its splits' row counts, sizes and features; a streamed one by a hash of the
  texts written.

  Args:
    data_config: the `config.data` ConfigDict.
    build: load the data (False: only check the flag, the files and the package).

  Returns:
    The TextSource (text_key 'text'), or None when `build` is False.

  Raises:
    DataError: the package is missing, the dataset, a split or the text column does not
      exist, or a split holds no text; each names the flag and the fix.
  """
  value = text_datasets._data_field(data_config, 'hf_dataset', '')
  spec = resolve_hf_dataset(value)
  if data_config.text_unit not in ('file', 'line'):
    raise text_datasets.DataError(
      f"--config.data.text_unit={data_config.text_unit!r}; use 'file' or 'line'."
    )
  limit = int(text_datasets._data_field(data_config, 'hf_max_examples', 0))
  if limit < 0:
    raise text_datasets.DataError(
      f'--config.data.hf_max_examples={limit} must be >= 0 (0: every example).'
    )
  for flag in ('train_split', 'eval_split'):
    if '[' in data_config[flag]:
      raise text_datasets.DataError(
        f'--config.data.{flag}={data_config[flag]!r}: a Hugging Face dataset takes split '
        f'names, not slices; name the split, bound it with --config.data.hf_max_examples, and '
        f'leave out the eval split to hold out --config.data.validation_fraction of training.'
      )
  datasets = _import_datasets()
  if not build:
    return None
  field = text_datasets._data_field(data_config, 'hf_text_field', 'text')
  config_name = text_datasets._data_field(data_config, 'hf_config', '')
  streaming = bool(text_datasets._data_field(data_config, 'hf_streaming', False))
  name = f'hf_dataset({value}{", " + config_name if config_name else ""})'
  settings = _hf_settings(data_config)
  fraction = data_config.validation_fraction
  if streaming:
    key = (
      text_datasets._fingerprint(spec.files, *settings)
      if spec.local
      else hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
    )
    cache_dir = data_config.cache_dir or text_datasets.default_cache_dir()
    directory = os.path.join(cache_dir, 'hf_stream', f'{_safe_name(value)}_{key}')
    path = os.path.join(directory, 'content.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        content = json.load(f)
    else:
      logging.info('streaming %s into %s', name, directory)
      content = _stream_to_cache(data_config, spec, name, directory)
    train = datasets.Dataset.from_file(os.path.join(directory, 'train.arrow'))
    val_path = os.path.join(directory, 'validation.arrow')
    validation = datasets.Dataset.from_file(val_path) if os.path.exists(val_path) else None
    records = _hf_records(train, validation, 'text', 0, fraction, name + ' (streamed)')
    fingerprint = hashlib.sha256(repr((settings, content['sha256'])).encode()).hexdigest()[:16]
  else:
    loaded = _load_hf(data_config, spec, streaming=False)
    has_eval = _check_splits(data_config, list(loaded), name)
    train = loaded[data_config.train_split]
    validation = loaded[data_config.eval_split] if has_eval else None
    for split in (train, validation):
      if split is not None:
        _check_text_column(split.features, field, name)
    records = _hf_records(train, validation, field, limit, fraction, name)
    # Row counts and sizes, not `datasets`' own fingerprint: that one hashes cache paths, which
    # differ between machines, and a resume on a new VM must still pass the data check.
    prepared = [
      (len(s), s.info.dataset_size, s.info.download_size, str(s.features))
      for s in (train, validation)
      if s is not None
    ]
    fingerprint = hashlib.sha256(repr((settings, prepared)).encode()).hexdigest()[:16]
  if spec.local:  # as for data.text_files: the cache key sees edits, the resume check content
    fingerprint = text_datasets._fingerprint(spec.files, *settings)
  source = text_datasets.TextSource(name, fingerprint, records[0], records[1], 'text')
  source.data_fingerprint = (
    text_datasets.content_fingerprint(spec.files, *settings) if spec.local else fingerprint
  )
  return source


def _safe_name(value: str) -> str:
  """A short file-name-safe form of `value` for cache directory names."""
  name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in value.strip())
  return name.strip('._')[-40:] or 'dataset'
