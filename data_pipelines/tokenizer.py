"""SentencePiece tokenizer: trained once on a sample of the training split, or loaded.

Training settings (docs/design.md 8): BPE, `byte_fallback` (unseen characters become byte pieces, so
every text round-trips), identity normalization and no whitespace folding (code and full-width
punctuation survive). Trained models are cached under `<cache_dir>/tokenizers/<hash>.model`,
keyed by the corpus fingerprint and every training setting.

Special ids (fixed for every trained model): 0 = <pad>, 1 = <unk>, 2 = [CLS] (<s>),
3 = [SEP] (</s>, appended to every document), 4 = [MASK].
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
_TRAINER_VERSION = 1  # bump when training settings change, to invalidate caches


class TokenizerError(ValueError):
  """Bad tokenizer input; the message names the flag and the fix."""


class Tokenizer:
  """A picklable SentencePiece wrapper (grain workers re-create the processor lazily).

  Attributes:
    model_bytes: the serialized SentencePiece model.
    sha256: hex digest of `model_bytes` (recorded in checkpoint metadata).
    vocab_size: number of pieces (ids are in [0, vocab_size)).
  """

  def __init__(self, model_bytes: bytes):
    self.model_bytes = model_bytes
    self.sha256 = hashlib.sha256(model_bytes).hexdigest()
    self._sp = None
    self.vocab_size = self.processor.get_piece_size()

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
    return self._sp

  def __getstate__(self):
    return {'model_bytes': self.model_bytes}

  def __setstate__(self, state):
    self.__init__(state['model_bytes'])

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text` (no special tokens added)."""
    return np.asarray(self.processor.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids])


def _sample_lines(records: Sequence, text_key: str, sample_bytes: int) -> list[str]:
  """Deterministic sample: non-blank lines of records in a fixed random order, `sample_bytes` in all."""
  total, lines = 0, []
  # A fixed permutation, so the sample spans the whole corpus and is the same every run.
  for i in np.random.default_rng(0).permutation(len(records)):
    text = records[i][text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    for line in text.splitlines():
      if line.strip():
        lines.append(line)
        total += len(line) + 1
    if total >= sample_bytes:
      break
  return lines


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> bytes:
  """Trains a BPE SentencePiece model in memory; returns its serialized bytes.

  Raises:
    TokenizerError: the sample is too small for the requested vocabulary.
  """
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type='bpe',
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name='identity',
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=0.9995, hard_vocab_limit=False, num_threads=2,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=CLS_ID, eos_id=SEP_ID,
        user_defined_symbols=['[MASK]'], max_sentence_length=16384, minloglevel=2)
  except RuntimeError as e:
    needed = re.search(r'Vocabulary size is smaller than required_chars\. \d+ vs (\d+)', str(e))
    if needed:  # byte fallback: 256 byte pieces + special pieces + the corpus's characters
      raise TokenizerError(
          f'--config.model.vocab_size={vocab_size} is too small for this corpus: the tokenizer '
          f'needs at least {needed.group(1)} pieces for its 256 byte pieces, special tokens and '
          f'the characters of the text. Raise it (the tiny presets use 8000; BERT uses '
          f'30522).') from None
    raise TokenizerError(
        f'training a {vocab_size}-piece tokenizer failed '
        f'({str(e).strip().splitlines()[-1][:300]}). Lower --config.model.vocab_size or give '
        f'more text.') from None
  return buf.getvalue()


def load_or_train(data_config, model_config, train_records: Sequence, text_key: str,
                  fingerprint: str) -> Tokenizer:
  """Loads `config.data.tokenizer_model`, or trains (and caches) one on the training split.

  Args:
    data_config: `config.data` (tokenizer_model, tokenizer_sample_bytes, cache_dir).
    model_config: `config.model` (vocab_size).
    train_records: random-access training records.
    text_key: feature holding the text.
    fingerprint: corpus fingerprint (part of the cache key).

  Returns:
    The Tokenizer; its vocab_size is <= config.model.vocab_size.

  Raises:
    TokenizerError: the .model file is missing or unreadable, or has more pieces than
      config.model.vocab_size.
  """
  vocab_size = model_config.vocab_size
  if data_config.tokenizer_model:
    path = data_config.tokenizer_model
    if not os.path.isfile(path):
      raise TokenizerError(
          f'--config.data.tokenizer_model={path!r} does not exist; give a SentencePiece '
          f'.model file or leave it empty to train one.')
    with open(path, 'rb') as f:
      try:
        tok = Tokenizer(f.read())
      except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos.
        raise TokenizerError(
            f'--config.data.tokenizer_model={path!r} is not a SentencePiece model ({e}).'
        ) from None
    if tok.processor.piece_to_id('[MASK]') == tok.processor.unk_id():
      logging.warning('%s has no [MASK] piece; MLM uses id %d (%r) as the mask token', path,
                      MASK_ID, tok.processor.id_to_piece(MASK_ID))
  else:
    from data_pipelines.text_datasets import default_cache_dir  # pylint: disable=g-import-not-at-top
    cache_dir = os.path.join(data_config.cache_dir or default_cache_dir(), 'tokenizers')
    key = hashlib.sha256(repr((_TRAINER_VERSION, fingerprint, vocab_size,
                               data_config.tokenizer_sample_bytes)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f'bpe{vocab_size}_{key}.model')
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        tok = Tokenizer(f.read())
    else:
      lines = _sample_lines(train_records, text_key, data_config.tokenizer_sample_bytes)
      logging.info('training a %d-piece BPE tokenizer on %d lines (%.1f MB)', vocab_size,
                   len(lines), sum(map(len, lines)) / 1e6)
      tok = Tokenizer(train_tokenizer(lines, vocab_size))
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f'{path}.tmp{os.getpid()}'
      with open(tmp, 'wb') as f:
        f.write(tok.model_bytes)
      os.replace(tmp, path)  # atomic: concurrent processes never read a partial model
  if tok.vocab_size > vocab_size:
    raise TokenizerError(
        f'the tokenizer {path} has {tok.vocab_size} pieces but --config.model.vocab_size='
        f'{vocab_size}; set --config.model.vocab_size={tok.vocab_size} or larger.')
  logging.info('tokenizer %s: %d pieces, sha256 %s', path, tok.vocab_size, tok.sha256[:12])
  tok.path = path
  return tok
