"""Sources of raw text: local text files, the built-in corpus, a TFDS dataset by name, or a
Hugging Face dataset (docs/configuration.md 1).

Every source ends as records read by random access: TFDS `array_record` shards through
`as_data_source` (no TensorFlow, docs/design.md 2), or the Arrow files of the `datasets`
library (`hf_datasets.load_hf_source`; a streamed dataset is written to the cache first); a
mixture of sources is `mixtures.load_mixture`. `load_text_source` dispatches to all. Local text
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
import contextlib
import dataclasses
import difflib
import glob
import hashlib
import os
import shutil
import sys
import sysconfig
import time
from typing import Iterator, Sequence

from absl import logging
import tensorflow_datasets as tfds


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


COLUMN_UNIT = 'column='


def text_unit_of(data_config) -> str:
  """The document unit of local text files: 'file', 'line', or 'column=<ref>' when
  data.text_column is set (one document per table row).

  Raises:
    DataError: data.text_unit is neither 'file' nor 'line'.
  """
  column = str(_data_field(data_config, 'text_column', '')).strip()
  if column:
    return COLUMN_UNIT + column
  if data_config.text_unit not in ('file', 'line'):
    raise DataError(f"--config.data.text_unit={data_config.text_unit!r}; use 'file' or 'line'.")
  return data_config.text_unit


def _documents(files: Sequence[str], text_unit: str) -> Iterator[tuple[str, str]]:
  """Yields (doc_id, text) for every non-blank document; warns about replaced bytes.

  Raises:
    DataError: text_unit 'column=<ref>' names no column of a file.
  """
  if text_unit.startswith(COLUMN_UNIT):
    # Imported here: task_files imports tasks, which must not load with the text sources.
    from data_pipelines import task_files  # pylint: disable=g-import-not-at-top
    from data_pipelines import tasks  # pylint: disable=g-import-not-at-top

    column = text_unit[len(COLUMN_UNIT) :]
    for path in files:
      try:
        rows = task_files.column_texts(path, column, '--config.data.text_column')
      except tasks.TaskError as e:
        raise DataError(str(e)) from None
      for number, text in rows:
        yield f'{path}:{number}', text
    return
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
    parts: a mixture's sources (`mixtures.load_mixture`; train and validation are then
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


def _data_field(data_config, name: str, default):
  # Configs restored from older checkpoints' metadata predate the hf_* fields.
  return data_config.get(name, default) if hasattr(data_config, 'get') else default


def load_text_source(data_config, *, build: bool = True) -> TextSource:
  """Resolves `config.data` to a prepared text dataset (building it if needed).

  Order: `mixture` (several sources with weights, `mixtures.load_mixture`) if set, else
  `text_files` (local glob) if set, else `hf_dataset` (`hf_datasets.load_hf_source`), else
  `tfds_name`, else the
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
  # Imported here: hf_datasets and mixtures import this module (TextSource, DataError).
  from data_pipelines import hf_datasets  # pylint: disable=g-import-not-at-top
  from data_pipelines import mixtures  # pylint: disable=g-import-not-at-top

  if _data_field(data_config, 'mixture', ()):
    return mixtures.load_mixture(data_config, build=build)
  cache_dir = data_config.cache_dir or default_cache_dir()
  if str(_data_field(data_config, 'text_column', '')).strip() and not data_config.text_files:
    raise DataError(
      '--config.data.text_column reads the table files of --config.data.text_files, which is '
      'empty; set text_files to the TSV/CSV/JSONL files (a Hugging Face dataset takes '
      '--config.data.hf_text_field instead), or leave text_column empty.'
    )
  if _data_field(data_config, 'hf_dataset', ''):
    other = [f for f in ('text_files', 'tfds_name') if data_config.get(f)]
    if other:
      raise DataError(
        f'--config.data.hf_dataset and --config.data.{other[0]} are both set; a run reads '
        f'one source: keep one of them (--config.data.{other[0]}= empties it).'
      )
    return hf_datasets.load_hf_source(data_config, build=build)
  if data_config.text_files:
    unit = text_unit_of(data_config)
    scan = scan_text_files(expand_globs(data_config.text_files))
    name, cls, files = 'local_text_files', LocalTextFiles, scan.files
  elif data_config.tfds_name:
    return _load_named(data_config)
  else:
    name, cls, files, unit = 'stdlib_corpus', StdlibCorpus, stdlib_files(), 'file'
    scan_text_files(files, flag='the built-in corpus')
  fingerprint = _fingerprint(files, unit, data_config.validation_fraction, sys.version_info[:2])
  data_dir = os.path.join(cache_dir, 'tfds', f'{name}_{fingerprint}')

  def make_builder():
    return cls(
      files=files,
      text_unit=unit,
      validation_fraction=data_config.validation_fraction,
      data_dir=data_dir,
      file_format='array_record',
    )

  builder = make_builder()
  if build:
    with build_guard(data_dir):
      try:
        builder.download_and_prepare()
      except FileExistsError:
        # Another process on a shared filesystem finished the same build first; theirs is
        # identical (same files, same fingerprint), so use it (below).
        pass
    # Read back what is on disk: a builder made before another process finished the same
    # build skips it as done but holds no split info of its own (its splits read as none).
    builder = make_builder()
    if not builder.is_prepared():
      raise DataError(
        f'the dataset build in {data_dir} did not finish (another process may have failed '
        f'during it); run again, which rebuilds it.'
      )
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
