"""Data mixtures (--config.data.mixture, docs/configuration.md 3): grain mixes the sources'
documents with the weights; counts per source, determinism, resume, sharding, fingerprints and
refused specs."""

import json
import pathlib

import grain
from grain._src.python.checkpoint import handler as grain_handler
import numpy as np
import pytest

from helpers import make_tiny_config
from data_pipelines import pipeline
from data_pipelines import mixtures
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
from pretrain import checkpointing

WORDS = (
  'the of and river city history music science people language war north king early modern '
  'island church school village century population station empire'
).split()


def _four_sigma(count: int, total: int, weight: float) -> bool:
  """Whether count / total is within 4 binomial standard deviations of `weight`."""
  return abs(count / total - weight) <= 4 * np.sqrt(weight * (1 - weight) / total)


@pytest.fixture(scope='module')
def sources(tmp_path_factory) -> pathlib.Path:
  """Two tiny local sources, one document per line: 'wiki' (prose, 300 lines) and 'code'
  (assignments, 300 lines), written by the test."""
  root = tmp_path_factory.mktemp('mixture_sources')
  rng = np.random.default_rng(0)
  (root / 'wiki').mkdir()
  (root / 'code').mkdir()
  for i in range(3):
    lines = [' '.join(rng.choice(WORDS, rng.integers(4, 14))) for _ in range(100)]
    (root / 'wiki' / f'w{i}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    lines = [
      f'x{rng.integers(50)} = f{rng.integers(9)}({rng.integers(999)}, y{rng.integers(20)})'
      for _ in range(100)
    ]
    (root / 'code' / f'c{i}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return root


def _config(root, cache_dir, wiki=0.7, code=0.3):
  config = make_tiny_config(root, cache_dir)
  config.data.text_files = ''
  config.data.text_unit = 'line'
  config.data.mixture = (
    ('wiki', wiki, f'text_files={root}/wiki/*.txt'),
    ('code', code, f'text_files={root}/code/*.txt'),
  )
  return config


def _load(config):
  source = text_datasets.load_text_source(config.data)
  tok = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  return source, tok


@pytest.fixture(scope='module')
def mixture(sources, cache_dir):
  config = _config(sources, cache_dir)
  return (config, *_load(config))


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_counts_per_source_match_the_weights(mixture):
  config, source, tok = mixture
  assert [p.name for p in source.parts] == ['local_text_files(3 files)'] * 2
  it = iter(pipeline.make_dataset(source.train, tok, config))
  batches = [next(it) for _ in range(40)]
  assert 'source' not in batches[0]  # counted on the host, never sent to the device
  counts = pipeline.mixture_counts(it)
  assert counts.names == ('wiki', 'code') and np.allclose(counts.weights, (0.7, 0.3))
  docs = int(counts.documents.sum())
  assert docs > 500
  assert _four_sigma(int(counts.documents[0]), docs, 0.7), counts.summary()
  # Every real token is counted once.
  assert counts.tokens.sum() == sum(int((b['segment_ids'] > 0).sum()) for b in batches)
  scalars = counts.scalars()
  assert scalars['wiki/documents'] == counts.documents[0]
  assert abs(scalars['wiki/token_share'] + scalars['code/token_share'] - 1) < 1e-9
  assert 'wiki' in counts.summary() and 'weight 70.0%' in counts.summary()
  # Evaluation reads the mixture of the sources' validation splits; its batches carry no ids.
  evals = pipeline.eval_batches(source.validation, tok, config)
  assert len(evals) == config.train.eval_steps and 'source' not in evals[0]


class _IdTokenizer:
  """'s:d:n' -> n ids 10000 (s + 1) + 100 d + i: every token names its source, document and
  place (i == 0: the document's first token)."""

  vocab_size = 100_000

  def encode(self, text):
    s, d, n = map(int, text.split(':'))
    return (np.arange(n) + 10_000 * (s + 1) + 100 * d).astype(np.int32)


def _synthetic(weights=(0.7, 0.3)):
  rng = np.random.default_rng(1)
  a = [{'text': f'0:{d}:{rng.integers(1, 30)}'.encode()} for d in range(60)]
  b = [{'body': f'1:{d}:{rng.integers(1, 30)}'} for d in range(40)]
  return pipeline.MixtureRecords(['a', 'b'], weights, [a, b], ['text', 'body'])


def test_counts_are_exact_against_the_token_ids(prepared_config):
  config = prepared_config
  it = iter(pipeline.make_dataset(_synthetic(), _IdTokenizer(), config))
  batches = [next(it) for _ in range(30)]
  stream = np.concatenate([b['tokens'][b['segment_ids'] > 0] for b in batches])
  owner = stream // 10_000 - 1
  is_sep = stream == tokenizer_lib.SEP_ID
  assert not is_sep[0]
  for i in np.flatnonzero(is_sep):  # a [SEP] ends the document of the token before it
    owner[i] = owner[i - 1]
  counts = pipeline.mixture_counts(it)
  np.testing.assert_array_equal(counts.tokens, np.bincount(owner, minlength=2))
  starts = (~is_sep) & (stream % 100 == 0)
  np.testing.assert_array_equal(counts.documents, np.bincount(owner[starts], minlength=2))
  assert _four_sigma(int(counts.documents[0]), int(counts.documents.sum()), 0.7)
  # Mixing happens before packing: rows hold documents of both sources.
  mixed_rows = sum(
    len(set((row[seg > 0] // 10_000).tolist()) - {0}) == 2
    for b in batches
    for row, seg in zip(b['tokens'], b['segment_ids'])
  )
  assert mixed_rows > 10


@pytest.fixture
def prepared_config(sources, cache_dir):
  config = make_tiny_config(sources, cache_dir)
  config.objective = 'clm'
  return config


def test_tokenizer_sample_draws_the_sources_in_proportion():
  records = _synthetic(weights=(3, 1))  # weights are relative
  assert records.weights == (0.75, 0.25) and len(records) == 100
  picks = np.random.default_rng(0).permutation(len(records))[:80]  # as tokenizer._sample_lines
  from_a = sum(str(records[int(i)]['text']).startswith("b'0:") for i in picks)
  assert _four_sigma(from_a, 80, 0.75)
  with pytest.raises(IndexError):
    records[100]


def test_every_source_is_sharded_over_the_processes():
  records = _synthetic()
  seen = []
  for index in range(2):
    ds = pipeline.mixed_documents(
      records, _IdTokenizer(), process_index=index, process_count=2, seed=0, shuffle=True
    )
    # One pass over this shard: 30 of a's documents and 20 of b's, interleaved 7:3.
    firsts = {int(ds[i]['tokens'][0]) for i in range(70)}
    seen.append({(t // 10_000 - 1, t % 10_000 // 100) for t in firsts})
  assert not seen[0] & seen[1]
  union = seen[0] | seen[1]
  assert {d for s, d in union if s == 0} == set(range(60))
  assert {d for s, d in union if s == 1} == set(range(40))


def test_same_seed_gives_the_same_batches(mixture, sources, cache_dir):
  config, source, tok = mixture
  again = _config(sources, cache_dir)
  source_b, tok_b = _load(again)  # built again from the config
  assert tok_b.sha256 == tok.sha256
  a = iter(pipeline.make_dataset(source.train, tok, config))
  b = iter(pipeline.make_dataset(source_b.train, tok_b, again))
  for _ in range(4):
    _assert_same(next(a), next(b))
  other = config.copy_and_resolve_references()
  other.data.shuffle_seed = 1
  first = next(iter(pipeline.make_dataset(source.train, tok, config)))
  moved = next(iter(pipeline.make_dataset(source.train, tok, other)))
  assert not np.array_equal(moved['tokens'], first['tokens'])


def test_resumed_iterator_continues_the_same_mixture(mixture, sources, cache_dir, tmp_path):
  config, source, tok = mixture
  full = iter(pipeline.make_dataset(source.train, tok, config))
  expected = [next(full) for _ in range(12)]
  expected_counts = pipeline.mixture_counts(full)

  first = iter(pipeline.make_dataset(source.train, tok, config))
  for _ in range(5):
    next(first)
  # Saved and restored as the trainer's checkpoints do (grain.checkpoint.CheckpointSave).
  assert isinstance(first, grain.DatasetIterator)
  grain_handler.CheckpointHandler().save(tmp_path, item=first)
  # A new process: the sources, tokenizer and pipeline built again from the config.
  config_b = _config(sources, cache_dir)
  source_b, tok_b = _load(config_b)
  resumed = iter(pipeline.make_dataset(source_b.train, tok_b, config_b))
  grain_handler.CheckpointHandler().restore(tmp_path, item=resumed)
  for want in expected[5:]:
    _assert_same(next(resumed), want)
  counts = pipeline.mixture_counts(resumed)
  np.testing.assert_array_equal(counts.documents, expected_counts.documents)
  np.testing.assert_array_equal(counts.tokens, expected_counts.tokens)


def test_fingerprint_covers_every_source_and_weight(mixture, sources, cache_dir, tmp_path):
  config, source, _ = mixture
  meta = {'data_fingerprint': source.data_fingerprint}
  same = text_datasets.load_text_source(_config(sources, cache_dir).data)
  assert same.data_fingerprint == source.data_fingerprint
  assert checkpointing.same_data(meta, same, config, str(tmp_path))
  # Weights 7:3 are the same mixture as 0.7:0.3.
  scaled = text_datasets.load_text_source(_config(sources, cache_dir, 7, 3).data)
  assert scaled.data_fingerprint == source.data_fingerprint
  reweighted = text_datasets.load_text_source(_config(sources, cache_dir, 0.5, 0.5).data)
  # One source's content changed (a copy of the sources, one line edited).
  copy = tmp_path / 'copy'
  for name in ('wiki', 'code'):
    (copy / name).mkdir(parents=True)
    for f in (sources / name).iterdir():
      (copy / name / f.name).write_bytes(f.read_bytes())
  copied = text_datasets.load_text_source(_config(copy, cache_dir).data)
  assert copied.data_fingerprint == source.data_fingerprint  # moved, not changed
  with open(copy / 'code' / 'c1.txt', 'a', encoding='utf-8') as f:
    f.write('z = 1\n')
  edited = text_datasets.load_text_source(_config(copy, cache_dir).data)
  for changed in (reweighted, edited):
    assert changed.data_fingerprint != source.data_fingerprint
    with pytest.raises(checkpointing.CheckpointError, match='mixture source, weight'):
      checkpointing.same_data(meta, changed, config, str(tmp_path))


@pytest.mark.parametrize(
  'mixture, message',
  [
    (('wiki:0.7', 'code:0.3'), "'wiki:0.7' is not a source"),
    ((('wiki', 0, 'text_files=x'),), 'weights must be > 0'),
    ((('wiki', 'heavy', 'text_files=x'),), "weight 'heavy', which is not a number"),
    ((('wiki', 1.0, 'text_files=x'), ('wiki', 1.0)), 'two sources are named'),
    ((('wi ki', 1.0),), 'may hold only letters'),
    ((('wiki', 1.0, 'seq_len=64'),), "sets 'seq_len', which is not a data field of one"),
    ((('wiki', 1.0, 'text_files'),), 'not field=value'),
    ((('wiki', 1.0, 'text_files=x', 'tfds_name=y'),), 'sets both text_files and tfds_name'),
    ((('wiki', 1.0, 'hf_max_examples=many'),), 'hf_max_examples (int)'),
  ],
)
def test_bad_mixture_is_refused_naming_the_flag(mixture, message, sources, cache_dir):
  config = _config(sources, cache_dir)
  config.data.mixture = mixture
  with pytest.raises(text_datasets.DataError, match='--config.data.mixture') as e:
    text_datasets.load_text_source(config.data)
  assert message in str(e.value)


def test_mixture_with_the_runs_own_source_or_a_missing_source_is_refused(sources, cache_dir):
  config = _config(sources, cache_dir)
  config.data.text_files = str(sources / 'wiki' / '*.txt')
  with pytest.raises(text_datasets.DataError, match='text_files=.* and --config.data.mixture'):
    text_datasets.load_text_source(config.data)
  config = _config(sources, cache_dir)
  config.data.mixture = (
    ('wiki', 1.0, f'text_files={sources}/nothing/*.txt'),
    ('code', 1.0, f'text_files={sources}/code/*.txt'),
  )
  with pytest.raises(text_datasets.DataError, match="mixture source 'wiki': .*matches no files"):
    text_datasets.load_text_source(config.data)


def test_one_source_without_trailing_comma_is_taken():
  config = make_tiny_config(pathlib.Path('.'), pathlib.Path('.'))
  config.data.mixture = ('wiki', 1.0, 'text_files=a/*.txt', 'text_unit=line')
  (entry,) = mixtures.parse_mixture(config.data)
  assert (entry.name, entry.weight) == ('wiki', 1.0)
  assert entry.settings == (('text_files', 'a/*.txt'), ('text_unit', 'line'))
  config.data.mixture = (('wiki', 2, 'hf_streaming=true', 'validation_fraction=0.5'),)
  (entry,) = mixtures.parse_mixture(config.data)
  assert entry.settings == (('hf_streaming', True), ('validation_fraction', 0.5))


@pytest.mark.slow
def test_training_resumed_from_a_checkpoint_equals_uninterrupted(mixture, tmp_path):
  """Slow: on a loaded machine (another test suite busy on both cores) the resumed run once
  ended at a different final loss, cause not found; on a quiet machine it held in every run
  (over 20). The iterator resume above (`test_resumed_iterator_continues_the_same_mixture`)
  stays in the default suite."""
  from pretrain import train  # pylint: disable=g-import-not-at-top

  config = mixture[0].copy_and_resolve_references()
  config.train.num_train_steps = 6
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  config.train.stop_after_steps = 4  # stops between checkpoints 3 and 6: resumes from 4
  train.train_and_evaluate(config, str(tmp_path / 'split'))
  config.train.stop_after_steps = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert resumed == full

  def realised(workdir) -> dict[int, dict]:
    lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r for r in lines if r['split'] == 'data'}

  # The shares are logged every log step and the resumed run continues the counts.
  full_lines, split_lines = realised(tmp_path / 'full'), realised(tmp_path / 'split')
  assert sorted(full_lines) == sorted(split_lines) == [2, 4, 6], sorted(split_lines)
  for step, line in full_lines.items():
    assert {k: v for k, v in line.items() if k != 'time'} == {
      k: v for k, v in split_lines[step].items() if k != 'time'
    }, step
  last = full_lines[6]
  assert last['wiki/tokens'] > 0 and last['code/tokens'] > 0
  assert last['wiki/document_share'] + last['code/document_share'] == pytest.approx(1)
