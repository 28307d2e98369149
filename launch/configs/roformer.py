"""RoFormer v1 MLM presets (Su et al. 2021; docs/algorithms.md 7.1): post-LN, biases, GELU, RoPE.

Select a preset with `--config=launch/configs/roformer.py:<preset>` (default `tiny`):

  python -m launch.pretrain --config=launch/configs/roformer.py:tiny --workdir=runs/roformer_tiny

| preset | L  | d    | h  | F    | params  | notes |
|--------|----|------|----|------|---------|-------|
| tiny   | 4  | 128  | 2  | 512  | ~1.8M   | `make pretrain` (CPU) |
| small  | 6  | 384  | 6  | 1536 | ~14M    | RoFormer-v2 small shape |
| base   | 12 | 768  | 12 | 3072 | ~92M    | BERT-base shape; TPU/GPU |
| large  | 24 | 1536 | 24 | 6144 | ~690M   | 2x base, so base -> large is an exact growth |

Consecutive presets are valid lossless growth pairs for `launch.upscale` (integer width
factors 3, 2, 2 at fixed head size 64, same vocabulary, same or larger depth). All presets use
an 8000-token SentencePiece vocabulary; set `--config.model.vocab_size=32000` for a large
corpus (the tokenizer is retrained to that size).
"""

from pretrain import config as config_schema

PRESETS = ('tiny', 'small', 'base', 'large')


def apply_preset(config, preset: str):
  """Sets the shape and schedule fields of `preset` on `config` (shared by all families).

  Raises:
    ValueError: unknown preset name.
  """
  model, data, train, optim = config.model, config.data, config.train, config.optim
  if preset == 'tiny':
    model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim = 128, 4, 2, 512
    data.seq_len, data.global_batch_size = 128, 32
    train.num_train_steps = 600
    optim.learning_rate, optim.warmup_steps = 2e-3, 50
  elif preset == 'small':
    model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim = 384, 6, 6, 1536
    data.seq_len, data.global_batch_size = 256, 64
    train.num_train_steps, train.eval_every_steps = 20_000, 1000
    train.checkpoint_every_steps = 1000
    optim.learning_rate, optim.warmup_steps = 1e-3, 1000
  elif preset == 'base':
    # bfloat16 activations over float32 parameters and optimizer state; data parallel (the
    # base mesh): fits one 16 GiB v5e chip per 8 with room to spare (docs/tpu_fit.md).
    model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim = 768, 12, 12, 3072
    data.seq_len, data.global_batch_size = 512, 256
    train.num_train_steps, train.eval_every_steps = 200_000, 5000
    train.checkpoint_every_steps, train.log_every_steps = 5000, 100
    optim.learning_rate, optim.warmup_steps = 5e-4, 10_000
    model.dtype, model.remat_policy = 'bfloat16', 'dots_with_no_batch_dims'
  elif preset == 'large':
    model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim = 1536, 24, 24, 6144
    data.seq_len, data.global_batch_size = 512, 1024
    train.num_train_steps, train.eval_every_steps = 500_000, 5000
    train.checkpoint_every_steps, train.log_every_steps = 5000, 100
    optim.learning_rate, optim.warmup_steps = 2e-4, 10_000
    model.dtype, model.remat_policy = 'bfloat16', 'full'
    # Fully sharded: replicated (pure data parallelism), parameters and AdamW state take
    # 7.8 GiB of every chip, half of a v5e chip's 16 GiB; FSDP over every chip fits from 16
    # v5e chips (docs/tpu_fit.md, benchmarks/aot_table.py).
    config.mesh.shape = (1, -1, 1)
  else:
    raise ValueError(f'unknown preset {preset!r}; choose one of {", ".join(PRESETS)}')
  return config


def get_config(preset: str = 'tiny'):
  """Returns the RoFormer v1 config for `preset` (one of PRESETS)."""
  config = config_schema.get_base_config()
  config.model.family = 'roformer'
  return apply_preset(config, preset or 'tiny')
