"""Packed documents never see each other: changing one document's tokens leaves every other
document's logits unchanged, for every family and both objectives (FLASH included: its
linear global part once mixed the documents of a row)."""

import jax
import numpy as np
import pytest
from flax import nnx

import models
from helpers import FAMILIES
from helpers import packed_batch
from helpers import tiny_config


def _logits_fn(config):
  model = models.build(config, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t, seg, pos: nnx.merge(graphdef, s)(t, seg, pos))
  return lambda batch: np.asarray(
    fn(state, batch['inputs'], batch['segment_ids'], batch['positions'])
  )


@pytest.mark.parametrize('objective', ['mlm', 'clm'])
@pytest.mark.parametrize('preset', FAMILIES)
def test_changing_one_document_leaves_the_others_unchanged(preset, objective):
  config = tiny_config(preset, objective)
  config.model.initializer_range = 0.5  # large activations: a leak shows far above rounding
  batch = packed_batch(config)
  logits = _logits_fn(config)
  before = logits(batch)
  rng = np.random.default_rng(1)
  for row in range(batch['inputs'].shape[0]):
    seg = batch['segment_ids'][row]
    for doc in np.unique(seg[seg > 0]):
      changed = {k: v.copy() for k, v in batch.items()}
      where = seg == doc
      changed['inputs'][row, where] = rng.integers(5, config.model.vocab_size, where.sum())
      after = logits(changed)
      others = (seg != doc) & (seg > 0)
      np.testing.assert_allclose(
        after[row, others],
        before[row, others],
        atol=2e-5,
        err_msg=f'row {row}: document {doc} moved the others',
      )
      assert not np.allclose(after[row, where], before[row, where])  # it did change
      np.testing.assert_array_equal(np.delete(after, row, 0), np.delete(before, row, 0))
      break  # one document per row keeps the test fast; rows differ in their packing


def test_causal_normalizer_reaches_the_model():
  config = tiny_config('gau:flash_tiny', 'clm')
  config.model.initializer_range = 0.5  # attention weights large enough to matter
  batch = packed_batch(config)
  visible = _logits_fn(config)(batch)
  config.model.causal_normalizer = 'n'
  n = _logits_fn(config)(batch)
  valid = batch['segment_ids'] > 0
  assert np.abs(visible[valid] - n[valid]).max() > 1e-4
