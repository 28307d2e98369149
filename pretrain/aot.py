"""Ahead-of-time compilation of the sharded train step for a TPU topology, on any machine
(`python -m launch.aot`), as MaxText's `train_compile.py` does: will a preset fit, and how.

`jax.experimental.topologies.get_topology_desc` describes a TPU slice from libtpu alone (the
`tpu` extra; no TPU needed); the train step is lowered with abstract, sharded arguments on a
mesh of those devices and compiled by the TPU compiler; `memory_analysis()` gives the bytes
per device and `cost_analysis()` the FLOPs of one step.

Several slices joined by the data-centre network (multi-slice) are written `2xv5e-16`:
`get_topology_desc(num_slices=2)` describes them, and the mesh is the hybrid one of
`pretrain.mesh.device_order` ('data' split across the slices first; docs/design.md 13).

A device is a chip, except on v4: libtpu describes a v4 slice with one device per TensorCore
(two per chip, each with half the chip's HBM), not the megacore device a v4 VM gives JAX, so
there memory is compared with half a chip's HBM (a conservative verdict: a megacore chip pools
both halves).

Roofline (`layer_corrected_cost`, `roofline`; docs/tpu_fit.md): XLA's `cost_analysis()` counts
the body of a while loop once, whatever its trip count, so the scanned layer stack
(`model.scan_layers`) is counted as one layer. The exact per-step cost is taken instead from two
small compiles of the same step with the layers unrolled (`scan_layers=False`) at 1 and 2
layers: every layer is the same computation, so cost(L) = cost(1) + (L - 1) * (cost(2) -
cost(1)) exactly (checked against a full unrolled compile in tests/test_roofline.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import objectives
import models
from pretrain import mesh as mesh_lib
from pretrain import peak
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


@dataclasses.dataclass(frozen=True)
class Chip:
  """Datasheet figures of one TPU chip: peak dense bf16 FLOP/s and HBM bandwidth in bytes/s
  (both per chip; a v4 chip's two TensorCores share them), and the page they come from."""

  name: str
  peak_flops: float
  hbm_bytes_per_s: float
  source: str

  @property
  def ridge_point(self) -> float:
    """FLOPs per byte of HBM traffic above which a step is compute-bound on this chip."""
    return self.peak_flops / self.hbm_bytes_per_s


# Cloud TPU "System architecture" tables (per chip; GBps = 1e9 bytes/s):
#   v4:  275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps  https://cloud.google.com/tpu/docs/v4
#   v5e: 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps    https://cloud.google.com/tpu/docs/v5e
#   v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps  https://cloud.google.com/tpu/docs/v5p
#   v6e: 918 TFLOPs bf16, 32 GB HBM at 1638 GBps    https://cloud.google.com/tpu/docs/v6e
CHIPS = {
  'v4': Chip('v4', 275e12, 1200e9, 'https://cloud.google.com/tpu/docs/v4'),
  'v5e': Chip('v5e', 197e12, 819e9, 'https://cloud.google.com/tpu/docs/v5e'),
  'v5p': Chip('v5p', 459e12, 2765e9, 'https://cloud.google.com/tpu/docs/v5p'),
  'v6e': Chip('v6e', 918e12, 1638e9, 'https://cloud.google.com/tpu/docs/v6e'),
}


class DoesNotFit(RuntimeError):
  """The TPU compiler refused the step outright: it needs more HBM than a device has."""


@dataclasses.dataclass
class AotReport:
  """What compiling one train step for a topology showed (bytes are per device).

  Attributes:
    topology: the accelerator type asked for (`2xv5e-16` for two slices); chips: chips in all
      its slices; devices: JAX devices the step was compiled for (2 per chip on v4, one per
      TensorCore; else = chips).
    mesh: the resolved mesh shape {'data', 'fsdp', 'tensor'}.
    argument_bytes, output_bytes, temp_bytes, code_bytes: from memory_analysis().
    hbm_bytes: the HBM one device has (a chip's HBM / devices per chip).
    compiled_flops: cost_analysis()['flops'] (per device, as XLA counts it; 0 if absent).
    model_flops: the analytic model FLOPs of one step over the whole slice.
    tokens_per_step: global_batch_size * seq_len.
    peak_flops_per_chip: dense bf16 peak of one chip (pretrain/peak.py table; 0 unknown).
    slices: TPU slices joined by the data-centre network.
    cost: the step's FLOPs and HBM bytes per device with every layer counted
      (`layer_corrected_cost`); None unless compile_train_step(..., roofline=True).
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
  slices: int = 1
  cost: StepCost | None = None

  @property
  def chip(self) -> str:
    """The chip generation ('v5e', ...) of the topology."""
    return topology_name(self.topology).split(':')[0]

  @property
  def devices_per_chip(self) -> int:
    return max(self.devices // self.chips, 1)

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


def split_slices(topology: str) -> tuple[int, str]:
  """'2xv5e-16' -> (2, 'v5e-16'); a single slice ('v5e-16', 'v5e:4x4') -> (1, topology).

  Raises:
    ValueError: a slice count below 1.
  """
  match = re.fullmatch(r'(\d+)x(v.+)', topology)
  if not match:
    return 1, topology
  if int(match[1]) < 1:
    raise ValueError(f'--topology={topology}: the number of slices must be >= 1.')
  return int(match[1]), match[2]


def quiet_libtpu(accelerator_type: str = 'v5litepod-8'):
  """Environment that keeps libtpu from looking for a TPU VM it is not on (set before the
  TPU backend starts; these variables only describe this process)."""
  accelerator_type = split_slices(accelerator_type)[1]
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator_type.replace('v5e-', 'v5litepod-'))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_WORKER_ID', '0')


def topology_name(accelerator_type: str) -> str:
  """'v5e-8' / 'v5litepod-8' -> 'v5e:2x4'; a name with ':' passes through; of several slices
  ('2xv5e-16'), one slice's.

  Raises:
    ValueError: an unknown accelerator type (lists the known ones).
  """
  accelerator_type = split_slices(accelerator_type)[1]
  if ':' in accelerator_type:
    return accelerator_type
  if accelerator_type not in TOPOLOGIES:
    raise ValueError(
      f'--topology={accelerator_type!r} is not known; use one of '
      f'{", ".join(TOPOLOGIES)} or a topology such as v5e:4x8.'
    )
  return TOPOLOGIES[accelerator_type]


def chips(accelerator_type: str) -> int:
  """Chips in all slices from the topology name ('v5e-8' -> 'v5e:2x4' -> 8; 'v4-8' -> 4;
  '2xv5e-16' -> 32).

  Raises:
    ValueError: an unknown accelerator type.
  """
  dims = topology_name(accelerator_type).split(':')[1].split('x')
  return split_slices(accelerator_type)[0] * int(np.prod([int(d) for d in dims]))


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


def topology_devices(accelerator_type: str) -> list:
  """The abstract TPU devices of a slice, or several ('2xv5e-16'), described by libtpu alone.

  Raises:
    ValueError: unknown topology.
    RuntimeError: libtpu is missing (install the `tpu` extra).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  name = topology_name(accelerator_type)
  num_slices = split_slices(accelerator_type)[0]
  quiet_libtpu(accelerator_type)
  # num_slices only when > 1: the one-slice call stays the one every libtpu accepts.
  slices_kwarg = {'num_slices': num_slices} if num_slices > 1 else {}
  try:
    topology = topologies.get_topology_desc(platform='tpu', topology_name=name, **slices_kwarg)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
      f'could not describe TPU topology {name} ({str(e).splitlines()[0]}); '
      f"install libtpu: pip install -e '.[tpu]'"
    ) from None
  return topology.devices


def compile_step(config, devices: Sequence):
  """Lowers and compiles the train step of `config` with abstract, sharded arguments on a mesh
  of `devices` (abstract TPU devices from `topology_devices`, or real ones such as CPUs); returns
  the `jax.stages.Compiled`.

  Raises:
    ValueError: a config the trainer refuses (mesh, batch, shapes).
    DoesNotFit: the compiler ran out of HBM while compiling (no memory figures exist then).
  """
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  train.validate(config, mesh)
  run_setup = train.setup(config, mesh)
  step = train.jit_train_step(run_setup, config)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  with jax.set_mesh(mesh):
    lowered = step.lower(run_setup.abstract_state, abstract_batch(config, mesh), key)
    try:
      return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler stops with RESOURCE_EXHAUSTED when even its best schedule overflows
      # HBM; that is a verdict, not a failure of this tool.
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise DoesNotFit(str(e).splitlines()[0]) from None


def compile_train_step(config, accelerator_type: str, roofline: bool = False) -> AotReport:
  """Compiles the train step of `config` for a TPU slice, or several joined by the data-centre
  network ('2xv5e-16'), and reports its memory and FLOPs; with `roofline`, also the step's
  layer-corrected FLOPs and HBM bytes (`layer_corrected_cost`: two more, smaller compiles).

  Raises:
    ValueError: unknown topology, or a config the trainer refuses (mesh, batch, shapes).
    DoesNotFit: the compiler ran out of HBM while compiling (no memory figures exist then).
    RuntimeError: libtpu is missing (install the `tpu` extra).
  """
  devices = topology_devices(accelerator_type)
  compiled = compile_step(config, devices)
  memory = compiled.memory_analysis()
  flops, _ = step_cost(compiled)
  tokens = config.data.global_batch_size * config.data.seq_len
  family = topology_name(accelerator_type).split(':')[0]
  slice_chips = chips(accelerator_type)
  devices_per_chip = max(len(devices) // slice_chips, 1)
  return AotReport(
    topology=accelerator_type,
    chips=slice_chips,
    devices=len(devices),
    mesh=dict(mesh_lib.make_mesh(config.mesh, devices).shape),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    hbm_bytes=HBM_BYTES.get(family, 0) // devices_per_chip,
    compiled_flops=flops,
    model_flops=model_flops_per_step(config),
    tokens_per_step=tokens,
    peak_flops_per_chip=peak.peak_flops_per_device(devices[0].device_kind),
    slices=split_slices(accelerator_type)[0],
    cost=layer_corrected_cost(config, devices) if roofline else None,
  )


def model_flops_per_step(config) -> float:
  """The analytic model FLOPs of one train step over the whole slice (models.flops_per_token:
  6 x matmul parameters per token plus attention, for the positions the loss reads)."""
  predictions = (
    objectives.max_predictions(config.data.seq_len, config.data.mask_rate)
    if config.objective == 'mlm'
    else config.data.seq_len
  )
  tokens = config.data.global_batch_size * config.data.seq_len
  return models.flops_per_token(config, predictions) * tokens


# ----------------------------------------------------------------------------- roofline


@dataclasses.dataclass(frozen=True)
class StepCost:
  """One train step's work on one device: `flops` (FLOPs) and `bytes_accessed` (bytes of HBM
  traffic as XLA's cost analysis models it: every top-level HLO op's operands read and results
  written, so reuse inside a fusion or a kernel is free, and prefetches into on-chip memory
  count). `kernel_flops` (part of `flops`): the analytic FLOPs of the Pallas splash-attention
  kernel, which XLA's count does not see into (0 when the step has no such kernel)."""

  flops: float
  bytes_accessed: float
  kernel_flops: float = 0.0

  @property
  def intensity(self) -> float:
    """Arithmetic intensity, FLOPs per byte."""
    return self.flops / self.bytes_accessed if self.bytes_accessed else float('inf')


def step_cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device of a compiled program, as `cost_analysis()` gives them
  (0.0 where absent). A while loop's body (a scanned layer stack) is counted once, and a Pallas
  kernel (a custom call) adds no FLOPs."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def _has_splash_kernel(compiled) -> bool:
  try:
    return 'splash_mha' in compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return False


def splash_kernel_flops(config, devices: int) -> float:
  """Analytic FLOPs of one layer's attention core (Q K^T and A V: 4 n x heads x head_dim per
  token forward, x3 for training, models/flops.py's convention) over the step, per device."""
  m, d = config.model, config.data
  inner = m.num_heads * (m.head_dim or m.hidden_size // m.num_heads)
  return 3 * 4 * d.seq_len * inner * d.global_batch_size * d.seq_len / devices


def layer_corrected_cost(config, devices: Sequence, compile_fn: Callable | None = None) -> StepCost:
  """The train step's FLOPs and HBM bytes per device with every layer counted.

  `cost_analysis()` counts a while loop's body once (tests/test_roofline.py shows it: a scanned
  step costs the same at 2 and 4 layers), so the compiled step of a scanned model is counted as
  one layer. Here the step is compiled twice more with the layers unrolled
  (`model.scan_layers=False`, no loop left) at 1 and 2 layers; the layers are identical, so the
  cost is affine in the layer count, and cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)) is
  exact for FLOPs (per layer: forward, backward, any remat recompute and its optimizer update)
  and for bytes up to the compiler's fusion choices at layer boundaries. Only the layer count
  and the loop change; mesh, batch, dtype, remat and optimizer are the config's. A step with
  gradient accumulation is one micro-batch (optax.MultiSteps), as the real step is.

  XLA counts no FLOPs inside a Pallas kernel: where the step runs the splash-attention kernel
  (attention_impl 'auto' on TPU), its analytic FLOPs (`splash_kernel_flops`, per layer) are
  added; its bytes are its operands and results, which is what it moves through HBM.

  Args:
    config: the run's config (not modified).
    devices: the devices to compile for (`topology_devices(...)`, or CPU devices in tests).
    compile_fn: `(config, devices) -> compiled` (default `compile_step`).

  Returns:
    StepCost: FLOPs and bytes of one step, per device.
  """
  compile_fn = compile_fn or compile_step
  costs, kernel = [], False
  for layers in (1, 2):
    c = config.copy_and_resolve_references()
    c.model.num_layers, c.model.scan_layers = layers, False
    compiled = compile_fn(c, devices)
    costs.append(np.array(step_cost(compiled)))
    kernel = kernel or _has_splash_kernel(compiled)
  per_layer = costs[1] - costs[0]
  flops, bytes_accessed = costs[0] + (config.model.num_layers - 1) * per_layer
  kernel_flops = (
    config.model.num_layers * splash_kernel_flops(config, len(devices)) if kernel else 0.0
  )
  return StepCost(float(flops + kernel_flops), float(bytes_accessed), float(kernel_flops))


@dataclasses.dataclass(frozen=True)
class Roofline:
  """The roofline bound of one step on one device of a chip (seconds, FLOPs per byte).

  Attributes:
    chip: the Chip whose figures were used.
    cost: the step's FLOPs and bytes per device.
    intensity: cost.flops / cost.bytes_accessed, FLOPs per byte.
    ridge_point: the chip's peak FLOP/s / HBM bytes/s, FLOPs per byte.
    compute_s: cost.flops / the device's peak FLOP/s.
    memory_s: cost.bytes_accessed / the device's HBM bytes/s.
    bound_s: max(compute_s, memory_s), the least time the step can take as far as XLA's counts
      are right (perfect overlap, no communication or launch overhead: a lower bound).
    mfu: model FLOPs per device / (bound_s x the device's peak): the best MFU the step allows
      (below 1 when compute-bound too, by XLA FLOPs over model FLOPs, e.g. remat recompute).
    memory_bound: intensity < ridge_point.
  """

  chip: Chip
  cost: StepCost
  intensity: float
  ridge_point: float
  compute_s: float
  memory_s: float
  bound_s: float
  mfu: float
  memory_bound: bool


def roofline(
  cost: StepCost, chip: str | Chip, model_flops: float = 0.0, devices_per_chip: int = 1
) -> Roofline:
  """The roofline bound of a step: max(FLOPs / peak, bytes / bandwidth).

  Args:
    cost: FLOPs and HBM bytes of one step on one device (`layer_corrected_cost`).
    chip: 'v4', 'v5e', 'v5p', 'v6e' (CHIPS) or a Chip.
    model_flops: analytic model FLOPs of the step on one device (for the MFU; 0: mfu 0).
    devices_per_chip: JAX devices per chip in the compile (2 on v4 as libtpu describes it,
      each with half the chip's peak and bandwidth; else 1).

  Returns:
    Roofline (seconds per step, FLOPs per byte, MFU as a fraction).

  Raises:
    ValueError: an unknown chip name.
  """
  if isinstance(chip, str):
    if chip not in CHIPS:
      raise ValueError(f'unknown chip {chip!r}; use one of {", ".join(CHIPS)}')
    chip = CHIPS[chip]
  peak = chip.peak_flops / devices_per_chip
  bandwidth = chip.hbm_bytes_per_s / devices_per_chip
  compute_s, memory_s = cost.flops / peak, cost.bytes_accessed / bandwidth
  bound_s = max(compute_s, memory_s)
  return Roofline(
    chip=chip,
    cost=cost,
    intensity=cost.intensity,
    ridge_point=chip.ridge_point,
    compute_s=compute_s,
    memory_s=memory_s,
    bound_s=bound_s,
    mfu=model_flops / (bound_s * peak) if bound_s else 0.0,
    memory_bound=cost.intensity < chip.ridge_point,
  )


def lever(bound: Roofline, config, devices: int) -> str:
  """What would raise the intensity of a memory-bound step toward the chip's ridge point ('' when
  the step is compute-bound): the config's levers that apply, most effective first.

  Bytes per step are a per-step part (parameters, gradients and AdamW state read and written
  once) plus a per-token part (activations through every element-wise pass); FLOPs are per
  token. A bigger per-device batch amortises only the first (for roformer:base on v5e-8 the
  per-token part is ~85% of the bytes, so batch is named only below 4096 tokens per device);
  bfloat16 activations cut the second (roformer:small: 7.2 -> 4.5 GB per step); remat
  recomputes forward passes, re-reading their inputs (base: 102, 115, 123 GB per step with
  remat none, dots_with_no_batch_dims, full); width raises FLOPs per activation byte (a matmul
  does ~d FLOPs per element it reads). Figures: docs/tpu_fit.md, Roofline.
  """
  if not bound.memory_bound:
    return ''
  m, d = config.model, config.data
  rows = max(d.global_batch_size // max(devices, 1), 1)
  levers = []
  if m.dtype != 'bfloat16':
    levers.append('bfloat16 activations (model.dtype)')
  if m.remat_policy == 'full':
    levers.append('less remat than full')
  elif m.remat_policy not in ('', 'none'):
    levers.append(f'remat none if it fits (now {m.remat_policy})')
  if rows * d.seq_len < 4096:
    levers.append(f'bigger per-device batch (now {rows} x {d.seq_len})')
  if m.hidden_size < 2048:
    levers.append(f'wider layers (d = {m.hidden_size})')
  return '; '.join(levers) or 'fewer element-wise passes per token (fusion)'
