"""Metric sinks (console, `metrics.jsonl`, TensorBoard via tensorboardX) and MFU bookkeeping.

Only process 0 writes files; every process may log to the console.
"""

from __future__ import annotations

import json
import math
import logging as logging_std
import os
import platform
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
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
      '(pretrain/metrics.py); set --config.train.peak_flops_per_device',
      devices[0].device_kind,
    )
  return flops * len(devices)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


# A remote metrics.jsonl is rewritten whole at most this often (GCS allows about one write per
# second to an object, and re-uploading the file at every log line grows quadratically).
REMOTE_UPLOAD_SECONDS = 30.0


def is_remote(path: str) -> bool:
  """Whether `path` has a scheme (gs://, s3://): written through etils.epath, not `open`."""
  return '://' in str(path)


class MetricWriter:
  """Writes scalar metrics to `metrics.jsonl` and TensorBoard events under `workdir`.

  A local workdir gets each line appended. A remote one (gs://, no appends there) gets the
  whole file rewritten through `etils.epath` at most every REMOTE_UPLOAD_SECONDS and at close;
  a failed upload is a warning, never the end of the run.

  Args:
    workdir: run directory (local or gs://); events go to `<workdir>/tensorboard`.
    enabled: write files (True on process 0 only).
    tensorboard: also write TensorBoard events.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tb = None
    self._remote_lines = None
    if not enabled:
      return
    path = epath.Path(workdir) / 'metrics.jsonl'
    if is_remote(workdir):
      self._remote_path, self._uploaded = path, 0.0
      self._remote_lines = path.read_text().splitlines(True) if path.exists() else []
    else:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, scalars: Mapping[str, float]):
    """Appends one line {'step', 'split', 'time', **scalars} and the TensorBoard scalars."""
    if not self._enabled:
      return
    record = {'step': int(step), 'split': split, 'time': time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    line = json.dumps(record) + '\n'
    if self._remote_lines is not None:
      self._remote_lines.append(line)
      if time.time() - self._uploaded >= REMOTE_UPLOAD_SECONDS:
        self._upload()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f'{split}/{k}', float(v), int(step))
      self._tb.flush()

  def write_text(self, tag: str, text: str):
    if self._tb is not None:
      self._tb.add_text(tag, text, 0)

  def _upload(self):
    try:
      self._remote_path.write_text(''.join(self._remote_lines))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('could not write %s (%s); retrying at the next write', self._remote_path, e)
    self._uploaded = time.time()

  def close(self):
    if self._remote_lines is not None:
      self._upload()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
  """loss, accuracy and perplexity from summed metrics ({'loss_sum', 'correct_sum',
  'weight_sum'}; perplexity capped at exp(50))."""
  w = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / w
  return {
    'loss': loss,
    'accuracy': float(sums['correct_sum']) / w,
    'perplexity': math.exp(min(loss, 50.0)),
  }


def truncate_history(workdir: str, step: int) -> int:
  """Keeps `metrics.jsonl` honest on (re)start: lines past `step` (the restored step; 0 for a
  fresh start) came from a run whose checkpoints are gone or older, so they move to
  `metrics.dropped.jsonl` (appended, never deleted) with a warning. Torn lines (not a whole
  metrics record: a process killed while writing one) are dropped with a warning of their own;
  they hold no record to keep, and the next write would otherwise be glued onto them.

  Args:
    workdir: the run directory (local or gs://).
    step: the restored step (0 for a fresh start).

  Returns:
    The number of lines taken out of `metrics.jsonl` (moved or torn).
  """
  root = epath.Path(workdir)
  path = root / 'metrics.jsonl'
  if not path.exists():
    return 0
  lines = path.read_text().splitlines(True)
  keep, drop, torn = [], [], []
  for line in lines:
    try:
      later = int(json.loads(line)['step']) > step
    except (ValueError, KeyError, TypeError):
      torn.append(line)
      continue
    (drop if later else keep).append(line)
  if torn:
    logging.warning(
      '%s had %d torn line(s) (not a whole metrics record: a run was killed '
      'while writing it), e.g. %r; dropped them, the other lines are intact',
      path,
      len(torn),
      torn[-1].rstrip('\n')[:80],
    )
  if drop:
    logging.warning(
      '%s had %d line(s) past the restored step %d (written after that '
      'checkpoint by a run that was killed, or whose checkpoints are gone); moved '
      'them to metrics.dropped.jsonl',
      path,
      len(drop),
      step,
    )
    dropped = root / 'metrics.dropped.jsonl'
    before = dropped.read_text() if dropped.exists() else ''
    dropped.write_text(before + ''.join(l if l.endswith('\n') else l + '\n' for l in drop))
  unterminated = bool(keep) and not keep[-1].endswith('\n')
  if unterminated:  # killed just before its newline: the next line must not be glued on
    keep[-1] += '\n'
  if drop or torn or unterminated:
    tmp = root / 'metrics.jsonl.tmp'
    tmp.write_text(''.join(keep))
    tmp.replace(path)
  return len(drop) + len(torn)


def log_line(step: int, num_steps: int, scalars: Mapping[str, Any]) -> str:
  """One console line: 'step 100/600 | loss 5.123 | acc 0.210 | lr 1.2e-03 | ...'."""
  parts = [f'step {step}/{num_steps}']
  fmt = {
    'loss': '{:.4f}',
    'accuracy': '{:.4f}',
    'learning_rate': '{:.2e}',
    'grad_norm': '{:.3f}',
    'tokens_per_sec': '{:,.0f}',
    'mfu': '{:.1%}',
    'perplexity': '{:.2f}',
  }
  names = {'tokens_per_sec': 'tokens/s', 'learning_rate': 'lr', 'accuracy': 'acc'}
  for k, v in scalars.items():
    if k in fmt:
      parts.append(f'{names.get(k, k)} {fmt[k].format(v)}')
  return ' | '.join(parts)


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO records that orbax, grain and TFDS send through the shared 'absl' logger."""

  _NOISY = (
    f'{os.sep}orbax{os.sep}',
    f'{os.sep}grain{os.sep}',
    f'{os.sep}tensorflow_datasets{os.sep}',
    f'{os.sep}etils{os.sep}',
  )

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
      n in record.pathname for n in self._NOISY
    )


def quiet_library_logs():
  """Keeps the console to this suite's lines (library warnings still show)."""
  logging_std.getLogger('absl').addFilter(_LibraryInfoFilter())
