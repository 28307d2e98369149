"""Test set-up: 8 fake CPU devices (for mesh tests), set before jax is imported."""

import os
import sys

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pathlib
import sysconfig

import pytest

# Real text every Python has: a few standard-library modules (tests never need ../shared).
_CORPUS_MODULES = ('json/__init__.py', 'json/decoder.py', 'json/encoder.py', 'textwrap.py',
                   'shlex.py', 'string.py', 'fnmatch.py', 'glob.py', 'bisect.py', 'heapq.py',
                   'colorsys.py', 'keyword.py', 'numbers.py', 'operator.py', 'queue.py',
                   'sched.py', 'abc.py', 'copy.py', 'csv.py', 'difflib.py')


@pytest.fixture(scope='session')
def text_corpus(tmp_path_factory) -> pathlib.Path:
  """A directory of 20 UTF-8 text files (~400 KB) plus a Chinese file, written by the test."""
  root = tmp_path_factory.mktemp('corpus')
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  for i, name in enumerate(_CORPUS_MODULES):
    (root / f'doc{i:02d}.txt').write_text((stdlib / name).read_text(encoding='utf-8'),
                                          encoding='utf-8')
  (root / 'poem.txt').write_text('床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。\n' * 20,
                                 encoding='utf-8')
  return root


def make_tiny_config(corpus: pathlib.Path, cache_dir: pathlib.Path, *,
                     preset: str = 'roformer:tiny', **overrides):
  """A family preset (`file:preset` under launch/configs) shrunk for tests: d 32, 2 layers,
  n 32, batch 8, vocab 512 (GAU: s 16; FLASH: chunk 8). Overrides use dotted keys."""
  import importlib  # pylint: disable=g-import-not-at-top
  module, name = preset.split(':')
  config = importlib.import_module(f'launch.configs.{module}').get_config(name)
  config.data.text_files = str(corpus / '*.txt')
  config.data.cache_dir = str(cache_dir)
  config.data.validation_fraction = 0.1
  config.data.seq_len, config.data.global_batch_size = 32, 8
  config.data.num_threads = 1
  m = config.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = 512, 32, 2, 2, 64
  m.shared_dim, m.chunk_size = 16, 8 if m.chunk_size else 0
  t = config.train
  t.num_train_steps, t.log_every_steps, t.eval_every_steps = 6, 2, 3
  t.eval_steps, t.checkpoint_every_steps = 2, 3
  config.optim.warmup_steps = 2
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def assert_trees_close(actual, expected, rtol=1e-5):
  """Per leaf of two pytrees: ||actual - expected|| <= rtol ||expected|| (+ 1e-12 so all-zero
  leaves compare exactly), naming the first leaf that differs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  expected_leaves = jax.tree.leaves(expected)
  actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
  assert len(actual_leaves) == len(expected_leaves)
  for (path, a), e in zip(actual_leaves, expected_leaves):
    a, e = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(e, np.float64))
    err, norm = np.linalg.norm(a - e), np.linalg.norm(e)
    assert err <= rtol * norm + 1e-12, (
        f'{jax.tree_util.keystr(path)}: relative error {err / max(norm, 1e-30):.2e}')


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
  """(config, source, tokenizer) of make_tiny_config: the dataset and tokenizer, built once."""
  from data_pipelines import text_datasets  # pylint: disable=g-import-not-at-top
  from data_pipelines import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config = make_tiny_config(text_corpus, cache_dir)
  source = text_datasets.load_text_source(config.data)
  tok = tokenizer_lib.load_or_train(config.data, config.model, source.train, source.text_key,
                                    source.fingerprint)
  return config, source, tok
