"""The trainer: `train_and_evaluate(config, workdir)` and its pure step functions.

Reads top to bottom: losses and metrics, the pure `train_step` / `eval_step`, state
initialisation and sharding, then `train_and_evaluate` (load data, build model and optimizer,
restore checkpoint, train loop). Hot loops never call `nnx.jit`: the model is split once into
(graphdef, params) and a pure step is `jax.jit`ted with donated state (docs/design.md 4).

Resume order (first that applies): a checkpoint in `<workdir>/checkpoints` (the latest step),
else a fresh initialisation from `config.seed`. `launch.upscale` writes a grown model as step 0
of a new workdir, which this order then resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import objectives
from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
import models
import optim
from pretrain import checkpointing
from pretrain import mesh as mesh_lib
from pretrain import metrics as metrics_lib

State = dict[str, Any]  # {'step': int32 [], 'params': pytree, 'opt_state': pytree}


class InputError(ValueError):
  """Bad input found before training starts (config, data, tokenizer, checkpoint, mesh).

  The message is one paragraph naming the flag or file and what to do; `launch.pretrain`
  prints it and exits with code 2.
  """


# ----------------------------------------------------------------------------- losses

def _predictions(batch: dict[str, jax.Array], objective: str):
  """(targets, weights, prediction_positions) for the objective's loss."""
  if objective == 'mlm':
    return batch['mlm_targets'], batch['mlm_weights'], batch['mlm_positions']
  return batch['targets'], batch['weights'], None


def loss_and_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Weighted token cross-entropy with integer labels.

  Args:
    logits: float [b, P, V] (cast to float32); targets: int32 [b, P]; weights: float32 [b, P].

  Returns:
    (mean loss over weighted tokens, sums) where sums = {'loss_sum', 'correct_sum',
    'weight_sum'} (float32 scalars, summed so they aggregate exactly over steps and hosts).
  """
  logits = logits.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  weight_sum = jnp.sum(weights)
  sums = {'loss_sum': jnp.sum(xent * weights), 'correct_sum': jnp.sum(correct * weights),
          'weight_sum': weight_sum}
  return sums['loss_sum'] / jnp.maximum(weight_sum, 1.0), sums


def model_loss(params, graphdef, batch: dict[str, jax.Array], objective: str,
               dropout_rng: jax.Array | None = None):
  """The training loss of one batch: (mean loss, sums of `loss_and_metrics`).

  Args:
    params: pure dict of parameters; graphdef: the model structure (nnx.split).
    batch: the pipeline's arrays (inputs, segment_ids, positions, and mlm_* or targets /
      weights); objective: 'mlm' or 'clm'; dropout_rng: a key (training) or None.
  """
  targets, weights, positions = _predictions(batch, objective)
  model = nnx.merge(graphdef, params)
  logits = model(batch['inputs'], batch['segment_ids'], batch['positions'],
                 prediction_positions=positions, dropout_rng=dropout_rng)
  return loss_and_metrics(logits, targets, weights)


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """loss, accuracy and perplexity from summed metrics."""
  w = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / w
  return {'loss': loss, 'accuracy': float(sums['correct_sum']) / w,
          'perplexity': math.exp(min(loss, 50.0))}


# ----------------------------------------------------------------------------- steps

def make_train_step(graphdef, tx: optax.GradientTransformation, config) -> Callable:
  """Builds the pure train step `(state, batch, base_key) -> (state, metrics)`.

  Per-step randomness (dropout) is `fold_in(base_key, state['step'])`, so a resumed run draws
  the same numbers as an uninterrupted one.
  """
  objective = config.objective
  use_dropout = config.model.dropout_rate > 0

  def train_step(state: State, batch, base_key):
    dropout_rng = jax.random.fold_in(base_key, state['step']) if use_dropout else None
    (_, sums), grads = jax.value_and_grad(model_loss, has_aux=True)(
        state['params'], graphdef, batch, objective, dropout_rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    out = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    step_metrics = dict(sums, grad_norm=optax.tree.norm(grads),
                        update_norm=optax.tree.norm(updates))
    step_metrics.update(optim.metrics(opt_state))
    return out, step_metrics

  return train_step


def make_eval_step(graphdef, config) -> Callable:
  """Builds the pure eval step `(params, batch) -> summed metrics` (no dropout)."""
  objective = config.objective

  def eval_step(params, batch):
    return model_loss(params, graphdef, batch, objective)[1]

  return eval_step


def jit_train_step(run_setup: 'Setup', config) -> Callable:
  """The compiled train step `(state, batch, base_key) -> (state, metrics)` on the setup's
  mesh: state sharded as `run_setup.state_shardings` and donated, batch split over the batch
  axes, traced under the mesh and logical axis rules (`mesh_lib.jit`, docs/design.md 4)."""
  mesh = run_setup.mesh
  return mesh_lib.jit(make_train_step(run_setup.graphdef, run_setup.tx, config), mesh,
                      config.mesh.logical_axis_rules,
                      in_shardings=(run_setup.state_shardings, mesh_lib.batch_sharding(mesh),
                                    None),
                      out_shardings=(run_setup.state_shardings, None), donate_argnums=0)


def jit_eval_step(run_setup: 'Setup', config) -> Callable:
  """The compiled eval step `(params, batch) -> sums` on the setup's mesh (see
  jit_train_step)."""
  mesh = run_setup.mesh
  return mesh_lib.jit(make_eval_step(run_setup.graphdef, config), mesh,
                      config.mesh.logical_axis_rules,
                      in_shardings=(run_setup.state_shardings['params'],
                                    mesh_lib.batch_sharding(mesh)))


# ----------------------------------------------------------------------------- state

def _build_model(config):
  return models.build(config, rngs=nnx.Rngs(params=config.seed))


def _path_key(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """Shardings for the optimizer state: a leaf whose path ends with a parameter's path and
  has its shape (Adam moments, momentum, gains) takes that parameter's sharding; everything
  else (counters, factored row/column statistics, scalars) is replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree.leaves(param_shardings)):
    by_path[_path_key(path)] = (leaf.shape, sharding)
  replicated = mesh_lib.replicated(mesh)

  def pick(path, leaf):
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def check_divisible(abstract_params, param_shardings):
  """Raises ValueError naming the first parameter whose shape the mesh does not divide."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree.leaves(param_shardings)):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % parts:
        name = '/'.join(str(k) for k in _path_key(path))
        raise ValueError(
            f'parameter {name} has size {size} on dim {dim}, which mesh axes {axes} '
            f'({parts} devices) do not divide; change --config.mesh.shape or map that '
            f'logical axis to None in --config.mesh.logical_axis_rules.')


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before the loop: model structure, optimizer, shardings.

  Attributes:
    mesh: the device mesh.
    graphdef: the model's static structure (merge with params to get a module).
    tx: the optimizer.
    abstract_state: ShapeDtypeStructs of the train state with their shardings.
    state_shardings: NamedShardings of the train state.
    num_params: parameter count.
  """
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  abstract_state: State
  state_shardings: State
  num_params: int


def setup(config, mesh) -> Setup:
  """Traces the model and optimizer abstractly (no allocation) and derives the shardings.

  Parameter shardings come from the logical axis names on every parameter and
  `config.mesh.logical_axis_rules`.
  """
  tx = optim.build(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.logical_axis_rules)):
    abstract_model = nnx.eval_shape(lambda: _build_model(config))
    graphdef, abstract_param_state = nnx.split(abstract_model, nnx.Param)
    param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract_param_state, mesh))
  abstract_params = nnx.to_pure_dict(abstract_param_state)
  check_divisible(abstract_params, param_shardings)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  shardings = {
      'step': mesh_lib.replicated(mesh),
      'params': param_shardings,
      'opt_state': opt_state_shardings(abstract_opt_state, abstract_params, param_shardings,
                                       mesh),
  }
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params,
              'opt_state': abstract_opt_state}
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  return Setup(mesh, graphdef, tx, checkpointing.abstract_like(abstract, shardings), shardings,
               num_params)


def init_state(config, run_setup: Setup) -> State:
  """Initialises the train state directly into its shardings (jit with out_shardings: no
  device ever holds the full unsharded parameters)."""

  def init():
    model = _build_model(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': run_setup.tx.init(params)}

  rules = tuple(config.mesh.logical_axis_rules)
  with jax.set_mesh(run_setup.mesh), nnx.logical_axis_rules(rules):
    return jax.jit(init, out_shardings=run_setup.state_shardings)()


# ----------------------------------------------------------------------------- helpers

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
      'model_shape': checkpointing.model_shape(config.model),
      'family': config.model.family,
      'objective': config.objective,
      'tokenizer': {'sha256': tokenizer.sha256, 'vocab_size': tokenizer.vocab_size,
                    'path': getattr(tokenizer, 'path', '')},
      'data_source': source_name,
      'mesh': dict(mesh.shape),
      'code_version': _code_version(),
      'lineage': lineage or [],
  }


class PreemptionWatcher:
  """Turns SIGTERM (how TPU VMs are preempted) into a flag read at step boundaries.

  On several hosts the flag is agreed through `multihost_utils` so that all hosts save the
  same step and stop together.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step boundary')
    self._flag.set()

  def should_stop(self) -> bool:
    flag = self._flag.is_set()
    if jax.process_count() > 1:
      flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
    return flag

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
  for key, value in overrides.items():
    section, field = key.split('.')
    if config[section][field] != value:
      logging.info('grown checkpoint: using %s=%r (set by launch.upscale)', key, value)
      config[section][field] = value


def validate(config, mesh=None):
  """Checks the config before any work starts.

  Raises:
    ValueError: the first problem found, as a sentence naming the field and the fix.
  """
  models.validate(config)  # also config.objective
  optim.validate(config)
  for field in ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'eval_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if config.train[field] < 1:
      raise ValueError(f'--config.train.{field}={config.train[field]} must be >= 1.')
  if config.data.seq_len < 2:
    raise ValueError(f'--config.data.seq_len={config.data.seq_len} must be >= 2.')
  if mesh is not None:
    mesh_lib.check_global_batch(config.data.global_batch_size, mesh)


# ----------------------------------------------------------------------------- main loop

def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; evaluates periodically.

  Args:
    config: the full ConfigDict (launch/configs/base.py).
    workdir: run directory: `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`.

  Returns:
    The final evaluation metrics {'loss', 'accuracy', 'perplexity'} (float).

  Raises:
    ValueError (and subclasses DataError, TokenizerError, CheckpointError): bad input,
      detected before training starts.
  """
  train_cfg = config.train
  is_main = jax.process_index() == 0
  metrics_lib.quiet_library_logs()

  try:
    # Check the config and the mesh.
    mesh = mesh_lib.make_mesh(config.mesh)
    validate(config, mesh)
    if config.optim.weight_decay is None:  # print and record the value in force
      config.optim.weight_decay = optim.weight_decay(config)
    logging.info('resolved config:\n%s', config)
    ckpt = checkpointing.Checkpointer(workdir, keep=train_cfg.keep_checkpoints)
    meta = ckpt.read_meta()
    adopt_growth_values(config, meta)
    checkpointing.check_compatible(meta, config.model, workdir)

    # Load dataset and tokenizer.
    source = text_datasets.load_text_source(config.data)
    tokenizer = tokenizer_lib.load_or_train(config.data, config.model, source.train,
                                            source.text_key, source.fingerprint)
    if meta and meta.get('tokenizer', {}).get('sha256') not in (None, tokenizer.sha256):
      raise checkpointing.CheckpointError(
          f'--workdir={workdir} was trained with a different tokenizer '
          f'({meta["tokenizer"].get("path")}); pass --config.data.tokenizer_model= that file, '
          f'or use a new --workdir.')
    pidx, pcount = jax.process_index(), jax.process_count()
    if pcount > 1:
      digests = multihost_utils.process_allgather(
          np.frombuffer(bytes.fromhex(tokenizer.sha256), np.uint8))
      if not np.all(digests == digests[0]):
        raise ValueError(
            'the processes trained different tokenizers; train one once and pass it to every '
            'host with --config.data.tokenizer_model=PATH.')
    train_ds = pipeline.make_dataset(source.train, tokenizer, config, text_key=source.text_key,
                                     train=True, process_index=pidx, process_count=pcount)
    train_iter = iter(train_ds)
    eval_set = pipeline.eval_batches(source.validation, tokenizer, config,
                                     text_key=source.text_key, process_index=pidx,
                                     process_count=pcount)

    # Build model and optimizer.
    run_setup = setup(config, mesh)
    if is_main:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info('model %s: %s parameters; mesh %s; data %s (%d train / %d validation docs); '
                 'tokenizer %d pieces', config.model.family, f'{run_setup.num_params:,}',
                 dict(mesh.shape), source.name, len(source.train), len(source.validation),
                 tokenizer.vocab_size)

    # Restore checkpoint (or initialise).
    start_step = ckpt.latest_step()
    lineage = (meta or {}).get('lineage', [])
    if start_step is not None:
      logging.info('resuming from %s/%d', ckpt.directory, start_step)
      state = ckpt.restore(start_step, run_setup.abstract_state, train_iter)
    else:
      state = init_state(config, run_setup)
      start_step = 0
  except ValueError as e:  # includes DataError, TokenizerError, CheckpointError
    raise InputError(str(e)) from e
  meta = checkpoint_meta(config, tokenizer, mesh, source.name, lineage)

  train_step = jit_train_step(run_setup, config)
  eval_step = jit_eval_step(run_setup, config)
  base_key = jax.random.key(config.seed)
  schedule = optim.learning_rate_schedule(config)
  accumulation = max(config.optim.accumulation_steps, 1)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)

  num_steps = train_cfg.num_train_steps
  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  num_predictions = (objectives.max_predictions(config.data.seq_len, config.data.mask_rate)
                     if config.objective == 'mlm' else config.data.seq_len)
  flops_per_step = models.flops_per_token(config, num_predictions) * tokens_per_step
  peak = metrics_lib.peak_flops(train_cfg.peak_flops_per_device)

  def evaluate(step: int) -> dict[str, float]:
    totals = None
    for batch in eval_set:
      sums = eval_step(state['params'], mesh_lib.global_batch(batch, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    result = summarize(jax.device_get(totals))
    writer.write(step, 'eval', result)
    logging.info('eval step %d | loss %.4f | acc %.4f | ppl %.2f (%d batches, %d tokens)', step,
                 result['loss'], result['accuracy'], result['perplexity'], len(eval_set),
                 int(totals['weight_sum']))
    return result

  def save(step: int):
    ckpt.save(step, state, train_iter, meta)

  # Train loop.
  watcher = PreemptionWatcher()
  stop_at = num_steps
  if train_cfg.stop_after_steps:
    stop_at = min(num_steps, start_step + train_cfg.stop_after_steps)
  logging.info('training steps %d -> %d of %d (%s tokens/step, %.3g FLOPs/step)', start_step,
               stop_at, num_steps, f'{tokens_per_step:,}', flops_per_step)
  if start_step >= num_steps:
    logging.info('the checkpoint is already at step %d of %d: evaluating only (raise '
                 '--config.train.num_train_steps to train further)', start_step, num_steps)
  pending, window_start, run_start = [], time.time(), time.time()
  window_steps, steps_done = 0, 0
  eval_result = None
  step = start_step
  try:
    while step < stop_at:
      batch = mesh_lib.global_batch(next(train_iter), mesh)
      state, step_metrics = train_step(state, batch, base_key)
      pending.append(step_metrics)
      step += 1
      if steps_done == 0:
        # The first step includes compilation: report it apart from throughput.
        jax.block_until_ready(state)
        logging.info('first step (compilation included) took %.1f s',
                     time.time() - window_start)
        window_start, window_steps = time.time(), -1
      window_steps += 1
      steps_done += 1
      if (step % train_cfg.log_every_steps == 0 or step == stop_at) and pending:
        fetched = jax.device_get(pending)
        elapsed = time.time() - window_start
        sums = {k: sum(m[k] for m in fetched) for k in ('loss_sum', 'correct_sum', 'weight_sum')}
        scalars = summarize(sums)
        del scalars['perplexity']
        scalars['grad_norm'] = float(np.mean([m['grad_norm'] for m in fetched]))
        # The rate of the last optimizer update (updates = micro-steps // accumulation).
        scalars['learning_rate'] = float(schedule(max(step // accumulation - 1, 0)))
        tps = window_steps * tokens_per_step / max(elapsed, 1e-9)
        scalars['tokens_per_sec'] = tps
        scalars['steps_per_sec'] = window_steps / max(elapsed, 1e-9)
        if peak:
          scalars['mfu'] = flops_per_step * scalars['steps_per_sec'] / peak
        for k in fetched[-1]:
          if k.startswith(('eg/', 'optim/')):
            scalars[k] = float(fetched[-1][k])
        writer.write(step, 'train', scalars)
        eta = (num_steps - step) / max(scalars['steps_per_sec'], 1e-9)
        logging.info('%s | ETA %s', metrics_lib.log_line(step, num_steps, scalars),
                     metrics_lib.format_duration(eta))
        pending, window_start, window_steps = [], time.time(), 0
      if step % train_cfg.eval_every_steps == 0 or step == num_steps:
        eval_result = evaluate(step)
      preempted = watcher.should_stop()
      if step % train_cfg.checkpoint_every_steps == 0 or step == stop_at or preempted:
        save(step)
      if preempted:
        logging.warning('stopped at step %d after SIGTERM; checkpoint saved', step)
        break
    if eval_result is None:
      eval_result = evaluate(step)
  finally:
    watcher.restore()
    ckpt.close()
    writer.close()
  total = time.time() - run_start
  logging.info('done: %d steps in %s (%.0f tokens/s overall); checkpoints in %s', steps_done,
               metrics_lib.format_duration(total),
               steps_done * tokens_per_step / max(total, 1e-9), ckpt.directory)
  return eval_result
