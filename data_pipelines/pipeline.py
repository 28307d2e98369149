"""The grain input pipeline: records -> shard by process -> shuffle -> tokenize -> pack -> batch
-> objective (docs/design.md 2).

Each process reads a disjoint shard of the documents (`[process_index::process_count]`),
shuffles it with `config.data.shuffle_seed` (a new order every epoch), tokenizes (appending
[SEP]), packs documents end to end into rows of `seq_len` tokens with grain's
concat-then-split packing (no token is dropped; a document that does not fit continues on the
next row), batches `global_batch_size / process_count` rows, then applies the objective. The
returned iterator's state (grain's own) is what checkpoints save, so a resumed run reads the
same batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
from typing import Sequence

import grain
import numpy as np

from data_pipelines import objectives
from data_pipelines import tokenizer as tokenizer_lib


class Tokenize(grain.transforms.Map):
  """record -> {'tokens': int32 [len + 1]}: the document's ids followed by [SEP]."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def map(self, record):
    text = record[self._text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    ids = self._tokenizer.encode(text)
    sep = getattr(self._tokenizer, 'sep_id', tokenizer_lib.SEP_ID)  # WordPiece: its [SEP]
    return {'tokens': np.concatenate([ids, np.array([sep], np.int32)])}


def _rename_packed(row):
  return {
    'tokens': row['tokens'].astype(np.int32),
    'segment_ids': row['tokens_segment_ids'].astype(np.int32),
    'positions': row['tokens_positions'].astype(np.int32),
  }


def _mask(batch, rng, **kwargs):
  return objectives.mask_tokens(batch, rng, **kwargs)


def document_dataset(
  records: Sequence, *, process_index: int, process_count: int, seed: int, shuffle: bool
) -> grain.MapDataset:
  """This process's shard of the documents, shuffled per epoch if `shuffle`, repeated forever.

  Raises:
    ValueError: fewer documents than processes (a shard would be empty).
  """
  if len(records) < process_count:
    raise ValueError(
      f'the split has {len(records)} document(s), fewer than the {process_count} processes; '
      f'every process needs at least one (add text or use --config.data.text_unit=line).'
    )
  ds = grain.MapDataset.source(records)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None)


def make_dataset(
  records: Sequence,
  tokenizer: tokenizer_lib.Tokenizer,
  config,
  *,
  text_key: str = 'text',
  train: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """Builds the per-process batch stream.

  Args:
    records: random-access records ({text_key: bytes}).
    tokenizer: the Tokenizer.
    config: full config; reads config.data (seq_len, global_batch_size, shuffle_seed,
      mask_*, num_threads, prefetch_buffer_size), config.objective, config.model.vocab_size.
    train: shuffle (train) or read in order (evaluation).
    process_index, process_count: this process's place among `jax.process_count()`.

  Returns:
    An IterDataset of dicts of NumPy arrays with leading dim
    global_batch_size / process_count: 'tokens', 'segment_ids', 'positions', 'inputs' (int32
    [b, n]) and, for MLM, 'mlm_positions', 'mlm_targets' (int32 [b, P]), 'mlm_weights' (float32
    [b, P]); for CLM, 'targets' (int32 [b, n]) and 'weights' (float32 [b, n]).

  Raises:
    ValueError: global_batch_size does not divide over the processes.
  """
  data = config.data
  if data.global_batch_size % process_count:
    raise ValueError(
      f'--config.data.global_batch_size={data.global_batch_size} does not divide over '
      f'{process_count} processes; use a multiple of {process_count}.'
    )
  ds = document_dataset(
    records,
    process_index=process_index,
    process_count=process_count,
    seed=data.shuffle_seed,
    shuffle=train,
  )
  ds = ds.map(Tokenize(tokenizer, text_key))
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch_buffer_size)
  )
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={'tokens': data.seq_len})
  it = it.map(_rename_packed)
  it = it.batch(data.global_batch_size // process_count, drop_remainder=True)
  if config.objective == 'mlm':
    # Seeded by (seed, process, batch index): hosts draw independent masks, resume repeats them.
    seed = (data.shuffle_seed * 1_000_003 + process_index * 7919 + (0 if train else 1)) % 2**32
    it = it.random_map(
      functools.partial(
        _mask,
        vocab_size=tokenizer.vocab_size,
        mask_rate=data.mask_rate,
        mask_token_rate=data.mask_token_rate,
        random_token_rate=data.random_token_rate,
        mask_id=getattr(tokenizer, 'mask_id', tokenizer_lib.MASK_ID),
        num_special=getattr(tokenizer, 'num_special', tokenizer_lib.NUM_SPECIAL),
      ),
      seed=seed,
    )
  elif config.objective == 'clm':
    it = it.map(objectives.next_token_targets)
  else:
    raise ValueError(f"--config.objective={config.objective!r}; use 'mlm' or 'clm'.")
  return it


def eval_batches(
  records: Sequence,
  tokenizer: tokenizer_lib.Tokenizer,
  config,
  *,
  text_key: str = 'text',
  process_index: int = 0,
  process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """The fixed evaluation set: the first `config.train.eval_steps` batches of the split, read
  in order with a fixed mask seed (the same batches at every evaluation)."""
  it = iter(
    make_dataset(
      records,
      tokenizer,
      config,
      text_key=text_key,
      train=False,
      process_index=process_index,
      process_count=process_count,
    )
  )
  return [next(it) for _ in range(config.train.eval_steps)]
