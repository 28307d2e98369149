"""Run directories as the other commands read and write them (docs/design.md 5).

A run directory (`--workdir`) holds `config.json`, `metrics.jsonl`, `tensorboard/` and
`checkpoints/<step>/{state,data,meta}`. The commands that read another run (`launch.upscale`,
`launch.export`, `launch.finetune`, benchmarks) or write a new run from one
(`launch.upscale`, `launch.convert`) share these helpers: which checkpoint to read and
reading it (`read_checkpoint`: the newest that restores, as `launch.pretrain` picks, or
--step: a step or 'best'; the run is never modified), the run's config rebuilt from a
checkpoint's metadata, writing a first checkpoint, and the `launch.pretrain` flags that
continue a written run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from typing import Any, Callable

from absl import logging
from flax import traverse_util
import jax
import ml_collections

from pretrain import checkpointing
from pretrain import checksums
from pretrain import config as config_schema
from pretrain import mesh as mesh_lib
from pretrain import train


# --step's value that picks the checkpoint with the lowest recorded eval loss.
BEST = 'best'


def parse_step(value: str | None) -> int | str | None:
  """The value of a launcher's --step flag: None (not given), BEST, or a step >= 0.

  Raises:
    train.InputError: anything else, naming --step.
  """
  if value is None or value == '':
    return None
  text = str(value).strip().lower()
  if text == BEST:
    return BEST
  if text.isdigit():
    return int(text)
  raise train.InputError(
    f"--step={value}: give a checkpoint step (an integer >= 0) or 'best' (the checkpoint "
    f'with the lowest recorded eval loss).'
  )


def _best_candidates(ckpt: checkpointing.Checkpointer, workdir: str, available: str) -> list:
  """The steps of `ckpt` that recorded an eval loss, lowest loss first (the newer of equal
  ones first).

  Raises:
    train.InputError: none recorded one.
  """
  losses = ckpt.eval_losses()
  if not losses:
    raise train.InputError(
      f'--step=best: no checkpoint of {workdir} records an eval loss (steps {available}). A '
      f'checkpoint records the loss of the evaluation run at the step it was saved (steps '
      f'that are multiples of both train.checkpoint_every_steps and train.eval_every_steps, '
      f'and the last step; runs written before this was recorded have none). Pass '
      f'--step=N with one of these steps, or leave --step out to read the newest.'
    )
  best = sorted(losses, key=lambda s: (losses[s], -s))
  logging.info(
    '--step=best: eval losses of %s: %s', workdir, {s: losses[s] for s in sorted(losses)}
  )
  return best


def read_checkpoint(
  workdir: str,
  read: Callable[[checkpointing.Checkpointer, int, dict], Any],
  step: int | str | None = None,
) -> tuple[int, dict, Any]:
  """Picks and reads the checkpoint of another run as `launch.pretrain` picks its own.

  The one way every command that reads a run (`launch.upscale`, `launch.export`,
  `launch.finetune`) chooses its checkpoint: `step` (--step) when given, else the newest whose
  metadata and arrays read and pass their checksums, each newer one that does not named in a
  one-line warning. With `step='best'` (--step=best): the checkpoint with the lowest eval loss
  recorded in orbax's metrics of its step (`Checkpointer.eval_losses`; only checkpoints saved
  where an evaluation ran have one), and when it does not restore the next best, each one
  that does not named in a warning. Each is tried twice (a transient storage error is not
  damage). The run is only read: nothing there is moved, created or deleted (moving a damaged
  checkpoint aside is the job of `launch.pretrain` on its own workdir, docs/design.md 9).

  Args:
    workdir: the run directory (--from_workdir), local or gs://.
    read: `(ckpt, step, meta) -> value`: reads what the caller needs of checkpoint `step`,
      its metadata given; e.g. `ckpt.restore(step, abstract_state)` (verified against the
      checksums). `train.InputError` from it (the run does not fit the command) is raised
      as it is; any other exception means that this checkpoint does not restore.
    step: the checkpoint to read (--step); 'best' (`BEST`): the lowest recorded eval loss;
      None: the newest that restores.

  Returns:
    (step, meta, value): the step read, its metadata (a dict) and what `read` returned.

  Raises:
    train.InputError: no complete checkpoint; `step` is not one of them, or it does not
      restore (naming it and why); no checkpoint restores (naming the newest and why);
      'best' and no checkpoint recorded an eval loss, or none of those restores.
  """
  ckpt = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
      raise train.InputError(f'--from_workdir={workdir} has no complete checkpoint.')
    available = ', '.join(map(str, sorted(steps)))
    if step == BEST:
      candidates = _best_candidates(ckpt, workdir, available)
    elif step is not None and step not in steps:
      raise train.InputError(
        f'--step={step} is not a checkpoint of {workdir}; available: {available}.'
      )
    else:
      candidates = steps if step is None else [step]
    failures = []
    for candidate in candidates:
      cause = None
      for _ in range(2):
        try:
          meta = ckpt.read_meta(candidate)
          if not isinstance(meta, dict):
            raise ValueError(f'the metadata is {type(meta).__name__}, not a JSON object')
          value = read(ckpt, candidate, meta)
        except train.InputError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          cause = str(e) if isinstance(e, checksums.ChecksumError) else None
          cause = cause or checkpointing.describe_error(e)
          continue
        for bad, bad_cause in failures:
          logging.warning(
            'checkpoint %s cannot be restored (%s); reading step %d instead (%s is left as it is)',
            ckpt.path(bad),
            bad_cause,
            candidate,
            workdir,
          )
        return candidate, meta, value
      failures.append((candidate, cause))
    if step == BEST:
      best, cause = failures[0]
      raise train.InputError(
        f'--step=best: none of the checkpoints of {workdir} that recorded an eval loss '
        f'(steps {[s for s, _ in failures]}, best first) can be restored; the best, '
        f'{ckpt.path(best)}, fails with: {cause}. Choose another --step ({available}), or '
        f'leave --step out to read the newest checkpoint that restores.'
      )
    if step is not None:
      raise train.InputError(
        f'--step={step}: checkpoint {ckpt.path(step)} cannot be restored ({cause}). Choose '
        f'another --step ({available}), or leave --step out to read the newest checkpoint '
        f'that restores.'
      )
    newest, cause = failures[0]
    raise train.InputError(
      f'no checkpoint of --from_workdir={workdir} can be restored (steps '
      f'{[s for s, _ in failures]}); the newest, {ckpt.path(newest)}, fails with: {cause}. '
      f'Give a run whose checkpoints are intact.'
    )
  finally:
    ckpt.close()


def read_params(ckpt: checkpointing.Checkpointer, step: int, meta: dict):
  """A `read` for `read_checkpoint` that needs the parameters: checkpoint `step` restored
  whole (optimizer state included: a checkpoint damaged anywhere is one that does not
  restore, as for `launch.pretrain`) for the model its metadata describes, on this process's
  first device, verified against its checksums.

  Returns:
    (params: a pure dict of jax.Arrays, number of parameters).

  Raises:
    checksums.ChecksumError: the arrays read differ from what was saved.
  """
  config = config_from_meta(meta['config'])
  config.mesh.shape = (-1, 1, 1)
  run_setup = train.setup(config, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
  return ckpt.restore(step, run_setup.abstract_state)['params'], run_setup.num_params


def restore_params(from_workdir: str, step: int, abstract_params):
  """The parameters of checkpoint `step` of `from_workdir` that `abstract_params` names
  (ShapeDtypeStructs with shardings; e.g. a classifier's encoder: the pretraining
  checkpoint's MLM head and optimizer state are not read), restored onto their shardings and
  verified against the checksums saved with them.

  Raises:
    train.InputError: the checkpoint's parameters do not fit (the message names the cause),
      or they fail their checksum.
  """
  ckpt = checkpointing.Checkpointer(from_workdir, read_only=True)
  try:
    return ckpt.restore(step, {'params': abstract_params}, partial=True)['params']
  except checksums.ChecksumError as e:
    raise train.InputError(f'checkpoint {ckpt.path(step)} cannot be restored: {e}.') from e
  except Exception as e:  # pylint: disable=broad-except
    raise train.InputError(
      f'the parameters of {ckpt.path(step)}/state do not fit this model '
      f'({checkpointing.describe_error(e)}); pass the config the run '
      f'was trained with, or a fine-tuning preset (the default).'
    ) from e
  finally:
    ckpt.close()


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
  out = checkpointing.Checkpointer.for_run(workdir, config.train, async_save=False)
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
