"""Fine-tuning: `finetune(options, workdir, from_workdir=..., config=...)` (docs/finetuning.md).

Reads top to bottom: options, the task loss and the pure eval step, the starting point (the
config, tokenizer and encoder parameters of a `launch.pretrain` run, or a config for a random
initialisation), one run (`prepare_run`, `train_run`, `evaluate`), and the sweep over learning
rates and seeds (`finetune`) that writes `results.json` and the table.

Every (learning rate, seed) pair is one run in `<workdir>/lr<lr>_seed<seed>/`, built from the
trainer's pieces: the mesh and shardings (`train.setup` with the classifier as the model), the
pure train step with its non-finite guard (`train.jit_train_step` with the task loss), orbax
checkpoints (`checkpointing.Checkpointer`: the state only, since the data order is a function
of the step), `metrics.jsonl` + TensorBoard (`metrics.MetricWriter`), the log lines
(`progress.TrainLog`) and SIGTERM / Ctrl-C saving (`guards.StopSignals`). A finished run leaves
`result.json` and is skipped when the command runs again; an interrupted one resumes from its
newest checkpoint and ends where an uninterrupted run ends (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from data_pipelines import tasks
from data_pipelines import tokenizer as tokenizer_lib
import models
from models import classifier
from pretrain import checkpointing
from pretrain import guards
from pretrain import mesh as mesh_lib
from pretrain import metrics as metrics_lib
from pretrain import progress
from pretrain import train

InputError = train.InputError


# ----------------------------------------------------------------------------- options

@dataclasses.dataclass
class Options:
  """How to fine-tune (the `launch.finetune` flags; docs/finetuning.md 5).

  Attributes:
    data: where the task's data comes from (tasks.TaskOptions).
    max_seq_len: n, tokens per example including [CLS] and [SEP]s (longer inputs are cut).
    batch_size: examples per step over all processes (must divide over the data-parallel
      devices); also the evaluation batch.
    num_epochs: training length in passes over the training set, when num_steps is 0.
    num_steps: training length in steps (0: from num_epochs).
    learning_rates: peak AdamW learning rates to sweep; the best by dev metric is reported.
    seeds: seeds per learning rate (head init, dropout, data order); mean and std reported.
    warmup_fraction: linear warmup over this fraction of the steps, then linear decay to 0.
    weight_decay: AdamW's decoupled decay (not on biases and norm scales).
    dropout_rate: dropout in the encoder and before the output layer (BERT: 0.1).
    pooling: 'mean' (mean over non-padding tokens) or 'cls' (first token through a tanh
      pooler); docs/finetuning.md 1 says why 'mean' is the default here.
    log_every_steps, eval_every_steps, checkpoint_every_steps: periods in steps (eval 0: only
      at the end; the end is always evaluated and saved).
    stop_after_steps: stop each run after this many steps in this process (0: off; tests and
      preemption drills).
    progress: 'auto', 'on' or 'off' (the terminal progress bar).
  """
  data: tasks.TaskOptions = dataclasses.field(default_factory=tasks.TaskOptions)
  max_seq_len: int = 128
  batch_size: int = 32
  num_epochs: float = 3.0
  num_steps: int = 0
  learning_rates: tuple[float, ...] = (3e-4,)
  seeds: tuple[int, ...] = (0,)
  warmup_fraction: float = 0.1
  weight_decay: float = 0.01
  dropout_rate: float = 0.1
  pooling: str = 'mean'
  log_every_steps: int = 50
  eval_every_steps: int = 0
  checkpoint_every_steps: int = 500
  stop_after_steps: int = 0
  progress: str = 'auto'


def validate_options(options: Options):
  """Raises ValueError naming the flag when an option is out of range."""
  if not options.learning_rates or any(not lr > 0 for lr in options.learning_rates):
    raise ValueError(f'--lrs={",".join(map(str, options.learning_rates))}: give one or more '
                     f'learning rates > 0, e.g. --lrs=1e-4,3e-4,1e-3.')
  if not options.seeds or len(set(options.seeds)) != len(options.seeds):
    raise ValueError(f'--seeds={",".join(map(str, options.seeds))}: give one or more distinct '
                     f'integer seeds, e.g. --seeds=0,1,2.')
  if options.batch_size < 1:
    raise ValueError(f'--batch_size={options.batch_size} must be >= 1.')
  if options.num_steps < 0 or (options.num_steps == 0 and not options.num_epochs > 0):
    raise ValueError(f'--num_steps={options.num_steps} / --num_epochs={options.num_epochs}: '
                     f'give num_steps >= 1 or num_epochs > 0.')
  if not 0 <= options.warmup_fraction < 1:
    raise ValueError(f'--warmup_fraction={options.warmup_fraction} must be in [0, 1) (BERT: '
                     f'0.1).')
  if not 0 <= options.dropout_rate < 1:
    raise ValueError(f'--dropout_rate={options.dropout_rate} must be in [0, 1) (BERT: 0.1).')
  for name in ('log_every_steps', 'checkpoint_every_steps'):
    if getattr(options, name) < 1:
      raise ValueError(f'--{name}={getattr(options, name)} must be >= 1.')
  if options.eval_every_steps < 0 or options.stop_after_steps < 0:
    raise ValueError('--eval_every_steps and --stop_after_steps must be >= 0 (0: off).')
  if options.progress not in progress.PROGRESS_MODES:
    raise ValueError(f'--progress={options.progress!r}; use one of '
                     f'{", ".join(progress.PROGRESS_MODES)}.')
  classifier.validate_head(options.pooling, 1)


# ----------------------------------------------------------------------------- loss and steps

def task_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, kind: str):
  """The task loss of a batch and its sums.

  Args:
    logits: float32 [b, C]; labels: int32 [b] (classification) or float32 [b] (regression);
    weights: float32 [b] (0 for the filler rows of a padded evaluation batch).
    kind: 'classification' (softmax cross-entropy) or 'regression' (squared error on
      logits[:, 0], as BERT's STS-B head).

  Returns:
    (mean loss over weighted examples, {'loss_sum', 'correct_sum', 'weight_sum'}) (float32
    scalars; correct_sum is 0 for regression).
  """
  logits = logits.astype(jnp.float32)
  if kind == 'classification':
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  else:
    losses = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    correct = jnp.zeros_like(losses)
  weight_sum = jnp.sum(weights)
  sums = {'loss_sum': jnp.sum(losses * weights), 'correct_sum': jnp.sum(correct * weights),
          'weight_sum': weight_sum}
  return sums['loss_sum'] / jnp.maximum(weight_sum, 1.0), sums


def _logits(params, graphdef, batch, dropout_rng=None):
  model = nnx.merge(graphdef, params)
  return model(batch['inputs'], batch['segment_ids'], batch['positions'],
               batch['token_types'], dropout_rng)


def make_loss_fn(kind: str) -> Callable:
  """`(params, graphdef, batch, dropout_rng) -> (loss, sums)` for `train.make_train_step`."""

  def loss_fn(params, graphdef, batch, dropout_rng):
    logits = _logits(params, graphdef, batch, dropout_rng)
    return task_loss(logits, batch['labels'], batch['weights'], kind)

  return loss_fn


def jit_eval_step(run_setup: train.Setup, config, kind: str) -> Callable:
  """The compiled eval step `(params, batch) -> (logits float32 [b, C], sums)`, outputs
  replicated so that every process reads every row."""
  mesh = run_setup.mesh

  def eval_step(params, batch):
    logits = _logits(params, run_setup.graphdef, batch)
    return logits, task_loss(logits, batch['labels'], batch['weights'], kind)[1]

  return mesh_lib.jit(eval_step, mesh, config.mesh.logical_axis_rules,
                      in_shardings=(run_setup.state_shardings['params'],
                                    mesh_lib.batch_sharding(mesh)),
                      out_shardings=mesh_lib.replicated(mesh))


# ----------------------------------------------------------------------------- starting point

@dataclasses.dataclass
class Start:
  """Where fine-tuning starts.

  Attributes:
    config: the encoder's config (model fields from the pretraining run, or --config).
    tokenizer: the pretraining run's tokenizer (or the config's).
    from_workdir, step: the pretraining run and its checkpoint step ('' / None: random init).
    meta: that checkpoint's metadata (None for random init).
  """
  config: Any
  tokenizer: Any
  from_workdir: str = ''
  step: int | None = None
  meta: dict | None = None


# Model fields --config may change for fine-tuning a run (how it computes, not what).
OVERRIDABLE_FIELDS = ('dtype', 'remat_policy')


def _newest_readable_meta(ckpt: checkpointing.Checkpointer):
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.read_meta(step)
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(meta, dict):
      return step, meta
  return None, None


def _check_same_encoder(meta: dict, config, from_workdir: str):
  """--config must describe the checkpoint's encoder (family, shape, function fields)."""
  saved_family = meta.get('family')
  if saved_family and saved_family != config.model.family:
    raise InputError(
        f'--from_workdir={from_workdir} holds a {saved_family} checkpoint but --config is a '
        f'{config.model.family} config; pass the config file of the {saved_family} family '
        f'(launch/configs/), or leave --config out to use the run\'s own config.')
  saved = dict(meta.get('model_shape', {}))
  saved_model = meta.get('config', {}).get('model', {})
  saved.update({k: saved_model[k] for k in checkpointing.FUNCTION_FIELDS if k in saved_model})
  current = checkpointing.model_shape(config.model)
  current.update({k: config.model[k] for k in checkpointing.FUNCTION_FIELDS if k in config.model})
  diffs = [f'{k}: checkpoint {saved[k]!r} vs --config {current[k]!r}'
           for k in sorted(current) if k in saved and saved[k] != current[k]]
  if diffs:
    raise InputError(
        f'--from_workdir={from_workdir} holds another model than --config describes '
        f'({"; ".join(diffs)}); pass the preset it was trained with (its config.json), or '
        f'leave --config out.')


def resolve_start(from_workdir: str = '', config=None, tokenizer_path: str = '') -> Start:
  """The config, tokenizer and checkpoint fine-tuning starts from.

  Order (the one place it is decided): --from_workdir's newest readable checkpoint, whose
  config is taken from its metadata (--config, if also given, must describe the same encoder
  and supplies the other fields, e.g. the mesh); else --config alone, a random initialisation
  with the config's tokenizer (--tokenizer, config.data.tokenizer_model, or the one trained on
  the config's pretraining text, cached).

  Raises:
    InputError: no checkpoint there, another family or shape than --config, a tokenizer that
      is missing or is not the run's.
  """
  from pretrain import grow  # pylint: disable=g-import-not-at-top
  try:
    if from_workdir:
      if (not metrics_lib.is_remote(from_workdir)
          and not os.path.isdir(os.path.join(from_workdir, 'checkpoints'))):
        raise InputError(f'--from_workdir={from_workdir} has no checkpoints/ directory; give '
                         f'the --workdir of a launch.pretrain run (or of launch.convert).')
      ckpt = checkpointing.Checkpointer(from_workdir, async_save=False)
      try:
        step, meta = _newest_readable_meta(ckpt)
      finally:
        ckpt.close()
      if meta is None:
        raise InputError(f'--from_workdir={from_workdir} holds no readable checkpoint; give '
                         f'the --workdir of a launch.pretrain run that saved one.')
      run_config = grow.config_from_meta(meta.get('config', {}))
      checkpointing.adopt_growth_values(run_config, meta)
      if config is None:
        config = run_config
        config.mesh.shape = (-1, 1, 1)  # this machine's devices, data parallel
      else:
        _check_same_encoder(meta, config, from_workdir)
        config = copy.deepcopy(config)
        for field in OVERRIDABLE_FIELDS:  # the rest of the model is the run's
          run_config.model[field] = config.model[field]
        config.model = run_config.model
        config.data = run_config.data
      tok = tokenizer_lib.load_run_tokenizer(meta, tokenizer_path or None)
    else:
      if config is None:
        raise InputError('give --from_workdir=RUN (fine-tune a pretrained encoder) or '
                         '--config=launch/configs/<family>.py:<preset> (random init, the '
                         'baseline).')
      step = meta = None
      config = copy.deepcopy(config)
      if tokenizer_path:
        config.data.tokenizer_model = tokenizer_path
      if config.data.tokenizer_model:
        tok = tokenizer_lib.load_or_train(config.data, config.model, [], 'text', '')
      else:
        from data_pipelines import text_datasets  # pylint: disable=g-import-not-at-top
        source = text_datasets.load_text_source(config.data)
        tok = tokenizer_lib.load_or_train(config.data, config.model, source.train,
                                          source.text_key, source.fingerprint)
    models.validate(config)
    if tok.vocab_size > config.model.vocab_size:
      raise InputError(f'the tokenizer has {tok.vocab_size} pieces but model.vocab_size is '
                       f'{config.model.vocab_size}; pass the run\'s tokenizer (--tokenizer).')
  except InputError:
    raise
  except ValueError as e:  # TokenizerError, DataError, CheckpointError, config errors
    raise InputError(str(e)) from e
  return Start(config, tok, from_workdir, step, meta)


def load_encoder_params(from_workdir: str, step: int, abstract_encoder):
  """The encoder parameters of a pretraining checkpoint (its MLM head and optimizer state are
  not read), restored onto the shardings of `abstract_encoder` (ShapeDtypeStructs).

  Raises:
    InputError: the checkpoint's parameters do not fit (the message names the cause).
  """
  path = os.path.join(checkpointing.checkpoint_directory(from_workdir), str(step), 'state')
  target = {'params': abstract_encoder}
  try:
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f'the encoder parameters of {path} do not fit this model '
                     f'({checkpointing.describe_error(e)}); pass the config the run was '
                     f'trained with, or leave --config out.') from e
  return restored['params']


# ----------------------------------------------------------------------------- one run

def num_train_steps(options: Options, num_examples: int) -> int:
  """options.num_steps, or ceil(num_epochs * examples / batch_size)."""
  if options.num_steps:
    return options.num_steps
  return max(1, math.ceil(options.num_epochs * num_examples / options.batch_size))


def run_config(config, options: Options, task: tasks.Task, learning_rate: float, seed: int,
               steps: int):
  """The full ConfigDict of one run: the encoder's config with the fine-tuning batch, length,
  dropout, seed, AdamW (linear warmup and decay, clip 1.0) and loop periods, plus a
  `finetune` section recording the task and head (written to config.json)."""
  from launch.configs import base  # pylint: disable=g-import-not-at-top
  c = copy.deepcopy(config)
  c.seed = int(seed)
  c.objective = 'mlm'  # bidirectional encoder (models/classifier.py); no LM head is run
  c.model.dropout_rate = float(options.dropout_rate)
  c.data.global_batch_size, c.data.seq_len = options.batch_size, options.max_seq_len
  c.optim = base.get_base_config().optim
  o = c.optim
  o.name, o.learning_rate, o.schedule = 'adamw', float(learning_rate), 'linear'
  o.warmup_steps = int(round(options.warmup_fraction * steps))
  o.weight_decay, o.grad_clip_norm = float(options.weight_decay), 1.0
  t = c.train
  t.num_train_steps, t.log_every_steps = steps, options.log_every_steps
  t.eval_every_steps = options.eval_every_steps or steps
  t.checkpoint_every_steps, t.keep_checkpoints = options.checkpoint_every_steps, 2
  t.stop_after_steps, t.progress, t.profile_steps = options.stop_after_steps, options.progress, ''
  with c.unlocked():
    c.finetune = ml_collections.ConfigDict({
        'task': task.name, 'kind': task.kind, 'label_names': list(task.label_names),
        'metric': task.metric, 'pooling': options.pooling,
        'data': {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in dataclasses.asdict(options.data).items()}})
  return c


@dataclasses.dataclass
class Run:
  """One (learning rate, seed) run; the attributes `train.save` reads (ckpt, state,
  train_iter, meta) have its meaning.

  Attributes:
    config, workdir: the run's ConfigDict and directory.
    task, train_data, dev_data: the task and its encoded splits.
    run_setup: mesh, classifier structure, optimizer, shardings.
    ckpt, meta: the run's checkpoints and their metadata.
    state, start_step: the train state (restored, or fresh with the pretrained encoder).
    train_step, eval_step: compiled steps; writer: metrics.jsonl + TensorBoard.
    evals: every evaluation of this run ({'step', 'loss', metric: value}).
  """
  config: Any
  workdir: str
  task: tasks.Task
  train_data: tasks.Encoded
  dev_data: tasks.Encoded
  run_setup: train.Setup
  ckpt: checkpointing.Checkpointer
  meta: dict
  state: dict
  start_step: int
  train_step: Callable
  eval_step: Callable
  writer: metrics_lib.MetricWriter
  tokenizer: Any = None
  train_iter: Any = None  # the data order is a function of the step: nothing to checkpoint
  evals: list = dataclasses.field(default_factory=list)
  stopped_by: str = ''

  def close(self):
    try:
      self.ckpt.close()
    finally:
      self.writer.close()


def _settings(start: Start, options: Options, task: tasks.Task, learning_rate: float,
              seed: int, steps: int) -> dict[str, Any]:
  """What makes two runs the same run (compared on resume and before reusing result.json)."""
  return {'from_workdir': os.path.abspath(start.from_workdir) if start.from_workdir else '',
          'from_step': start.step, 'task_fingerprint': task.fingerprint,
          'learning_rate': float(learning_rate), 'seed': int(seed), 'num_steps': int(steps),
          'batch_size': options.batch_size, 'max_seq_len': options.max_seq_len,
          'pooling': options.pooling, 'dropout_rate': float(options.dropout_rate),
          'warmup_fraction': float(options.warmup_fraction),
          'weight_decay': float(options.weight_decay), 'tokenizer': start.tokenizer.sha256,
          'model_shape': checkpointing.model_shape(start.config.model)}


def _check_settings(saved: dict | None, settings: dict, where: str):
  if not saved:
    return
  diffs = [f'{k}: {saved.get(k)!r} there vs {v!r} now' for k, v in settings.items()
           if json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(v))]
  if diffs:
    raise InputError(f'{where} holds a fine-tuning run with other settings '
                     f'({"; ".join(diffs)}); use a new --workdir, or the flags of that run.')


def _build(task: tasks.Task, options: Options) -> Callable:
  """config -> the classifier for this task (parameters from nnx.Rngs(params=config.seed))."""
  return lambda c: classifier.build(c, task.num_outputs, options.pooling,
                                    rngs=nnx.Rngs(params=c.seed))


def compiled_steps(config, task: tasks.Task, options: Options, cache: dict | None = None):
  """(setup, train step, eval step) of a run config, reused from `cache` by every run whose
  compiled program is the same: runs that differ only in the seed or stop_after_steps (the
  seed changes the initial state, the data order and the dropout key, which are arguments).

  Raises:
    ValueError: the mesh does not fit the devices or the batch does not divide over it.
  """
  program = copy.deepcopy(config)
  program.seed, program.train.stop_after_steps = 0, 0
  key = (program.to_json_best_effort(), task.kind, task.num_outputs, options.pooling)
  if cache is not None and key in cache:
    return cache[key]
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_global_batch(options.batch_size, mesh)
  run_setup = train.setup(config, mesh, _build(task, options))
  steps = (run_setup, train.jit_train_step(run_setup, config, make_loss_fn(task.kind)),
           jit_eval_step(run_setup, config, task.kind), jit_init(run_setup, config, task,
                                                                 options))
  if cache is not None:
    cache[key] = steps
  return steps


def jit_init(run_setup: train.Setup, config, task: tasks.Task, options: Options) -> Callable:
  """The compiled fresh state `(key, encoder_params or None) -> state`: the classifier
  initialised from `key` (nnx.Rngs(params=key)), its encoder replaced by `encoder_params`
  when given, step 0 and the optimizer's initial state, created directly in the state's
  shardings (as `train.init_state`). One program per sweep: the seed is an argument."""

  def init(key, encoder_params):
    model = classifier.build(config, task.num_outputs, options.pooling,
                             rngs=nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if encoder_params is not None:
      params = dict(params, encoder=encoder_params)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': run_setup.tx.init(params)}

  return mesh_lib.jit(init, run_setup.mesh, config.mesh.logical_axis_rules,
                      out_shardings=run_setup.state_shardings)


def prepare_run(start: Start, options: Options, task: tasks.Task, data, workdir: str,
                learning_rate: float, seed: int, encoder_params=None, steps_cache=None) -> Run:
  """Sets up one run: config, mesh and shardings, the newest checkpoint of `workdir` or a
  fresh state (the classifier initialised from `seed`, its encoder replaced by
  `encoder_params` when given), compiled steps and the metrics writer.

  Args:
    data: (train, dev) `tasks.Encoded`; encoder_params: pretrained encoder parameters on the
      run's shardings (copied, never donated), or None (random init).
    steps_cache: a dict shared by the runs of a sweep (see `compiled_steps`).

  Raises:
    InputError: the workdir holds a run of other settings; the batch does not divide.
  """
  steps = num_train_steps(options, len(data[0]))
  config = run_config(start.config, options, task, learning_rate, seed, steps)
  settings = _settings(start, options, task, learning_rate, seed, steps)
  ckpt = None
  try:
    run_setup, train_step, eval_step, init = compiled_steps(config, task, options,
                                                            steps_cache)
    mesh = run_setup.mesh
    ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    _check_settings((ckpt.newest_meta() or {}).get('finetune'), settings,
                    f'--workdir={workdir}')
    if jax.process_index() == 0:
      checkpointing.write_config(workdir, config)
    start_step, state = ckpt.restore_newest(run_setup.abstract_state)
    if start_step is None:
      # A new state: encoder_params are copied (the train step donates the state).
      state, start_step = init(jax.random.key(config.seed), encoder_params), 0
    else:
      logging.info('resuming %s from step %d', workdir, start_step)
    if jax.process_index() == 0:
      metrics_lib.truncate_history(workdir, start_step)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  except BaseException as e:
    if ckpt is not None:
      ckpt.close()
    if isinstance(e, ValueError) and not isinstance(e, InputError):
      raise InputError(str(e)) from e
    raise
  meta = {'config': json.loads(config.to_json_best_effort()),
          'model_shape': checkpointing.model_shape(config.model),
          'family': config.model.family,
          'tokenizer': {'sha256': start.tokenizer.sha256,
                        'vocab_size': start.tokenizer.vocab_size,
                        'path': getattr(start.tokenizer, 'path', '')},
          'mesh': dict(mesh.shape), 'finetune': settings,
          'label_names': list(task.label_names)}
  return Run(config=config, workdir=workdir, task=task, train_data=data[0], dev_data=data[1],
             run_setup=run_setup, ckpt=ckpt, meta=meta, state=state, start_step=start_step,
             train_step=train_step, eval_step=eval_step, writer=writer,
             tokenizer=start.tokenizer)


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch (processes feed consecutive row blocks)."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return batch
  per = len(batch['weights']) // count
  return {k: v[index * per:(index + 1) * per] for k, v in batch.items()}


def _device_batch(run: Run, encoded: tasks.Encoded, indices) -> dict[str, jax.Array]:
  batch = tasks.make_batch(encoded, indices, run.config.data.seq_len, run.tokenizer)
  return mesh_lib.global_batch(_local_rows(batch), run.run_setup.mesh)


def evaluate(run: Run, step: int) -> dict[str, float]:
  """Every metric of the task on the whole dev split (the last batch padded with filler rows
  of weight 0); logs and writes {'loss', metric: value}."""
  b, n = run.config.data.global_batch_size, len(run.dev_data)
  outputs, totals = [], None
  for start in range(0, n, b):
    indices = list(range(start, min(start + b, n)))
    indices += [-1] * (b - len(indices))
    logits, sums = run.eval_step(run.state['params'], _device_batch(run, run.dev_data, indices))
    outputs.append(np.asarray(jax.device_get(logits)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  outputs = np.concatenate(outputs)[:n]
  totals = jax.device_get(totals)
  result = {'loss': float(totals['loss_sum']) / max(float(totals['weight_sum']), 1.0)}
  result.update(tasks.compute_metrics(run.task, outputs, run.dev_data.labels))
  run.writer.write(step, 'eval', result)
  run.evals.append(dict(result, step=step))
  logging.info('eval step %d | %s (%d dev examples)', step,
               ' | '.join(f'{k} {v:.4f}' for k, v in result.items()), n)
  return result


def train_run(run: Run, signals: guards.StopSignals) -> dict[str, float] | None:
  """Steps from run.start_step to train.num_train_steps (or stop_after_steps, SIGTERM,
  Ctrl-C) with the trainer's hooks: log lines, evaluation every eval_every_steps and at the
  end, checkpoints every checkpoint_every_steps, at the end and on a stop.

  Returns:
    The final dev metrics, or None when stopped before the end (a checkpoint was saved).

  Raises:
    guards.RunStopped: too many non-finite steps in a row (3) or a failed save (4).
  """
  t = run.config.train
  num_steps = t.num_train_steps
  stop_at = min(num_steps, run.start_step + t.stop_after_steps) if t.stop_after_steps else (
      num_steps)
  bar = progress.ProgressBar(t.progress, run.start_step, stop_at)
  log = progress.TrainLog(run.config, bar)
  # Encoder FLOPs only (TrainLog counts an MLM head a classifier does not run).
  log.flops_per_step = models.flops_per_token(run.config, 0) * log.tokens_per_step
  seed, b, n = run.config.seed, run.config.data.global_batch_size, len(run.train_data)
  base_key = jax.random.key(seed)
  health = guards.Health(t.max_nonfinite_steps)
  step, previous, result = run.start_step, None, None
  try:
    while step < stop_at:
      batch = _device_batch(run, run.train_data, tasks.train_indices(n, step, b, seed))
      run.state, step_metrics = run.train_step(run.state, batch, base_key)
      log.add(step_metrics, first=step == run.start_step, state=run.state)
      step += 1
      signals.current_step = step
      if previous is not None:
        health.observe(step - 1, previous)
      previous = step_metrics
      log_step = step % t.log_every_steps == 0 or step == stop_at
      if log_step:
        log.write(run.writer, step)
      if step % t.eval_every_steps == 0 or step == num_steps:
        result = evaluate(run, step)
      stop = signals.should_stop(step, log_step)
      if step % t.checkpoint_every_steps == 0 or step == stop_at or stop:
        health.observe(step, step_metrics)
        train.save(run, step, health, force=stop)
      if stop:
        run.stopped_by = signals.reason
        logging.warning('stopped %s at step %d after %s; run the same command to resume',
                        run.workdir, step, signals.reason)
        return None
    if previous is not None:
      health.observe(step, previous)
  finally:
    bar.close()
  if step < num_steps:
    return None
  return result if result is not None else evaluate(run, step)


# ----------------------------------------------------------------------------- the sweep

def run_name(learning_rate: float, seed: int) -> str:
  """The subdirectory of one run: 'lr0.0003_seed0'."""
  return f'lr{learning_rate:g}_seed{seed}'


def _std(values) -> float:
  """Sample standard deviation (ddof 1; 0 for one value)."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(task: tasks.Task, runs: list[dict[str, Any]], options: Options,
              start: Start) -> dict[str, Any]:
  """results.json: per learning rate the mean and std over seeds of every dev metric, the
  best learning rate by the task metric's mean, and its mean and std as top-level numbers
  (what `launch.report` tables)."""
  sweep = []
  for lr in options.learning_rates:
    mine = [r for r in runs if r['learning_rate'] == float(lr)]
    values = {m: [r['dev'][m] for r in mine] for m in task.metrics}
    sweep.append({'learning_rate': float(lr), 'seeds': [r['seed'] for r in mine],
                  'dev': values,
                  'mean': {m: float(np.mean(v)) for m, v in values.items()},
                  'std': {m: _std(v) for m, v in values.items()}})
  best = max(sweep, key=lambda s: s['mean'][task.metric])
  metric = task.metric
  return {
      'task': task.name, 'kind': task.kind, 'metric': metric,
      'init': 'pretrained' if start.from_workdir else 'random',
      'from_workdir': os.path.abspath(start.from_workdir) if start.from_workdir else '',
      'from_step': start.step, 'family': start.config.model.family,
      'train_examples': len(task.train), 'dev_examples': len(task.dev),
      'num_steps': runs[0]['num_steps'] if runs else 0,
      'best_learning_rate': best['learning_rate'], 'num_seeds': len(options.seeds),
      f'dev_{metric}_mean': best['mean'][metric], f'dev_{metric}_std': best['std'][metric],
      'best': {'learning_rate': best['learning_rate'], 'mean': best['mean'],
               'std': best['std']},
      'sweep': sweep, 'runs': runs,
  }


def results_table(results: dict[str, Any]) -> str:
  """A Markdown table of the sweep: per learning rate, mean +- std of every dev metric over
  the seeds and the task metric of each seed; the best row is marked."""
  metrics = list(results['sweep'][0]['mean']) if results['sweep'] else []
  metric = results['metric']
  lines = [f'{results["task"]} ({results["init"]} init, {results["num_steps"]} steps, '
           f'{results["num_seeds"]} seed(s); dev {metric} picks the learning rate)',
           '| learning rate | ' + ' | '.join(f'{m} (mean ± std)' for m in metrics) +
           f' | {metric} per seed |',
           '|---' * (len(metrics) + 2) + '|']
  for row in results['sweep']:
    mark = ' (best)' if row['learning_rate'] == results['best_learning_rate'] else ''
    cells = [f'{row["mean"][m]:.4f} ± {row["std"][m]:.4f}' for m in metrics]
    seeds = ', '.join(f'{v:.4f}' for v in row['dev'][metric])
    lines.append(f'| {row["learning_rate"]:g}{mark} | ' + ' | '.join(cells) + f' | {seeds} |')
  return '\n'.join(lines)


def _read_json(path: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, value):
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def finetune(options: Options, workdir: str, from_workdir: str = '', config=None,
             tokenizer_path: str = '', steps_cache: dict | None = None
             ) -> dict[str, Any] | None:
  """Fine-tunes for every learning rate and seed of `options`, then writes
  `<workdir>/results.json` and logs the best result (`results_table` formats the sweep).

  Args:
    options: what to fine-tune on and how (Options).
    workdir: the fine-tuning directory: one `lr<lr>_seed<s>/` per run (config.json,
      metrics.jsonl, tensorboard/, checkpoints/, result.json), and results.json,
      metrics.jsonl + config.json (copies of the best run's, for launch.report) at the top.
    from_workdir, config, tokenizer_path: the starting point (`resolve_start`).
    steps_cache: compiled steps shared with other calls in this process (benchmarks, tests);
      None: a fresh cache.

  Returns:
    The results (see `aggregate`), or None when stopped by SIGTERM / Ctrl-C (the same
    command resumes).

  Raises:
    InputError: bad input, before any training (exit code 2 in launch.finetune).
    guards.RunStopped: a run stopped on non-finite steps (3) or a failed save (4).
  """
  metrics_lib.quiet_library_logs()
  signals = guards.StopSignals()
  lock = guards.WorkdirLock(workdir)
  try:
    try:
      validate_options(options)
      lock.acquire()
      start = resolve_start(from_workdir, config, tokenizer_path)
      task = tasks.load(options.data)
      data = (tasks.encode(task.train, start.tokenizer, options.max_seq_len),
              tasks.encode(task.dev, start.tokenizer, options.max_seq_len))
    except ValueError as e:
      raise (e if isinstance(e, InputError) else InputError(str(e))) from e
    logging.info('task %s: %s, %d labels, %d train / %d dev examples%s; start: %s', task.name,
                 task.kind, task.num_outputs if task.kind == 'classification' else 0,
                 len(task.train), len(task.dev), ' (pairs)' if task.is_pair else '',
                 f'{from_workdir} step {start.step}' if from_workdir else 'random init')
    runs, encoder_params = [], None
    steps_cache = {} if steps_cache is None else steps_cache
    for lr in options.learning_rates:
      for seed in options.seeds:
        sub = os.path.join(workdir, run_name(lr, seed))
        steps = num_train_steps(options, len(task.train))
        settings = _settings(start, options, task, lr, seed, steps)
        done = _read_json(os.path.join(sub, 'result.json'))
        if done and done.get('settings') == json.loads(json.dumps(settings)):
          logging.info('%s is done (result.json); skipping it', sub)
          runs.append(done)
          continue
        if start.from_workdir and encoder_params is None:
          try:
            run_setup = compiled_steps(run_config(start.config, options, task, lr, seed, steps),
                                       task, options, steps_cache)[0]
          except ValueError as e:
            raise (e if isinstance(e, InputError) else InputError(str(e))) from e
          encoder_params = load_encoder_params(
              start.from_workdir, start.step, run_setup.abstract_state['params']['encoder'])
        run = prepare_run(start, options, task, data, sub, lr, seed, encoder_params,
                          steps_cache)
        began = time.time()
        try:
          dev = train_run(run, signals)
        finally:
          with train._stop_on_failed_save():  # pylint: disable=protected-access
            run.close()
        if dev is None:
          return None
        result = {'learning_rate': float(lr), 'seed': int(seed), 'num_steps': steps,
                  'dev': dev, 'evals': run.evals, 'seconds': time.time() - began,
                  'settings': json.loads(json.dumps(settings))}
        if jax.process_index() == 0:
          _write_json(os.path.join(sub, 'result.json'), result)
        runs.append(result)
    results = aggregate(task, runs, options, start)
    if jax.process_index() == 0:
      _write_json(os.path.join(workdir, 'results.json'), results)
      best = os.path.join(workdir, run_name(results['best_learning_rate'], options.seeds[0]))
      for name in ('metrics.jsonl', 'config.json'):
        if os.path.exists(os.path.join(best, name)):
          shutil.copyfile(os.path.join(best, name), os.path.join(workdir, name))
    logging.info('results in %s: best learning rate %g, dev %s %.4f ± %.4f over %d seed(s)',
                 os.path.join(workdir, 'results.json'), results['best_learning_rate'],
                 results['metric'], results[f'dev_{results["metric"]}_mean'],
                 results[f'dev_{results["metric"]}_std'], results['num_seeds'])
    return results
  finally:
    lock.release()
    signals.restore()
