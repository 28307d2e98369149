"""Fine-tuning presets for `launch.finetune` (its default `--config`), docs/finetuning.md 5.

  python -m launch.finetune --from_workdir=runs/roformer_tiny --workdir=runs/mr \
      --config.finetune.train_file=MR/train.tsv --config.finetune.dev_file=MR/dev.tsv

Every field is in the schema (pretrain/config.py, section `finetune`; the loop's cadence is
`train`) and can be overridden as `--config.finetune.<field>=...`. A preset names no encoder:
the encoder (model, tokenizer, weights) comes from `--from_workdir`. For the random-init
baseline pass a family config instead (`--config=launch/configs/roformer.py:tiny`), whose
`finetune` section has the same defaults.

| preset | what |
|---|---|
| default | BERT's recipe: AdamW 3e-4, 10 % warmup then linear decay, 3 epochs, batch 32, n 128 |
"""

from pretrain import config as config_schema

PRESETS = ('default',)


def get_config(preset: str = 'default'):
  """Returns the fine-tuning config for `preset` (one of PRESETS)."""
  preset = preset or 'default'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; choose one of {", ".join(PRESETS)}')
  return config_schema.get_finetune_config()
