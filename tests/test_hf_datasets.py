"""Hugging Face datasets as a text source (--config.data.hf_dataset, docs/configuration.md 1):
local JSON Lines, Parquet and text files, downloaded or streamed, through the same pipeline,
tokenizer and resumable iterator as the other sources. Local files only (no network)."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import make_tiny_config
from data_pipelines import pipeline
from data_pipelines import text_datasets
from pretrain import train

pytest.importorskip('datasets')  # the `hf` extra (also in `test`)
pa = pytest.importorskip('pyarrow')
pq = pytest.importorskip('pyarrow.parquet')


@pytest.fixture(scope='module')
def documents(text_corpus):
  """The corpus files' texts split at blank lines, each distinct document once (about 600)."""
  parts = (
    d
    for f in sorted(text_corpus.glob('*.txt'))
    for d in f.read_text(encoding='utf-8').split('\n\n')
    if d.strip()
  )
  return list(dict.fromkeys(parts))


@pytest.fixture(scope='module')
def data_files(documents, tmp_path_factory):
  """The documents as docs.jsonl (with a blank and a null text among them, which are skipped)
  and as docs.parquet (text column 'body')."""
  root = tmp_path_factory.mktemp('hf')
  rows = [{'text': d, 'n': i} for i, d in enumerate(documents)]
  rows[3:3] = [{'text': '  \n', 'n': -1}, {'text': None, 'n': -2}]
  with open(root / 'docs.jsonl', 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  pq.write_table(pa.table({'body': documents}), root / 'docs.parquet')
  return root


def _config(text_corpus, cache_dir, hf_dataset, **overrides):
  config = make_tiny_config(text_corpus, cache_dir, **overrides)
  config.data.text_files = ''
  config.data.hf_dataset = str(hf_dataset)
  return config


def _texts(records):
  return [r['text'] for r in records]


def test_json_parquet_and_text_files_hold_the_corpus_once(
  documents, data_files, text_corpus, cache_dir
):
  splits = {}
  for kind, path, overrides in (
    ('jsonl', data_files / 'docs.jsonl', {}),
    ('parquet', data_files / 'docs.parquet', {'data.hf_text_field': 'body'}),
    ('txt', text_corpus / '*.txt', {}),  # one document per file (data.text_unit)
  ):
    config = _config(text_corpus, cache_dir, path, **overrides)
    source = text_datasets.load_text_source(config.data)
    splits[kind] = _texts(source.train), _texts(source.validation)
    assert splits[kind][1] and not set(splits[kind][0]) & set(splits[kind][1]), kind
  assert sorted(sum(splits['jsonl'], [])) == sorted(documents)  # blank and null skipped
  assert sorted(sum(splits['parquet'], [])) == sorted(documents)
  files = {f.read_text(encoding='utf-8') for f in text_corpus.glob('*.txt')}
  assert set(sum(splits['txt'], [])) == files
  # Stable on a reload: the same split and fingerprints.
  config = _config(text_corpus, cache_dir, data_files / 'docs.jsonl')
  a = text_datasets.load_text_source(config.data)
  b = text_datasets.load_text_source(config.data)
  assert (a.fingerprint, a.data_fingerprint) == (b.fingerprint, b.data_fingerprint)
  assert _texts(b.validation) == splits['jsonl'][1]


def test_eval_split_of_a_directory_and_bad_input_named(documents, text_corpus, cache_dir, tmp_path):
  # A directory with train / validation files: `datasets` names the splits by file name.
  for split, part in (('train', documents[:40]), ('validation', documents[40:45])):
    with open(tmp_path / f'{split}.jsonl', 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'content': d}) + '\n' for d in part)
  config = _config(text_corpus, cache_dir, tmp_path, **{'data.hf_text_field': 'content'})
  source = text_datasets.load_text_source(config.data)
  assert (_texts(source.train), _texts(source.validation)) == (documents[:40], documents[40:45])
  bad = {
    'data.hf_text_field': ('text', r"hf_text_field='text' is not a column .* has content"),
    'data.train_split': ('nope', r"train_split='nope' is not a split .* has train, validation"),
    'data.tfds_name': ('imdb_reviews', 'hf_dataset and --config.data.tfds_name are both set'),
    'data.eval_split': ('train[:5%]', r"eval_split='train\[:5%\]': .* split names, not slices"),
  }
  for field, (value, message) in bad.items():
    config = _config(text_corpus, cache_dir, tmp_path, **{'data.hf_text_field': 'content'})
    config.update_from_flattened_dict({field: value})
    with pytest.raises(text_datasets.DataError, match=message):
      text_datasets.load_text_source(config.data)
  (tmp_path / 'notes.md').write_text('# notes\n')
  for value, message in (
    (tmp_path / 'notes.md', r'notes\.md, which is not a file type read here'),
    (tmp_path / 'missing*.jsonl', 'hf_dataset=.* matches no files'),
  ):
    with pytest.raises(text_datasets.DataError, match=message):
      text_datasets.load_text_source(_config(text_corpus, cache_dir, value).data)


def test_streamed_copy_equals_the_download_and_resumes_at_the_exact_batch(
  data_files, tiny_data, text_corpus, cache_dir, tmp_path
):
  """A streamed dataset is written once to <cache_dir>/hf_stream and read by index, so the
  grain iterator's saved state restores the exact position, even after the copy is streamed
  again from scratch."""
  _, _, tok = tiny_data
  config = _config(text_corpus, tmp_path / 'cache', data_files / 'docs.jsonl')
  downloaded = text_datasets.load_text_source(config.data)
  config.data.hf_streaming = True
  streamed = text_datasets.load_text_source(config.data)
  assert _texts(streamed.train) == _texts(downloaded.train)
  assert _texts(streamed.validation) == _texts(downloaded.validation)
  assert streamed.data_fingerprint == downloaded.data_fingerprint  # one resume check for both

  it = iter(pipeline.make_dataset(streamed.train, tok, config))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  shutil.rmtree(tmp_path / 'cache' / 'hf_stream')  # a new machine: streamed again
  again = text_datasets.load_text_source(config.data)
  resumed = iter(pipeline.make_dataset(again.train, tok, config))
  resumed.set_state(state)
  got = next(resumed)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)

  config.data.hf_max_examples = 50  # a bounded stream: the first 50 rows (2 of them blank)
  bounded = text_datasets.load_text_source(config.data)
  assert len(bounded.train) + len(bounded.validation) == 48
  assert os.listdir(tmp_path / 'cache' / 'hf_stream').__len__() == 2


def test_pretraining_on_a_streamed_parquet_dataset_resumes_like_an_uninterrupted_run(
  data_files, text_corpus, cache_dir, tmp_path
):
  """The real code path: a tokenizer trained on the source, packed batches, a checkpoint with
  the iterator's position and the data fingerprint, and a resume that passes the data check
  and ends where an uninterrupted run ends."""
  config = _config(
    text_corpus,
    cache_dir,
    data_files / 'docs.parquet',
    **{'data.hf_text_field': 'body', 'data.hf_streaming': True},
  )
  config.train.num_train_steps, config.train.log_every_steps = 4, 1
  config.train.checkpoint_every_steps, config.train.eval_every_steps = 2, 4
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  config.train.stop_after_steps = 2
  train.train_and_evaluate(config, str(tmp_path / 'split'))
  config.train.stop_after_steps = 0
  assert train.train_and_evaluate(config, str(tmp_path / 'split')) == full
  assert np.isfinite(full['loss'])
  read = lambda run: [
    json.loads(l) for l in (tmp_path / run / 'metrics.jsonl').read_text().splitlines()
  ]
  losses = lambda run: [(l['step'], l['loss']) for l in read(run) if l['split'] == 'train']
  assert losses('split') == losses('full') and len(losses('full')) == 4
  meta = json.loads((tmp_path / 'split' / 'checkpoints' / '4' / 'meta' / 'metadata').read_text())
  assert meta['data_source'].startswith('hf_dataset(')
