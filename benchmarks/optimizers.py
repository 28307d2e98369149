"""Optimizer-state memory per parameter byte on the RoFormer `base` parameter shapes.

  .venv/bin/python benchmarks/optimizers.py [--builtin]    (or: python -m benchmarks.optimizers)

Shape-only (jax.eval_shape on tx.init; nothing is allocated or trained), a few seconds on CPU.
The parameter tree is a BERT-base-like RoFormer: vocab 8000, d 768, 12 layers stacked on a
leading 'layers' axis (query/key/value/output kernels (12, 768, 768) + biases, FFN
(12, 768, 3072) / (12, 3072, 768) + biases, two LayerNorms per layer), token and segment
embeddings + LayerNorm, MLM transform dense + LayerNorm + output bias (the decoder is the tied
embedding). If `models.build` exists, its parameter shapes are used instead (printed), unless
--builtin is given.

Targets (docs/algorithms.md 1.2, 2.5): AdaFactor without momentum <= 0.05x AdamW's state;
accumulation in
momentum adds 0 bytes over its base optimizer; optax.MultiSteps adds 1x the parameters.
"""

from __future__ import annotations

import sys


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import optim  # noqa: E402
from optim import adafactor  # noqa: E402
from optim import tree_paths  # noqa: E402
from launch.configs import roformer  # noqa: E402


def roformer_base_shapes(vocab=8000, d=768, layers=12, mlp=3072, dtype=jnp.float32):
  """The nested dict of ShapeDtypeStructs described in the module docstring."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  norm = lambda *lead: {'scale': s(*lead, d), 'bias': s(*lead, d)}  # noqa: E731
  dense = lambda n_in, n_out, *lead: {
    'kernel': s(*lead, n_in, n_out),  # noqa: E731
    'bias': s(*lead, n_out),
  }
  return {
    'embed': {
      'token': {'embedding': s(vocab, d)},
      'segment': {'embedding': s(2, d)},
      'norm': norm(),
    },
    'layers': {
      'attention': {name: dense(d, d, layers) for name in ('query', 'key', 'value', 'output')},
      'attention_norm': norm(layers),
      'mlp': {'wi': dense(d, mlp, layers), 'wo': dense(mlp, d, layers)},
      'mlp_norm': norm(layers),
    },
    'mlm': {'transform': dense(d, d), 'norm': norm(), 'output': {'bias': s(vocab)}},
  }


def model_shapes():
  """(shapes, source): models.build's parameter shapes if available, else the tree above."""
  if '--builtin' in sys.argv:
    return roformer_base_shapes(), 'built-in BERT-base-like tree (--builtin)'
  try:
    import models  # pylint: disable=import-outside-toplevel

    build = getattr(models, 'build', None)
    if build is not None:
      from flax import nnx  # pylint: disable=import-outside-toplevel

      config = roformer.get_config('base')
      state = jax.eval_shape(lambda: nnx.state(build(config, rngs=nnx.Rngs(0)), nnx.Param))
      shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state)
      )
      return shapes, 'models.build(roformer.py:base)'
  except Exception as e:  # pylint: disable=broad-except
    print(f'(models.build unusable here: {type(e).__name__}: {e}; using the built-in tree)')
  return roformer_base_shapes(), 'built-in BERT-base-like tree'


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(shapes, **optim_fields) -> int:
  config = roformer.get_config('base')
  config.optim.weight_decay = 0.0  # no effect on state; silences the adafactor 'optax' warning
  config.optim.grad_clip_norm = 0.0  # no effect on state; accumulation='momentum' needs it
  config.optim.update_from_flattened_dict(optim_fields)
  return tree_bytes(jax.eval_shape(optim.build(config).init, shapes))


def factoring_report(shapes):
  """Which leaves AdaFactor factors, and the statistic shapes of the stacked kernels."""
  lines = []
  for path, x in jax.tree_util.tree_leaves_with_path(shapes):
    names = tree_paths.path_names(path)
    view = adafactor.matrix_view_shape(tuple(x.shape), names)
    dims = optim.factored_dims(view, stacked=tree_paths.is_stacked(names))
    if len(x.shape) >= 2:
      if dims is None:
        stats = f'full {view}'
      else:
        d1, d0 = dims
        row = tuple(n for a, n in enumerate(view) if a != d0)
        col = tuple(n for a, n in enumerate(view) if a != d1)
        stats = f'factored: {row} + {col}'
        if view != tuple(x.shape):
          stats += f' (viewed as {view})'
      lines.append(f'  {"/".join(names):34s} {str(tuple(x.shape)):18s} {stats}')
  return lines


def main():
  shapes, source = model_shapes()
  params = tree_bytes(shapes)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  print(
    f'Parameters: {n_params / 1e6:.1f}M ({params / 2**20:.1f} MiB float32), '
    f'from the {source}; jax {jax.__version__}, shape-only (jax.eval_shape).'
  )
  adamw = state_bytes(shapes, name='adamw')
  sgdm = state_bytes(shapes, name='sgdm')
  af_b4k = state_bytes(shapes, name='adafactor', adafactor_variant='bert4keras', b1=0.9)
  rows = [
    # (optimizer, bytes, base bytes for "extra", target text)
    ('AdamW', adamw, None, '2x (mu, nu)'),
    (
      'AdaFactor factored, b1=0',
      state_bytes(shapes, name='adafactor', b1=0.0),
      None,
      f'<= 0.05x AdamW = {0.05 * adamw / params:.3f}x',
    ),
    (
      '  same, raw optax rule (no axis merge)',
      state_bytes(shapes, name='adafactor', b1=0.0, factor_merge_small_axes=False),
      None,
      'optax rule on raw shapes',
    ),
    (
      'AdaFactor + momentum b1=0.9',
      state_bytes(shapes, name='adafactor', b1=0.9),
      None,
      '~1x + factored stats',
    ),
    ('SGDM (heavy ball)', sgdm, None, '1x'),
    (
      'SGDM, accumulate in momentum k=8',
      state_bytes(shapes, name='sgdm', accumulation='momentum', accumulation_steps=8),
      sgdm,
      '+0 over SGDM',
    ),
    (
      'AdamW, accumulate in momentum k=8',
      state_bytes(shapes, name='adamw', accumulation='momentum', accumulation_steps=8),
      adamw,
      '+0 over AdamW',
    ),
    (
      'AdaFactor b1=0.9, accumulate in M k=8',
      state_bytes(
        shapes,
        name='adafactor',
        adafactor_variant='bert4keras',
        b1=0.9,
        accumulation='momentum',
        accumulation_steps=8,
      ),
      af_b4k,
      '+0 over AdaFactor b1=0.9',
    ),
    (
      'AdamW, every_k k=8 (Su)',
      state_bytes(shapes, name='adamw', accumulation='every_k', accumulation_steps=8),
      adamw,
      '+0 over AdamW',
    ),
    (
      'AdamW, optax.MultiSteps k=8',
      state_bytes(shapes, name='adamw', accumulation='multisteps', accumulation_steps=8),
      adamw,
      '+1x over AdamW',
    ),
    (
      'SGDM + EG (EGDD form)',
      state_bytes(shapes, name='sgdm', **{'eg.enabled': True}),
      sgdm,
      '+2x (p, gbar)',
    ),
    (
      'AdamW + EG (momentum signal)',
      state_bytes(shapes, name='adamw', **{'eg.enabled': True}),
      adamw,
      '+3x (p, gbar, u_prev)',
    ),
  ]
  print()
  print(
    f'| {"optimizer":40s} | {"state MiB":>9s} | {"state/param":>11s} | '
    f'{"extra over base":>22s} | target'
  )
  print(f'|{"-" * 42}|{"-" * 11}|{"-" * 13}|{"-" * 24}|{"-" * 32}')
  for name, nbytes, base, target in rows:
    diff = nbytes - base if base is not None else 0
    size = f'{diff:+d} B' if abs(diff) < 2**20 else f'{diff / 2**20:+.1f} MiB'
    extra = '' if base is None else f'{diff / params:+.4f}x ({size})'

    print(
      f'| {name:40s} | {nbytes / 2**20:9.2f} | {nbytes / params:10.4f}x | {extra:>22s} | {target}'
    )
  ratio = rows[1][1] / adamw
  print()
  print(
    f'AdaFactor (b1=0) state / AdamW state = {ratio:.4f} (target <= 0.05): '
    f'{"met" if ratio <= 0.05 else "NOT met"}'
  )
  print('AdaFactor statistics per leaf (rank >= 2):')
  print('\n'.join(factoring_report(shapes)))


if __name__ == '__main__':
  main()
