"""Orbax checkpoints of the train state, the grain iterator and JSON metadata (docs/design.md 5).

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` holds params, opt_state and
step; `data` the grain iterator state (so a resumed run reads the batches an uninterrupted run
would); `meta` the resolved config, model shape, tokenizer hash, mesh and lineage. Saves are
asynchronous; orbax writes into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint. A newest checkpoint that cannot be restored
(damaged or missing files) is moved aside to `<workdir>/checkpoints_damaged/` (never deleted)
once an older one restores; a save that fails raises `SaveError` at once (docs/design.md 9).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from pretrain import metrics as metrics_lib

# Model fields whose change makes a checkpoint's parameters unusable.
SHAPE_FIELDS = (
  'family',
  'vocab_size',
  'hidden_size',
  'num_layers',
  'num_heads',
  'head_dim',
  'mlp_dim',
  'type_vocab_size',
  'residual',
  'expansion_factor',
  'shared_dim',
  'chunk_size',
  'scan_layers',
  'init',
)


def model_shape(model_config) -> dict[str, Any]:
  """The subset of `config.model` that fixes the parameter tree (compared on resume)."""
  return {k: model_config[k] for k in SHAPE_FIELDS if k in model_config}


class CheckpointError(ValueError):
  """The workdir's checkpoint does not match the config; the message says what to do."""


class SaveError(RuntimeError):
  """A checkpoint save failed (full disk, lost permissions, ...); one line naming the path."""


def describe_error(e: BaseException) -> str:
  """One line for an exception: `[Errno 28] No space left on device: 'path'` or `Type: msg`."""
  if isinstance(e, OSError) and e.strerror:
    return f'[Errno {e.errno}] {e.strerror}' + (f": '{e.filename}'" if e.filename else '')
  text = str(e).strip().splitlines()
  first = text[0] if text else ''
  return f'{type(e).__name__}: {first[:300]}'


def checkpoint_directory(workdir: str) -> str:
  """`<workdir>/checkpoints`, absolute for a local workdir; gs:// and other remote paths go to
  orbax as they are (it writes them natively)."""
  if metrics_lib.is_remote(workdir):
    return workdir.rstrip('/') + '/checkpoints'
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items of this suite.

  Args:
    workdir: run directory; checkpoints go to `<workdir>/checkpoints`.
    keep: number of most recent checkpoints kept (config.train.keep_checkpoints).
    async_save: save in a background thread (the training loop blocks only for the copy to
      host memory).
  """

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = checkpoint_directory(workdir)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict[str, Any], force: bool = True):
    """Starts saving `state` (pytree of jax.Arrays), the iterator state and `meta` at `step`.

    Raises:
      SaveError: this save, or an earlier asynchronous one, failed.
    """
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._save_errors(step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  @contextlib.contextmanager
  def _save_errors(self, step: int | None = None):
    """Turns any failure of a save (or of an earlier asynchronous one) into one SaveError;
    `step` is the save's step (None: the newest, which is the one an asynchronous failure is
    about). Does nothing more on success: `check_for_errors` runs at every step."""
    try:
      yield
    except SaveError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      step = self.latest_step() if step is None else step
      intact = [s for s in self.all_steps() if s != step]
      raise SaveError(
        f'saving checkpoint {os.path.join(self.directory, str(step))} failed: '
        f'{describe_error(e)}. The earlier checkpoints {intact} are intact; fix the cause '
        f'(free disk space, permissions) and run the same command to resume.'
      ) from e

  def check_for_errors(self):
    """Raises SaveError if an asynchronous save has failed (cheap: no waiting)."""
    with self._save_errors():
      self._manager.check_for_errors()

  def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
    """The JSON metadata of `step` (default: latest), or None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def newest_readable_meta(self) -> tuple[int | None, dict[str, Any] | None]:
    """(step, metadata) of the newest checkpoint whose metadata reads (damaged ones are
    skipped here and moved aside by `restore_newest`), or (None, None) if there is none."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue
      if isinstance(meta, dict):
        return step, meta
    return None, None

  def newest_meta(self) -> dict[str, Any] | None:
    """The metadata of `newest_readable_meta`, or None if there is none."""
    return self.newest_readable_meta()[1]

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs), and the
    iterator in place; works across mesh shapes (orbax reshards)."""
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if not isinstance(restored['meta'], dict):
      raise ValueError(f'the metadata is {type(restored["meta"]).__name__}, not a JSON object')
    return restored['state']

  def restore_newest(self, abstract_state, data_iterator=None):
    """Restores the newest checkpoint that restores; newer ones that fail are moved aside.

    A failure is taken as damage only once an older checkpoint of the same workdir restores
    (a config that no checkpoint fits moves nothing).

    Returns:
      (step, state), or (None, None) if there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints and none restores; names the newest and why.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      state, cause = self._try_restore(step, abstract_state, data_iterator)
      if jax.process_count() > 1:  # every process must resume from the same step
        failed = multihost_utils.process_allgather(np.array(cause is not None))
        if failed.any() and cause is None:
          cause = f'it failed on {int(failed.sum())} other process(es)'
      if cause is not None:
        failures.append((step, cause))
        continue
      for bad_step, bad_cause in failures:
        self._move_aside(bad_step, bad_cause, step)
      return step, state
    if failures:
      step, cause = failures[0]
      raise CheckpointError(
        f'no checkpoint in {self.directory} can be restored (steps '
        f'{[s for s, _ in failures]}); the newest, {step}, fails with: {cause}. If it is '
        f'damaged, move {self.directory}/{step} away and run again; if the config changed, '
        f'pass the config that wrote it (config.json) or use a new --workdir.'
      )
    return None, None

  def _try_restore(self, step, abstract_state, data_iterator, attempts: int = 2):
    """(state, None), or (None, cause) after `attempts` tries (a transient storage error is
    not damage)."""
    cause = None
    for _ in range(attempts):
      try:
        return self.restore(step, abstract_state, data_iterator), None
      except Exception as e:  # pylint: disable=broad-except
        cause = describe_error(e)
    return None, cause

  def _move_aside(self, step: int, cause: str, fallback: int):
    aside_root = os.path.join(os.path.dirname(self.directory), 'checkpoints_damaged')
    aside = os.path.join(aside_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    logging.warning(
      'checkpoint %s/%d cannot be restored (%s): moved to %s; resuming from step %d',
      self.directory,
      step,
      cause,
      aside,
      fallback,
    )
    if jax.process_index() == 0:
      try:
        epath.Path(aside_root).mkdir(parents=True, exist_ok=True)
        epath.Path(self.directory, str(step)).rename(aside)
      except Exception as e:  # pylint: disable=broad-except
        # e.g. a bucket without directories: the step stays and is skipped again next time.
        logging.warning(
          'could not move %s/%d aside (%s); it stays in place',
          self.directory,
          step,
          describe_error(e),
        )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    self._manager.reload()

  def wait(self):
    with self._save_errors():
      self._manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


# Model fields besides the shape whose change makes the same parameters compute another
# function or changes their tree (a learned position table appears or changes rows).
FUNCTION_FIELDS = (
  'norm_type',
  'use_bias',
  'mlp_activation',
  'attention_norm',
  'position_embedding',
  'max_position',
)
# Config fields (besides the model shape) a run cannot change on resume: they change the
# parameter or optimizer-state tree, or the function the parameters compute.
RESUME_FIELDS = ('objective', 'optim.name') + tuple(f'model.{k}' for k in FUNCTION_FIELDS)


def check_compatible(meta: dict[str, Any] | None, config, workdir: str):
  """Refuses to resume a checkpoint whose model shape or RESUME_FIELDS differ from `config`
  (before anything is restored, so the message names the field instead of a tree diff).

  Raises:
    CheckpointError: naming the differing fields and the ways out.
  """
  if not meta:
    return
  saved = meta.get('model_shape', {})
  current = model_shape(config.model)
  diffs = [
    f'{k}: checkpoint {saved[k]!r} vs config {current[k]!r}'
    for k in current
    if k in saved and saved[k] != current[k]
  ]
  saved_config = traverse_util.flatten_dict(meta.get('config', {}), sep='.')
  now = traverse_util.flatten_dict(config.to_dict(), sep='.')
  diffs += [
    f'{k}: checkpoint {saved_config[k]!r} vs config {now[k]!r}'
    for k in RESUME_FIELDS
    if k in saved_config and saved_config[k] != now.get(k)
  ]
  if diffs:
    raise CheckpointError(
      f'--workdir={workdir} holds a checkpoint of a different model or optimizer '
      f'({"; ".join(diffs)}). Use a new --workdir, pass the config that wrote it (its '
      f'config.json), or grow it with launch.upscale.'
    )


def same_data(meta: dict[str, Any] | None, source, config, workdir: str) -> bool:
  """Whether the checkpoint was trained on the data `source` holds now (True without a
  checkpoint or a recorded fingerprint).

  Returns:
    False when the data changed and --config.data.allow_changed_data is set: the caller then
    restores the model but starts the data iterator afresh.

  Raises:
    CheckpointError: the data changed and allow_changed_data is not set.
  """
  recorded = (meta or {}).get('data_fingerprint')
  current = source.data_fingerprint or source.fingerprint
  changed = recorded is not None and recorded != current
  if jax.process_count() > 1:  # every process takes the same branch (one may see other files)
    changed = bool(multihost_utils.process_allgather(np.array(changed)).any())
  if not changed:
    return True
  if config.data.allow_changed_data:
    logging.warning(
      'the training data changed since the checkpoint was written (%s, '
      'fingerprint %s, was %s): resuming the model with the data iterator '
      'started afresh (--config.data.allow_changed_data)',
      source.name,
      current,
      recorded,
    )
    return False
  raise CheckpointError(
    f'the training data changed since the checkpoint in --workdir={workdir} was written '
    f'({source.name}: fingerprint {current}, was {recorded}; files were added, removed, '
    f'renamed or their contents changed). The saved data position would point into '
    f'different text. Restore the original files, pass '
    f'--config.data.allow_changed_data=true to resume the model with the data read from '
    f'the start, or use a new --workdir.'
  )


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def _code_version() -> str:
  try:
    return subprocess.run(
      ['git', 'describe', '--always', '--dirty'],
      capture_output=True,
      text=True,
      timeout=5,
      cwd=os.path.dirname(__file__),
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def checkpoint_meta(config, tokenizer, mesh, source, lineage=None) -> dict[str, Any]:
  """The JSON metadata saved with every checkpoint (docs/design.md 5).

  Args:
    source: the training data (`text_datasets.TextSource`: its name and fingerprint are kept,
      so that a resume over changed data is noticed).
  """
  return {
    'config': json.loads(config.to_json_best_effort()),
    'model_shape': model_shape(config.model),
    'family': config.model.family,
    'objective': config.objective,
    'tokenizer': {
      'sha256': tokenizer.sha256,
      'vocab_size': tokenizer.vocab_size,
      'path': getattr(tokenizer, 'path', ''),
    },
    'data_source': source.name,
    'data_fingerprint': source.data_fingerprint or source.fingerprint,
    'mesh': dict(mesh.shape),
    'code_version': _code_version(),
    'lineage': lineage or [],
  }


def adopt_growth_values(config, meta):
  """A workdir written by `launch.upscale` fixes a few values the grown weights need (LayerNorm
  eps / k, the trained DeepNorm alpha, the source run's tokenizer): apply them, so that
  `launch.pretrain` continues the grown model with the plain preset command."""
  lineage = (meta or {}).get('lineage') or []
  if not lineage:
    return
  overrides = dict(lineage[-1].get('upscale', {}).get('config_overrides', {}))
  if not config.data.tokenizer_model and meta.get('tokenizer', {}).get('path'):
    overrides['data.tokenizer_model'] = meta['tokenizer']['path']
  changed = {
    key: value
    for key, value in overrides.items()
    if traverse_util.flatten_dict(config.to_dict(), sep='.').get(key) != value
  }
  for key, value in changed.items():
    logging.info('grown checkpoint: using %s=%r (set by launch.upscale)', key, value)
  config.update_from_flattened_dict(changed)


def write_config(workdir: str, config):
  """Writes the resolved config to `<workdir>/config.json` (local or gs://)."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
