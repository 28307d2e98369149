"""Minimal reproduction: XLA partitions a batched gather's gradient wrongly on a 3-axis mesh.

  python benchmarks/repro/gather_grad_sharding.py

Pure JAX, no project code. On 8 fake CPU devices, the gradient of

  loss = sum((take_along_axis(take(E, tokens) @ W, idx, axis=1) @ H.T) ** 2)

with the batch split over ('data', 'fsdp') and W's output features over 'tensor' is wrong
on a (2, 2, 2) mesh (relative error ~0.9 while the loss is right), and right on every mesh
where one of the three axes is 1. Shardy and GSPMD sharding propagation give the same wrong
numbers, so the fault is in XLA's SPMD partitioning that both share. Constraining the
activation before or after the gather to (batch split, features whole) gives the right
gradient: that is what the models do (`models.encoder.gather_positions`; every residual
activation is constrained, and the trainer traces its steps under the mesh and logical axis
rules so that the constraints apply, `pretrain.mesh.jit`).

Seen with jax/jaxlib 0.12.0.1 on CPU (2026-12). Prints one line per case:
  partitioner  mesh  constraint  relative error of dL/dW  (OK if < 1e-5)
"""

import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

BATCH, LENGTH, FEATURES, PICKED, VOCAB = 8, 16, 8, 2, 64


def loss(params, tokens, idx, constrain):
  h = jnp.take(params['e'], tokens, axis=0) @ params['w']  # [b, n, d]
  if constrain:
    h = jax.lax.with_sharding_constraint(h, P(('data', 'fsdp'), None, None))
  picked = jnp.take_along_axis(h, idx[..., None], axis=1)  # [b, k, d]
  return jnp.sum((picked @ params['h'].T) ** 2)


def grad_w(shape, constrain, inputs):
  params, tokens, idx = inputs
  mesh = jax.make_mesh(
    shape,
    ('data', 'fsdp', 'tensor'),
    axis_types=(jax.sharding.AxisType.Auto,) * 3,
    devices=jax.devices()[: int(np.prod(shape))],
  )
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  shardings = {
    'w': NamedSharding(mesh, P(None, 'tensor')),
    'e': NamedSharding(mesh, P()),
    'h': NamedSharding(mesh, P('tensor', 'fsdp')),
  }
  fn = jax.jit(
    jax.grad(lambda p, t, i: loss(p, t, i, constrain)), in_shardings=(shardings, batch, batch)
  )
  with jax.set_mesh(mesh):
    return np.asarray(fn(params, tokens, idx)['w'])


def main():
  rng = np.random.default_rng(0)
  params = {
    'w': rng.normal(size=(FEATURES, FEATURES)).astype(np.float32),
    'e': rng.normal(size=(VOCAB, FEATURES)).astype(np.float32),
    'h': rng.normal(size=(VOCAB, FEATURES)).astype(np.float32),
  }
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  idx = rng.integers(0, LENGTH, (BATCH, PICKED)).astype(np.int32)
  inputs = (params, tokens, idx)
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}')
  bad = 0
  for shardy in (True, False):
    jax.config.update('jax_use_shardy_partitioner', shardy)
    reference = grad_w((1, 1, 1), False, inputs)
    for shape in ((2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1)):
      for constrain in (False, True):
        err = np.linalg.norm(grad_w(shape, constrain, inputs) - reference) / np.linalg.norm(
          reference
        )
        ok = err < 1e-5
        bad += not ok
        print(
          f'{"shardy" if shardy else "gspmd ":6}  {shape}  constraint={constrain!s:5}  '
          f'{err:.2e}  {"OK" if ok else "WRONG"}'
        )
  return bad


if __name__ == '__main__':
  sys.exit(1 if main() else 0)
