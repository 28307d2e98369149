"""The peak FLOP/s behind MFU: datasheet figures of TPU and GPU device kinds, and the
measured matmul rate of a CPU host (docs/design.md 10).
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import logging
import jax

# Dense bfloat16 peak FLOP/s of one JAX device, keyed by the exact `device.device_kind`.
# The strings are the ones jax reports (TPU: jax/_src/pallas/mosaic/tpu_info.py maps the same
# names to chip versions; GPU: the CUDA device name). Figures: Google Cloud TPU "System
# architecture" pages (per chip; v2 and v3 chips have two TensorCores, each its own device,
# so half the chip's figure), NVIDIA datasheets (tensor-core BF16 without sparsity, i.e. half
# the "with sparsity" figure; V100 has no bf16: its FP16 tensor-core figure).
PEAK_FLOPS_BY_DEVICE_KIND = {
  'TPU v2': 45e12 / 2,
  'TPU v3': 123e12 / 2,
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,
  'TPU v5e': 197e12,  # v5e
  'TPU v5': 459e12,
  'TPU v5p': 459e12,  # v5p
  'TPU v6 lite': 918e12,
  'TPU v6e': 918e12,  # v6e (Trillium)
  'NVIDIA H200': 989e12,  # H200 SXM
  'NVIDIA H200 NVL': 835e12,
  'NVIDIA H100 80GB HBM3': 989e12,  # H100 SXM
  'NVIDIA H100 PCIe': 756e12,
  'NVIDIA H100 NVL': 835e12,
  'NVIDIA A100-SXM4-40GB': 312e12,
  'NVIDIA A100-SXM4-80GB': 312e12,
  'NVIDIA A100-PCIE-40GB': 312e12,
  'NVIDIA A100 80GB PCIe': 312e12,
  'NVIDIA L40S': 362e12,
  'NVIDIA L4': 121e12,
  'Tesla V100-SXM2-16GB': 125e12,
  'Tesla V100-SXM2-32GB': 125e12,
  'Tesla V100-PCIE-16GB': 112e12,
  'Tesla V100-PCIE-32GB': 112e12,
}


def peak_flops_per_device(device_kind: str) -> float:
  """The dense bf16 peak FLOP/s of one device of `device_kind` (exact match), or 0.0 if the
  table does not know it (no substring guessing: 'NVIDIA L40S' is not an 'L4')."""
  return PEAK_FLOPS_BY_DEVICE_KIND.get(device_kind.strip(), 0.0)


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def matmul_peak_cache_path() -> str:
  """Where measured matmul peaks are cached: $XDG_CACHE_HOME (or ~/.cache)/encoder-pretrain/."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'encoder-pretrain', 'matmul_peak.json')


def measured_matmul_peak(dtype: str = 'float32', size: int = 2048, refresh: bool = False) -> float:
  """FLOP/s of a large jitted [size, size] x [size, size] matmul on this process's first device.

  The best of 5 timed runs of 4 chained matmuls (2 size^3 FLOPs each), after compilation. On
  CPU this is the rate of all cores together (XLA's CPU matmuls use every core), the realistic
  ceiling for MFU there (docs/design.md 10). The result is cached in
  `matmul_peak_cache_path()` keyed by platform, processor, core count, jax version, dtype and
  size, so a run measures it once per machine (about a second); `refresh` measures again and
  keeps the higher of the two (a measurement on a busy machine is low, never high).

  Args:
    dtype: a jnp dtype name ('float32', 'bfloat16').
    size: the matrix side (2048: large enough to reach the CPU's peak, 64 MiB in float32).

  Returns:
    FLOP/s (float).
  """
  # This process's own device: jax.devices()[0] belongs to process 0, and on any other process
  # the matmul would run there (or nowhere) and time nothing.
  device = jax.local_devices()[0]
  key = '|'.join(
    [
      device.platform,
      device.device_kind,
      _cpu_model(),
      str(os.cpu_count()),
      jax.__version__,
      dtype,
      str(size),
    ]
  )
  path = matmul_peak_cache_path()
  cache = {}
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    pass
  if not refresh and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
    return float(cache[key])
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jax.device_put(jnp.ones((size, size), dtype) / size, device)

  @jax.jit
  def chain(x):
    for _ in range(4):  # x stays ~1/size-scaled: no overflow, no denormals
      x = x @ a
    return x

  jax.block_until_ready(chain(a))
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(chain(a))
    best = min(best, time.perf_counter() - start)
  # A machine busy with other work measures low, and a low peak inflates every MFU after it:
  # keep the best rate ever measured here, so a quiet re-measurement (refresh) corrects it.
  previous = cache.get(key)
  flops = max(
    4 * 2 * size**3 / best, float(previous) if isinstance(previous, (int, float)) else 0.0
  )
  cache[key] = flops
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(cache, f, indent=1)
    os.replace(tmp, path)
  except OSError as e:  # a read-only home only costs a re-measure next time
    logging.warning('could not cache the measured matmul peak in %s: %s', path, e)
  return flops


def peak_flops(configured: float = 0.0, dtype: str = 'float32') -> float:
  """Total peak FLOP/s of all devices of this job (MFU's denominator).

  Args:
    configured: per-device peak from config.train.peak_flops_per_device; 0 = look up.
    dtype: the compute dtype (config.model.dtype); used for the CPU measurement.

  Returns:
    Peak FLOP/s summed over all devices: the configured figure x devices; on CPU the measured
    `dtype` matmul rate of this host (however many fake devices share its cores) x processes;
    on TPU/GPU the dense bf16 table figure x devices. 0 if unknown (MFU is then not reported).
  """
  devices = jax.devices()
  if configured > 0:
    return configured * len(devices)
  if devices[0].platform == 'cpu':
    return measured_matmul_peak(dtype) * jax.process_count()
  flops = peak_flops_per_device(devices[0].device_kind)
  if not flops:
    logging.warning(
      'MFU not reported: device kind %r is not in the peak FLOP/s table '
      '(pretrain/peak.py); set --config.train.peak_flops_per_device',
      devices[0].device_kind,
    )
  return flops * len(devices)
