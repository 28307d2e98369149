"""Roofline of the train step (pretrain/aot.py): XLA's cost analysis counts a scanned layer
stack once, `layer_corrected_cost` counts every layer (exactly: it equals a full unrolled
compile), and the bound math on fixed numbers. CPU compiles of a small model; the libtpu AOT
check is slow."""

import jax
import pytest

from pretrain import aot
from tests import helpers

# Tolerance of XLA's FLOPs against the analytic matmul count (models/flops.py, 6 x parameters x
# tokens plus attention): XLA also counts element-wise work (norms, softmax, GELU, the loss,
# AdamW's update), which models/flops.py leaves out; at d = 128 it is a few percent.
ANALYTIC_RTOL = 0.10


def small_config(num_layers: int, scan_layers: bool = True):
  config = helpers.tiny_config('roformer:tiny', 'mlm')
  m = config.model
  m.hidden_size, m.num_heads, m.mlp_dim, m.num_layers = 128, 2, 512, num_layers
  # A real loop even on CPU (as on TPU), where model.scan_unroll=0 would unroll it.
  m.scan_layers, m.scan_unroll = scan_layers, 1
  return config


@pytest.fixture(scope='module')
def cpu():
  return jax.devices('cpu')[:1]


_COMPILED = {}


def cached_compile(config, devices):
  """aot.compile_step, once per config (the 2- and 4-layer corrections share their compiles)."""
  key = (config.to_json(), tuple(devices))
  if key not in _COMPILED:
    _COMPILED[key] = aot.compile_step(config, devices)
  return _COMPILED[key]


def compiled_flops(config, devices) -> float:
  return aot.step_cost(aot.compile_step(config, devices))[0]


def test_cost_analysis_counts_a_scanned_layer_stack_once(cpu):
  # The reason for the correction: 2 and 4 scanned layers cost XLA almost the same FLOPs (only
  # AdamW's element-wise update of the stacked [L, ...] parameters, outside the loop, grows),
  # far below the analytic count of 4 layers.
  two, four = compiled_flops(small_config(2), cpu), compiled_flops(small_config(4), cpu)
  assert 1.0 < four / two < 1.1
  assert four < 0.6 * aot.model_flops_per_step(small_config(4))


def test_layer_corrected_cost_counts_every_layer(cpu):
  two = aot.layer_corrected_cost(small_config(2), cpu, cached_compile)
  four = aot.layer_corrected_cost(small_config(4), cpu, cached_compile)
  print(f'2 layers: {two}, 4 layers: {four}')
  # Exact: the 1- and 2-layer extrapolation equals the full unrolled 4-layer compile (to
  # the float32 rounding of the totals XLA reports).
  unrolled = aot.step_cost(aot.compile_step(small_config(4, scan_layers=False), cpu))
  assert four.flops == pytest.approx(unrolled[0], rel=1e-5)  # float32 sums in XLA
  assert four.bytes_accessed == pytest.approx(unrolled[1], rel=0.02)
  # Twice the layers, about twice the FLOPs (the embedding and MLM head do not grow), as the
  # analytic count says.
  analytic_two = aot.model_flops_per_step(small_config(2))
  analytic_four = aot.model_flops_per_step(small_config(4))
  assert 1.8 < four.flops / two.flops < 2.0
  assert four.flops / two.flops == pytest.approx(analytic_four / analytic_two, rel=0.02)
  assert two.flops == pytest.approx(analytic_two, rel=ANALYTIC_RTOL)
  assert four.flops == pytest.approx(analytic_four, rel=ANALYTIC_RTOL)
  assert four.bytes_accessed > two.bytes_accessed > 0


def test_roofline_bound_on_fixed_numbers():
  v5e = aot.CHIPS['v5e']
  assert v5e.ridge_point == pytest.approx(197e12 / 819e9)  # ~240 FLOPs per byte
  # Compute-bound: 197 TFLOPs over 409.5 GB takes 1 s of MXU time and 0.5 s of HBM time.
  r = aot.roofline(aot.StepCost(197e12, 409.5e9), 'v5e', model_flops=98.5e12)
  assert (r.compute_s, r.memory_s, r.bound_s) == pytest.approx((1.0, 0.5, 1.0))
  assert r.intensity == pytest.approx(481.07, rel=1e-4)
  assert not r.memory_bound
  assert r.mfu == pytest.approx(0.5)
  # Memory-bound: 8.19 GB at 819 GB/s is 10 ms; 197 GFLOPs is 1 ms.
  r = aot.roofline(aot.StepCost(197e9, 8.19e9), 'v5e', model_flops=197e9)
  assert (r.compute_s, r.memory_s, r.bound_s) == pytest.approx((1e-3, 1e-2, 1e-2))
  assert r.memory_bound and r.intensity == pytest.approx(24.05, rel=1e-3)
  assert r.mfu == pytest.approx(0.1)
  # v4 as libtpu describes it: a device is one TensorCore, half a chip's peak and bandwidth.
  r = aot.roofline(aot.StepCost(137.5e12, 0.6e12), 'v4', devices_per_chip=2)
  assert (r.compute_s, r.memory_s) == pytest.approx((1.0, 1.0))
  assert r.ridge_point == pytest.approx(275e12 / 1200e9)
  with pytest.raises(ValueError, match='unknown chip'):
    aot.roofline(aot.StepCost(1.0, 1.0), 'v9')


def test_lever_names_the_config_levers_only_when_memory_bound():
  config = small_config(2)
  slow = aot.roofline(aot.StepCost(1e9, 1e9), 'v5e')
  assert aot.lever(slow, config, devices=8) == (
    'bfloat16 activations (model.dtype); bigger per-device batch (now 1 x 32); '
    'wider layers (d = 128)'
  )
  fast = aot.roofline(aot.StepCost(1e15, 1e9), 'v5e')
  assert aot.lever(fast, config, devices=8) == ''


@pytest.mark.slow
def test_tpu_aot_layer_corrected_cost_matches_the_analytic_count():
  pytest.importorskip('libtpu')
  config = small_config(4)
  config.data.seq_len = 128  # a multiple of the splash kernel's block: 'auto' picks it on TPU
  # 8 rows per chip, so AdamW's element-wise update (per step) is spread over enough tokens.
  config.data.global_batch_size = 64
  report = aot.compile_train_step(config, 'v5e-8', roofline=True)
  analytic = report.model_flops / report.devices
  # XLA's count plus the splash kernel's analytic FLOPs (XLA sees none inside the kernel).
  assert report.cost.kernel_flops > 0
  assert report.cost.flops == pytest.approx(analytic, rel=ANALYTIC_RTOL)
  assert report.cost.flops > report.compiled_flops  # the scanned compile saw one layer
  bound = aot.roofline(report.cost, report.chip, analytic, report.devices_per_chip)
  assert bound.bound_s > 0 and 0 < bound.mfu < 1
