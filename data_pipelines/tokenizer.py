"""Tokenizers: SentencePiece (trained here, or a given .model) or BERT WordPiece (a vocab.txt).

SentencePiece (the default, docs/design.md 8): BPE, `byte_fallback` (unseen characters become
byte pieces, so every text round-trips), identity normalization and no whitespace folding
(code and full-width punctuation survive). Trained models are cached under
`<cache_dir>/tokenizers/<hash>.model`, keyed by the corpus fingerprint and every training
setting; a cached model that no longer loads is trained again. Lines longer than SentencePiece
takes (MAX_SENTENCE_BYTES) are trained on in pieces. Special ids (fixed for every trained
model): 0 = <pad>, 1 = <unk>, 2 = [CLS] (<s>), 3 = [SEP] (</s>, appended to every document),
4 = [MASK].

WordPiece (`--config.data.tokenizer_model=vocab.txt`, or `tokenizer_kind=wordpiece` to train
one): the BERT / RoFormer / RoFormer-v2 / GAU-alpha vocabulary format (one token per line, the
id is the line number; Chinese vocabularies are character-level), encoded by the `tokenizers`
library exactly as transformers' BertTokenizerFast does (BERT normalizer with CJK characters
split apart, optional lower-casing and accent stripping, `##` continuation pieces). Special ids
are those of [PAD], [UNK], [CLS], [SEP] and [MASK] in the file (0, 100, 101, 102, 103 in BERT's
vocabularies); ids below `num_special` are never masked.

Every tokenizer object has the same interface: `encode(text) -> int32 ids`, `decode(ids)`,
`vocab_size`, `sha256` (recorded in checkpoint metadata), `model_bytes` (the file's bytes),
`kind`, and the special ids `pad_id`, `unk_id`, `cls_id`, `sep_id`, `mask_id`, `num_special`.
`load(path)` opens either kind; `load_run_tokenizer(meta)` the tokenizer a checkpoint was
trained with (docs/huggingface.md 4).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
_TRAINER_VERSION = 1  # bump when training settings change, to invalidate caches
# config.data.tokenizer_kind: 'auto' = a `.txt` tokenizer_model is a WordPiece vocab.txt,
# any other file a SentencePiece model; with no file, train SentencePiece.
KINDS = ('auto', 'sentencepiece', 'wordpiece')
# BERT's special tokens, by the attribute that holds their id.
WORDPIECE_SPECIALS = {
  'pad_id': '[PAD]',
  'unk_id': '[UNK]',
  'cls_id': '[CLS]',
  'sep_id': '[SEP]',
  'mask_id': '[MASK]',
}


class TokenizerError(ValueError):
  """Bad tokenizer input; the message names the flag and the fix."""


class Tokenizer:
  """A picklable SentencePiece wrapper (grain workers re-create the processor lazily).

  Attributes:
    model_bytes: the serialized SentencePiece model.
    sha256: hex digest of `model_bytes` (recorded in checkpoint metadata).
    vocab_size: number of pieces (ids are in [0, vocab_size)).
    kind: 'sentencepiece'.
    pad_id, unk_id, cls_id, sep_id, mask_id, num_special: the fixed special ids above.
    path: the file it was loaded from ('' if built from bytes).

  Raises:
    TokenizerError: `model_bytes` is empty; sentencepiece's RuntimeError when they are not a
      model.
  """

  kind = 'sentencepiece'
  pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID
  num_special = NUM_SPECIAL

  def __init__(self, model_bytes: bytes):
    self.model_bytes = model_bytes
    self.sha256 = hashlib.sha256(model_bytes).hexdigest()
    self._sp = None
    self.path = ''
    if not model_bytes:
      # sentencepiece accepts an empty proto as a model of 0 pieces that encodes nothing (an
      # empty file left by a crash): refuse it like any other damaged model.
      raise TokenizerError('the model is empty: 0 bytes')
    self.vocab_size = self.processor.get_piece_size()

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
    return self._sp

  def __getstate__(self):
    return {'model_bytes': self.model_bytes, 'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['model_bytes'])
    self.path = state.get('path', '')

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text` (no special tokens added)."""
    return np.asarray(self.processor.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids])


class WordPieceTokenizer:
  """A picklable BERT WordPiece tokenizer over a vocab.txt, through the `tokenizers` library.

  Encodes as transformers' BertTokenizerFast(vocab, do_lower_case=lowercase): BERT normalizer
  (control characters removed, whitespace unified, CJK characters surrounded by spaces,
  lower-casing and accent stripping when `lowercase`), BERT pre-tokenizer (whitespace and
  punctuation), WordPiece with `##` continuations and [UNK] for words longer than 100
  characters or not coverable.

  Args:
    vocab_bytes: the vocab.txt file (UTF-8, one token per line, id = line number).
    lowercase: BERT's do_lower_case (uncased and Chinese vocabularies: True).

  Attributes:
    model_bytes: `vocab_bytes`; lowercase: as given; kind: 'wordpiece'.
    sha256: hex digest of the vocabulary and the lowercase flag (both change the ids).
    vocab_size: lines in the file.
    pad_id, unk_id, cls_id, sep_id, mask_id: ids of [PAD], [UNK], [CLS], [SEP], [MASK].
    num_special: 1 + the largest of those ids; ids below it are never masked or sampled as
      random MLM replacements (BERT's [unused*] slots lie there too).
    path: the file it was loaded from ('' if built from bytes).

  Raises:
    TokenizerError: not UTF-8, a special token missing, or special tokens not at the start
      of the vocabulary.
  """

  kind = 'wordpiece'

  def __init__(self, vocab_bytes: bytes, lowercase: bool = True):
    self.model_bytes, self.lowercase = vocab_bytes, bool(lowercase)
    self.sha256 = hashlib.sha256(
      vocab_bytes + (b'\n#lowercase' if self.lowercase else b'\n#cased')
    ).hexdigest()
    self.path = ''
    try:
      tokens = vocab_bytes.decode('utf-8').splitlines()
    except UnicodeDecodeError as e:
      raise TokenizerError(
        f'the WordPiece vocabulary is not UTF-8 text ({e}); give a BERT '
        'vocab.txt (one token per line).'
      ) from None
    self.vocab = {}
    for i, token in enumerate(tokens):
      self.vocab[token.rstrip('\r')] = i  # a repeated line keeps its last id, as BERT's
    self.vocab_size = len(tokens)
    missing = [t for t in WORDPIECE_SPECIALS.values() if t not in self.vocab]
    if missing:
      raise TokenizerError(
        f'the WordPiece vocabulary has no {", ".join(missing)} line; a BERT vocab.txt '
        'holds [PAD], [UNK], [CLS], [SEP] and [MASK] (add the missing lines).'
      )
    for attr, token in WORDPIECE_SPECIALS.items():
      setattr(self, attr, self.vocab[token])
    self.num_special = 1 + max(getattr(self, a) for a in WORDPIECE_SPECIALS)
    if self.num_special > self.vocab_size // 2:
      raise TokenizerError(
        f'the special tokens of the WordPiece vocabulary lie at ids up to '
        f'{self.num_special - 1} of {self.vocab_size}; masking treats every id below the '
        'largest special id as special, so put [PAD] [UNK] [CLS] [SEP] [MASK] at the '
        "start of the file (BERT's layout)."
      )
    self._backend = None

  @property
  def backend(self):
    """The `tokenizers.Tokenizer` (built on first use)."""
    if self._backend is None:
      self._backend = wordpiece_backend(self.vocab, self.lowercase)
    return self._backend

  def __getstate__(self):
    return {'model_bytes': self.model_bytes, 'lowercase': self.lowercase, 'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['model_bytes'], state['lowercase'])
    self.path = state.get('path', '')

  def encode(self, text: str) -> np.ndarray:
    """Returns the int32 ids of `text` (no special tokens added)."""
    return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special tokens dropped, `##` pieces joined), as BertTokenizerFast."""
    return self.backend.decode([int(i) for i in ids])


def wordpiece_backend(vocab: dict[str, int], lowercase: bool):
  """A `tokenizers.Tokenizer` equal to transformers' BertTokenizerFast for `vocab`: BERT
  normalizer (clean_text, CJK split, lowercase, accents stripped iff lowercase), BERT
  pre-tokenizer, WordPiece ('##', [UNK], 100 characters per word), WordPiece decoder, and the
  BERT template `[CLS] A [SEP] (B [SEP])` used when special tokens are asked for."""
  from tokenizers import Tokenizer as Backend  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

  backend = Backend(models.WordPiece(vocab, unk_token='[UNK]', max_input_chars_per_word=100))
  backend.normalizer = normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
  )
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  backend.decoder = decoders.WordPiece(prefix='##')
  backend.add_special_tokens(list(WORDPIECE_SPECIALS.values()))
  cls, sep = vocab['[CLS]'], vocab['[SEP]']
  backend.post_processor = processors.TemplateProcessing(
    single='[CLS]:0 $A:0 [SEP]:0',
    pair='[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1',
    special_tokens=[('[CLS]', cls), ('[SEP]', sep)],
  )
  return backend


def resolve_kind(path: str, kind: str = 'auto') -> str:
  """'sentencepiece' or 'wordpiece' for a tokenizer file: `kind` unless 'auto', else by name
  (`*.txt` is a WordPiece vocab.txt).

  Raises:
    TokenizerError: an unknown kind.
  """
  if kind not in KINDS:
    raise TokenizerError(
      f'--config.data.tokenizer_kind={kind!r}; choose one of {", ".join(KINDS)}.'
    )
  if kind != 'auto':
    return kind
  return 'wordpiece' if path.endswith('.txt') else 'sentencepiece'


def wordpiece_lowercase(path: str, lowercase: bool | None = None) -> bool:
  """BERT's do_lower_case for the vocab.txt at `path`: `lowercase` if given, else the
  `do_lower_case` of a `tokenizer_config.json` next to it (a Hugging Face model directory),
  else True (BERT uncased and the Chinese vocabularies)."""
  if lowercase is not None:
    return bool(lowercase)
  sibling = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if os.path.isfile(sibling):
    try:
      with open(sibling, encoding='utf-8') as f:
        value = json.load(f).get('do_lower_case')
      if isinstance(value, bool):
        return value
    except (OSError, ValueError, AttributeError):
      pass
  return True


def load(path: str, kind: str = 'auto', lowercase: bool | None = None):
  """Opens a tokenizer file: a SentencePiece .model or a WordPiece vocab.txt.

  Args:
    path: the file.
    kind: 'auto' (by name, see `resolve_kind`), 'sentencepiece' or 'wordpiece'.
    lowercase: WordPiece only, see `wordpiece_lowercase` (None: from the directory).

  Returns:
    A `Tokenizer` or `WordPieceTokenizer` whose `path` is `path`.

  Raises:
    TokenizerError: missing or unreadable file, naming --config.data.tokenizer_model.
  """
  kind = resolve_kind(path, kind)
  if not os.path.isfile(path):
    raise TokenizerError(
      f'--config.data.tokenizer_model={path!r} does not exist; give a SentencePiece '
      f'.model file, a WordPiece vocab.txt, or leave it empty to train one.'
    )
  with open(path, 'rb') as f:
    data = f.read()
  if kind == 'wordpiece':
    try:
      tok = WordPieceTokenizer(data, wordpiece_lowercase(path, lowercase))
    except TokenizerError as e:
      raise TokenizerError(f'--config.data.tokenizer_model={path!r}: {e}') from None
  else:
    try:
      tok = Tokenizer(data)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos.
      raise TokenizerError(
        f'--config.data.tokenizer_model={path!r} is not a SentencePiece model ({e}); a '
        'WordPiece vocabulary must end in .txt or be given with '
        '--config.data.tokenizer_kind=wordpiece.'
      ) from None
  tok.path = path
  return tok


def load_run_tokenizer(meta: dict, path: str | None = None):
  """The tokenizer a checkpoint was trained with, from its metadata (`meta`: the JSON item
  of `pretrain.checkpointing`; `path` overrides the recorded file, e.g. on another machine).

  The one function that re-opens a run's tokenizer (fine-tuning, export, upscale checks): the
  kind and lowercase flag come from the run's `config.data`, and the result must have the
  recorded sha256.

  Raises:
    TokenizerError: the file is missing, or is not the one the run recorded (the message
      names the recorded path and --tokenizer / --config.data.tokenizer_model).
  """
  recorded = (meta or {}).get('tokenizer', {})
  data = (meta or {}).get('config', {}).get('data', {})
  path = path or recorded.get('path', '')
  if not path or not os.path.isfile(path):
    raise TokenizerError(
      f'the tokenizer of this run ({path or "path not recorded"}) is not on this machine; '
      'pass the same file with --tokenizer=PATH (or --config.data.tokenizer_model=PATH).'
    )
  tok = load(path, data.get('tokenizer_kind', 'auto'), data.get('tokenizer_lowercase'))
  if recorded.get('sha256') not in (None, tok.sha256):
    raise TokenizerError(
      f'{path} is not the tokenizer the run was trained with (sha256 {tok.sha256[:12]} vs '
      f'recorded {recorded["sha256"][:12]}); pass the file it recorded, '
      f'{recorded.get("path") or "(none recorded)"}.'
    )
  return tok


def _sample_lines(records: Sequence, text_key: str, sample_bytes: int) -> list[str]:
  """Deterministic sample: non-blank lines of records in a fixed random order, `sample_bytes`
  in all."""
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


# SentencePiece's trainer silently skips every sentence longer than this many UTF-8 bytes (its
# max_sentence_length), so a corpus of long lines (one 5 MB line, a novel's paragraphs) left it
# nothing to train on. Longer lines of the sample are cut into pieces that fit (`_pieces`).
MAX_SENTENCE_BYTES = 16384
_CHARACTER_COVERAGE = 0.9995
# Where a long line is cut, best first: whitespace (the cut drops it: SentencePiece marks the
# start of every sentence as a word start anyway), then the clause and sentence punctuation of
# text written without spaces (kept with the piece before), else any character boundary.
_SPACE_CUTS = tuple(c.encode('utf-8') for c in ' \t\u3000\u00a0')
_PUNCT_CUTS = tuple(c.encode('utf-8') for c in '。！？；，、．')


def _pieces(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
  """Cuts one line of the tokenizer's sample into pieces SentencePiece trains on.

  Each cut lies in the second half of the piece before it: at the last whitespace there
  (dropped), else after the last CJK clause or sentence mark, else at the last character
  boundary. Only the training sample is cut; the documents stay whole.

  Args:
    line: one line of text (no line breaks).
    max_bytes: the longest piece, in UTF-8 bytes.

  Returns:
    `[line]` when it fits in `max_bytes`, else its non-blank pieces, each at most `max_bytes`
    UTF-8 bytes.
  """
  if len(line) * 4 <= max_bytes:  # a character is at most 4 bytes: fits without encoding
    return [line]
  data = line.encode('utf-8')
  pieces, start = [], 0
  while len(data) - start > max_bytes:
    end = start + max_bytes
    while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: `end` would split a character
      end -= 1
    low = start + max_bytes // 2
    space = max((data.rfind(c, low, end), len(c)) for c in _SPACE_CUTS)
    punct = max(data.rfind(c, low, end) + len(c) for c in _PUNCT_CUTS)
    if space[0] >= 0:
      piece, start = data[start : space[0]], space[0] + space[1]
    elif punct > low:
      piece, start = data[start:punct], punct
    else:
      piece, start = data[start:end], end
    pieces.append(piece.decode('utf-8'))
  pieces.append(data[start:].decode('utf-8'))
  return [p for p in pieces if p.strip()]


def train_tokenizer(lines: Iterable[str], vocab_size: int) -> bytes:
  """Trains a BPE SentencePiece model in memory; returns its serialized bytes.

  Lines longer than MAX_SENTENCE_BYTES are trained on in pieces (`_pieces`). A sample too
  small for `vocab_size` pieces gives fewer (logged as a warning).

  Args:
    lines: the training sample (str lines, any length).
    vocab_size: the number of pieces wanted (config.model.vocab_size).

  Returns:
    The serialized SentencePiece model.

  Raises:
    TokenizerError: the vocabulary is too small for the sample's characters, the sample holds
      no text, or SentencePiece failed (the message gives its error and the sample's size).
  """
  seen = {'lines': 0, 'sentences': 0, 'bytes': 0, 'cut': 0}
  sentences = []
  for line in lines:
    pieces = _pieces(line)
    seen['lines'] += 1
    seen['cut'] += len(pieces) > 1
    sentences += pieces
  seen['sentences'] = len(sentences)
  seen['bytes'] = sum(len(s.encode('utf-8')) for s in sentences)
  extra = {}
  # SentencePiece writes a word start as U+2581 (one before every sentence, one for every
  # space) and, like any character, leaves it out of the vocabulary when it is rarer than
  # 1 - character_coverage. In long lines without spaces (Chinese paragraphs) it is: every
  # text would then start with its 3 bytes, and decode would give back a literal U+2581.
  # Required only then, so every other sample trains the same model as before.
  marks = len(sentences) + sum(s.count(' ') for s in sentences)
  if marks < (1 - _CHARACTER_COVERAGE) * (len(sentences) + sum(map(len, sentences))):
    extra['required_chars'] = '\u2581'
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=buf,
      model_type='bpe',
      vocab_size=vocab_size,
      byte_fallback=True,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      character_coverage=_CHARACTER_COVERAGE,
      hard_vocab_limit=False,
      num_threads=2,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=CLS_ID,
      eos_id=SEP_ID,
      user_defined_symbols=['[MASK]'],
      max_sentence_length=MAX_SENTENCE_BYTES,
      minloglevel=2,
      **extra,
    )
  except RuntimeError as e:
    needed = re.search(r'Vocabulary size is smaller than required_chars\. \d+ vs (\d+)', str(e))
    if needed:  # byte fallback: 256 byte pieces + special pieces + the corpus's characters
      raise TokenizerError(
        f'--config.model.vocab_size={vocab_size} is too small for this corpus: the tokenizer '
        f'needs at least {needed.group(1)} pieces for its 256 byte pieces, special tokens and '
        f'the characters of the text. Raise it (the tiny presets use 8000; BERT uses '
        f'30522).'
      ) from None
    if not seen['sentences']:
      raise TokenizerError(
        'the sample of the training split that a SentencePiece tokenizer is trained on holds '
        'no text (no non-blank line); point --config.data.text_files (or '
        '--config.data.tfds_name and --config.data.tfds_text_key) at text, or pass a trained '
        'tokenizer with --config.data.tokenizer_model=PATH.'
      ) from None
    raise TokenizerError(
      f'SentencePiece failed to train a {vocab_size}-piece tokenizer on a sample of '
      f'{_sample_size(seen)} ({str(e).strip().splitlines()[-1][:300]}); train a tokenizer '
      f'another way and pass it with --config.data.tokenizer_model=PATH.'
    ) from None
  if seen['cut']:
    logging.info(
      'tokenizer sample: %d line(s) longer than %d bytes were cut into pieces '
      '(SentencePiece skips longer sentences)',
      seen['cut'],
      MAX_SENTENCE_BYTES,
    )
  pieces = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
  if pieces < vocab_size:
    # hard_vocab_limit=False: a small sample gives a smaller vocabulary rather than failing.
    logging.warning(
      'the tokenizer has %d pieces, fewer than --config.model.vocab_size=%d: its sample (%s) '
      'holds no more merges; ids %d and up are never used. Give more text (or raise '
      '--config.data.tokenizer_sample_bytes) for a full vocabulary.',
      pieces,
      vocab_size,
      _sample_size(seen),
      pieces,
    )
  return buf.getvalue()


def _sample_size(seen: dict[str, int]) -> str:
  """'N lines, M MB' (and how many lines were cut) for messages about the sample."""
  cut = f', {seen["cut"]} of them cut into pieces' if seen['cut'] else ''
  return f'{seen["lines"]} line(s){cut}, {seen["bytes"] / 1e6:.2f} MB'


def train_wordpiece(lines: Iterable[str], vocab_size: int, lowercase: bool = True) -> bytes:
  """Trains a BERT WordPiece vocabulary (tokenizers' WordPieceTrainer over BERT
  normalisation and pre-tokenisation); returns vocab.txt bytes with [PAD] [UNK] [CLS] [SEP]
  [MASK] at ids 0-4.

  Raises:
    TokenizerError: the text yields no vocabulary.
  """
  from tokenizers import Tokenizer as Backend  # pylint: disable=g-import-not-at-top
  from tokenizers import models, normalizers, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  backend = Backend(models.WordPiece(unk_token='[UNK]'))
  backend.normalizer = normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
  )
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
    vocab_size=vocab_size,
    special_tokens=list(WORDPIECE_SPECIALS.values()),
    show_progress=False,
    continuing_subword_prefix='##',
  )
  backend.train_from_iterator(list(lines), trainer=trainer)
  vocab = backend.get_vocab()
  if len(vocab) <= len(WORDPIECE_SPECIALS):
    raise TokenizerError('training a WordPiece vocabulary found no text; give more text.')
  return ''.join(f'{t}\n' for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])).encode()


def load_or_train(
  data_config, model_config, train_records: Sequence, text_key: str, fingerprint: str
):
  """Loads `config.data.tokenizer_model`, or trains (and caches) one on the training split.

  A damaged cached tokenizer (one that no longer loads) is trained again and replaced, with a
  warning: the cache is keyed by the corpus and every training setting, so it is trained from
  the same sample with the same settings (SentencePiece gives the same file again; WordPiece
  may order ties differently), and a resumed run checks its sha256 against the checkpoint.

  Args:
    data_config: `config.data` (tokenizer_model, tokenizer_kind, tokenizer_lowercase,
      tokenizer_sample_bytes, cache_dir).
    model_config: `config.model` (vocab_size).
    train_records: random-access training records.
    text_key: feature holding the text.
    fingerprint: corpus fingerprint (part of the cache key).

  Returns:
    The `Tokenizer` (SentencePiece) or `WordPieceTokenizer`; its vocab_size is <=
    config.model.vocab_size.

  Raises:
    TokenizerError: the given file is missing or unreadable, the trained one cannot be written
      to the cache, or the tokenizer has more pieces than config.model.vocab_size.
  """
  vocab_size = model_config.vocab_size
  kind = data_config.get('tokenizer_kind', 'auto')
  lowercase = data_config.get('tokenizer_lowercase', None)
  if data_config.tokenizer_model:
    path = data_config.tokenizer_model
    tok = load(path, kind, lowercase)
    if tok.kind == 'sentencepiece' and (
      tok.processor.piece_to_id('[MASK]') == tok.processor.unk_id()
    ):
      logging.warning(
        '%s has no [MASK] piece; MLM uses id %d (%r) as the mask token',
        path,
        MASK_ID,
        tok.processor.id_to_piece(MASK_ID),
      )
  else:
    from data_pipelines.text_datasets import default_cache_dir  # pylint: disable=g-import-not-at-top

    cache_dir = os.path.join(data_config.cache_dir or default_cache_dir(), 'tokenizers')
    kind = resolve_kind('', kind)
    settings = (_TRAINER_VERSION, fingerprint, vocab_size, data_config.tokenizer_sample_bytes)
    if kind == 'wordpiece':
      lowercase = True if lowercase is None else bool(lowercase)
      settings += ('wordpiece', lowercase)
    key = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
    path = os.path.join(
      cache_dir,
      (
        f'wordpiece{vocab_size}_{key}.txt'
        if kind == 'wordpiece'
        else f'bpe{vocab_size}_{key}.model'
      ),
    )
    tok, damage = _open_cached(path, kind, lowercase)
    if tok is None:
      lines = _sample_lines(train_records, text_key, data_config.tokenizer_sample_bytes)
      logging.info(
        'training a %d-piece %s tokenizer on %d lines (%.1f MB)',
        vocab_size,
        'WordPiece' if kind == 'wordpiece' else 'BPE',
        len(lines),
        sum(map(len, lines)) / 1e6,
      )
      data = (
        train_wordpiece(lines, vocab_size, lowercase)
        if kind == 'wordpiece'
        else train_tokenizer(lines, vocab_size)
      )
      tok = WordPieceTokenizer(data, lowercase) if kind == 'wordpiece' else Tokenizer(data)
      tok.path = path
      _write_cache(path, data, damage)
  if tok.vocab_size > vocab_size:
    raise TokenizerError(
      f'the tokenizer {path} has {tok.vocab_size} pieces but --config.model.vocab_size='
      f'{vocab_size}; set --config.model.vocab_size={tok.vocab_size} or larger.'
    )
  logging.info('tokenizer %s: %d pieces, sha256 %s', path, tok.vocab_size, tok.sha256[:12])
  return tok


def _open_cached(path: str, kind: str, lowercase: bool | None):
  """The cached tokenizer at `path`, if there is one that loads.

  Args:
    path: its place under `<cache_dir>/tokenizers`.
    kind: 'sentencepiece' or 'wordpiece'.
    lowercase: WordPiece's do_lower_case (part of the cache key).

  Returns:
    (tokenizer, '') when it loads; (None, '') when there is none; (None, what is wrong) when
    it is damaged (a warning says so: the caller trains it again).
  """
  if not os.path.isfile(path):
    return None, ''
  data = b''
  try:
    with open(path, 'rb') as f:
      data = f.read()
    tok = WordPieceTokenizer(data, lowercase) if kind == 'wordpiece' else Tokenizer(data)
  except Exception as e:  # pylint: disable=broad-except
    # sentencepiece raises RuntimeError or OSError on a damaged proto, WordPieceTokenizer a
    # TokenizerError; whichever it is, the file is this cache's own and can be trained again.
    if isinstance(e, TokenizerError) or not data:
      damage = str(e).split(';')[0]  # what is wrong, without the fix meant for a given file
    else:  # sentencepiece's own message is a C++ assertion
      damage = f'{len(data)} bytes that do not parse as a SentencePiece model'
    logging.warning(
      'the cached tokenizer %s is damaged (%s); training it again to replace it, from the '
      'same sample with the same settings (a resumed run checks that it is the tokenizer its '
      'checkpoint recorded)',
      path,
      damage,
    )
    return None, damage
  tok.path = path
  return tok, ''


def _write_cache(path: str, data: bytes, damage: str = ''):
  """Writes a trained tokenizer to the cache atomically (concurrent processes never read a
  partial file; a damaged one is replaced in one step).

  Args:
    path: its place under `<cache_dir>/tokenizers`.
    data: the model or vocab.txt bytes.
    damage: what was wrong with the file it replaces ('' if there was none).

  Raises:
    TokenizerError: the cache cannot be written (the message names the file and
      --config.data.cache_dir).
  """
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    found = (
      f'the cached tokenizer {path} is damaged ({damage}) and the one trained to replace it'
      if damage
      else 'the trained tokenizer'
    )
    raise TokenizerError(
      f'{found} cannot be written ({e.strerror or e}); delete {path} if it is there (a new '
      f'one is trained and cached on the next run) and make --config.data.cache_dir a '
      f'writable directory, or pass a tokenizer with --config.data.tokenizer_model=PATH.'
    ) from None
