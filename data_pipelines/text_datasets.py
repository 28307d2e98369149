"""Sources of raw text: local text files, the built-in corpus, a TFDS dataset by name, or a
Hugging Face dataset (docs/configuration.md 1).

Every source ends as records read by random access: TFDS `array_record` shards through
`as_data_source` (no TensorFlow, docs/design.md 2), or the Arrow files of the `datasets`
library (`load_hf_source`; a streamed dataset is written to the cache first). Local text
sources are built once into `<cache_dir>/tfds/<name>_<fingerprint>` where the fingerprint
hashes the file list, sizes, modification times and split settings, so editing the corpus
rebuilds it and re-running does not.

Non-UTF-8 input policy: a file whose first 8 KiB contain a NUL byte is treated as binary and
skipped with a warning; any other file is decoded as UTF-8 with invalid bytes replaced by
U+FFFD, and the number of replaced bytes is reported (warning at build time).

A build writes into `incomplete.*` directories that TFDS renames when it is done; a killed
build leaves one behind. Builds hold a shared lock on `<cache entry>/.build.lock`, and a build
that finds the lock free removes the `incomplete.*` directories nothing wrote to for
STALE_BUILD_SECONDS (`build_guard`).
"""

from __future__ import annotations

import codecs
import collections.abc
import contextlib
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import time
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import pipeline

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # not POSIX: builds take no lock and leave killed builds' directories
  fcntl = None

tfds.disable_progress_bar()

# Directory names skipped in the built-in corpus: test suites, IDLE and installed packages
# are not on every Python install (docs/design.md 8: ~11 MB remain).
_STDLIB_SKIP_DIRS = frozenset(
  {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', '__pycache__'}
)
_BINARY_SNIFF_BYTES = 8192
_FEATURES = {'text': tfds.features.Text(), 'id': tfds.features.Text()}


class DataError(ValueError):
  """Bad data input (missing files, no usable text, bad split): the message says what to do."""


# ------------------------------------------------------------------ reading local files

_replaced_bytes = [0]


def _count_and_replace(error: UnicodeDecodeError):
  _replaced_bytes[0] += error.end - error.start
  return '\ufffd', error.end


codecs.register_error('encoder_pretrain_count_replace', _count_and_replace)


@dataclasses.dataclass
class TextFileScan:
  """What a scan of local text files found.

  Attributes:
    files: the readable text files, sorted (paths).
    binary_files: files skipped because they look binary (NUL byte in the first 8 KiB).
    total_bytes: bytes of the text files.
  """

  files: list[str]
  binary_files: list[str]
  total_bytes: int


def expand_globs(pattern: str, flag: str = '--config.data.text_files') -> list[str]:
  """Expands a comma-separated list of globs (with `**`) into sorted regular files.

  Raises:
    DataError: no pattern given, or nothing matched.
  """
  patterns = [p.strip() for p in pattern.split(',') if p.strip()]
  files = sorted(
    {
      f
      for p in patterns
      for f in glob.glob(os.path.expanduser(p), recursive=True)
      if os.path.isfile(f)
    }
  )
  directories = [p for p in patterns if os.path.isdir(os.path.expanduser(p))]
  if not files and directories:
    raise DataError(
      f'{flag}={pattern!r} is a directory ({directories[0]}), not a file glob; give the '
      f"files in it, e.g. {flag}='{directories[0].rstrip('/')}/**/*.txt' (quoted, so that "
      f'Python expands the **).'
    )
  if not files:
    raise DataError(
      f'{flag}={pattern!r} matches no files. Check the path (globs such as '
      f'"corpus/**/*.txt" need quotes in the shell so that Python expands them), or leave '
      f'{flag} empty to train on the built-in corpus.'
    )
  return files


def scan_text_files(files: Sequence[str], flag: str = '--config.data.text_files') -> TextFileScan:
  """Sorts `files` into text and binary files (NUL-byte sniff).

  Raises:
    DataError: every file is binary or empty.
  """
  text, binary, total = [], [], 0
  for path in files:
    with open(path, 'rb') as f:
      head = f.read(_BINARY_SNIFF_BYTES)
    if b'\x00' in head:
      binary.append(path)
      continue
    size = os.path.getsize(path)
    if size:
      text.append(path)
      total += size
  if binary:
    logging.warning('skipping %d binary file(s) (NUL bytes), e.g. %s', len(binary), binary[0])
  if not text:
    raise DataError(
      f'{flag}: the {len(files)} matched file(s) hold no usable text (all empty or binary, '
      f'e.g. {files[0]}). Point the flag at UTF-8 text files.'
    )
  return TextFileScan(text, binary, total)


def read_text(path: str) -> tuple[str, int]:
  """Reads `path` as UTF-8, replacing invalid bytes; returns (text, replaced byte count)."""
  before = _replaced_bytes[0]
  with open(path, 'rb') as f:
    text = f.read().decode('utf-8', errors='encoder_pretrain_count_replace')
  return text, _replaced_bytes[0] - before


def _is_validation(doc_id: str, fraction: float) -> bool:
  """Deterministic hold-out: a document is in validation iff its id hashes below `fraction`."""
  digest = hashlib.sha256(doc_id.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64 < fraction


def _documents(files: Sequence[str], text_unit: str) -> Iterator[tuple[str, str]]:
  """Yields (doc_id, text) for every non-blank document; warns about replaced bytes."""
  replaced_total, replaced_files = 0, 0
  for path in files:
    text, replaced = read_text(path)
    if replaced:
      replaced_total += replaced
      replaced_files += 1
    if text_unit == 'file':
      if text.strip():
        yield path, text
    else:
      for i, line in enumerate(text.splitlines()):
        if line.strip():
          yield f'{path}:{i}', line
  if replaced_total:
    logging.warning(
      '%d file(s) were not valid UTF-8: %d invalid byte(s) replaced by U+FFFD',
      replaced_files,
      replaced_total,
    )


class _LocalTextBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the local-text builders: documents from files, split by a hash of their id."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, *, files: Sequence[str], text_unit: str, validation_fraction: float, **kwargs):
    self._files = list(files)
    self._text_unit = text_unit
    self._validation_fraction = validation_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs() reads files next to the builder's module.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(_FEATURES))

  def _split_generators(self, dl_manager):
    del dl_manager
    ids = [doc_id for doc_id, _ in _documents(self._files, self._text_unit)]
    if not ids:
      raise DataError(
        f'the {len(self._files)} file(s) hold only blank text (e.g. '
        f'{self._files[0]}); point --config.data.text_files at text.'
      )
    if len(ids) == 1:
      # One document (a single file, or a single line): its tail is the validation text.
      text = next(_documents(self._files, self._text_unit))[1]
      head, tail = split_single_document(text, self._validation_fraction, ids[0])
      return {
        'train': self._single(ids[0], head, 'head'),
        'validation': self._single(ids[0], tail, 'tail'),
      }
    held_out = {i for i in ids if _is_validation(i, self._validation_fraction)}
    if not held_out:
      # A small corpus can hash nothing into validation: hold out the lowest-hash document.
      held_out = {min(ids, key=lambda i: hashlib.sha256(i.encode()).digest())}
    if len(held_out) == len(ids):
      # Everything hashed into validation: keep the highest-hash document for training.
      held_out.discard(max(ids, key=lambda i: hashlib.sha256(i.encode()).digest()))
    return {
      'train': self._generate_examples(held_out, False),
      'validation': self._generate_examples(held_out, True),
    }

  def _single(self, doc_id: str, text: str, part: str):
    yield f'{doc_id}#{part}', {'text': text, 'id': f'{doc_id}#{part}'}

  def _generate_examples(self, held_out: set[str], validation: bool):
    for doc_id, text in _documents(self._files, self._text_unit):
      if (doc_id in held_out) == validation:
        yield doc_id, {'text': text, 'id': doc_id}


# A one-document corpus smaller than this cannot give both a training and a validation part
# of a few dozen tokens each.
MIN_SINGLE_DOCUMENT_CHARS = 400


def split_single_document(text: str, validation_fraction: float, name: str) -> tuple[str, str]:
  """Splits a corpus's only document into (train head, validation tail).

  The tail is the last `validation_fraction` of the characters (at least 1/8 of
  MIN_SINGLE_DOCUMENT_CHARS), cut at the nearest line break when there is one.

  Raises:
    DataError: the document has fewer than MIN_SINGLE_DOCUMENT_CHARS non-blank characters.
  """
  text = text.rstrip()  # trailing blank lines must not become the validation text
  size = len(text.strip())
  if size < MIN_SINGLE_DOCUMENT_CHARS:
    raise DataError(
      f'the corpus is one document ({name}) of {size} characters: too small to hold out a '
      f'validation part. Give at least {MIN_SINGLE_DOCUMENT_CHARS} characters of text (a '
      f'real run needs megabytes), or more files.'
    )
  tail_chars = max(int(len(text) * validation_fraction), MIN_SINGLE_DOCUMENT_CHARS // 8)
  cut = len(text) - tail_chars
  newline = text.rfind('\n', 0, cut + 1)
  if newline > len(text) // 2 and text[newline + 1 :].strip():
    cut = newline + 1
  return text[:cut], text[cut:]


class LocalTextFiles(_LocalTextBuilder):
  """Local text files as a TFDS dataset (`--config.data.text_files=GLOB`).

  Features: `text` (bytes, UTF-8) and `id` (`path` or `path:line`). Splits: `train` and
  `validation` (documents whose id hashes below `validation_fraction`).
  """


class StdlibCorpus(_LocalTextBuilder):
  """The built-in corpus: the Python standard library's `.py` files (about 11 MB).

  Every Python install has it, so the main job trains on real, varied text with no download.
  Test suites, IDLE and site-packages are excluded (not present on every install).
  """


def stdlib_files() -> list[str]:
  """Returns the sorted `.py` files of this interpreter's standard library."""
  root = sysconfig.get_paths()['stdlib']
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith('.py'))
  return sorted(found)


def _fingerprint(files: Sequence[str], *settings) -> str:
  h = hashlib.sha256(repr(settings).encode())
  for path in files:
    st = os.stat(path)
    h.update(f'{path}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:16]


_EDGE_BYTES = 65536


def content_fingerprint(files: Sequence[str], *settings) -> str:
  """What the data *is*, for the resume check: each file's path relative to the corpus root,
  its size and a hash of its first and last 64 KiB, plus `settings`. Unlike the cache key it
  ignores modification times, so data copied again unchanged (a new VM after a preemption)
  still counts as the same data, and a different mount point does too."""
  root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if files else ''
  h = hashlib.sha256(repr(settings).encode())
  for path in files:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(_EDGE_BYTES)
      f.seek(max(size - _EDGE_BYTES, 0))
      tail = f.read(_EDGE_BYTES)
    rel = os.path.relpath(os.path.abspath(path), root)
    h.update(f'{rel}\0{size}\0'.encode() + hashlib.sha256(head + tail).digest())
  return h.hexdigest()[:16]


# An `incomplete.*` directory that nothing wrote to for this long, found while no build holds
# the lock, is a killed build's. The age matters where locks do not reach other hosts (some
# network filesystems): a live build writes its shards continuously, and every build of one
# cache entry starts at about the same time (all hosts of a job, or a rerun).
STALE_BUILD_SECONDS = 3600
BUILD_LOCK = '.build.lock'


def _newest_change(path: str) -> float:
  """The latest modification time (seconds since the epoch) of `path` and everything in it."""
  newest = os.lstat(path).st_mtime
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      try:
        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
      except OSError:  # removed while we looked: it was just being written
        return time.time()
  return newest


def remove_stale_builds(data_dir: str, max_age: float = STALE_BUILD_SECONDS) -> list[str]:
  """Removes the `incomplete.*` build directories of `data_dir` unchanged for `max_age`.

  Call it only while holding `data_dir`'s build lock exclusively (`build_guard` does): a
  directory of a build that is running must not go.

  Args:
    data_dir: a TFDS data_dir of this cache (`<cache_dir>/tfds/<name>_<fingerprint>`).
    max_age: seconds without a write after which a build directory counts as abandoned.

  Returns:
    The directories removed.
  """
  removed = []
  for path in sorted(glob.glob(os.path.join(glob.escape(data_dir), '*', 'incomplete.*'))):
    try:
      if not os.path.isdir(path) or time.time() - _newest_change(path) < max_age:
        continue
    except OSError:  # gone already (another cleaner, or TFDS finishing): nothing to do
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  if removed:
    logging.warning(
      'removed %d incomplete dataset build(s) left by a killed build (no build '
      'running, nothing written for %.0f min): %s',
      len(removed),
      max_age / 60,
      ', '.join(removed),
    )
  return removed


@contextlib.contextmanager
def build_guard(data_dir: str):
  """Held around a build of `data_dir`: a shared lock on its BUILD_LOCK file, so that builds
  of the same data may run at once (the first to finish wins, see `load_text_source`), taken
  after removing killed builds' directories when no build holds the lock.

  Nothing is locked or removed where locks are not available (no fcntl, a remote or read-only
  cache, a filesystem without flock): the build then runs as TFDS alone would run it.

  Args:
    data_dir: a TFDS data_dir of this cache (`<cache_dir>/tfds/<name>_<fingerprint>`).

  Yields:
    None, with the lock held (when there is one).
  """
  fd = None
  if fcntl is not None and '://' not in data_dir:
    try:
      os.makedirs(data_dir, exist_ok=True)
      fd = os.open(os.path.join(data_dir, BUILD_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only cache: a prepared dataset is still readable
      fd = None
  try:
    if fd is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        pass  # another build is running (or cleaning): leave its directories alone
      except OSError as e:  # a filesystem without flock: no lock, no cleaning
        logging.info('no build lock on %s (%s); building without one', data_dir, e)
        os.close(fd)
        fd = None
      else:
        remove_stale_builds(data_dir)
    if fd is not None:
      # Shared while building: converts an exclusive lock, or waits for a cleaner to finish.
      fcntl.flock(fd, fcntl.LOCK_SH)
    yield
  finally:
    if fd is not None:
      os.close(fd)  # releases the lock


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/encoder_pretrain` or `~/.cache/encoder_pretrain`."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'encoder_pretrain')


@dataclasses.dataclass
class TextSource:
  """A prepared text dataset.

  Attributes:
    name: human-readable source name for logs and checkpoint metadata.
    fingerprint: identifies the content (tokenizer cache key, metadata).
    train: random-access source of train records ({'text': bytes, ...}).
    validation: random-access source of validation records.
    text_key: feature holding the text.
    data_fingerprint: identifies the content for the resume check (no modification times;
      `content_fingerprint`); empty = use `fingerprint`.
    parts: a mixture's sources (`load_mixture`; train and validation are then
      `pipeline.MixtureRecords` of theirs); () for a single source.
  """

  name: str
  fingerprint: str
  train: Sequence
  validation: Sequence
  text_key: str
  data_fingerprint: str = ''
  parts: tuple = ()


def _from_builder(
  builder: tfds.core.DatasetBuilder,
  name: str,
  fingerprint: str,
  train_split: str,
  eval_split: str,
  text_key: str,
) -> TextSource:
  splits = builder.info.splits
  for flag, split in (('train_split', train_split), ('eval_split', eval_split)):
    if split not in splits:
      raise DataError(
        f'--config.data.{flag}={split!r} is not a split of {name}; it has '
        f'{", ".join(sorted(splits.keys()))}.'
      )
  if text_key not in builder.info.features:
    raise DataError(
      f'--config.data.tfds_text_key={text_key!r} is not a feature of {name}; it has '
      f'{", ".join(builder.info.features.keys())}.'
    )
  sources = builder.as_data_source(split=[train_split, eval_split])
  train, validation = sources
  if not len(train):
    raise DataError(f'{name}: the {train_split!r} split is empty; add more text.')
  if not len(validation):
    raise DataError(
      f'{name}: the {eval_split!r} split is empty; add more documents or raise '
      f'--config.data.validation_fraction.'
    )
  return TextSource(name, fingerprint, train, validation, text_key)


def load_text_source(data_config, *, build: bool = True) -> TextSource:
  """Resolves `config.data` to a prepared text dataset (building it if needed).

  Order: `mixture` (several sources with weights, `load_mixture`) if set, else `text_files`
  (local glob) if set, else `hf_dataset` (`load_hf_source`), else `tfds_name`, else the
  built-in corpus; `hf_dataset` with either of the others is an error.

  Args:
    data_config: the `config.data` ConfigDict.
    build: build local datasets that are not cached yet (False: only check the inputs).

  Returns:
    A TextSource with random-access train and validation splits (None for a Hugging Face
    dataset when `build` is False).

  Raises:
    DataError: the glob matches nothing, the files hold no text, the dataset or split does
      not exist, a split is empty, or a bad mixture.
  """
  if _data_field(data_config, 'mixture', ()):
    return load_mixture(data_config, build=build)
  cache_dir = data_config.cache_dir or default_cache_dir()
  if _data_field(data_config, 'hf_dataset', ''):
    other = [f for f in ('text_files', 'tfds_name') if data_config.get(f)]
    if other:
      raise DataError(
        f'--config.data.hf_dataset and --config.data.{other[0]} are both set; a run reads '
        f'one source: keep one of them (--config.data.{other[0]}= empties it).'
      )
    return load_hf_source(data_config, build=build)
  if data_config.text_files:
    if data_config.text_unit not in ('file', 'line'):
      raise DataError(f"--config.data.text_unit={data_config.text_unit!r}; use 'file' or 'line'.")
    scan = scan_text_files(expand_globs(data_config.text_files))
    name, cls, files = 'local_text_files', LocalTextFiles, scan.files
    unit = data_config.text_unit
  elif data_config.tfds_name:
    return _load_named(data_config)
  else:
    name, cls, files, unit = 'stdlib_corpus', StdlibCorpus, stdlib_files(), 'file'
    scan_text_files(files, flag='the built-in corpus')
  fingerprint = _fingerprint(files, unit, data_config.validation_fraction, sys.version_info[:2])
  data_dir = os.path.join(cache_dir, 'tfds', f'{name}_{fingerprint}')
  builder = cls(
    files=files,
    text_unit=unit,
    validation_fraction=data_config.validation_fraction,
    data_dir=data_dir,
    file_format='array_record',
  )
  if build:
    with build_guard(data_dir):
      try:
        builder.download_and_prepare()
      except FileExistsError:
        # Another process on a shared filesystem finished the same build first; theirs is
        # identical (same files, same fingerprint), so use it.
        builder = cls(
          files=files,
          text_unit=unit,
          validation_fraction=data_config.validation_fraction,
          data_dir=data_dir,
          file_format='array_record',
        )
        if not builder.is_prepared():
          raise
  source = _from_builder(
    builder, f'{name}({len(files)} files)', fingerprint, 'train', 'validation', 'text'
  )
  source.data_fingerprint = content_fingerprint(files, unit, data_config.validation_fraction)
  return source


def _close_names(name: str) -> str:
  """'Close names: a, b, c. ' from TFDS's registered builders ('' if none is close)."""
  try:
    known = tfds.list_builders(with_community_datasets=False)
  except Exception:  # pylint: disable=broad-except
    return ''
  builder = name.split('/')[0].split(':')[0]
  close = difflib.get_close_matches(builder, known, n=5, cutoff=0.6)
  return f'Close names: {", ".join(close)}. ' if close else ''


def _load_named(data_config) -> TextSource:
  name = data_config.tfds_name
  data_dir = data_config.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # TFDS raises several types for unknown names/configs.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
      f'--config.data.tfds_name={name!r} is not a TFDS dataset this install knows '
      f'({first_line[:200]}). {_close_names(name)}Check the name with '
      f'`tfds.list_builders()`, or set --config.data.tfds_data_dir to the directory that '
      f'holds it.'
    ) from None
  if not builder.is_prepared():
    logging.info('preparing TFDS dataset %s in %s', name, builder.data_dir)
    builder.download_and_prepare(file_format='array_record')
  fingerprint = hashlib.sha256(f'{name}\0{builder.data_dir}'.encode()).hexdigest()[:16]
  return _from_builder(
    builder,
    name,
    fingerprint,
    data_config.train_split,
    data_config.eval_split,
    data_config.tfds_text_key,
  )


# ------------------------------------------------------------------ Hugging Face datasets

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


def _data_field(data_config, name: str, default):
  # Configs restored from older checkpoints' metadata predate the hf_* fields.
  return data_config.get(name, default) if hasattr(data_config, 'get') else default


def _import_datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(
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
      raise DataError(
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
  files = expand_globs(value, flag=_HF_FLAG)
  unknown = [f for f in files if _extension(f) not in HF_FILE_BUILDERS]
  if unknown:
    raise DataError(
      f'{_HF_FLAG}={value!r} matches {unknown[0]}, which is not a file type read here; give '
      f'.txt, .json/.jsonl, .parquet or .csv files (optionally compressed), or use '
      f'--config.data.text_files for other text files.'
    )
  builders = sorted({HF_FILE_BUILDERS[_extension(f)] for f in files})
  if len(builders) > 1:
    raise DataError(
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
  value = _data_field(data_config, 'hf_dataset', '')
  try:
    loaded = datasets.load_dataset(
      spec.path,
      _data_field(data_config, 'hf_config', '') or None,
      revision=_data_field(data_config, 'hf_revision', '') or None,
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
    raise DataError(
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
    raise DataError(
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
    raise DataError(
      f'--config.data.hf_text_field={field!r} is not a column of {name}; it has '
      f'{", ".join(columns)}. Set the flag to the column holding the text.'
    )
  dtype = getattr(features[field], 'dtype', None)
  if dtype not in ('string', 'large_string'):
    raise DataError(
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
    _data_field(data_config, 'hf_dataset', ''),
    _data_field(data_config, 'hf_config', ''),
    _data_field(data_config, 'hf_revision', ''),
    _data_field(data_config, 'hf_text_field', 'text'),
    _data_field(data_config, 'hf_max_examples', 0),
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
      if time.time() - _newest_change(old) >= STALE_BUILD_SECONDS:
        shutil.rmtree(old, ignore_errors=True)
    except OSError:
      pass
  streams = _load_hf(data_config, spec, streaming=True)
  has_eval = _check_splits(data_config, list(streams), name)
  outputs = {'train': data_config.train_split}
  if has_eval:
    outputs['validation'] = data_config.eval_split
  field = _data_field(data_config, 'hf_text_field', 'text')
  limit = _data_field(data_config, 'hf_max_examples', 0)
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
              raise DataError(
                f'--config.data.hf_text_field={field!r} is not a column of {name} (example '
                f'{count} of {split!r} has {", ".join(example)}); set it to the text column.'
              )
            text = example[field]
            if text is not None and not isinstance(text, str):
              raise DataError(
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
      raise DataError(
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
      raise DataError(
        f'{name}: the --config.data.{split} split has no non-blank text in its column '
        f'--config.data.hf_text_field={field!r}; check the column and the split.'
      )
  return HFRecords(train, field, train_rows), HFRecords(validation, field, val_rows)


def load_hf_source(data_config, *, build: bool = True) -> TextSource | None:
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
  value = _data_field(data_config, 'hf_dataset', '')
  spec = resolve_hf_dataset(value)
  if data_config.text_unit not in ('file', 'line'):
    raise DataError(f"--config.data.text_unit={data_config.text_unit!r}; use 'file' or 'line'.")
  limit = int(_data_field(data_config, 'hf_max_examples', 0))
  if limit < 0:
    raise DataError(f'--config.data.hf_max_examples={limit} must be >= 0 (0: every example).')
  for flag in ('train_split', 'eval_split'):
    if '[' in data_config[flag]:
      raise DataError(
        f'--config.data.{flag}={data_config[flag]!r}: a Hugging Face dataset takes split '
        f'names, not slices; name the split, bound it with --config.data.hf_max_examples, and '
        f'leave out the eval split to hold out --config.data.validation_fraction of training.'
      )
  datasets = _import_datasets()
  if not build:
    return None
  field = _data_field(data_config, 'hf_text_field', 'text')
  config_name = _data_field(data_config, 'hf_config', '')
  streaming = bool(_data_field(data_config, 'hf_streaming', False))
  name = f'hf_dataset({value}{", " + config_name if config_name else ""})'
  settings = _hf_settings(data_config)
  fraction = data_config.validation_fraction
  if streaming:
    key = (
      _fingerprint(spec.files, *settings)
      if spec.local
      else hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
    )
    cache_dir = data_config.cache_dir or default_cache_dir()
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
    fingerprint = _fingerprint(spec.files, *settings)
  source = TextSource(name, fingerprint, records[0], records[1], 'text')
  source.data_fingerprint = (
    content_fingerprint(spec.files, *settings) if spec.local else fingerprint
  )
  return source


def _safe_name(value: str) -> str:
  """A short file-name-safe form of `value` for cache directory names."""
  name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in value.strip())
  return name.strip('._')[-40:] or 'dataset'


# ------------------------------------------------------------------ mixtures

MIXTURE_FLAG = '--config.data.mixture'
# The data fields a mixture source may set (docs/configuration.md 3). A field a source leaves
# out takes the run's value (--config.data.<field>), except the three that choose the source
# (_SOURCE_SELECTORS): a source without one is the built-in corpus.
MIXTURE_SOURCE_FIELDS = (
  'text_files',
  'text_unit',
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


def _mixture_error(detail: str) -> DataError:
  return DataError(
    f'{MIXTURE_FLAG}: {detail} Write the mixture as a tuple of sources, each (name, weight, '
    f"'field=value', ...) with data fields of one source ({', '.join(MIXTURE_SOURCE_FIELDS)}), "
    f'e.g. {_MIXTURE_EXAMPLE}; leave it () for one source.'
  )


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _typed(data_config, name: str, field: str, text: str):
  """`text` as the type of data.<field> (bool, int, float or str)."""
  default = _data_field(data_config, field, '')
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
  value = _data_field(data_config, 'mixture', ())
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


def load_mixture(data_config, *, build: bool = True) -> TextSource | None:
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
  own = [f for f in _SOURCE_SELECTORS if _data_field(data_config, f, '')]
  if own:
    raise DataError(
      f'--config.data.{own[0]}={data_config[own[0]]!r} and {MIXTURE_FLAG} are both set; a '
      f"mixture names all its sources: make it one of them (e.g. ('main', 1.0, "
      f"'{own[0]}={data_config[own[0]]}')) or empty it with --config.data.{own[0]}=."
    )
  parts = []
  for entry in entries:
    try:
      parts.append(load_text_source(_source_config(data_config, entry), build=build))
    except DataError as e:
      raise DataError(f'{MIXTURE_FLAG} source {entry.name!r}: {e}') from None
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
  return TextSource(
    name + ')', fingerprint, train, validation, 'text', data_fingerprint, tuple(parts)
  )
