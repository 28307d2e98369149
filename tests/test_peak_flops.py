"""The peak FLOP/s table is looked up by exact device kind (MFU's denominator)."""

import pytest

from pretrain import metrics


@pytest.mark.parametrize('kind, flops', [
    ('NVIDIA L4', 121e12),
    ('NVIDIA L40S', 362e12),          # contains 'L4': a substring match gave 121e12
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),          # v5e
    ('TPU v5', 459e12),               # v5p: 'TPU v5' is also a prefix of 'TPU v5 lite'
    ('TPU v6 lite', 918e12),
    ('TPU v3', 61.5e12),              # per TensorCore: a v3 chip is two devices
    ('NVIDIA L40', 0.0),              # unknown kinds are not guessed from similar names
    ('TPU v7', 0.0),
    ('NVIDIA GeForce RTX 4090', 0.0),
])
def test_peak_flops_lookup_is_exact(kind, flops):
  assert metrics.peak_flops_per_device(kind) == flops


def test_every_entry_is_a_plausible_dense_bf16_peak():
  for kind, flops in metrics.PEAK_FLOPS_BY_DEVICE_KIND.items():
    assert 2e13 <= flops <= 1e15, kind
