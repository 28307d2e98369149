"""DeepNet presets (docs/algorithms.md 5): RoFormer v1 blocks with the DeepNorm residual
LN(alpha * x + G(x)) and beta-scaled Xavier init of W_v, W_o and the FFN matrices;
alpha = (2N)^(1/4), beta = (8N)^(-1/4) for N encoder blocks (encoder-only constants).

  python -m launch.pretrain --config=launch/configs/deepnet.py:tiny --workdir=runs/deepnet_tiny

| preset | layers | hidden | heads | mlp | notes |
|---|---|---|---|---|---|
| tiny | 16 | 128 | 2 | 512 | CPU |
| deep | 128 | 64 | 2 | 256 | >= 100 layers, narrow; compiles like a 12-layer model (scan) |
| base | 48 | 768 | 12 | 3072 | TPU |
Measured figures (loss, throughput, compile time) are in docs/models.md and docs/performance.md.
"""

from pretrain import config as config_schema
from launch.configs import roformer

PRESETS = ('tiny', 'deep', 'base')


def get_config(preset: str = 'tiny'):
  """Returns the DeepNet config for `preset` (one of PRESETS)."""
  preset = preset or 'tiny'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {", ".join(PRESETS)}')
  config = roformer.apply_preset(
    config_schema.get_base_config(), 'base' if preset == 'base' else 'tiny'
  )
  m = config.model
  m.family, m.residual = 'roformer', 'deepnorm'
  if preset == 'tiny':
    m.num_layers = 16
    config.train.num_train_steps = 300
  elif preset == 'deep':
    m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = 64, 128, 2, 256
    m.remat_policy = 'full'
    config.train.num_train_steps = 300
  else:
    m.num_layers = 48
  # No warmup on purpose: DeepNorm is meant to train deep post-LN stacks without it
  # (docs/algorithms.md 5.4).
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 1e-3
  return config
