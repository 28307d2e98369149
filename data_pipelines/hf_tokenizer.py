"""Our tokenizers as Hugging Face tokenizer files, and back (docs/huggingface.md 4).

  files = hf_tokenizer.hf_files(tokenizer, model_max_length=1536)   # {name: bytes}
  name, lowercase = hf_tokenizer.find_in_hf_dir(directory)            # what convert copies

A SentencePiece model becomes a `tokenizers` `tokenizer.json` (BPE with byte fallback, the
model's own vocabulary and ids, merges rebuilt from its pieces) that
`AutoTokenizer.from_pretrained(DIR)` loads as a `PreTrainedTokenizerFast`; the original
`tokenizer.model` is written next to it, so an import gets back the very file. A WordPiece
vocabulary is written as `vocab.txt` plus the equivalent `tokenizer.json`, loaded as
`BertTokenizerFast`. Both add BERT's `[CLS] A [SEP] (B [SEP])` when special tokens are asked
for; `add_special_tokens=False` gives exactly `tokenizer.encode(text)`.
"""

from __future__ import annotations

import json
import os

from data_pipelines import tokenizer as tokenizer_lib

SENTENCEPIECE_FILE = 'tokenizer.model'
WORDPIECE_FILE = 'vocab.txt'
_SPACE = '\u2581'  # SentencePiece's whitespace symbol


def _sp_proto(model_bytes: bytes):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  return proto


def sentencepiece_backend(model_bytes: bytes):
  """A `tokenizers.Tokenizer` giving the ids of the SentencePiece BPE model `model_bytes`.

  Vocabulary: every piece at its id. Merges: each normal piece of two or more characters,
  split at every point where both halves are pieces, ranked by the piece's score (SentencePiece
  merges the pair whose result scores highest, then the leftmost; tokenizers the lowest rank,
  then the leftmost). Normaliser: a leading space symbol (SentencePiece's dummy prefix) and
  spaces to U+2581, applied to the whole text (special tokens are matched after it, as
  SentencePiece matches user-defined pieces in the normalised text). Byte fallback as the
  model's.

  Raises:
    tokenizer_lib.TokenizerError: a model this conversion does not reproduce (not BPE, a
      normalisation rule other than identity, whitespace folding, suffix whitespace).
  """
  from tokenizers import AddedToken, Tokenizer as Backend  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers  # pylint: disable=g-import-not-at-top

  proto = _sp_proto(model_bytes)
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  problems = []
  if trainer.model_type != trainer.BPE:
    problems.append('it is not a BPE model')
  if norm.name not in ('identity', '') or norm.precompiled_charsmap:
    problems.append(f'its normalization rule is {norm.name!r}, not identity')
  if norm.remove_extra_whitespaces:
    problems.append('it folds whitespace (remove_extra_whitespaces)')
  if trainer.treat_whitespace_as_suffix:
    problems.append('it treats whitespace as a suffix')
  if problems:
    raise tokenizer_lib.TokenizerError(
      f'the SentencePiece model cannot be converted exactly ({"; ".join(problems)}); the '
      'export converts the BPE models this suite trains (identity normalisation, no '
      'whitespace folding).'
    )
  pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
  vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
  normal = proto.SentencePiece.NORMAL
  merges = []
  for i, (piece, score, kind) in enumerate(pieces):
    if kind != normal or len(piece) < 2:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((-score, i, vocab[left], vocab[right], left, right))
  merges.sort()
  unk = pieces[proto.trainer_spec.unk_id][0]
  backend = Backend(
    models.BPE(
      vocab=vocab,
      merges=[(m[4], m[5]) for m in merges],
      unk_token=unk,
      fuse_unk=True,
      byte_fallback=bool(trainer.byte_fallback),
    )
  )
  steps = [normalizers.Replace(' ', _SPACE)]
  if norm.add_dummy_prefix:
    steps.insert(0, normalizers.Prepend(_SPACE))
  backend.normalizer = normalizers.Sequence(steps)
  backend.pre_tokenizer = None
  decode = [decoders.Replace(_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if norm.add_dummy_prefix:
    decode.append(decoders.Strip(' ', 1, 0))
  backend.decoder = decoders.Sequence(decode)
  special = [
    p
    for p, _, kind in pieces
    if kind
    in (proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN, proto.SentencePiece.USER_DEFINED)
  ]
  # normalized=True: matched in the normalised text, as SentencePiece matches them.
  backend.add_special_tokens([AddedToken(p, special=True, normalized=True) for p in special])
  return backend


def _template(backend, cls_token: str, sep_token: str):
  from tokenizers import processors  # pylint: disable=g-import-not-at-top

  backend.post_processor = processors.TemplateProcessing(
    single=f'{cls_token}:0 $A:0 {sep_token}:0',
    pair=f'{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1',
    special_tokens=[
      (cls_token, backend.token_to_id(cls_token)),
      (sep_token, backend.token_to_id(sep_token)),
    ],
  )


def special_tokens(tokenizer) -> dict[str, str]:
  """The special token strings of `tokenizer` by transformers' names (pad_token, ...)."""
  if tokenizer.kind == 'wordpiece':
    return {
      'pad_token': '[PAD]',
      'unk_token': '[UNK]',
      'cls_token': '[CLS]',
      'sep_token': '[SEP]',
      'mask_token': '[MASK]',
    }
  piece = tokenizer.processor.id_to_piece
  return {
    'pad_token': piece(tokenizer.pad_id),
    'unk_token': piece(tokenizer.unk_id),
    'cls_token': piece(tokenizer.cls_id),
    'sep_token': piece(tokenizer.sep_id),
    'bos_token': piece(tokenizer.cls_id),
    'eos_token': piece(tokenizer.sep_id),
    'mask_token': piece(tokenizer.mask_id),
  }


def hf_files(tokenizer, model_max_length: int) -> dict[str, bytes]:
  """The tokenizer files of a Hugging Face model directory for `tokenizer`.

  Args:
    tokenizer: a `tokenizer_lib.Tokenizer` (SentencePiece) or `WordPieceTokenizer`.
    model_max_length: tokens the exported model accepts (its max_position_embeddings).

  Returns:
    {file name: bytes}: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
    and `tokenizer.model` (SentencePiece) or `vocab.txt` (WordPiece), the original file.

  Raises:
    tokenizer_lib.TokenizerError: a SentencePiece model `sentencepiece_backend` cannot convert.
  """
  specials = special_tokens(tokenizer)
  if tokenizer.kind == 'wordpiece':
    backend = tokenizer_lib.wordpiece_backend(tokenizer.vocab, tokenizer.lowercase)
    raw = {WORDPIECE_FILE: tokenizer.model_bytes}
    config = {
      'tokenizer_class': 'BertTokenizer',
      'do_lower_case': tokenizer.lowercase,
      'tokenize_chinese_chars': True,
      'strip_accents': None,
    }
  else:
    backend = sentencepiece_backend(tokenizer.model_bytes)
    _template(backend, specials['cls_token'], specials['sep_token'])
    raw = {SENTENCEPIECE_FILE: tokenizer.model_bytes}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  config.update(
    specials,
    model_max_length=int(model_max_length),
    clean_up_tokenization_spaces=False,
    model_input_names=['input_ids', 'token_type_ids', 'attention_mask'],
  )
  dump = lambda obj: (json.dumps(obj, indent=2, ensure_ascii=False) + '\n').encode()  # noqa: E731
  return {
    **raw,
    'tokenizer.json': backend.to_str(pretty=True).encode(),
    'tokenizer_config.json': dump(config),
    'special_tokens_map.json': dump(specials),
  }


def find_in_hf_dir(directory: str) -> tuple[str, bool | None]:
  """The tokenizer file of a Hugging Face model directory that this suite can train with.

  Returns:
    (file name, lowercase): `tokenizer.model` (SentencePiece; lowercase None) if present, else
    `vocab.txt` (WordPiece; do_lower_case from tokenizer_config.json, default True).

  Raises:
    tokenizer_lib.TokenizerError: neither file is there (a tokenizer.json alone is not read:
      the message says so and names the flag that gives a file).
  """
  if os.path.isfile(os.path.join(directory, SENTENCEPIECE_FILE)):
    return SENTENCEPIECE_FILE, None
  if os.path.isfile(os.path.join(directory, WORDPIECE_FILE)):
    return WORDPIECE_FILE, tokenizer_lib.wordpiece_lowercase(
      os.path.join(directory, WORDPIECE_FILE)
    )
  found = sorted(n for n in os.listdir(directory) if 'token' in n or n.endswith('.model'))
  raise tokenizer_lib.TokenizerError(
    f'{directory} has no vocab.txt (WordPiece) or tokenizer.model (SentencePiece) '
    f'(tokenizer files there: {", ".join(found) or "none"}); a tokenizer.json alone is not '
    'read. Give the vocabulary with --config.data.tokenizer_model=PATH.'
  )
