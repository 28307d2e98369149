"""Packing, masking, CLM targets, process sharding and iterator state of the grain pipeline."""

import collections
import json
import threading

import numpy as np
import pytest

from data_pipelines import objectives
from data_pipelines import pipeline
from data_pipelines import tokenizer as tokenizer_lib


@pytest.fixture
def prepared(tiny_data):
  config, source, tok = tiny_data
  return config.copy_and_resolve_references(), source, tok


def _records(texts):
  return [{'text': t.encode()} for t in texts]


class _CountingTokenizer:
  """Each document is its own distinct ids (doc d, token i -> 1000 * (d + 1) + i)."""

  vocab_size = 100_000

  def encode(self, text):
    d, length = map(int, text.split(':'))
    return np.arange(length, dtype=np.int32) + 1000 * (d + 1)


def test_packing_loses_and_duplicates_no_token(prepared):
  config, _, _ = prepared
  config = config.copy_and_resolve_references()
  config.objective = 'clm'
  lengths = [5, 40, 1, 17, 64, 3, 29, 33, 8, 12]
  records = _records([f'{d}:{n}' for d, n in enumerate(lengths)])
  it = iter(pipeline.make_dataset(records, _CountingTokenizer(), config, train=False))
  per_epoch = sum(lengths) + len(lengths)  # + one [SEP] per document
  seen = []
  # Exactly one epoch plus the next (packing carries remainders across rows).
  while len(seen) < 2 * per_epoch:
    batch = next(it)
    for row, seg, pos in zip(batch['tokens'], batch['segment_ids'], batch['positions']):
      seen.extend(row.tolist())
      # Segment ids start at 1 and increase by one at every new document in the row.
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
      # Positions restart at 0 exactly where a new segment starts after the first.
      starts = np.flatnonzero(np.diff(seg)) + 1
      assert np.all(pos[starts] == 0)
      inner = np.setdiff1d(np.arange(1, len(row)), starts)
      assert np.all(pos[inner] == pos[inner - 1] + 1)
  first = seen[:per_epoch]
  counts = collections.Counter(t for t in first if t != tokenizer_lib.SEP_ID)
  expected = collections.Counter(
    t for d, n in enumerate(lengths) for t in range(1000 * (d + 1), 1000 * (d + 1) + n)
  )
  assert counts == expected  # no token lost or duplicated within one pass
  assert first.count(tokenizer_lib.SEP_ID) == len(lengths)


def test_attention_mask_never_crosses_segments():
  from models import attention  # pylint: disable=g-import-not-at-top

  seg = np.array([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(attention.attention_mask(seg, causal=False))[0]
  mask = mask.reshape(mask.shape[-2:]) if mask.ndim > 2 else mask
  same = (seg[0][:, None] == seg[0][None, :]) & (seg[0][None, :] > 0)
  np.testing.assert_array_equal(mask[seg[0] > 0], same[seg[0] > 0])


def _batch(rng, b=64, n=128, num_special=5, vocab=1000):
  tokens = rng.integers(num_special, vocab, size=(b, n)).astype(np.int32)
  tokens[:, ::17] = tokenizer_lib.SEP_ID  # special tokens sprinkled in
  seg = np.ones((b, n), np.int32)
  seg[:, -7:] = 0  # padding at the end
  tokens[:, -7:] = tokenizer_lib.PAD_ID
  return {'tokens': tokens, 'segment_ids': seg, 'positions': np.tile(np.arange(n), (b, 1))}


def test_mask_rates_on_100k_tokens():
  rng = np.random.default_rng(0)
  batch = _batch(rng, b=800)
  out = objectives.mask_tokens(batch, np.random.default_rng(1), vocab_size=1000)
  maskable = (batch['tokens'] >= tokenizer_lib.NUM_SPECIAL) & (batch['segment_ids'] > 0)
  w = out['mlm_weights'] > 0
  assert maskable.sum() > 90_000
  assert abs(w.sum() / maskable.sum() - 0.15) < 0.005
  rows = np.broadcast_to(np.arange(len(w))[:, None], w.shape)[w]
  pos = out['mlm_positions'][w]
  after = out['inputs'][rows, pos]
  target = out['mlm_targets'][w]
  np.testing.assert_array_equal(target, batch['tokens'][rows, pos])
  frac_mask = np.mean(after == tokenizer_lib.MASK_ID)
  frac_same = np.mean(after == target)
  assert abs(frac_mask - 0.8) < 0.01
  assert abs(frac_same - 0.1) < 0.01  # "unchanged" plus rare random hits of the same id
  assert abs(1 - frac_mask - frac_same - 0.1) < 0.01  # random replacements
  # Positions are distinct within a row, and only unmasked positions keep their token.
  for r in range(20):
    p = out['mlm_positions'][r][w[r]]
    assert len(set(p.tolist())) == len(p)
    untouched = np.setdiff1d(np.arange(batch['tokens'].shape[1]), p)
    np.testing.assert_array_equal(out['inputs'][r, untouched], batch['tokens'][r, untouched])


def test_special_and_padding_tokens_never_masked():
  batch = _batch(np.random.default_rng(0))
  out = objectives.mask_tokens(batch, np.random.default_rng(2), vocab_size=1000)
  w = out['mlm_weights'] > 0
  rows = np.broadcast_to(np.arange(len(w))[:, None], w.shape)[w]
  chosen = batch['tokens'][rows, out['mlm_positions'][w]]
  assert np.all(chosen >= tokenizer_lib.NUM_SPECIAL)
  assert np.all(batch['segment_ids'][rows, out['mlm_positions'][w]] > 0)
  # Random replacements are never special tokens other than [MASK].
  replaced = out['inputs'][rows, out['mlm_positions'][w]]
  assert np.all((replaced == tokenizer_lib.MASK_ID) | (replaced >= tokenizer_lib.NUM_SPECIAL))


def test_same_seed_and_step_give_same_mask(prepared):
  config, source, tok = prepared
  a = iter(pipeline.make_dataset(source.train, tok, config))
  b = iter(pipeline.make_dataset(source.train, tok, config))
  batches_a = [next(a) for _ in range(3)]
  batches_b = [next(b) for _ in range(3)]
  for x, y in zip(batches_a, batches_b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # Different steps draw different masks.
  assert not np.array_equal(batches_a[0]['mlm_positions'], batches_a[1]['mlm_positions'])
  other = config.copy_and_resolve_references()
  other.data.shuffle_seed = 1
  c = next(iter(pipeline.make_dataset(source.train, tok, other)))
  assert not np.array_equal(c['inputs'], batches_a[0]['inputs'])


def test_next_token_targets_stay_inside_segments():
  seg = np.array([[1, 1, 1, 2, 2, 0]])
  tokens = np.array([[7, 8, 9, 10, 11, 0]])
  out = objectives.next_token_targets(
    {'tokens': tokens, 'segment_ids': seg, 'positions': np.zeros_like(seg)}
  )
  np.testing.assert_array_equal(out['weights'][0], [1, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(out['targets'][0][:2], [8, 9])
  assert out['targets'][0][3] == 11


def test_process_shards_are_disjoint_and_cover():
  records = [{'text': str(i)} for i in range(103)]
  shards = []
  for pidx in range(4):
    ds = pipeline.document_dataset(
      records, process_index=pidx, process_count=4, seed=3, shuffle=True
    )
    n = (103 - pidx + 3) // 4
    shards.append([ds[i]['text'] for i in range(n)])
  flat = [x for s in shards for x in s]
  assert sorted(flat, key=int) == [str(i) for i in range(103)]  # disjoint and covering
  # The next epoch of a shard is a reshuffle of the same documents.
  ds0 = pipeline.document_dataset(records, process_index=0, process_count=4, seed=3, shuffle=True)
  second = [ds0[i]['text'] for i in range(len(shards[0]), 2 * len(shards[0]))]
  assert sorted(second) == sorted(shards[0]) and second != shards[0]


def test_iterator_state_round_trips(prepared):
  config, source, tok = prepared
  ds = pipeline.make_dataset(source.train, tok, config)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize('prefetch_batches', [0, 4])
def test_resume_from_a_json_saved_position_equals_uninterrupted(prepared, prefetch_batches):
  """The data position as checkpoints store it (JSON) resumes exactly at every batch
  boundary, with batches made ahead in a thread or not, also where a packed row ended exactly
  at a document's end (grain 0.2.18's sentinel, `pipeline.RestorablePacking`): there the old
  pipeline resumed one document late."""
  config, _, _ = prepared
  config.data.prefetch_batches = prefetch_batches
  # seq_len 32: documents of 15 and 31 tokens (+ [SEP]) end rows exactly, 7 + 23 too, the
  # others do not.
  lengths = [15, 15, 7, 23, 15, 31, 15, 15, 10, 20, 31] * 8
  records = _records([f'{d}:{n}' for d, n in enumerate(lengths)])
  ds = pipeline.make_dataset(records, _CountingTokenizer(), config, train=False)
  it = iter(ds)
  expected = [next(it) for _ in range(25)]
  sentinel = 0
  for k in range(1, 23):
    it = iter(ds)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    packing = state['parent']
    sentinel += packing['remainder_slices'] == {'tokens': [-1, -1]}
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected[k : k + 2]:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{key} after {k} batches')
  assert sentinel >= 3  # the case the fix is for occurs here


def test_packing_batching_and_masking_run_off_the_consuming_thread(prepared, monkeypatch):
  """With data.prefetch_batches > 0 the stages after tokenization (packing, batching, masking)
  run in the pipeline's own thread, so the training loop's thread only takes batches."""
  config, source, tok = prepared
  seen = []
  mask = pipeline._mask  # pylint: disable=protected-access

  def recording_mask(batch, rng, **kwargs):
    seen.append(threading.get_ident())
    return mask(batch, rng, **kwargs)

  monkeypatch.setattr(pipeline, '_mask', recording_mask)
  for prefetch, off_thread in ((4, True), (0, False)):
    config.data.prefetch_batches = prefetch
    seen.clear()
    it = iter(pipeline.make_dataset(source.train, tok, config))
    for _ in range(3):
      next(it)
    it.close()
    assert seen and all((t != threading.get_ident()) == off_thread for t in seen), prefetch


def test_batch_that_does_not_divide_over_processes_is_refused(prepared):
  config, source, tok = prepared
  with pytest.raises(ValueError, match='global_batch_size=8 does not divide over 3'):
    pipeline.make_dataset(source.train, tok, config, process_count=3)
