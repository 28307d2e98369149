"""Orbax checkpoints of the train state, the grain iterator and JSON metadata (docs/design.md 5).

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` holds params, opt_state and
step; `data` the grain iterator state (so a resumed run reads the batches an uninterrupted run
would); `meta` the resolved config, model shape, tokenizer hash, mesh and lineage. Saves are
asynchronous; orbax writes into a temporary directory and renames it when complete, so an
interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

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


def check_compatible(meta: dict[str, Any] | None, model_config, workdir: str):
  """Refuses to resume a checkpoint whose model shape differs from `config.model`.

  Raises:
    CheckpointError: naming the differing fields and the two ways out.
  """
  if not meta:
    return
  saved = meta.get('model_shape', {})
  current = model_shape(model_config)
  diffs = [f'{k}: checkpoint {saved[k]!r} vs config {current[k]!r}'
           for k in current if k in saved and saved[k] != current[k]]
  if diffs:
    raise CheckpointError(
        f'--workdir={workdir} holds a checkpoint of a different model ({"; ".join(diffs)}). '
        f'Use a new --workdir, pass the config that wrote it, or grow it with launch.upscale.')


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)
