"""Ahead-of-time compilation of the sharded train step for a TPU topology, on any machine
(`python -m launch.aot`), as MaxText's `train_compile.py` does: will a preset fit, and how.

`jax.experimental.topologies.get_topology_desc` describes a TPU slice from libtpu alone (the
`tpu` extra; no TPU needed); the train step is lowered with abstract, sharded arguments on a
mesh of those devices and compiled by the TPU compiler; `memory_analysis()` gives the bytes
per device and `cost_analysis()` the FLOPs of one step.

A device is a chip, except on v4: libtpu describes a v4 slice with one device per TensorCore
(two per chip, each with half the chip's HBM), not the megacore device a v4 VM gives JAX, so
there memory is compared with half a chip's HBM (a conservative verdict: a megacore chip pools
both halves).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import objectives
import models
from pretrain import mesh as mesh_lib
from pretrain import metrics as metrics_lib
from pretrain import train

# Accelerator types (gcloud's names, and the short v5e-8 form) -> topology names for
# get_topology_desc, and each chip's HBM (Cloud TPU "System architecture" pages).
TOPOLOGIES = {
  'v4-8': 'v4:2x2x1',
  'v4-16': 'v4:2x2x2',
  'v4-32': 'v4:2x2x4',
  'v5e-8': 'v5e:2x4',
  'v5e-16': 'v5e:4x4',
  'v5e-32': 'v5e:4x8',
  'v5e-64': 'v5e:8x8',
  'v5litepod-8': 'v5e:2x4',
  'v5litepod-16': 'v5e:4x4',
  'v5litepod-32': 'v5e:4x8',
  'v5p-8': 'v5p:2x2x1',
  'v5p-16': 'v5p:2x2x2',
  'v6e-8': 'v6e:2x4',
  'v6e-16': 'v6e:4x4',
}
HBM_BYTES = {'v4': 32 * 2**30, 'v5e': 16 * 2**30, 'v5p': 95 * 2**30, 'v6e': 32 * 2**30}


class DoesNotFit(RuntimeError):
  """The TPU compiler refused the step outright: it needs more HBM than a device has."""


@dataclasses.dataclass
class AotReport:
  """What compiling one train step for a topology showed (bytes are per device).

  Attributes:
    topology: the accelerator type asked for; chips: chips in the slice; devices: JAX devices
      the step was compiled for (2 per chip on v4, one per TensorCore; else = chips).
    mesh: the resolved mesh shape {'data', 'fsdp', 'tensor'}.
    argument_bytes, output_bytes, temp_bytes, code_bytes: from memory_analysis().
    hbm_bytes: the HBM one device has (a chip's HBM / devices per chip).
    compiled_flops: cost_analysis()['flops'] (per device, as XLA counts it; 0 if absent).
    model_flops: the analytic model FLOPs of one step over the whole slice.
    tokens_per_step: global_batch_size * seq_len.
    peak_flops_per_chip: dense bf16 peak of one chip (pretrain/metrics.py table; 0 unknown).
  """

  topology: str
  chips: int
  devices: int
  mesh: dict[str, int]
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  compiled_flops: float
  model_flops: float
  tokens_per_step: int
  peak_flops_per_chip: float = 0.0

  @property
  def total_bytes(self) -> int:
    # Donated state: outputs alias the arguments, so they are not counted twice.
    return self.argument_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  def mfu_needed(self, tokens_per_sec: float) -> float:
    """The model FLOPs utilisation a throughput of `tokens_per_sec` would take (0: no peak)."""
    peak = self.peak_flops_per_chip * self.chips
    return self.model_flops * tokens_per_sec / self.tokens_per_step / peak if peak else 0.0


def quiet_libtpu(accelerator_type: str = 'v5litepod-8'):
  """Environment that keeps libtpu from looking for a TPU VM it is not on (set before the
  TPU backend starts; these variables only describe this process)."""
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator_type.replace('v5e-', 'v5litepod-'))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_WORKER_ID', '0')


def topology_name(accelerator_type: str) -> str:
  """'v5e-8' / 'v5litepod-8' -> 'v5e:2x4'; a name with ':' passes through.

  Raises:
    ValueError: an unknown accelerator type (lists the known ones).
  """
  if ':' in accelerator_type:
    return accelerator_type
  if accelerator_type not in TOPOLOGIES:
    raise ValueError(
      f'--topology={accelerator_type!r} is not known; use one of '
      f'{", ".join(TOPOLOGIES)} or a topology such as v5e:4x8.'
    )
  return TOPOLOGIES[accelerator_type]


def chips(accelerator_type: str) -> int:
  """Chips in a slice from its topology name ('v5e-8' -> 'v5e:2x4' -> 8; 'v4-8' -> 4).

  Raises:
    ValueError: an unknown accelerator type.
  """
  dims = topology_name(accelerator_type).split(':')[1].split('x')
  return int(np.prod([int(d) for d in dims]))


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one global batch as the pipeline makes it, split over the batch axes."""
  b, n = config.data.global_batch_size, config.data.seq_len
  sharding = mesh_lib.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {k: spec((b, n), jnp.int32) for k in ('inputs', 'segment_ids', 'positions')}
  if config.objective == 'mlm':
    p = objectives.max_predictions(n, config.data.mask_rate)
    batch.update(
      mlm_positions=spec((b, p), jnp.int32),
      mlm_targets=spec((b, p), jnp.int32),
      mlm_weights=spec((b, p), jnp.float32),
    )
  else:
    batch.update(targets=spec((b, n), jnp.int32), weights=spec((b, n), jnp.float32))
  return batch


def compile_train_step(config, accelerator_type: str) -> AotReport:
  """Compiles the train step of `config` for a TPU slice and reports its memory and FLOPs.

  Raises:
    ValueError: unknown topology, or a config the trainer refuses (mesh, batch, shapes).
    DoesNotFit: the compiler ran out of HBM while compiling (no memory figures exist then).
    RuntimeError: libtpu is missing (install the `tpu` extra).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  name = topology_name(accelerator_type)
  quiet_libtpu(accelerator_type)
  try:
    topology = topologies.get_topology_desc(platform='tpu', topology_name=name)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
      f'could not describe TPU topology {name} ({str(e).splitlines()[0]}); '
      f"install libtpu: pip install -e '.[tpu]'"
    ) from None
  devices = topology.devices
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  train.validate(config, mesh)
  run_setup = train.setup(config, mesh)
  step = train.jit_train_step(run_setup, config)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  with jax.set_mesh(mesh):
    lowered = step.lower(run_setup.abstract_state, abstract_batch(config, mesh), key)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler stops with RESOURCE_EXHAUSTED when even its best schedule overflows
      # HBM; that is a verdict, not a failure of this tool.
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise DoesNotFit(str(e).splitlines()[0]) from None
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  tokens = config.data.global_batch_size * config.data.seq_len
  predictions = (
    objectives.max_predictions(config.data.seq_len, config.data.mask_rate)
    if config.objective == 'mlm'
    else config.data.seq_len
  )
  family = name.split(':')[0]
  slice_chips = chips(accelerator_type)
  devices_per_chip = max(len(devices) // slice_chips, 1)
  return AotReport(
    topology=accelerator_type,
    chips=slice_chips,
    devices=len(devices),
    mesh=dict(mesh.shape),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    hbm_bytes=HBM_BYTES.get(family, 0) // devices_per_chip,
    compiled_flops=float(cost.get('flops', 0.0)),
    model_flops=models.flops_per_token(config, predictions) * tokens,
    tokens_per_step=tokens,
    peak_flops_per_chip=metrics_lib.peak_flops_per_device(devices[0].device_kind),
  )
