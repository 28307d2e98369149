"""Shared pieces of the benchmark scripts: a synthetic batch of the pipeline's shapes and the
median time of the real train step (run as `python benchmarks/<script>.py`, which puts this
directory on sys.path)."""

import statistics
import time

import jax
import numpy as np

from pretrain import aot
from pretrain import mesh as mesh_lib
from pretrain import train


def synthetic_batch(config, mesh):
  """A global batch with the pipeline's keys, shapes and dtypes (random ids, unit weights)."""
  rng = np.random.default_rng(0)
  batch = {}
  for k, spec in aot.abstract_batch(config, mesh).items():
    if spec.dtype == np.int32:
      high = config.data.seq_len if 'positions' in k else config.model.vocab_size
      batch[k] = rng.integers(1, high, spec.shape).astype(np.int32)
    else:
      batch[k] = np.ones(spec.shape, np.float32)
  return mesh_lib.global_batch(batch, mesh)


def time_train_step(config, repeats: int = 5):
  """(median seconds per step after compilation, the train state after the timed steps).

  The real trainer step (`train.jit_train_step`) on `config.mesh` over this machine's devices.
  """
  mesh = mesh_lib.make_mesh(config.mesh)
  run_setup = train.setup(config, mesh)
  state = train.init_state(config, run_setup)
  step_fn = train.jit_train_step(run_setup, config)
  batch, key = synthetic_batch(config, mesh), jax.random.key(0)
  state, _ = step_fn(state, batch, key)
  jax.block_until_ready(state)  # compiled
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return statistics.median(times), state
