"""Orbax checkpoints of the train state, the grain iterator and JSON metadata (docs/design.md 5).

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` holds params, opt_state and
step; `data` the grain iterator state (so a resumed run reads the batches an uninterrupted run
would); `meta` the resolved config, model shape, tokenizer hash, mesh and lineage. Saves are
asynchronous; orbax writes into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from absl import logging
from flax import traverse_util
import grain
import jax
import orbax.checkpoint as ocp

# Model fields whose change makes a checkpoint's parameters unusable.
SHAPE_FIELDS = ('family', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'head_dim',
                'mlp_dim', 'type_vocab_size', 'residual', 'expansion_factor', 'shared_dim',
                'chunk_size', 'scan_layers', 'init')


def model_shape(model_config) -> dict[str, Any]:
  """The subset of `config.model` that fixes the parameter tree (compared on resume)."""
  return {k: model_config[k] for k in SHAPE_FIELDS if k in model_config}


class CheckpointError(ValueError):
  """The workdir's checkpoint does not match the config; the message says what to do."""


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items of this suite.

  Args:
    workdir: run directory; checkpoints go to `<workdir>/checkpoints`.
    keep: number of most recent checkpoints kept (config.train.keep_checkpoints).
    async_save: save in a background thread (the training loop blocks only for the copy to
      host memory).
  """

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict[str, Any], force: bool = True):
    """Starts saving `state` (pytree of jax.Arrays), the iterator state and `meta` at `step`."""
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
    """The JSON metadata of `step` (default: latest), or None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs), and the
    iterator in place; works across mesh shapes (orbax reshards)."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))['state']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


# Config fields (besides the model shape) a run cannot change on resume: they change the
# parameter or optimizer-state tree, or the function the parameters compute.
RESUME_FIELDS = ('objective', 'model.norm_type', 'model.use_bias', 'model.mlp_activation',
                 'optim.name')


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
  diffs = [f'{k}: checkpoint {saved[k]!r} vs config {current[k]!r}'
           for k in current if k in saved and saved[k] != current[k]]
  saved_config = traverse_util.flatten_dict(meta.get('config', {}), sep='.')
  now = traverse_util.flatten_dict(config.to_dict(), sep='.')
  diffs += [f'{k}: checkpoint {saved_config[k]!r} vs config {now[k]!r}'
            for k in RESUME_FIELDS if k in saved_config and saved_config[k] != now.get(k)]
  if diffs:
    raise CheckpointError(
        f'--workdir={workdir} holds a checkpoint of a different model or optimizer '
        f'({"; ".join(diffs)}). Use a new --workdir, pass the config that wrote it (its '
        f'config.json), or grow it with launch.upscale.')


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _code_version() -> str:
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                          text=True, timeout=5, cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def checkpoint_meta(config, tokenizer, mesh, source_name: str, lineage=None) -> dict[str, Any]:
  """The JSON metadata saved with every checkpoint (docs/design.md 5)."""
  return {
      'config': json.loads(config.to_json_best_effort()),
      'model_shape': model_shape(config.model),
      'family': config.model.family,
      'objective': config.objective,
      'tokenizer': {'sha256': tokenizer.sha256, 'vocab_size': tokenizer.vocab_size,
                    'path': getattr(tokenizer, 'path', '')},
      'data_source': source_name,
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
  changed = {key: value for key, value in overrides.items()
             if traverse_util.flatten_dict(config.to_dict(), sep='.').get(key) != value}
  for key, value in changed.items():
    logging.info('grown checkpoint: using %s=%r (set by launch.upscale)', key, value)
  config.update_from_flattened_dict(changed)
