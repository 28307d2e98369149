"""Names of pytree leaves from jax key paths (DictKey / GetAttrKey / SequenceKey)."""

from __future__ import annotations

from typing import Mapping


def key_name(key) -> str:
  """'kernel' for DictKey('kernel'), GetAttrKey('kernel') or a plain string; '3' for index 3."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path) -> list[str]:
  """[key_name(k) for k in path]: ('layers', 'attention', 'query', 'kernel') style."""
  return [key_name(k) for k in path]


def is_stacked(names, stacked_key: str | None = 'layers') -> bool:
  """Whether a leaf is stacked on a leading layers axis (scanned layers).

  True iff `stacked_key` is one of the leaf's parent names and is not followed by a list
  index: ('layers', 'mlp', 'wi', 'kernel') is stacked [L, d, F]; ('layers', '3', 'mlp', 'wi',
  'kernel') (scan_layers=False: a list of layers) is not. stacked_key None: never.
  """
  names = list(names)
  if stacked_key is None or stacked_key not in names[:-1]:
    return False
  nxt = names[names.index(stacked_key) + 1]
  return not nxt.lstrip('-').isdigit()


# Optimizer-state fields holding second moments (Adam/LAMB nu, AdaFactor v / v_row / v_col):
# they map with squared factors when the parameters they follow are rescaled.
SECOND_MOMENT_NAMES = ('nu', 'v', 'v_row', 'v_col', 'nu_hat', 'vhat', 'second_moment')


def parameter_suffix(
  state_path: tuple, shape: tuple, param_shapes: Mapping[tuple, tuple]
) -> int | None:
  """Where a parameter's path starts inside an optimizer-state leaf's path, or None.

  The one rule for "parameter-shaped optimizer leaves" (Adam moments, momentum, EG gains, an
  unfactored AdaFactor v): the leaf's path ends with a parameter's path and it has that
  parameter's shape, e.g. (0, 'mu', 'layers', 'mlp', 'wi', 'kernel') for the parameter
  ('layers', 'mlp', 'wi', 'kernel'). Counters, factored statistics and scalars match nothing.
  Used by the trainer's shardings and by growth's optimizer-state map.

  Args:
    state_path: the leaf's path keys; param_shapes: {parameter path keys: shape}, built with
      the same key convention.
    shape: the leaf's shape.

  Returns:
    start such that state_path[start:] is a parameter path of that shape, or None.
  """
  for start in range(len(state_path)):
    want = param_shapes.get(tuple(state_path[start:]))
    if want is not None and tuple(want) == tuple(shape):
      return start
  return None


def is_second_moment(prefix: tuple) -> bool:
  """Whether the state field holding a parameter-shaped tree (the path before the parameter's
  path, e.g. (0, 'nu')) is a second moment."""
  return bool(prefix) and str(key_name(prefix[-1])) in SECOND_MOMENT_NAMES
