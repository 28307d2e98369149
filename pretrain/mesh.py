"""The device mesh ('data', 'fsdp', 'tensor'), the shardings derived from it (docs/design.md 4),
and which rows of every batch each process supplies (docs/design.md 13).

One sharding path for every scale: `jax.jit` with `NamedSharding`s over an Auto-axis mesh.
Data parallelism is `mesh.shape = (-1, 1, 1)`, which is what `pmap` did.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

from absl import logging
from flax import nnx
import jax
from jax.experimental import mesh_utils
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


def _platform(devices: Sequence[jax.Device]) -> str:
  """The devices' platform: 'cpu', 'gpu' or 'tpu' (a function, so tests can pretend)."""
  return devices[0].platform


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices (joined by the data-centre network) the devices span; 1 off TPU."""
  if _platform(devices) != 'tpu':
    return 1
  return len({getattr(d, 'slice_index', 0) for d in devices})


def device_order(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """`devices` arranged as a mesh of `shape`, following the physical topology where there is one.

  `mesh_utils.create_device_mesh` puts the last axis ('tensor', the busiest) on the fastest
  links of a TPU torus. When it cannot map the shape without splitting a physical axis it
  raises; we ask again allowing the split, and log a warning. Only on CPU, which has no
  topology, does a failure fall back to the plain device order (logged): on a TPU slice the
  plain order can put the busiest axis on the slowest links, so there the error propagates.

  Devices of several TPU slices (multi-slice) form a hybrid mesh
  (`mesh_utils.create_hybrid_device_mesh`): 'data' is split first across the slices, over
  the data-centre network, which carries only the gradient all-reduce; each slice holds
  data / slices x fsdp x tensor devices on its own interconnect (docs/design.md 13).

  Args:
    shape: the resolved mesh shape; its product is len(devices).
    devices: the devices of the mesh.

  Returns:
    An object array of the devices with shape `shape`.

  Raises:
    ValueError: the shape cannot be laid out on the devices' topology (not on CPU), or, on
      several slices, its data axis is not a multiple of the number of slices.
  """
  shape, devices = tuple(shape), list(devices)
  slices = num_slices(devices)
  if slices > 1:
    if shape[0] % slices:
      raise ValueError(
        f'--config.mesh.shape={shape} runs on {slices} TPU slices, which only the data axis '
        f'may span (their network is too slow for fsdp or tensor); make the data axis a '
        f'multiple of {slices}, e.g. ({slices * max(shape[0] // slices, 1)}, ...) with the '
        f"other axes dividing one slice's {len(devices) // slices} chips."
      )
    per_slice, across = (shape[0] // slices, *shape[1:]), (slices, 1, 1)
    build = lambda split: mesh_utils.create_hybrid_device_mesh(  # noqa: E731
      per_slice, across, devices, allow_split_physical_axes=split
    )
  else:
    build = lambda split: mesh_utils.create_device_mesh(  # noqa: E731
      shape, devices, allow_split_physical_axes=split
    )
  if any(getattr(d, 'core_on_chip', 0) for d in devices):
    # One device per TensorCore: how libtpu describes a v4 topology for an ahead-of-time
    # compile (a v4 VM gives JAX one megacore device per chip). create_device_mesh refuses
    # such devices; they come slice by slice, chip by chip, so the plain order keeps the
    # slices whole on the data axis (checked above) and a chip's two cores side by side.
    logging.info('mesh %s in plain device order: one device per TensorCore', shape)
    return np.asarray(devices).reshape(shape)
  try:
    return build(False)
  except (ValueError, NotImplementedError, AssertionError) as e:
    if _platform(devices) == 'cpu':
      logging.info('mesh %s in plain device order (create_device_mesh: %s)', shape, e)
      return np.asarray(devices).reshape(shape)
    unsplit_error = e
  try:
    device_array = build(True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    raise ValueError(
      f'--config.mesh.shape={shape} cannot be laid out on the topology of the {len(devices)} '
      f'{_platform(devices)} devices ({devices[0].device_kind}, {slices} slice(s)): '
      f'{unsplit_error}; with split physical axes: {e}. Choose axis sizes that multiply from '
      f'the physical axes of the slice (powers of two on a TPU torus).'
    ) from e
  logging.warning(
    'mesh %s splits a physical axis of the %s topology (%s); collectives along the split '
    'mesh axis use fewer links.',
    shape,
    devices[0].device_kind,
    unsplit_error,
  )
  return device_array


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the Auto-axis mesh of `config.mesh` over `devices` (default: all devices).

  The device order follows the topology (`device_order`). Auto axes on purpose:
  `jax.make_mesh` defaults to Explicit axes in jax >= 0.12, which rejects GSPMD-style sharding
  constraints (docs/dependencies.md 3).

  Raises:
    ValueError: the shape does not fit the devices or their topology.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mesh_config.shape, len(devices))
  return Mesh(device_order(shape, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: the product of the 'data' and 'fsdp' axes."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class BatchFeed:
  """Which rows of every global batch one process supplies (docs/design.md 13).

  The batch splits over ('data', 'fsdp') into `num_shards` equal blocks of rows; block
  k = data index * fsdp size + fsdp index. A process supplies the blocks its devices address.
  When another axis ('tensor') spans processes, several processes address the same blocks:
  they form one feed group and must supply identical rows, so they read the same data.

  Attributes:
    index: this process's feed group, in [0, count): the data shard it reads
      (`pipeline.make_dataset(process_index=index, process_count=count)`).
    count: the number of feed groups; each supplies global_batch_size / count rows.
    shards: the blocks this process's devices address, ascending; its local batch holds their
      rows in this order.
    num_shards: the number of blocks, data x fsdp.
  """

  index: int
  count: int
  shards: tuple[int, ...]
  num_shards: int

  def rows(self, global_batch_size: int) -> np.ndarray:
    """The global row indices this process supplies, in the order of its local batch.

    Returns:
      int64 [global_batch_size / count], ascending.

    Raises:
      ValueError: global_batch_size does not divide over the blocks.
    """
    if global_batch_size % self.num_shards:
      raise ValueError(
        f'--config.data.global_batch_size={global_batch_size} does not divide over the '
        f'{self.num_shards} batch shards (mesh data x fsdp); use a multiple of '
        f'{self.num_shards}.'
      )
    per = global_batch_size // self.num_shards
    return np.concatenate([np.arange(k * per, (k + 1) * per) for k in self.shards])


def feed_groups(block: np.ndarray, process: np.ndarray) -> list[tuple[int, ...]]:
  """The feed groups of a mesh: the distinct sets of batch blocks that processes address.

  A mesh can be fed when every process addresses as many blocks as every other, and two
  processes address either the same blocks or disjoint ones. Otherwise a process would have
  to supply rows that only partly coincide with another's, which per-process loading cannot
  do; `jax.make_array_from_process_local_data` calls such a sharding non-uniform.

  Args:
    block: int [num_devices], the batch block of each device of the mesh.
    process: int [num_devices], the process index of each device.

  Returns:
    The groups ordered by their first block, each an ascending tuple of blocks; group i is
    feed index i.

  Raises:
    ValueError: the mesh cannot be fed (naming --config.mesh.shape and the fix).
  """
  by_process: dict[int, set[int]] = {}
  for k, p in zip(np.ravel(block).tolist(), np.ravel(process).tolist()):
    by_process.setdefault(p, set()).add(k)
  groups = sorted({tuple(sorted(b)) for b in by_process.values()})
  num_blocks = len(set(np.ravel(block).tolist()))
  if sum(len(g) for g in groups) != num_blocks or len({len(g) for g in groups}) > 1:
    listing = '; '.join(f'process {p}: {sorted(b)}' for p, b in sorted(by_process.items()))
    raise ValueError(
      f'--config.mesh.shape cannot be fed: processes address overlapping but different sets '
      f'of batch shards ({listing}), so no process can load its rows on its own. Choose a '
      f'shape whose tensor axis stays within one host or spans whole hosts (a divisor or a '
      f'multiple of the devices per host).'
    )
  return groups


@functools.lru_cache(maxsize=64)
def _batch_feed(mesh: Mesh, process_index: int) -> BatchFeed:
  positions = np.indices(mesh.devices.shape)
  block = positions[AXES.index('data')] * mesh.shape['fsdp'] + positions[AXES.index('fsdp')]
  process = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  groups = feed_groups(block, process)
  mine = set(np.ravel(block[process == process_index]).tolist())
  if not mine:
    raise ValueError(
      f'process {process_index} has no device in the mesh {dict(mesh.shape)}; build the mesh '
      f"over every process's devices (--config.mesh.shape with -1 for one axis)."
    )
  index = next(i for i, g in enumerate(groups) if set(g) == mine)
  return BatchFeed(index, len(groups), groups[index], data_parallel_size(mesh))


def batch_feed(mesh: Mesh) -> BatchFeed:
  """Which rows of every global batch this process supplies (`BatchFeed`; cached per mesh).

  Raises:
    ValueError: the mesh cannot be fed (`feed_groups`), or this process has no device in it.
  """
  return _batch_feed(mesh, jax.process_index())


def local_rows(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
  """This process's rows of a global batch that every process holds whole (fine-tuning, the
  probe): those of the batch blocks its devices address (`batch_feed`), ready for
  `global_batch`. Processes of one feed group get the same rows.

  Args:
    batch: the global batch, arrays [b, ...], the same in every process.
    mesh: the device mesh.

  Returns:
    The arrays [b / feed count, ...] at `batch_feed(mesh).rows(b)` (`batch` itself when one
    group feeds everything).
  """
  feed = batch_feed(mesh)
  if feed.count == 1:
    return batch
  rows = feed.rows(len(next(iter(batch.values()))))
  return {k: v[rows] for k, v in batch.items()}


def check_global_batch(global_batch_size: int, mesh: Mesh):
  """Raises ValueError if the global batch does not split evenly over the batch shards, or if
  the processes cannot feed the mesh (`batch_feed`)."""
  n = data_parallel_size(mesh)
  if global_batch_size % n:
    raise ValueError(
      f'--config.data.global_batch_size={global_batch_size} does not divide over the '
      f'{n} data-parallel devices (mesh data x fsdp); use a multiple of {n}.'
    )
  batch_feed(mesh)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the processes' NumPy batches into global arrays sharded over the batch axes.

  Args:
    local_batch: this process's rows (`batch_feed(mesh).rows`), each array [b / count, ...];
      processes in one feed group pass identical arrays.
    mesh: the device mesh.

  Returns:
    The same keys as jax.Arrays [b, ...] with `batch_sharding(mesh)`.

  Raises:
    ValueError: an array's rows do not match the blocks this process addresses.
  """
  sharding, count = batch_sharding(mesh), batch_feed(mesh).count
  # The global shape is explicit: inferred, it would count processes, not feed groups, and
  # come out wrong (half, on 2 processes) when 'tensor' spans them.
  return {
    k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count, *v.shape[1:]))
    for k, v in local_batch.items()
  }


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
