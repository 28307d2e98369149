"""RoFormer v2 MLM presets (docs/algorithms.md 7.2): no biases, parameter-free RMS norm (eps 1e-7),
post-norm, RoPE, MLM head tied with no transform; truncated-normal L^-1/2 init
(docs/algorithms.md 5.3);
ReLU feed-forward (the released checkpoints: `hidden_act: relu` in the configs of
ZhuiyiTechnology/roformer-v2's chinese_roformer-v2-char_{small,base,large} and their ports,
e.g. PaddleNLP's roformer_v2_chinese_char_*; docs/algorithms.md 7.2); LAMB with a piecewise-linear
schedule
as in the released MLM recipe.

  python -m launch.pretrain --config=launch/configs/roformer_v2.py:tiny --workdir=runs/v2_tiny

Shapes are those of launch/configs/roformer.py (tiny 128/4L, small 384/6L, base 768/12L,
large 1536/24L; consecutive presets are exact growth pairs for launch.upscale).
Measured figures are in docs/models.md and docs/performance.md.
"""

from pretrain import config as config_schema
from launch.configs import roformer


def get_config(preset: str = 'tiny'):
  """Returns the RoFormer v2 config for `preset` (one of roformer.PRESETS)."""
  config = roformer.apply_preset(config_schema.get_base_config(), preset or 'tiny')
  m = config.model
  m.family, m.use_bias, m.norm_type, m.norm_eps, m.init = (
    'roformer_v2',
    False,
    'rmsnorm_noparam',
    1e-7,
    'roformer_v2',
  )
  m.mlp_activation = 'relu'
  o = config.optim
  o.name, o.weight_decay, o.eps = 'lamb', 0.01, 1e-6
  o.learning_rate = 1.76e-3
  # Released recipe (in micro-steps): linear warmup to 32k, then x0.5 at 320k, x0.1 at 1.28M,
  # x0.01 at 2.56M; scaled here to the preset's length with the same shape.
  n = config.train.num_train_steps
  o.schedule = 'piecewise_linear'
  o.warmup_steps = 0
  o.schedule_boundaries = (
    (0, 0.0),
    (max(1, n // 80), 1.0),
    (n // 8, 0.5),
    (n // 2, 0.1),
    (n, 0.01),
  )
  if preset == 'tiny':
    # CPU demo: the recipe's LAMB at 1.76e-3 is tuned for 1M steps and barely moves a few
    # hundred (docs/models.md: benchmarks/families.py).
    o.name, o.schedule, o.learning_rate, o.warmup_steps = 'adamw', 'linear', 2e-3, 50
  return config
