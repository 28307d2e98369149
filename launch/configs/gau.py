"""GAU presets (docs/algorithms.md 6): GAU-alpha by default, FLASH mixed-chunk attention as
variants.

  python -m launch.pretrain --config=launch/configs/gau.py:tiny --workdir=runs/gau_tiny
  python -m launch.pretrain --config=launch/configs/gau.py:flash_tiny --workdir=runs/flash_tiny

GAU-alpha (docs/algorithms.md 6.3): RoFormer v2 skeleton with each attention + FFN pair replaced by
two GAU
layers (so 2L GAU layers for an L-block shape), bias-free, parameter-free RMS post-norm,
softmax_plus attention, shared dim s = 128, expansion e = 2d, truncated-normal L^-1/3 init,
and the released training recipe for small/base/large: LAMB at 1.76e-3, weight decay 0.01,
no warmup, learning-rate multipliers {0: 1, 160k: 0.5, 640k: 0.1, 1.28M: 0.01}
(the released recipe of ZhuiyiTechnology/GAU-alpha, docs/algorithms.md 6.3; its keys are steps of a
1.28M-step run), scaled here to the preset's num_train_steps with the same shape (160k/1.28M
= 1/8, 640k/1.28M = 1/2, 1.28M -> the last step). FLASH presets keep the linear schedule. FLASH
(docs/algorithms.md 6.2): relu^2 attention normalised by valid keys, mixed-chunk attention with
chunk_size c (quadratic inside chunks, linear across them: cost linear in seq_len), and the
paper's N(0, 0.02^2) kernel init kept at its relative scale: std = 0.02 sqrt(768 / d) (0.02 at
flash_base's d = 768, 0.049 at flash_tiny's d = 128; `flash_init_std`). The absolute 0.02 at
d = 128 is 0.23/sqrt(d), and a relu^2 GAU branch is homogeneous of degree ~7 in its weights:
each branch started at RMS 8e-5 on a unit-RMS stream (flash_base: 1e-2; now 1.3e-2), with
gradients to match, and flash_tiny learned slower (400 steps of 16 x 128 tokens, AdamW 2e-3,
warmup 30: eval MLM loss 5.21 / accuracy 0.22 with 0.02, 4.85 / 0.30 with 0.049;
tests/test_models_gau.py).

| preset | GAU layers | hidden | s | e | seq_len x batch |
|---|---|---|---|---|---|
| tiny / flash_tiny | 8 | 128 | 128 | 256 | 128 x 32 (flash: c = 32) |
| small | 12 | 384 | 128 | 768 | 256 x 64 |
| base / flash_base | 24 | 768 | 128 | 1536 | 512 x 256 (flash: c = 256) |
| large | 48 | 1536 | 128 | 3072 | 512 x 1024 |
Measured figures are in docs/models.md and docs/performance.md.
"""

import math

from pretrain import config as config_schema
from launch.configs import roformer

PRESETS = ('tiny', 'small', 'base', 'large', 'flash_tiny', 'flash_base')


def flash_init_std(hidden_size: int) -> float:
  """The FLASH paper's kernel std 0.02 at d = 768 (0.55 / sqrt(d)) at width `hidden_size`."""
  return 0.02 * math.sqrt(768 / hidden_size)


def get_config(preset: str = 'tiny'):
  """Returns the GAU config for `preset` (one of PRESETS)."""
  preset = preset or 'tiny'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {", ".join(PRESETS)}')
  flash = preset.startswith('flash_')
  config = roformer.apply_preset(config_schema.get_base_config(), preset.removeprefix('flash_'))
  m = config.model
  m.family = 'gau'
  m.num_layers *= 2  # two GAU layers replace one attention + FFN block
  m.expansion_factor, m.shared_dim = 2, 128
  m.use_bias, m.norm_type, m.norm_eps = False, 'rmsnorm_noparam', 1e-7
  if flash:
    m.attention_norm, m.init = 'relu2', 'normal'
    # Set for the preset's width; with --config.model.hidden_size=d pass
    # --config.model.initializer_range=flash_init_std(d) too.
    m.initializer_range = flash_init_std(m.hidden_size)
    m.chunk_size = 32 if preset == 'flash_tiny' else 256
  else:
    m.attention_norm, m.init = 'softmax_plus', 'gau_alpha'
  o = config.optim
  o.name, o.weight_decay, o.eps, o.learning_rate = 'lamb', 0.01, 1e-6, 1.76e-3
  if not flash:
    n = config.train.num_train_steps
    o.schedule, o.warmup_steps = 'piecewise_linear', 0
    o.schedule_boundaries = ((0, 1.0), (n // 8, 0.5), (n // 2, 0.1), (n, 0.01))
  if preset in ('tiny', 'flash_tiny'):
    # CPU demo: the recipe's LAMB at 1.76e-3 is tuned for 1M steps and barely moves a few
    # hundred (docs/models.md: benchmarks/families.py).
    o.name, o.schedule, o.learning_rate, o.warmup_steps = 'adamw', 'linear', 2e-3, 50
  return config
