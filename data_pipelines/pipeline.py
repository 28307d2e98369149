"""The grain input pipeline: records -> shard by process -> shuffle -> tokenize -> pack -> batch
-> objective (docs/design.md 2).

Each data shard reads a disjoint slice of the documents (`[process_index::process_count]`),
shuffles it with `config.data.shuffle_seed` (a new order every epoch), tokenizes (appending
[SEP]), packs documents end to end into rows of `seq_len` tokens with grain's
concat-then-split packing (no token is dropped; a document that does not fit continues on the
next row), batches `global_batch_size / process_count` rows, then applies the objective. The
returned iterator's state (grain's own) is what checkpoints save, so a resumed run reads the
same batches an uninterrupted run would.

A data shard is a feed group of processes (`pretrain.mesh.batch_feed`, docs/design.md 13):
the processes whose devices address the same rows of the global batch. That is one process
per shard unless a mesh axis other than 'data' and 'fsdp' spans hosts; processes of one group
pass the same `process_index` and get identical batches (masks included), as
`jax.make_array_from_process_local_data` requires.

A mixture of sources (`--config.data.mixture`, docs/configuration.md 3) arrives as
`MixtureRecords`: every source is sharded, shuffled and tokenized on its own, then grain mixes
the documents with the weights (`grain.MapDataset.mix`) before packing, so rows hold documents
of several sources. Each token carries its source id through packing; the last stage
(`CountSources`) drops it from the batch and keeps the counts per source on the host, in the
checkpointed iterator state (`mixture_counts`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
import os
from typing import Any, Sequence

import grain
import numpy as np

from data_pipelines import objectives
from data_pipelines import tokenizer as tokenizer_lib


class Tokenize(grain.transforms.Map):
  """record -> {'tokens': int32 [len + 1]}: the document's ids followed by [SEP].

  With `source` (a mixture's source index s of `num_sources` k) also 'source': int32
  [len + 1], s at every token but the first, which holds s + k (a document start; packing
  restarts positions at 0 on a continued document, so starts cannot be read from positions).
  """

  def __init__(
    self,
    tokenizer: tokenizer_lib.Tokenizer,
    text_key: str,
    source: int | None = None,
    num_sources: int = 0,
  ):
    self._tokenizer = tokenizer
    self._text_key = text_key
    self._source = source
    self._num_sources = num_sources

  def map(self, record):
    text = record[self._text_key]
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    ids = self._tokenizer.encode(text)
    sep = getattr(self._tokenizer, 'sep_id', tokenizer_lib.SEP_ID)  # WordPiece: its [SEP]
    tokens = np.concatenate([ids, np.array([sep], np.int32)]).astype(np.int32)
    if self._source is None:
      return {'tokens': tokens}
    source = np.full(tokens.shape, self._source, np.int32)
    source[0] += self._num_sources
    return {'tokens': tokens, 'source': source}


def _rename_packed(row):
  out = {
    'tokens': row['tokens'].astype(np.int32),
    'segment_ids': row['tokens_segment_ids'].astype(np.int32),
    'positions': row['tokens_positions'].astype(np.int32),
  }
  if 'source' in row:  # a mixture: the source id of every token (CountSources drops it)
    out['source'] = row['source'].astype(np.int32)
  return out


def _mask(batch, rng, **kwargs):
  return objectives.mask_tokens(batch, rng, **kwargs)


def document_dataset(
  records: Sequence, *, process_index: int, process_count: int, seed: int, shuffle: bool
) -> grain.MapDataset:
  """Data shard `process_index` of `process_count` of the documents, shuffled per epoch if
  `shuffle`, repeated forever.

  Raises:
    ValueError: fewer documents than data shards (a shard would be empty).
  """
  if len(records) < process_count:
    raise ValueError(
      f'the split has {len(records)} document(s), fewer than the {process_count} data shards '
      f'(processes that load their own rows); every shard needs at least one (add text or use '
      f'--config.data.text_unit=line).'
    )
  ds = grain.MapDataset.source(records)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None)


class MixtureRecords(collections.abc.Sequence):
  """The records of several sources with weights: what `make_dataset` mixes
  (`--config.data.mixture`, docs/configuration.md 3).

  As a sequence it is one pass over grain's weighted interleave of the sources (each repeated),
  so that a uniform sample of it draws the sources in proportion to their weights: record i
  is place i of `grain.MapDataset.mix` as {'text': the text}, and the length is the sum of
  the sources' lengths. The tokenizer's training sample reads it this way
  (`tokenizer.load_or_train`); `make_dataset` reads the sources themselves.

  Args:
    names: the sources' names, unique (logs and metric names).
    weights: their relative weights, > 0 (normalised here to sum to 1).
    sources: their random-access records, each non-empty.
    text_keys: the feature holding the text in each source's records.

  Raises:
    ValueError: lengths that do not match, a weight <= 0, or an empty source.
  """

  def __init__(
    self,
    names: Sequence[str],
    weights: Sequence[float],
    sources: Sequence[Sequence],
    text_keys: Sequence[str],
  ):
    if not len(names) == len(weights) == len(sources) == len(text_keys) or not names:
      raise ValueError('MixtureRecords: names, weights, sources and text_keys must match.')
    if min(weights) <= 0:
      raise ValueError(f'MixtureRecords: weights {tuple(weights)} must all be > 0.')
    empty = [n for n, s in zip(names, sources) if not len(s)]
    if empty:
      raise ValueError(f'MixtureRecords: source {empty[0]!r} has no records.')
    total = float(sum(weights))
    self.names = tuple(names)
    self.weights = tuple(float(w) / total for w in weights)
    self.sources = tuple(sources)
    self.text_keys = tuple(text_keys)
    self._length = sum(len(s) for s in sources)
    self._places = grain.MapDataset.mix(
      [
        grain.MapDataset.range(len(s)).repeat(None).map(functools.partial(_tag, i))
        for i, s in enumerate(sources)
      ],
      self.weights,
    )

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._length))]
    index = int(index)
    if index < 0:
      index += self._length
    if not 0 <= index < self._length:
      raise IndexError(f'record {index} of a mixture of {self._length}')
    source, key = self._places[index]
    return {'text': self.sources[source][key][self.text_keys[source]]}

  def __repr__(self) -> str:
    parts = ', '.join(
      f'{n} {w:.3g}: {len(s)}' for n, w, s in zip(self.names, self.weights, self.sources)
    )
    return f'MixtureRecords({parts})'


def _tag(source: int, key: int) -> tuple[int, int]:
  return source, int(key)


def source_seed(seed: int, name: str) -> int:
  """The shuffle seed of mixture source `name`: a hash of (data.shuffle_seed, name), so each
  source has its own order, which does not change when other sources are added."""
  return int.from_bytes(hashlib.sha256(f'{seed}\0{name}'.encode()).digest()[:4], 'big')


def mixed_documents(
  records: MixtureRecords,
  tokenizer: tokenizer_lib.Tokenizer,
  *,
  process_index: int,
  process_count: int,
  seed: int,
  shuffle: bool,
) -> grain.MapDataset:
  """Data shard `process_index` of every source (`document_dataset`, each shuffled with its
  own `source_seed`), tokenized with the source id of every token (`Tokenize`), mixed with the
  weights by `grain.MapDataset.mix`: a deterministic interleave, so any prefix of the mixture
  holds each source's documents in proportion to its weight (within one document), and the
  mixture is random access, so the iterator state stays one position.

  Raises:
    ValueError: a source with fewer documents than data shards (names the source).
  """
  parts = []
  for i, (name, source, key) in enumerate(zip(records.names, records.sources, records.text_keys)):
    try:
      ds = document_dataset(
        source,
        process_index=process_index,
        process_count=process_count,
        seed=source_seed(seed, name),
        shuffle=shuffle,
      )
    except ValueError as e:
      raise ValueError(f'--config.data.mixture source {name!r}: {e}') from None
    parts.append(ds.map(Tokenize(tokenizer, key, source=i, num_sources=len(records.names))))
  return grain.MapDataset.mix(parts, records.weights)


@dataclasses.dataclass
class MixtureCounts:
  """What a mixture's batches held so far, per source (this process's data shard).

  Attributes:
    names: the sources' names.
    weights: their weights, normalised to sum to 1.
    documents: int64 [k]: documents started in the batches read (a document packed across
      rows counts once, in the batch of its first token).
    tokens: int64 [k]: tokens (not padding) of each source in the batches read, [SEP]
      included.
  """

  names: tuple[str, ...]
  weights: tuple[float, ...]
  documents: np.ndarray
  tokens: np.ndarray

  @staticmethod
  def _shares(counts: np.ndarray) -> np.ndarray:
    return counts / max(int(counts.sum()), 1)

  def scalars(self) -> dict[str, float]:
    """{'<name>/documents', '<name>/tokens': counts; '<name>/document_share',
    '<name>/token_share': fractions of all sources'} for the metric sinks."""
    out = {}
    doc_share, token_share = self._shares(self.documents), self._shares(self.tokens)
    for i, name in enumerate(self.names):
      out[f'{name}/documents'] = float(self.documents[i])
      out[f'{name}/tokens'] = float(self.tokens[i])
      out[f'{name}/document_share'] = float(doc_share[i])
      out[f'{name}/token_share'] = float(token_share[i])
    return out

  def summary(self) -> str:
    """'wiki 70.0% docs 64.1% tokens (weight 70.0%), code ...' for a log line."""
    doc_share, token_share = self._shares(self.documents), self._shares(self.tokens)
    return ', '.join(
      f'{n} {100 * d:.1f}% docs {100 * t:.1f}% tokens (weight {100 * w:.1f}%)'
      for n, d, t, w in zip(self.names, doc_share, token_share, self.weights)
    )


class CountSources(grain.IterDataset):
  """Batches with 'source' (int32 [b, n], `Tokenize`) -> the same batches without it,
  counting each source's documents and tokens on the host (`mixture_counts`). The counts are
  part of the iterator state, so a resumed run continues them."""

  def __init__(self, parent: grain.IterDataset, names: Sequence[str], weights: Sequence[float]):
    super().__init__(parent)
    self._names, self._weights = tuple(names), tuple(weights)

  def __iter__(self) -> grain.DatasetIterator:
    return _CountSourcesIterator(self._parent.__iter__(), self._names, self._weights)


class _CountSourcesIterator(grain.DatasetIterator):
  """The iterator of CountSources; state {'parent', 'documents', 'tokens'} (JSON)."""

  def __init__(self, parent: grain.DatasetIterator, names, weights):
    super().__init__(parent)
    self._names, self._weights = names, weights
    self._documents = np.zeros(len(names), np.int64)
    self._tokens = np.zeros(len(names), np.int64)

  def __next__(self):
    batch = next(self._parent)
    k = len(self._names)
    source = batch['source'][batch['segment_ids'] > 0]  # padding is not a source's
    self._tokens += np.bincount(source % k, minlength=k)
    self._documents += np.bincount(source[source >= k] - k, minlength=k)
    return {key: value for key, value in batch.items() if key != 'source'}

  def get_state(self) -> dict[str, Any]:
    return {
      'parent': self._parent.get_state(),
      'documents': [int(c) for c in self._documents],
      'tokens': [int(c) for c in self._tokens],
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['documents']) != len(self._names):
      raise ValueError(
        f'the saved data position counts {len(state["documents"])} mixture sources, this '
        f'run has {len(self._names)}; resume with the --config.data.mixture that wrote it.'
      )
    self._parent.set_state(state['parent'])
    self._documents = np.array(state['documents'], np.int64)
    self._tokens = np.array(state['tokens'], np.int64)

  def mixture_counts(self) -> MixtureCounts:
    return MixtureCounts(self._names, self._weights, self._documents.copy(), self._tokens.copy())

  def __str__(self) -> str:
    return f'CountSources({", ".join(self._names)})'


class RestorablePacking(grain.IterDataset):
  """grain's ConcatThenSplitIterDataset whose saved position restores exactly after the JSON
  round trip of a checkpoint (docs/design.md 5, benchmarks/repro/grain_packing_state_json.py).

  grain 0.2.18 marks "the remainder is the whole next document" with the tuple (-1, -1) in the
  state's remainder_slices; JSON gives it back as the list [-1, -1], which its set_state
  compares unequal to the tuple, so it takes that document for a slice [-1:-1] and drops it:
  every checkpoint taken when a packed row ended exactly at a document's end (about 1 in 12
  on the test corpora) resumed one document later. The state is passed through unchanged
  (checkpoints stay compatible) and the slices are made tuples again on restore.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _RestorablePackingIterator(self._parent.__iter__())


class _RestorablePackingIterator(grain.DatasetIterator):
  """The iterator of RestorablePacking: the parent's elements and state."""

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    slices = state.get('remainder_slices') or {}
    fixed = {key: tuple(value) for key, value in slices.items()}
    self._parent.set_state({**state, 'remainder_slices': fixed} if slices else state)


def mixture_counts(iterator) -> MixtureCounts | None:
  """The documents and tokens per source that a mixture's training iterator (an iterator of
  `make_dataset` over `MixtureRecords`) returned so far, counted since the run's first batch
  (restored with the iterator state); None for any other iterator. Costs a copy of 2k ints."""
  counts = getattr(iterator, 'mixture_counts', None)
  return counts() if callable(counts) else None


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
    records: random-access records ({text_key: bytes}), or a `MixtureRecords` (a mixture:
      its sources are mixed by `mixed_documents`, and the iterator also counts what each
      source contributed, `mixture_counts`).
    tokenizer: the Tokenizer.
    config: full config; reads config.data (seq_len, global_batch_size, shuffle_seed,
      mask_*, num_threads, prefetch_buffer_size, prefetch_batches), config.objective,
      config.model.vocab_size.
    train: shuffle (train) or read in order (evaluation).
    process_index, process_count: this process's data shard and the number of shards:
      `pretrain.mesh.batch_feed(mesh).index` and `.count`, which equal `jax.process_index()`
      and `jax.process_count()` only when every process addresses batch rows of its own.
      Calls with the same values return identical batches.

  Returns:
    An IterDataset of dicts of NumPy arrays with leading dim
    global_batch_size / process_count (this process's rows, `BatchFeed.rows`): 'tokens',
    'segment_ids', 'positions', 'inputs' (int32 [b, n]) and, for MLM, 'mlm_positions',
    'mlm_targets' (int32 [b, P]), 'mlm_weights' (float32 [b, P]); for CLM, 'targets' (int32
    [b, n]) and 'weights' (float32 [b, n]).

  Raises:
    ValueError: global_batch_size does not divide over the data shards, or a split (a
      mixture source's split) has fewer documents than data shards.
  """
  data = config.data
  if data.global_batch_size % process_count:
    raise ValueError(
      f'--config.data.global_batch_size={data.global_batch_size} does not divide over '
      f'{process_count} processes; use a multiple of {process_count}.'
    )
  mixture = isinstance(records, MixtureRecords)
  if mixture:
    ds = mixed_documents(
      records,
      tokenizer,
      process_index=process_index,
      process_count=process_count,
      seed=data.shuffle_seed,
      shuffle=train,
    )
    # The source ids pack alongside the tokens: the same lengths, so the same cuts.
    lengths = {'tokens': data.seq_len, 'source': data.seq_len}
  else:
    ds = document_dataset(
      records,
      process_index=process_index,
      process_count=process_count,
      seed=data.shuffle_seed,
      shuffle=train,
    )
    ds = ds.map(Tokenize(tokenizer, text_key))
    lengths = {'tokens': data.seq_len}
  it = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=read_threads(data.num_threads), prefetch_buffer_size=data.prefetch_buffer_size
    )
  )
  it = RestorablePacking(grain.experimental.ConcatThenSplitIterDataset(it, length_struct=lengths))
  it = it.map(_rename_packed)
  it = it.batch(data.global_batch_size // process_count, drop_remainder=True)
  if config.objective == 'mlm':
    # Seeded by (seed, data shard, batch index): shards draw independent masks, the processes
    # of one shard the same ones, and resume repeats them.
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
  if data.get('prefetch_batches', 0) > 0:
    # Packing, batching and masking run in this thread (grain checkpoints the position of the
    # batch the consumer took, not of the ones made ahead).
    it = grain.experimental.ThreadPrefetchIterDataset(
      it, prefetch_buffer_size=data.prefetch_batches
    )
  if mixture:  # on the consumer's side: the counts are those of the batches taken
    it = CountSources(it, records.names, records.weights)
  return it


# Upper bound of data.num_threads=-1: tokenization in more Python threads stops paying.
MAX_AUTO_READ_THREADS = 16


def read_threads(num_threads: int) -> int:
  """grain read threads for data.num_threads: -1 = one per core up to MAX_AUTO_READ_THREADS
  (os.cpu_count()), else as given (0: read on the consuming thread)."""
  if num_threads >= 0:
    return num_threads
  return max(1, min(MAX_AUTO_READ_THREADS, os.cpu_count() or 1))


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
  try:
    return [next(it) for _ in range(config.train.eval_steps)]
  finally:
    it.close()  # stops the prefetch thread
