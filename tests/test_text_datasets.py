"""TFDS builders (local files, built-in corpus, a dataset by name) and the tokenizer."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import make_tiny_config
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib


def _texts(split):
  return [r['text'].decode() for r in split]


def test_local_files_one_document_per_file(text_corpus, cache_dir):
  config = make_tiny_config(text_corpus, cache_dir)
  source = text_datasets.load_text_source(config.data)
  train, val = _texts(source.train), _texts(source.validation)
  files = sorted(p for p in os.listdir(text_corpus) if p.endswith('.txt'))
  assert len(train) + len(val) == len(files) and val
  on_disk = {(text_corpus / f).read_text(encoding='utf-8') for f in files}
  assert set(train) | set(val) == on_disk and not set(train) & set(val)


def test_local_files_one_document_per_line_and_stable_split(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(text_corpus, cache_dir)
  config.data.text_files = str(text_corpus / 'doc0*.txt')
  config.data.text_unit = 'line'
  a = text_datasets.load_text_source(config.data)
  b = text_datasets.load_text_source(config.data)
  assert a.fingerprint == b.fingerprint and _texts(a.validation) == _texts(b.validation)
  lines = [
    l
    for f in sorted(text_corpus.glob('doc0*.txt'))
    for l in f.read_text(encoding='utf-8').splitlines()
    if l.strip()
  ]
  assert sorted(_texts(a.train) + _texts(a.validation)) == sorted(lines)
  assert 0.05 < len(a.validation) / len(lines) < 0.15  # validation_fraction = 0.1


def test_text_column_reads_one_document_per_row_of_tsv_csv_and_jsonl(tmp_path, cache_dir):
  # Task-adaptive pretraining reads a fine-tuning file's text column as it is (docs/
  # finetuning.md 9): each row's text is a document, labels and blank texts are not.
  texts = [f'sentence number {i} about "quotes", tabs and more' for i in range(40)]
  (tmp_path / 'a.tsv').write_text(
    ''.join(f'{i % 2}\t{t}\n' for i, t in enumerate(texts[:20])) + '1\t \n', encoding='utf-8'
  )
  (tmp_path / 'b.jsonl').write_text(
    ''.join(f'{{"label": 0, "sentence": "{t.replace(chr(34), "")}"}}\n' for t in texts[20:30])
    + '{"label": 1}\n',
    encoding='utf-8',
  )
  (tmp_path / 'c.csv').write_text(
    'label,sentence\n' + ''.join(f'1,"{t.replace(chr(34), 2 * chr(34))}"\n' for t in texts[30:]),
    encoding='utf-8',
  )
  config = make_tiny_config(tmp_path, cache_dir)
  expected = {
    'a.tsv': ('1', texts[:20]),
    'b.jsonl': ('sentence', [t.replace('"', '') for t in texts[20:30]]),
    'c.csv': ('sentence', texts[30:]),
  }
  for name, (column, want) in expected.items():
    config.data.text_files, config.data.text_column = str(tmp_path / name), column
    source = text_datasets.load_text_source(config.data)
    assert sorted(_texts(source.train) + _texts(source.validation)) == sorted(want), name
  config.data.text_files, config.data.text_column = str(tmp_path / 'a.tsv'), '0'
  labels = text_datasets.load_text_source(config.data)
  assert set(_texts(labels.train) + _texts(labels.validation)) == {'0', '1'}  # not the cache
  for column, match in (('7', 'at most 2 column'), ('text', 'is not a column')):
    config.data.text_column = column
    with pytest.raises(text_datasets.DataError, match=f'text_column={column} .*{match}'):
      text_datasets.load_text_source(config.data)
  config.data.text_files = ''
  with pytest.raises(text_datasets.DataError, match='text_files, which is empty'):
    text_datasets.load_text_source(config.data)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes('café crème'.encode('latin-1'))
  text, replaced = text_datasets.read_text(str(path))
  assert replaced == 2 and text == 'caf\ufffd cr\ufffdme'


def test_binary_files_are_skipped_and_all_binary_is_an_error(tmp_path):
  (tmp_path / 'a.bin').write_bytes(b'\x00\x01\x02' * 10)
  (tmp_path / 'b.txt').write_text('hello')
  scan = text_datasets.scan_text_files(text_datasets.expand_globs(str(tmp_path / '*')))
  assert [os.path.basename(f) for f in scan.files] == ['b.txt']
  assert [os.path.basename(f) for f in scan.binary_files] == ['a.bin']
  with pytest.raises(text_datasets.DataError, match='no usable text'):
    text_datasets.scan_text_files([str(tmp_path / 'a.bin')])


def test_glob_matching_nothing_is_an_error(tmp_path):
  with pytest.raises(text_datasets.DataError, match='matches no files'):
    text_datasets.expand_globs(str(tmp_path / 'nothing*.txt'))


def test_builtin_corpus_is_the_stdlib():
  files = text_datasets.stdlib_files()
  assert len(files) > 300
  assert all(f.endswith('.py') and '/test/' not in f for f in files)
  assert sum(os.path.getsize(f) for f in files) > 5e6


class TinyNamedText(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset known by name, standing in for wikipedia/c4 in tests."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({'content': tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(40), 'test': self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'content': f'document {i}: ' + 'the quick brown fox ' * (i % 7 + 1)}


def test_tfds_dataset_by_name(text_corpus, cache_dir, tmp_path):
  TinyNamedText(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = make_tiny_config(text_corpus, cache_dir)
  config.data.text_files = ''
  config.data.tfds_name = 'tiny_named_text'
  config.data.tfds_data_dir = str(tmp_path)
  config.data.tfds_text_key = 'content'
  config.data.eval_split = 'test'
  source = text_datasets.load_text_source(config.data)
  assert (len(source.train), len(source.validation)) == (40, 5)
  assert source.text_key == 'content'
  config.data.eval_split = 'validation'
  with pytest.raises(text_datasets.DataError, match="eval_split='validation' is not a split"):
    text_datasets.load_text_source(config.data)
  config.data.tfds_name = 'no_such_dataset_xyz'
  with pytest.raises(text_datasets.DataError, match='is not a TFDS dataset'):
    text_datasets.load_text_source(config.data)


def test_tokenizer_round_trips_code_and_chinese_and_is_cached(text_corpus, cache_dir):
  config = make_tiny_config(text_corpus, cache_dir)
  source = text_datasets.load_text_source(config.data)
  tok = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  for text in ['def f(x):\n\treturn x  # two  spaces', '舉頭望明月，低頭思故鄉。', 'ünïcödé ☃ 🙂']:
    assert tok.decode(tok.encode(text)) == text
  assert tok.processor.id_to_piece(tokenizer_lib.MASK_ID) == '[MASK]'
  assert tok.processor.pad_id() == tokenizer_lib.PAD_ID
  assert tok.vocab_size <= config.model.vocab_size
  mtime = os.path.getmtime(tok.path)
  again = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  assert again.sha256 == tok.sha256 and os.path.getmtime(tok.path) == mtime  # cache hit
  # A given .model is loaded as is; a too-small vocab_size is refused with the fix.
  config.data.tokenizer_model = tok.path
  loaded = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, 'other'
  )
  assert loaded.sha256 == tok.sha256
  config.model.vocab_size = tok.vocab_size - 1
  with pytest.raises(tokenizer_lib.TokenizerError, match='set --config.model.vocab_size='):
    tokenizer_lib.load_or_train(config.data, config.model, source.train, source.text_key, 'x')
  np.testing.assert_array_equal(tok.encode('abc'), loaded.encode('abc'))


def test_directory_given_as_glob_says_so_and_suggests_a_glob(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'a.txt').write_text('some text\n')
  with pytest.raises(text_datasets.DataError, match=r'is a directory .*corpus/\*\*/\*\.txt'):
    text_datasets.expand_globs(str(tmp_path / 'corpus'))
  assert text_datasets.expand_globs(str(tmp_path / 'corpus' / '**' / '*.txt'))
