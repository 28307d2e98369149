"""The device mesh ('data', 'fsdp', 'tensor') and the shardings derived from it (docs/design.md 4).

One sharding path for every scale: `jax.jit` with `NamedSharding`s over an Auto-axis mesh.
Data parallelism is `mesh.shape = (-1, 1, 1)`, which is what `pmap` did.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from flax import nnx
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from optim import tree_paths

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 in `shape` by the remaining device count.

  Raises:
    ValueError: more than one -1, or the shape does not multiply to `num_devices`.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise ValueError(f'--config.mesh.shape={shape} must have 3 entries for {AXES}.')
  if shape.count(-1) > 1:
    raise ValueError(f'--config.mesh.shape={shape} has more than one -1; give at most one.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or num_devices % known:
      raise ValueError(
        f'--config.mesh.shape={shape} cannot fill {num_devices} devices: the fixed axes '
        f'({known}) must divide the device count.'
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
      f'--config.mesh.shape={shape} uses {math.prod(shape)} devices but {num_devices} are '
      f'available; make the product equal the device count (or use -1 for one axis).'
    )
  return shape


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the Auto-axis mesh of `config.mesh` over `devices` (default: all devices).

  Auto axes on purpose: `jax.make_mesh` defaults to Explicit axes in jax >= 0.12, which
  rejects GSPMD-style sharding constraints (docs/dependencies.md 3).
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # Fake CPU devices or odd counts: fall back to the plain order.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: the product of the 'data' and 'fsdp' axes."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_global_batch(global_batch_size: int, mesh: Mesh):
  """Raises ValueError if the global batch does not split evenly over the batch shards."""
  n = data_parallel_size(mesh)
  if global_batch_size % n or global_batch_size % jax.process_count():
    raise ValueError(
      f'--config.data.global_batch_size={global_batch_size} does not divide over the '
      f'{n} data-parallel devices (mesh data x fsdp) and {jax.process_count()} processes; '
      f'use a multiple of {math.lcm(n, jax.process_count())}.'
    )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process NumPy batches into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def jit(
  fn: Callable, mesh: Mesh, logical_axis_rules: Sequence[tuple[str, Any]], **jit_kwargs
) -> Callable:
  """`jax.jit(fn, **jit_kwargs)`, traced and run under `mesh` and the logical axis rules.

  The models' activation sharding constraints (`models.layers.constrain`) read the mesh and
  the rules from the context at trace time and are silently no-ops without them; a step
  jitted outside that context leaves XLA free to pick activation shardings, and on a
  (2, 2, 2) mesh it picked ones whose gather/scatter partitioning is wrong
  (benchmarks/repro/gather_grad_sharding.py, docs/design.md). Every compiled step of the
  trainer goes through here so the constraints always apply.

  Args:
    fn: the pure function to compile.
    mesh: the device mesh.
    logical_axis_rules: config.mesh.logical_axis_rules.
    **jit_kwargs: passed to jax.jit (in_shardings, out_shardings, donate_argnums, ...).

  Returns:
    A callable with fn's signature; its `.lower(*args)` lowers in the same context (for
    ahead-of-time compilation).
  """
  jitted = jax.jit(fn, **jit_kwargs)
  rules = tuple(tuple(r) for r in logical_axis_rules)

  def in_context(method):
    @functools.wraps(fn)
    def run(*args, **kwargs):
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return method(*args, **kwargs)

    return run

  call = in_context(jitted)
  call.lower = in_context(jitted.lower)
  return call


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """Shardings of the optimizer state: a parameter-shaped leaf (`optim.tree_paths.
  parameter_suffix`: Adam moments, momentum, EG gains) takes its parameter's sharding;
  everything else (counters, factored row/column statistics, scalars) is replicated."""
  key = lambda path: tuple(tree_paths.path_names(path))  # noqa: E731
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  shapes = {key(path): leaf.shape for path, leaf in flat_params}
  by_path = dict(zip((key(path) for path, _ in flat_params), jax.tree.leaves(param_shardings)))

  def pick(path, leaf):
    path = key(path)
    start = tree_paths.parameter_suffix(path, leaf.shape, shapes)
    return replicated(mesh) if start is None else by_path[path[start:]]

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def check_divisible(abstract_params, param_shardings):
  """Raises ValueError naming the first parameter whose shape the mesh does not divide."""
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings)
  ):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % parts:
        name = '/'.join(tree_paths.path_names(path))
        raise ValueError(
          f'parameter {name} has size {size} on dim {dim}, which mesh axes {axes} '
          f'({parts} devices) do not divide; change --config.mesh.shape or map that '
          f'logical axis to None in --config.mesh.logical_axis_rules.'
        )
