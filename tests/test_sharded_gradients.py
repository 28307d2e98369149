"""Gradients on every mesh shape equal one device's, for every family and both objectives.

The loss is the trainer's own (`train.model_loss`, compiled by `train`'s sharded jit); the
batch packs several documents per row with padding, and MLM predictions are gathered at
masked positions. Regression: a (2, 2, 2) mesh gave gradients with cosine similarity 0.6 to
one device's while the loss matched (benchmarks/repro/gather_grad_sharding.py).
"""

import jax
import numpy as np
import pytest

from helpers import FAMILIES
from helpers import MESHES
from helpers import assert_trees_close
from helpers import loss_and_grads
from helpers import packed_batch
from helpers import tiny_config


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
