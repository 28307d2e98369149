"""Test set-up: 8 fake CPU devices (for mesh tests), set before jax is imported; transformers'
remote-code cache in .cache/."""

import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where transformers copies an export's code under trust_remote_code=True (read when
# transformers is imported): inside the clone, not the user's ~/.cache.
os.environ.setdefault(
  'HF_MODULES_CACHE',
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.cache', 'hf_modules'),
)

import pathlib
import sysconfig

import pytest

# Real text every Python has: a few standard-library modules (tests never need ../shared).
_CORPUS_MODULES = (
  'json/__init__.py',
  'json/decoder.py',
  'json/encoder.py',
  'textwrap.py',
  'shlex.py',
  'string.py',
  'fnmatch.py',
  'glob.py',
  'bisect.py',
  'heapq.py',
  'colorsys.py',
  'keyword.py',
  'numbers.py',
  'operator.py',
  'queue.py',
  'sched.py',
  'abc.py',
  'copy.py',
  'csv.py',
  'difflib.py',
)


@pytest.fixture(scope='session')
def text_corpus(tmp_path_factory) -> pathlib.Path:
  """A directory of 20 UTF-8 text files (~400 KB) plus a Chinese file, written by the test."""
  root = tmp_path_factory.mktemp('corpus')
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  for i, name in enumerate(_CORPUS_MODULES):
    (root / f'doc{i:02d}.txt').write_text(
      (stdlib / name).read_text(encoding='utf-8'), encoding='utf-8'
    )
  (root / 'poem.txt').write_text(
    '床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。\n' * 20, encoding='utf-8'
  )
  return root


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory) -> pathlib.Path:
  """One TFDS/tokenizer cache for the whole session (datasets build once)."""
  return tmp_path_factory.mktemp('cache')


@pytest.fixture
def x64():
  """float64 for the duration of one test (NumPy-reference comparisons, docs/algorithms.md 0)."""
  import jax  # pylint: disable=g-import-not-at-top

  previous = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


@pytest.fixture(scope='session')
def tiny_data(text_corpus, cache_dir):
  """(config, source, tokenizer) of helpers.make_tiny_config: dataset and tokenizer, built
  once."""
  from data_pipelines import text_datasets  # pylint: disable=g-import-not-at-top
  from data_pipelines import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from helpers import make_tiny_config  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(text_corpus, cache_dir)
  source = text_datasets.load_text_source(config.data)
  tok = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  return config, source, tok


@pytest.fixture
def warnings(monkeypatch):
  """The absl warnings logged during the test, formatted, as a list."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  logged = []
  monkeypatch.setattr(absl_logging, 'warning', lambda msg, *a: logged.append(msg % a))
  return logged


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Groups the tests for pytest-xdist (`make test`: `-n 2 --dist loadgroup`): every test of a
  file on one worker (module fixtures build once), and every `two_process` test on one worker,
  first, so that one jax.distributed pair runs at a time: the pairs' deadlines are sized for
  one pair beside one other test, not for two pairs sharing 2 cores (docs/testing.md 1)."""
  del config
  for item in items:
    pair = item.get_closest_marker('two_process') is not None
    item.add_marker(pytest.mark.xdist_group('two_process' if pair else item.path.name))
  items.sort(key=lambda item: item.get_closest_marker('two_process') is None)
