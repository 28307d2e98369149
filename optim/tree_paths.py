"""Names of pytree leaves from jax key paths (DictKey / GetAttrKey / SequenceKey)."""

from __future__ import annotations


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
