"""MFU's two sides: the peak FLOP/s (an exact device-kind table; measured and cached on CPU) and
the model FLOP count (against XLA's count of the compiled step)."""

import json

import pytest

from pretrain import peak


@pytest.mark.parametrize(
  'kind, flops',
  [
    ('NVIDIA L4', 121e12),
    ('NVIDIA L40S', 362e12),  # contains 'L4': a substring match gave 121e12
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5', 459e12),  # v5p: 'TPU v5' is also a prefix of 'TPU v5 lite'
    ('TPU v6 lite', 918e12),
    ('TPU v3', 61.5e12),  # per TensorCore: a v3 chip is two devices
    ('NVIDIA L40', 0.0),  # unknown kinds are not guessed from similar names
    ('TPU v7', 0.0),
    ('NVIDIA GeForce RTX 4090', 0.0),
  ],
)
def test_peak_flops_lookup_is_exact(kind, flops):
  assert peak.peak_flops_per_device(kind) == flops


def test_every_entry_is_a_plausible_dense_bf16_peak():
  for kind, flops in peak.PEAK_FLOPS_BY_DEVICE_KIND.items():
    assert 2e13 <= flops <= 1e15, kind


def _compiled_step_flops(config) -> float:
  """XLA's FLOP count of the compiled train step on one CPU device (layers unrolled, since a
  scanned loop body is counted once)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pretrain import aot, mesh as mesh_lib, train  # pylint: disable=g-import-not-at-top

  config.model.scan_layers = False
  config.mesh.shape = (1, 1, 1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  run_setup = train.setup(config, mesh)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  with jax.set_mesh(mesh):
    compiled = (
      train.jit_train_step(run_setup, config)
      .lower(run_setup.abstract_state, aot.abstract_batch(config, mesh), key)
      .compile()
    )
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


@pytest.mark.parametrize(
  'preset, objective, upper',
  [
    ('roformer:tiny', 'mlm', 1.15),
    ('roformer_v2:tiny', 'clm', 1.15),
    ('gau:tiny', 'mlm', 1.15),
    ('deepnet:tiny', 'mlm', 1.15),
    # FLASH's per-document global part executes prefix differences and a partial chunk on top
    # of the 4 s e per token it needs (docs/design.md 10): the count is a lower bound there.
    ('gau:flash_tiny', 'mlm', 2.0),
  ],
)
def test_model_flops_match_the_compiled_step(preset, objective, upper):
  """models.flops_per_token (matmuls only) against XLA's cost analysis of the real step: XLA
  also counts element-wise work, so it may be a little higher, never lower."""
  import importlib  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  from data_pipelines import objectives  # pylint: disable=g-import-not-at-top

  module, name = preset.split(':')
  config = importlib.import_module(f'launch.configs.{module}').get_config(name)
  config.objective = objective
  m = config.model
  m.hidden_size, m.num_layers, m.mlp_dim, m.vocab_size = 64, 2, 256, 1000
  m.num_heads, m.shared_dim = 1, 32
  config.data.seq_len, config.data.global_batch_size = 128, 2
  if m.chunk_size:
    m.chunk_size = 32
  n = config.data.seq_len
  predictions = objectives.max_predictions(n, config.data.mask_rate) if objective == 'mlm' else n
  analytic = models.flops_per_token(config, predictions) * n * config.data.global_batch_size
  compiled = _compiled_step_flops(config)
  assert analytic <= compiled <= upper * analytic, compiled / analytic


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  first = peak.measured_matmul_peak('float32', size=256)
  path = peak.matmul_peak_cache_path()
  assert path.startswith(str(tmp_path)) and 1e8 < first < 1e14
  with open(path) as f:
    ((key, cached),) = json.load(f).items()
  assert cached == first and 'float32' in key and '|256' in key
  # A cached figure is returned as is (planted, so a re-measurement would show).
  with open(path, 'w') as f:
    json.dump({key: 123.0}, f)
  assert peak.measured_matmul_peak('float32', size=256) == 123.0
  assert peak.measured_matmul_peak('float32', size=256, refresh=True) != 123.0
  # A refresh never lowers the cached figure (a busy machine measures low).
  with open(path, 'w') as f:
    json.dump({key: 1e15}, f)
  assert peak.measured_matmul_peak('float32', size=256, refresh=True) == 1e15
  # A damaged cache file is measured again, not an error.
  with open(path, 'w') as f:
    f.write('{not json')
  assert peak.measured_matmul_peak('float32', size=256) > 1e8


def test_cpu_mfu_denominator_is_the_measured_peak_unless_configured(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(peak, 'measured_matmul_peak', lambda dtype: {'float32': 7e10}[dtype])
  assert peak.peak_flops(0.0, 'float32') == 7e10  # one process, however many fake devices
  assert peak.peak_flops(5e11) == 5e11 * len(jax.devices())
