"""Applying a growth plan to parameter trees (and gradient-shaped trees, for optimizer
state): per-leaf axis maps, inserted layers, symmetry breaking (docs/algorithms.md 4).

  params = apply.grow_params(params, plan)            # numpy arrays, the target's layout
  moments = apply.grow_like_gradient(tree, plan, 2)   # second moments: squared factors
"""

from __future__ import annotations

import zlib

import numpy as np

from flax import traverse_util

from models.growth.plan import _BRANCH_END, GrowthError, Plan, _has_norm_params


# ----------------------------------------------------------------------------- leaf rules


def _leaf_rule(growth_plan: Plan, path: tuple[str, ...]):
  """(kind, [(AxisMap, role) or None per axis]) for a leaf; layer leaves exclude the L axis.

  kind: 'kernel', 'embedding', 'bias', 'scale' (norm gain / GAU scale-offset gain) or 'qk'.
  """
  m = growth_plan.maps
  st, name = path[:-1], path[-1]
  produce = lambda a: (a, 'produce')
  consume = lambda a: (a, 'consume')
  norm = {
    'scale': ('scale', [produce(m['norm_scale'])]),
    'bias': ('bias', [produce(m['norm_bias'])]),
  }
  if st[0] == 'embedder':
    if st[-1] == 'norm':
      return norm[name]
    return 'embedding', [None, produce(m['embed'])]
  if st[0] == 'head':
    if st == ('head',) and name == 'bias':
      return 'bias', [None]
    if st[-1] == 'transform':
      if name == 'kernel':
        return 'kernel', [consume(m['stream']), produce(m['head_hidden'])]
      return 'bias', [produce(m['head_hidden'])]
    if st[-1] == 'norm':
      return ('scale' if name == 'scale' else 'bias'), [produce(m['head_norm'])]
  if st[0] == 'layers':
    st = st[1:]
    if st and st[-1] in ('attention_norm', 'mlp_norm', 'norm'):
      return norm[name]
    if growth_plan.src.family == 'gau':
      if st == ('uvz',):
        return (
          ('kernel', [consume(m['stream']), produce(m['uvz'])])
          if name == 'kernel'
          else ('bias', [produce(m['uvz'])])
        )
      if st == ('out',):
        return (
          ('kernel', [consume(m['e']), produce(m['stream'])])
          if name == 'kernel'
          else ('bias', [produce(m['stream'])])
        )
      if st == ('qk',):
        return 'qk', name
    else:
      if st[0] == 'attention' and st[1] in ('query', 'key', 'value'):
        dh = m[{'query': 'dh_q', 'key': 'dh_k', 'value': 'dh_v'}[st[1]]]
        out = [produce(m['heads']), produce(dh)]
        return ('kernel', [consume(m['stream'])] + out) if name == 'kernel' else ('bias', out)
      if st == ('attention', 'out'):
        return (
          ('kernel', [consume(m['heads']), consume(m['dh_v']), produce(m['stream'])])
          if name == 'kernel'
          else ('bias', [produce(m['stream'])])
        )
      if st == ('mlp', 'wi'):
        return (
          ('kernel', [consume(m['stream']), produce(m['mlp'])])
          if name == 'kernel'
          else ('bias', [produce(m['mlp'])])
        )
      if st == ('mlp', 'wo'):
        return (
          ('kernel', [consume(m['mlp']), produce(m['stream'])])
          if name == 'kernel'
          else ('bias', [produce(m['stream'])])
        )
  raise GrowthError(
    f'models/growth/apply.py has no growth rule for parameter {"/".join(path)}; '
    'the model layout changed: add a rule in _leaf_rule.'
  )


def _rng(seed: int, path: tuple[str, ...], salt: str = '') -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(('/'.join(path) + salt).encode())])


def _rms(y: np.ndarray, mask: np.ndarray, stacked: bool) -> np.ndarray:
  """RMS of y over entries where mask is False (per layer if stacked), broadcastable to y."""
  keep = ~mask
  axes = tuple(range(1 if stacked else 0, y.ndim))
  num = np.sum(np.where(keep, y * y, 0.0), axis=axes, keepdims=True)
  den = np.maximum(np.sum(np.broadcast_to(keep, y.shape), axis=axes, keepdims=True), 1)
  return np.sqrt(num / den)


def _mean(y: np.ndarray, mask: np.ndarray, stacked: bool) -> np.ndarray:
  keep = ~mask
  axes = tuple(range(1 if stacked else 0, y.ndim))
  num = np.sum(np.where(keep, y, 0.0), axis=axes, keepdims=True)
  den = np.maximum(np.sum(np.broadcast_to(keep, y.shape), axis=axes, keepdims=True), 1)
  return num / den


def _apply(
  x: np.ndarray,
  axes,
  kind: str,
  mode: str,
  power: int,
  stacked: bool,
  rng: np.random.Generator | None,
) -> np.ndarray:
  """Applies per-axis maps to one leaf (float64). axes excludes the L axis when stacked."""
  offset = 1 if stacked else 0
  y = np.asarray(x, np.float64)
  if len(axes) + offset != y.ndim:
    raise GrowthError(
      f'leaf of shape {y.shape} does not match its growth rule '
      f'({len(axes)} feature axes); the model layout changed.'
    )
  new_any = np.zeros((1,) * y.ndim, bool)
  zero_any = np.zeros((1,) * y.ndim, bool)
  for i, rule in enumerate(axes):
    if rule is None:
      continue
    amap, role = rule
    ax = i + offset
    idx, fac, is_new, must_zero = amap.layout(role, mode)
    shape = [1] * y.ndim
    shape[ax] = len(idx)
    y = np.take(y, np.where(idx >= 0, idx, 0), axis=ax) * (fac**power).reshape(shape)
    new_any = new_any | is_new.reshape(shape)
    zero_any = zero_any | must_zero.reshape(shape)
  new_any = np.broadcast_to(new_any, y.shape)
  if mode == 'grad' or not new_any.any():
    return np.where(new_any, 0.0, y)
  if kind in ('kernel', 'embedding'):
    std = _rms(y, new_any, stacked)
    fill = rng.standard_normal(y.shape) * std
  elif kind == 'scale':
    fill = np.broadcast_to(_mean(y, new_any, stacked), y.shape)
  else:
    fill = 0.0
  y = np.where(new_any, fill, y)
  return np.where(np.broadcast_to(zero_any, y.shape), 0.0, y)


def _grow_leaf(
  growth_plan: Plan, path: tuple[str, ...], x, mode: str, power: int = 1
) -> np.ndarray:
  stacked = path[0] == 'layers'
  kind, axes = _leaf_rule(growth_plan, path)
  rng = _rng(growth_plan.options.seed, path)
  if kind == 'qk':  # [L, m, s]: one map per row (q rows zero-slot with new zeros, k rows free)
    x = np.asarray(x, np.float64)
    rows = growth_plan.maps['qk_rows']
    if x.shape[1] != len(rows):
      raise GrowthError(f'{"/".join(path)} has {x.shape[1]} rows, expected {len(rows)}.')
    sub = 'scale' if axes == 'scale' else 'bias'
    out = [
      _apply(x[:, r], [(rows[r], 'produce')], sub, mode, power, True, rng) for r in range(len(rows))
    ]
    return np.stack(out, axis=1)
  return _apply(x, axes, kind, mode, power, stacked, rng)


# ----------------------------------------------------------------------------- trees


def _stacked(params: dict) -> dict:
  layers = params.get('layers')
  if isinstance(layers, (list, tuple)) or (
    isinstance(layers, dict) and layers and all(isinstance(k, int) for k in layers)
  ):
    seq = [layers[i] for i in sorted(layers)] if isinstance(layers, dict) else list(layers)
    out = dict(params)
    out['layers'] = traverse_util.unflatten_dict(
      {
        path: np.stack([np.asarray(traverse_util.flatten_dict(l)[path]) for l in seq])
        for path in traverse_util.flatten_dict(seq[0])
      }
    )
    return out
  return params


def _unstacked(params: dict) -> dict:
  out = dict(params)
  flat = traverse_util.flatten_dict(params['layers'])
  num = next(iter(flat.values())).shape[0]
  out['layers'] = {
    i: traverse_util.unflatten_dict({path: v[i] for path, v in flat.items()}) for i in range(num)
  }
  return out


def _norm_names(growth_plan: Plan) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(first, last) norm of a block (the same for a one-norm GAU block)."""
  if growth_plan.src.family == 'gau':
    return ('norm',), ('norm',)
  return ('attention_norm',), ('mlp_norm',)


def _insert_layers(growth_plan: Plan, flat: dict[tuple, np.ndarray], mode: str) -> dict:
  """Inserts zero-branch blocks at growth_plan.new_layers into stacked leaves
  (docs/algorithms.md 4.6)."""
  if not growth_plan.new_layers:
    return flat
  flat = dict(flat)
  layer_paths = [path for path in flat if path[0] == 'layers']
  blocks = [
    {path[1:]: flat[path][i] for path in layer_paths} for i in range(flat[layer_paths[0]].shape[0])
  ]
  first, last = _norm_names(growth_plan)
  transfer = growth_plan.depth_method == 'norm_transfer' and _has_norm_params(growth_plan.src)
  stats = {
    path[1:]: (
      _rms(flat[path], np.zeros((1,) * flat[path].ndim, bool), False),
      flat[path].mean(axis=0),
    )
    for path in layer_paths
  }
  for position in growth_plan.new_layers:
    rng = _rng(growth_plan.options.seed, ('layers', str(position)), 'depth')
    block = {}
    for sub, value in blocks[0].items():
      rms, mean = stats[sub]
      if mode == 'grad' or sub[:-1] in _BRANCH_END or sub[-1] == 'bias':
        block[sub] = np.zeros_like(value)
      elif sub[:-1] in (first, last):  # norm gain: c_s * identity
        block[sub] = np.full_like(value, growth_plan.c_stream)
      elif sub[-1] == 'scale':  # GAU q/k gains: the layers' mean
        block[sub] = np.array(mean)
      else:
        block[sub] = rng.standard_normal(value.shape) * float(np.squeeze(rms))
    if transfer:
      # The new block's last norm takes over the preceding norm's gain and offset; the
      # preceding norm becomes c_s * identity (gradient mode: its moments move along).
      if position == 0:
        owner, keys = flat, {n: ('embedder', 'norm', n) for n in ('scale', 'bias')}
      else:
        owner, keys = blocks[position - 1], {n: last + (n,) for n in ('scale', 'bias')}
      for name, key in keys.items():
        if last + (name,) not in block or key not in owner:
          continue
        old = owner[key]
        block[last + (name,)] = np.array(old)
        owner[key] = (
          np.zeros_like(old)
          if mode == 'grad' or name == 'bias'
          else np.full_like(old, growth_plan.c_stream)
        )
    blocks.insert(position, block)
  for path in layer_paths:
    flat[path] = np.stack([b[path[1:]] for b in blocks])
  return flat


def _grow_tree(growth_plan: Plan, params: dict, mode: str, power: int = 1) -> dict:
  """Width then depth growth of a stacked-or-not pure dict of arrays; returns numpy leaves
  in the dst layout (scan_layers)."""
  flat = traverse_util.flatten_dict(_stacked(params))
  dtypes = {path: np.asarray(v).dtype for path, v in flat.items()}
  out = {
    path: _grow_leaf(growth_plan, tuple(str(k) for k in path), v, mode, power)
    for path, v in flat.items()
  }
  if mode == 'param' and growth_plan.options.symmetry_breaking == 'noise':
    for path, y in out.items():
      kind, _ = _leaf_rule(growth_plan, tuple(str(k) for k in path))
      if kind in ('kernel', 'embedding') and y.shape != np.shape(flat[path]):
        rng = _rng(growth_plan.options.seed, tuple(str(k) for k in path), 'noise')
        stacked = path[0] == 'layers'
        rms = _rms(y, np.zeros((1,) * y.ndim, bool), stacked)
        out[path] = y + growth_plan.options.noise_sigma * rms * rng.standard_normal(y.shape)
  out = _insert_layers(growth_plan, out, mode)
  out = {path: y.astype(dtypes[path]) for path, y in out.items()}
  tree = traverse_util.unflatten_dict(out)
  return tree if growth_plan.dst.scan_layers else _unstacked(tree)


def grow_params(params: dict, growth_plan: Plan) -> dict:
  """The grown parameter tree (numpy arrays, the source leaves' dtypes) for growth_plan.

  params: the source's pure dict (nnx.to_pure_dict(nnx.state(model, nnx.Param))), stacked
  (scan_layers=True) or not; the result follows the target's scan_layers.
  """
  return _grow_tree(growth_plan, params, 'param')


def grow_like_gradient(tree: dict, growth_plan: Plan, power: int = 1) -> dict:
  """Maps a parameter-shaped tree the way gradients map (docs/algorithms.md 4.7): copies of a unit
  split
  the gradient (producers 1/(copies c), consumers c); new units and inserted blocks get 0.
  power=2 maps second moments (squared factors)."""
  return _grow_tree(growth_plan, tree, 'grad', power)
