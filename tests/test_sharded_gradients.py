"""Gradients on every mesh shape equal one device's, for every family and both objectives.

The loss is the trainer's own (`train.model_loss`, compiled by `train`'s sharded jit); the
batch packs several documents per row with padding, and MLM predictions are gathered at
masked positions. Regression: a (2, 2, 2) mesh gave gradients with cosine similarity 0.6 to
one device's while the loss matched (benchmarks/repro/gather_grad_sharding.py).
"""

import jax
import numpy as np
import pytest

from conftest import assert_trees_close
from conftest import make_tiny_config
from pretrain import mesh as mesh_lib
from pretrain import train

FAMILIES = ('roformer:tiny', 'roformer_v2:tiny', 'gau:tiny', 'gau:flash_tiny', 'deepnet:tiny')
MESHES = ((2, 2, 2), (1, 4, 2), (8, 1, 1))


def packed_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch like the pipeline's: rows of 1-3 packed documents, some padding, MLM and CLM
  fields (mlm_positions [b, P] with some zero weights; targets = next token in the document)."""
  rng = np.random.default_rng(seed)
  b, n, vocab = config.data.global_batch_size, config.data.seq_len, config.model.vocab_size
  inputs = rng.integers(5, vocab, (b, n)).astype(np.int32)
  segment_ids = np.zeros((b, n), np.int32)
  positions = np.zeros((b, n), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(3, n - 3), size=row % 3, replace=False))
    end = n - (row % 4) * 2  # rows 1, 2, 3 (mod 4) end in padding
    start = 0
    for doc, stop in enumerate(list(cuts[cuts < end]) + [end]):
      segment_ids[row, start:stop] = doc + 1
      positions[row, start:stop] = np.arange(stop - start)
      start = stop
  inputs[segment_ids == 0] = 0
  same_doc_next = np.zeros((b, n), bool)
  same_doc_next[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
  targets = np.zeros((b, n), np.int32)
  targets[:, :-1] = inputs[:, 1:]
  num_predictions = 5
  mlm_positions = np.stack([rng.choice(n, num_predictions, replace=False) for _ in range(b)])
  mlm_weights = (np.take_along_axis(segment_ids, mlm_positions, 1) > 0).astype(np.float32)
  return {
      'inputs': inputs, 'segment_ids': segment_ids, 'positions': positions,
      'targets': targets, 'weights': same_doc_next.astype(np.float32),
      'mlm_positions': mlm_positions.astype(np.int32),
      'mlm_targets': rng.integers(5, vocab, (b, num_predictions)).astype(np.int32),
      'mlm_weights': mlm_weights,
  }


def tiny_config(preset: str, objective: str):
  config = make_tiny_config(__import__('pathlib').Path('/nonexistent'), '/nonexistent',
                            preset=preset, objective=objective)
  config.model.num_layers = 2
  return config


def loss_and_grads(config, batch, devices):
  """(loss, gradient pytree) of the trainer's loss on a mesh over `devices`."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  s = train.setup(config, mesh)
  params = train.init_state(config, s)['params']
  fn = mesh_lib.jit(
      jax.value_and_grad(lambda p, b: train.model_loss(p, s.graphdef, b, config.objective),
                         has_aux=True),
      mesh, config.mesh.logical_axis_rules,
      in_shardings=(s.state_shardings['params'], mesh_lib.batch_sharding(mesh)))
  (loss, _), grads = fn(params, mesh_lib.global_batch(batch, mesh))
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize('objective', ['mlm', 'clm'])
@pytest.mark.parametrize('preset', FAMILIES)
def test_gradients_on_every_mesh_match_one_device(preset, objective):
  config = tiny_config(preset, objective)
  batch = packed_batch(config)
  loss_1, grads_1 = loss_and_grads(config, batch, jax.devices()[:1])
  assert np.isfinite(loss_1)
  for shape in MESHES:
    config.mesh.shape = shape
    loss_n, grads_n = loss_and_grads(config, batch, jax.devices())
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-6, err_msg=str(shape))
    assert_trees_close(grads_n, grads_1)
