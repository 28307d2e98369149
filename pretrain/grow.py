"""Growing a trained run into a larger model: load the source run, plan, apply, write the
grown run as step 0 of a new workdir (docs/algorithms.md 4; the maps are `models.growth`).

  result = grow.grow_run(from_workdir, target_config, workdir)   # a GrowthResult
  print(grow.summary(result, config_spec, workdir))

The target config's data, vocabulary and tokenizer fields default to the source run's (the
tokenizer must be the very file the source trained with); `config.upscale` holds the growth
options. `launch.pretrain` on the new workdir resumes step 0 and adopts the values growth
fixed (`checkpointing.adopt_growth_values`). Nothing is written before every check passes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
import models
from models import growth
from optim import tree_paths
from pretrain import checkpointing
from pretrain import mesh as mesh_lib
from pretrain import rundir
from pretrain import train

# Source-run fields reused unless given on the command line (same corpus and tokenizer).
INHERITED_FIELDS = (
  'objective',
  'model.vocab_size',
  'model.type_vocab_size',
  'data.text_files',
  'data.text_unit',
  'data.tfds_name',
  'data.tfds_data_dir',
  'data.tfds_text_key',
  'data.hf_dataset',
  'data.hf_config',
  'data.hf_revision',
  'data.hf_text_field',
  'data.hf_streaming',
  'data.hf_max_examples',
  'data.mixture',
  'data.train_split',
  'data.eval_split',
  'data.validation_fraction',
  'data.cache_dir',
  'data.tokenizer_sample_bytes',
  'data.tokenizer_kind',
  'data.tokenizer_lowercase',
)


@dataclasses.dataclass
class GrowthResult:
  """What `grow_run` did.

  Attributes:
    max_abs_logit_diff: max |logits(grown) - logits(source)| on a held-out batch (float).
    small, grown: held-out {'loss', 'accuracy', 'perplexity'} of the two models.
    report: the growth plan's report (`models.growth.Plan.report()`).
    step: the source checkpoint step; checkpoint: the written step-0 directory.
    num_params: (source, grown) parameter counts; config: the grown run's config.
  """

  max_abs_logit_diff: float
  small: dict[str, float]
  grown: dict[str, float]
  report: dict[str, Any]
  step: int
  checkpoint: str
  num_params: tuple[int, int]
  config: ml_collections.ConfigDict


def _check_paths(from_workdir: str, workdir: str):
  if not os.path.isdir(os.path.join(from_workdir, 'checkpoints')):
    raise train.InputError(
      f'--from_workdir={from_workdir} has no checkpoints/ directory; give '
      'the workdir of a run written by launch.pretrain.'
    )
  out_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise train.InputError(
      f'--workdir={workdir} already holds checkpoints; launch.upscale '
      'writes a new run: choose an empty --workdir.'
    )
  if os.path.abspath(workdir) == os.path.abspath(from_workdir):
    raise train.InputError('--workdir must differ from --from_workdir.')


def _target_config(config, src_config, meta, from_workdir, explicit):
  """The target config with the source's data fields and tokenizer unless given explicitly."""
  config = copy.deepcopy(config)
  flat = traverse_util.flatten_dict(src_config.to_dict(), sep='.')
  config.update_from_flattened_dict(
    {field: rundir.to_tuples(flat[field]) for field in INHERITED_FIELDS if field not in explicit}
  )
  tok_path = meta.get('tokenizer', {}).get('path', '')
  if 'data.tokenizer_model' not in explicit:
    if not tok_path or not os.path.isfile(tok_path):
      raise train.InputError(
        f'the tokenizer of {from_workdir} ({tok_path or "path not recorded"}) is not on this '
        'machine; pass the same SentencePiece file with --config.data.tokenizer_model=PATH.'
      )
    config.data.tokenizer_model = tok_path
  return config


def _heldout_metrics(run_setup, config, params, heldout, mesh):
  """Held-out metrics and the logits at the predicted positions (NumPy)."""
  batch = mesh_lib.global_batch(heldout, mesh)
  sums = train.jit_eval_step(run_setup, config)(params, batch)

  def logits_fn(params):
    model = nnx.merge(run_setup.graphdef, params)
    return model(
      batch['inputs'],
      batch['segment_ids'],
      batch['positions'],
      prediction_positions=batch.get('mlm_positions'),
    )

  return train.summarize(jax.device_get(sums)), np.asarray(jax.jit(logits_fn)(params))


def _grown_state(state, plan, options, run_setup):
  """Grown params, and the optimizer state reset or mapped, placed on the target shardings."""
  src_params = jax.device_get(state['params'])
  abstract = run_setup.abstract_state
  params = jax.tree.map(
    lambda a, x: np.asarray(x, a.dtype), abstract['params'], growth.grow_params(src_params, plan)
  )
  fresh = jax.jit(run_setup.tx.init)(params)
  opt_state = fresh
  if options.optimizer_state == 'map':
    try:
      opt_state = grow_opt_state(
        jax.device_get(state['opt_state']), plan, jax.device_get(fresh), src_params
      )
    except growth.GrowthError as e:
      raise train.InputError(str(e)) from e
  new_state = {'step': np.zeros((), np.int32), 'params': params, 'opt_state': opt_state}
  return jax.tree.map(
    lambda a, x: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), abstract, new_state
  )


def grow_opt_state(src_opt_state, plan: growth.Plan, fresh_opt_state, src_params: dict):
  """The source's optimizer state mapped onto the grown model (optimizer_state='map').

  Every sub-tree of the state holding parameter-shaped leaves (`optim.tree_paths.
  parameter_suffix`: Adam/LAMB mu and nu, SGD momentum, EMA buffers) is mapped the way
  gradients map (`growth.grow_like_gradient`; squared factors for second moments,
  `tree_paths.is_second_moment`); a scalar counter next to a mapped field is kept; every other
  leaf takes the fresh state's value (e.g. the schedule's counter: the grown run starts its
  own schedule). docs/algorithms.md 4.7.

  Args:
    src_opt_state: the source's optimizer state (NumPy leaves); plan: the growth plan;
    fresh_opt_state: `tx.init` of the grown parameters (NumPy leaves); src_params: the
      source's parameters (pure dict).

  Returns:
    A state with the fresh state's structure.

  Raises:
    growth.GrowthError: non-scalar leaves that are not parameter-shaped (factored AdaFactor
      statistics), or a state that does not line up with the fresh one: use 'reset'.
  """
  key = lambda path: tuple(tree_paths.key_name(k) for k in path)  # noqa: E731
  param_shapes = {
    tuple(map(str, path)): np.shape(v) for path, v in traverse_util.flatten_dict(src_params).items()
  }
  flat_src = {
    key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(src_opt_state)[0]
  }
  groups: dict[tuple, dict] = {}  # state prefix -> {parameter path: leaf}
  for path, leaf in flat_src.items():
    start = tree_paths.parameter_suffix(path, np.shape(leaf), param_shapes)
    if start is not None:
      groups.setdefault(path[:start], {})[path[start:]] = np.asarray(leaf)
    elif np.ndim(leaf) > 0:
      raise growth.GrowthError(
        f'optimizer state leaf {"/".join(path)} (shape {np.shape(leaf)}) is not shaped like '
        "a parameter and cannot be mapped; use growth.optimizer_state='reset' (or an "
        'unfactored optimizer such as adamw/lamb/sgdm).'
      )
  # Parameter paths back to the source's own keys (ints for a list of layers).
  own_key = {tuple(map(str, path)): path for path in traverse_util.flatten_dict(src_params)}
  mapped: dict[tuple, np.ndarray] = {}
  for prefix, flat in groups.items():
    power = 2 if tree_paths.is_second_moment(prefix) else 1
    tree = growth.grow_like_gradient(
      traverse_util.unflatten_dict({own_key[p]: v for p, v in flat.items()}), plan, power
    )
    for path, value in traverse_util.flatten_dict(tree).items():
      mapped[prefix + tuple(map(str, path))] = value
  kept_prefixes = {prefix[:-1] for prefix in groups if prefix}
  leaves, used = [], 0
  for path, fresh in jax.tree_util.tree_flatten_with_path(fresh_opt_state)[0]:
    k = key(path)
    if k in mapped:
      used += 1
      leaves.append(np.asarray(mapped[k]).astype(np.asarray(fresh).dtype))
    elif np.ndim(fresh) == 0 and k[:-1] in kept_prefixes and k in flat_src:
      leaves.append(np.asarray(flat_src[k]))
    else:
      leaves.append(np.asarray(fresh))
  if used != len(mapped):
    raise growth.GrowthError(
      'the grown optimizer state does not line up with the fresh one (was it built by the '
      "same optimizer?); use growth.optimizer_state='reset'."
    )
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh_opt_state), leaves)


def grow_run(
  from_workdir: str,
  config,
  workdir: str,
  step: int | None = None,
  explicit: frozenset = frozenset(),
) -> GrowthResult:
  """Grows the checkpoint of `from_workdir` into step 0 of `workdir` for target `config`.

  Args:
    from_workdir: a workdir written by launch.pretrain (or launch.upscale).
    config: the target ConfigDict (config.upscale holds the growth options).
    workdir: the new run directory; must hold no checkpoint.
    step: the source step (default: the newest checkpoint that restores, as
      `rundir.read_checkpoint` picks it).
    explicit: dotted config fields given on the command line (kept over the source's).

  Returns:
    A GrowthResult.

  Raises:
    train.InputError: bad input (paths, an invalid growth, another tokenizer, a damaged
      --step, no checkpoint that restores); nothing has been written.
  """
  _check_paths(from_workdir, workdir)
  try:
    # The mesh comes from the target config (growth never changes it); the source state is
    # restored onto it, and the grown state is built on it.
    mesh = mesh_lib.make_mesh(config.mesh)
  except ValueError as e:
    raise train.InputError(str(e)) from e

  def read(ckpt, src_step, src_meta):
    src_config = rundir.config_from_meta(src_meta['config'])
    try:
      src_setup = train.setup(src_config, mesh)
    except ValueError as e:  # the mesh does not fit the source model: bad input, not damage
      raise train.InputError(str(e)) from e
    return src_config, src_setup, ckpt.restore(src_step, src_setup.abstract_state)

  # The newest checkpoint that restores (or --step), as launch.pretrain picks its own.
  step, meta, (src_config, src_setup, state) = rundir.read_checkpoint(from_workdir, read, step)
  config = _target_config(config, src_config, meta, from_workdir, explicit)
  try:
    options = growth.options_from_config(config)
    models.validate(config)
    plan = growth.plan(src_config, config, options)
    config = growth.grown_config(config, plan)
    train.validate(config, mesh)
    source = text_datasets.load_text_source(config.data)
    tokenizer = tokenizer_lib.load_or_train(
      config.data, config.model, source.train, source.text_key, source.fingerprint
    )
  except ValueError as e:
    raise train.InputError(str(e)) from e
  if tokenizer.sha256 != meta.get('tokenizer', {}).get('sha256', tokenizer.sha256):
    raise train.InputError(
      f'--config.data.tokenizer_model={config.data.tokenizer_model} is not the tokenizer '
      f'{from_workdir} was trained with (sha256 differs); pass the file it recorded, '
      f'{meta["tokenizer"].get("path") or "(none recorded)"}.'
    )
  heldout = pipeline.eval_batches(source.validation, tokenizer, config, text_key=source.text_key)[0]
  train_iter = iter(
    pipeline.make_dataset(source.train, tokenizer, config, text_key=source.text_key, train=True)
  )
  dst_setup = train.setup(config, mesh)
  new_state = _grown_state(state, plan, options, dst_setup)

  small, small_logits = _heldout_metrics(src_setup, src_config, state['params'], heldout, mesh)
  grown, grown_logits = _heldout_metrics(dst_setup, config, new_state['params'], heldout, mesh)
  weights = np.asarray(heldout.get('mlm_weights', heldout.get('weights')))
  diff = float(np.max(np.abs(small_logits - grown_logits)[weights > 0]))

  lineage = list(meta.get('lineage', [])) + [
    {
      'grown_from': os.path.abspath(from_workdir),
      'step': int(step),
      'family': meta.get('family'),
      'model_shape': meta.get('model_shape'),
      'max_abs_logit_diff': diff,
      'heldout_loss_small': small['loss'],
      'heldout_loss_grown': grown['loss'],
      'upscale': plan.report(),
    }
  ]
  new_meta = checkpointing.checkpoint_meta(config, tokenizer, mesh, source, lineage)
  checkpoint = rundir.write_run(workdir, config, new_state, train_iter, new_meta)
  return GrowthResult(
    max_abs_logit_diff=diff,
    small=small,
    grown=grown,
    report=plan.report(),
    step=int(step),
    checkpoint=checkpoint,
    num_params=(src_setup.num_params, dst_setup.num_params),
    config=config,
  )


def summary(result: GrowthResult, config_spec: str, workdir: str) -> str:
  """The lines `launch.upscale` prints: shapes, scheme, notes, the held-out check, where the
  checkpoint went and the exact `launch.pretrain` command that continues the grown run."""
  report = result.report
  shape = lambda s: (
    f'd {s["hidden_size"]}, L {s["num_layers"]}, '
    + (  # noqa: E731
      f'e {s["expansion"] * s["hidden_size"]}, s {s["shared_dim"]}'
      if s['family'] == 'gau'
      else f'h {s["num_heads"]} x {s["head_dim"]}, F {s["mlp_dim"]}'
    )
  )
  src, dst = report['from'], report['to']
  lines = [
    f'grew {src["family"]} ({shape(src)}; {result.num_params[0]:,} params) -> '
    f'({shape(dst)}; {result.num_params[1]:,} params) from step {result.step}',
    f'scheme: width {report["width_method"]} (stream {report["stream_expansion"]}, scale '
    f'{report["stream_scale"]:.4g}), symmetry breaking {report["options"]["symmetry_breaking"]}, '
    f'depth {report["depth_method"]} {report["new_layers"] or ""}, optimizer state '
    f'{report["options"]["optimizer_state"]}; exact: {report["exactness"]}',
  ]
  lines += [f'  note: {note}' for note in report['notes']]
  if report['config_overrides']:
    lines.append(
      'config values set by growth: '
      + ', '.join(f'{k}={v!r}' for k, v in report['config_overrides'].items())
    )
  small, grown = result.small, result.grown
  lines.append(
    f'held-out batch: max |logit difference| {result.max_abs_logit_diff:.3g}; '
    f'{result.config.objective.upper()} loss small {small["loss"]:.6f} vs grown '
    f'{grown["loss"]:.6f}; accuracy {small["accuracy"]:.4f} vs '
    f'{grown["accuracy"]:.4f}'
  )
  lines.append(f'wrote {result.checkpoint}')
  try:
    extra = rundir.continue_flags(result.config, rundir.load_preset(config_spec))
  except Exception:  # pylint: disable=broad-except
    extra = ['<the overrides in', os.path.join(workdir, 'config.json>')]
  lines.append(
    'continue training with:\n  python -m launch.pretrain '
    + ' '.join([f'--config={config_spec}', f'--workdir={workdir}'] + extra)
  )
  return '\n'.join(lines)
