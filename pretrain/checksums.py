"""Checksums of a train state's arrays, recorded in a checkpoint's metadata at save and
verified after every restore: orbax's storage (zarr chunks compressed with zstd, no checksum
of their own) can return damaged bytes that still decode as numbers (docs/design.md 9).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np


class ChecksumError(RuntimeError):
  """Restored arrays differ from the checksums recorded when the checkpoint was saved: its
  files were damaged after the save. The message starts 'its data failed the checksum'."""


# The key of the checksums in a checkpoint's JSON metadata, and the version of the algorithm
# (a checkpoint recorded with another version is restored unverified, as one without any).
CHECKSUM_KEY = 'state_checksums'
CHECKSUM_ALGORITHM = 'uint32-words: sum, sum of fmix32(word ^ index * 0x9e3779b1); v1'


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit into all."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words: one per element of 1, 2 or 4 bytes (zero-extended),
  two per element of 8 bytes (a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 [2] of one array: the sum of its words and the sum of fmix32(word ^ index *
  0x9e3779b1) (index: the row-major position), both modulo 2**32.

  Integer sums do not depend on the order of reduction, so the result is the same for every
  sharding of the array (save and restore meshes may differ). Any one changed word changes
  both sums (fmix32 is a bijection); several changes, swapped elements included, escape the
  second with probability 2**-32.
  """
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  for axis, size in enumerate(w.shape):  # iotas, not a reshape: no resharding of x
    index = index * jnp.uint32(size) + lax.broadcasted_iota(jnp.uint32, w.shape, axis)
  mixed = _fmix32(w ^ (index * jnp.uint32(0x9E3779B1)))
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _checksum_fn(mesh: jax.sharding.Mesh | None) -> Callable:
  """The jitted `leaves -> uint32 [n, 2]`, replicated over `mesh` (every process reads it)."""
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return jax.jit(lambda leaves: jnp.stack([_leaf_checksum(x) for x in leaves]), out_shardings=out)


def _dtype(x) -> np.dtype | None:
  """The dtype of a leaf whose bits `_words` can read (1, 2, 4 or 8 bytes per element, not
  complex), else None (such leaves are neither recorded nor checked)."""
  dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return dtype
  dtype = np.dtype(dtype)
  if dtype.kind == 'c' or dtype.itemsize not in (1, 2, 4, 8):
    return None
  return dtype


def state_checksums(tree) -> dict[str, str]:
  """A checksum of every array leaf of `tree`, computed where the arrays are.

  One jitted reduction over all leaves (on several processes: one program that every process
  runs, at the same point, with the sums all-reduced), so it checks the global arrays whatever
  their sharding.

  Args:
    tree: a pytree of jax.Arrays (e.g. the train state {'step', 'params', 'opt_state'}) or
      NumPy arrays; leaves of 1, 2, 4 or 8 bytes per element (others are left out).

  Returns:
    {leaf path ('params/layers/mlp/wi/kernel'): dtype name + ':' + 16 hex digits (the two
    uint32 sums of `_leaf_checksum`)}.
  """
  flat = [(path, x, _dtype(x)) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  flat = [(path, x, dtype) for path, x, dtype in flat if dtype is not None]
  if not flat:
    return {}
  leaves = [x for _, x, _ in flat]
  mesh = next(
    (x.sharding.mesh for x in leaves if isinstance(getattr(x, 'sharding', None), NamedSharding)),
    None,
  )
  sums = np.asarray(jax.device_get(_checksum_fn(mesh)(leaves)))
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): (
      f'{dtype}:{int(s[0]):08x}{int(s[1]):08x}'
    )
    for (path, _, dtype), s in zip(flat, sums)
  }


def checksum_record(tree) -> dict[str, Any]:
  """The `meta[CHECKSUM_KEY]` of a checkpoint of `tree`: {'algorithm', 'leaves'}."""
  return {'algorithm': CHECKSUM_ALGORITHM, 'leaves': state_checksums(tree)}


def verify_checksums(tree, meta: dict[str, Any] | None):
  """Checks the arrays of `tree` (a restored state, or a part of one: same leaf paths)
  against the checksums `meta` recorded at save; leaves without a record, or restored in
  another dtype, are not checked, nor is a checkpoint written before checksums existed.

  Raises:
    ChecksumError: 'its data failed the checksum: ...', naming up to three arrays.
  """
  record = (meta or {}).get(CHECKSUM_KEY)
  if not isinstance(record, dict) or record.get('algorithm') != CHECKSUM_ALGORITHM:
    return
  saved = record.get('leaves') or {}
  now = state_checksums(tree)
  checked = {
    k: v for k, v in now.items() if k in saved and saved[k].split(':')[0] == v.split(':')[0]
  }
  bad = [k for k, v in checked.items() if saved[k] != v]
  if bad:
    raise ChecksumError(
      f'its data failed the checksum: {len(bad)} of {len(checked)} arrays differ from what '
      f'was saved ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}); its files no '
      f'longer hold what was written'
    )
