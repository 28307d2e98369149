"""Run directories as the other commands read and write them (docs/design.md 5).

A run directory (`--workdir`) holds `config.json`, `metrics.jsonl`, `tensorboard/` and
`checkpoints/<step>/{state,data,meta}`. The commands that read another run (`launch.upscale`,
`launch.export`, `launch.finetune`, benchmarks) or write a new run from one
(`launch.upscale`, `launch.convert`) share these helpers: which checkpoint step to read, the
run's config rebuilt from a checkpoint's metadata, writing a first checkpoint, and the
`launch.pretrain` flags that continue a written run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex

from flax import traverse_util
import ml_collections
import orbax.checkpoint as ocp

from pretrain import checkpointing
from pretrain import config as config_schema
from pretrain import train


def source_step(ckpt: checkpointing.Checkpointer, workdir: str, step: int | None) -> int:
  """The checkpoint step to read from `workdir`: `step` (--step) or the latest complete one.

  Raises:
    train.InputError: no complete checkpoint, or `step` is not one of them (lists those that
      are).
  """
  steps = ckpt.all_steps()
  if not steps:
    raise train.InputError(f'--from_workdir={workdir} has no complete checkpoint.')
  step = max(steps) if step is None else step
  if step not in steps:
    raise train.InputError(
      f'--step={step} is not a checkpoint of {workdir}; '
      f'available: {", ".join(map(str, sorted(steps)))}.'
    )
  return step


def restore_params(from_workdir: str, step: int, abstract_params):
  """The parameters of checkpoint `step` of `from_workdir` that `abstract_params` names
  (ShapeDtypeStructs with shardings; e.g. a classifier's encoder: the pretraining
  checkpoint's MLM head and optimizer state are not read), restored onto their shardings.

  Raises:
    train.InputError: the checkpoint's parameters do not fit (the message names the cause).
  """
  path = os.path.join(checkpointing.checkpoint_directory(from_workdir), str(step), 'state')
  target = {'params': abstract_params}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
      path,
      args=ocp.args.PyTreeRestore(
        target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise train.InputError(
      f'the parameters of {path} do not fit this model '
      f'({checkpointing.describe_error(e)}); pass the config the run '
      f'was trained with, or a fine-tuning preset (the default).'
    ) from e
  return restored['params']


def to_tuples(value):
  """JSON lists back to the tuples the schema uses (nested lists become nested tuples)."""
  if isinstance(value, (list, tuple)):
    return tuple(to_tuples(v) for v in value)
  return value


def config_from_meta(saved: dict) -> ml_collections.ConfigDict:
  """The source run's ConfigDict from a checkpoint's meta['config'] (JSON: lists where the
  schema has tuples), on top of the base schema (fields the schema lacks are kept)."""
  config = config_schema.get_base_config()

  def merge(target, values):
    for key, value in values.items():
      if isinstance(value, dict):
        if key not in target:
          target[key] = ml_collections.ConfigDict()
        merge(target[key], value)
      elif key in target and isinstance(target[key], tuple):
        target[key] = to_tuples(value)
      else:
        target[key] = value

  merge(config, saved)
  return config


def write_run(workdir: str, config, state, train_iter, meta) -> str:
  """Writes config.json and checkpoint 0 of a new run (synchronously).

  Args:
    workdir: the new run directory; config: its ConfigDict; state: {'step', 'params',
      'opt_state'} (jax.Arrays on their shardings); train_iter: the grain iterator whose
      state is saved with it; meta: the checkpoint's JSON metadata.

  Returns:
    The written step directory, `<workdir>/checkpoints/0`.
  """
  checkpointing.write_config(workdir, config)
  out = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False)
  try:
    out.save(0, state, train_iter, meta)
  finally:
    out.close()
  return os.path.join(out.directory, '0')


def load_preset(spec: str) -> ml_collections.ConfigDict:
  """Re-reads a `--config` spec `path[:preset]`: the config without command-line overrides."""
  path, _, preset = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_preset_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def continue_flags(config, preset) -> list[str]:
  """`--config.x=v` for every field where `config` differs from `preset` (upscale.* left
  out: launch.pretrain does not read them), shell-quoted."""
  want = traverse_util.flatten_dict(config.to_dict(), sep='.')
  have = traverse_util.flatten_dict(preset.to_dict(), sep='.')
  out = []
  for key, value in want.items():
    if key.startswith('upscale.') or have.get(key, object()) == value:
      continue
    if isinstance(value, (list, tuple)):
      value = repr(to_tuples(value))
    out.append(
      shlex.quote(
        f'--config.{key}={value!r}' if isinstance(value, float) else f'--config.{key}={value}'
      )
    )
  return out


def read_json(path: str):
  """The JSON value in `path`, or None when it is missing or not valid JSON."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, value):
  """Writes `value` as JSON to `path` atomically (a temporary file, then a rename)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)
