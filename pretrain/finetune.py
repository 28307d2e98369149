"""Fine-tuning: `finetune(config, workdir, from_workdir=...)` (docs/finetuning.md).

Reads top to bottom: the `config.finetune` section checked, the task loss and the pure eval
step, the starting point (the config, tokenizer and encoder parameters of a `launch.pretrain`
run, or a config for a random initialisation), one run (`prepare_run`, then the shared
training loop `loop.train_loop` with the task's batches and `evaluate`), and the sweep over
learning rates and seeds (`finetune`) that writes `results.json` and the table.

Every (learning rate, seed) pair is one run in `<workdir>/lr<lr>_seed<seed>/`, built from the
trainer's pieces: the mesh and shardings (`train.setup` with the classifier as the model), the
pure train step with its non-finite guard (`train.jit_train_step` with the task loss), orbax
checkpoints (`checkpointing.Checkpointer`: the state only, since the data order is a function
of the step), `metrics.jsonl` + TensorBoard, and the one loop with its hooks, signals and
health checks (`pretrain/loop.py`). A finished run leaves `result.json` and is skipped when
the command runs again; an interrupted one resumes from its newest checkpoint and ends where
an uninterrupted run ends (tested).
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
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import tasks
from data_pipelines import tokenizer as tokenizer_lib
import models
from models import classifier
from pretrain import checkpointing
from pretrain import config as config_schema
from pretrain import guards
from pretrain import loop
from pretrain import mesh as mesh_lib
from pretrain import metrics as metrics_lib
from pretrain import rundir
from pretrain import sinks
from pretrain import storage
from pretrain import task_metrics
from pretrain import train

InputError = train.InputError


# ----------------------------------------------------------------------------- the config


def validate(config):
  """Checks `config.finetune` and the loop's `config.train` fields before any work.

  Raises:
    ValueError: the first field out of range, named as its flag with the fix.
  """
  ft = config.finetune
  if not ft.learning_rates or any(not lr > 0 for lr in ft.learning_rates):
    raise ValueError(
      f'--config.finetune.learning_rates={",".join(map(str, ft.learning_rates))}'
      f': give one or more learning rates > 0, e.g. '
      f'--config.finetune.learning_rates=1e-4,3e-4,1e-3.'
    )
  if (
    not ft.seeds
    or len(set(ft.seeds)) != len(ft.seeds)
    or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in ft.seeds)
  ):
    raise ValueError(
      f'--config.finetune.seeds={",".join(map(str, ft.seeds))}: give one or '
      f'more distinct integer seeds >= 0, e.g. --config.finetune.seeds=0,1,2.'
    )
  if ft.batch_size < 1:
    raise ValueError(f'--config.finetune.batch_size={ft.batch_size} must be >= 1.')
  if ft.max_seq_len > train.MAX_SEQ_LEN:
    raise ValueError(
      f'--config.finetune.max_seq_len={ft.max_seq_len:,} is beyond {train.MAX_SEQ_LEN:,} '
      f'tokens per example; give a length that fits the task (BERT: 128 or 512).'
    )
  if ft.num_steps < 0 or (ft.num_steps == 0 and not ft.num_epochs > 0):
    raise ValueError(
      f'--config.finetune.num_steps={ft.num_steps} / num_epochs='
      f'{ft.num_epochs}: give num_steps >= 1 or num_epochs > 0.'
    )
  if not 0 <= ft.warmup_fraction < 1:
    raise ValueError(
      f'--config.finetune.warmup_fraction={ft.warmup_fraction} must be in [0, 1) (BERT: 0.1).'
    )
  if not 0 <= ft.validation_fraction < 1:
    raise ValueError(
      f'--config.finetune.validation_fraction={ft.validation_fraction} must be in [0, 1) '
      f'(e.g. 0.1; 0 = no selection on held-out data).'
    )
  if not 0 <= ft.dropout_rate < 1:
    raise ValueError(
      f'--config.finetune.dropout_rate={ft.dropout_rate} must be in [0, 1) (BERT: 0.1).'
    )
  train.validate_train(config.train)
  classifier.validate_head(ft.pooling, 1)


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
  if kind == 'classification':
    return train.loss_and_metrics(logits, labels, weights)
  losses = jnp.square(logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32))
  return train.weighted_sums(losses, jnp.zeros_like(losses), weights)


def _logits(params, graphdef, batch, dropout_rng=None):
  model = nnx.merge(graphdef, params)
  return model(
    batch['inputs'], batch['segment_ids'], batch['positions'], batch['token_types'], dropout_rng
  )


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

  return mesh_lib.jit(
    eval_step,
    mesh,
    config.mesh.logical_axis_rules,
    in_shardings=(run_setup.state_shardings['params'], mesh_lib.batch_sharding(mesh)),
    out_shardings=mesh_lib.replicated(mesh),
  )


# ----------------------------------------------------------------------------- starting point


@dataclasses.dataclass
class Start:
  """Where fine-tuning starts.

  Attributes:
    config: the full config of the runs: the encoder's model and data fields (from the
      pretraining run, or --config for a random initialisation), the rest (finetune, train,
      mesh) from --config.
    tokenizer: the pretraining run's tokenizer (or the config's).
    from_workdir, step: the pretraining run and its checkpoint step ('' / None: random init).
    meta: that checkpoint's metadata (None for random init).
  """

  config: Any
  tokenizer: Any
  from_workdir: str = ''
  step: int | None = None
  meta: dict | None = None


# Model fields --config may change for fine-tuning a run (how it computes, not what); a
# fine-tuning preset leaves them '' (the run's).
OVERRIDABLE_FIELDS = ('dtype', 'remat_policy')


def _check_same_encoder(meta: dict, config, from_workdir: str):
  """A --config that names an encoder must describe the checkpoint's (family, shape,
  function fields); a fine-tuning preset (model.family '') names none."""
  if not config.model.family:
    return
  saved_family = meta.get('family')
  if saved_family and saved_family != config.model.family:
    raise InputError(
      f'--from_workdir={from_workdir} holds a {saved_family} checkpoint but --config is a '
      f'{config.model.family} config; pass the config file of the {saved_family} family '
      f'(launch/configs/), or a fine-tuning preset (launch/configs/finetune.py, the '
      f'default).'
    )
  saved = dict(meta.get('model_shape', {}))
  saved_model = meta.get('config', {}).get('model', {})
  saved.update({k: saved_model[k] for k in checkpointing.FUNCTION_FIELDS if k in saved_model})
  current = checkpointing.model_shape(config.model)
  current.update({k: config.model[k] for k in checkpointing.FUNCTION_FIELDS if k in config.model})
  diffs = [
    f'{k}: checkpoint {saved[k]!r} vs --config {current[k]!r}'
    for k in sorted(current)
    if k in saved and saved[k] != current[k]
  ]
  if diffs:
    raise InputError(
      f'--from_workdir={from_workdir} holds another model than --config describes '
      f'({"; ".join(diffs)}); pass the preset it was trained with (its config.json), or '
      f'a fine-tuning preset (launch/configs/finetune.py, the default).'
    )


def resolve_start(
  from_workdir: str = '', config=None, tokenizer_path: str = '', step: int | str | None = None
) -> Start:
  """The config, tokenizer and checkpoint fine-tuning starts from.

  Args:
    from_workdir: a launch.pretrain (or launch.convert / launch.upscale) run, or '' for a
      random initialisation.
    config: the full ConfigDict of the fine-tuning runs (None: `config.get_finetune_config()`,
      the schema's fine-tuning defaults).
    tokenizer_path: the tokenizer file when the run's recorded one is elsewhere ('' = the
      recorded one, or the config's).
    step: the checkpoint of --from_workdir (launch.finetune --step): a step, 'best' (the
      lowest recorded eval loss) or None (the newest that restores); `rundir.read_checkpoint`.

  Order (the one place it is decided): --from_workdir's newest checkpoint that restores
  (`rundir.read_checkpoint`: read whole, it passes its checksums), whose model and
  data fields are taken from its metadata (a --config that names an encoder must
  describe the same one; model.dtype / remat_policy may differ); else --config alone, a random
  initialisation with the config's tokenizer (--tokenizer, config.data.tokenizer_model, or
  the one trained on the config's pretraining text, cached).

  Raises:
    InputError: no checkpoint there that restores, another family or shape than --config, a
      fine-tuning preset without --from_workdir, a tokenizer that is missing or is not the
      run's.
  """
  config = copy.deepcopy(config_schema.get_finetune_config() if config is None else config)
  try:
    if from_workdir:
      if not storage.is_remote(from_workdir) and not os.path.isdir(
        os.path.join(from_workdir, 'checkpoints')
      ):
        raise InputError(
          f'--from_workdir={from_workdir} has no checkpoints/ directory; give '
          f'the --workdir of a launch.pretrain run (or of launch.convert).'
        )
      # The newest checkpoint that restores and passes its checksums, picked as
      # launch.pretrain picks its own (a newer damaged one is named in a warning); the
      # encoder is read from it again onto the runs' shardings (`finetune`).
      step, meta, _ = rundir.read_checkpoint(from_workdir, rundir.read_params, step)
      run_config = rundir.config_from_meta(meta.get('config', {}))
      checkpointing.adopt_growth_values(run_config, meta)
      _check_same_encoder(meta, config, from_workdir)
      for field in OVERRIDABLE_FIELDS:  # the rest of the model is the run's
        if config.model[field]:
          run_config.model[field] = config.model[field]
      config.model = run_config.model
      config.data = run_config.data
      tok = tokenizer_lib.load_run_tokenizer(meta, tokenizer_path or None)
    else:
      if not config.model.family:
        raise InputError(
          'give --from_workdir=RUN (fine-tune a pretrained encoder) or '
          '--config=launch/configs/<family>.py:<preset> (random init, the '
          'baseline); a fine-tuning preset names no encoder.'
        )
      step = meta = None
      if tokenizer_path:
        config.data.tokenizer_model = tokenizer_path
      if config.data.tokenizer_model:
        tok = tokenizer_lib.load_or_train(config.data, config.model, [], 'text', '')
      else:
        from data_pipelines import text_datasets  # pylint: disable=g-import-not-at-top

        source = text_datasets.load_text_source(config.data)
        tok = tokenizer_lib.load_or_train(
          config.data, config.model, source.train, source.text_key, source.fingerprint
        )
    models.validate(config)
    if tok.vocab_size > config.model.vocab_size:
      raise InputError(
        f'the tokenizer has {tok.vocab_size} pieces but model.vocab_size is '
        f"{config.model.vocab_size}; pass the run's tokenizer (--tokenizer)."
      )
  except InputError:
    raise
  except ValueError as e:  # TokenizerError, DataError, CheckpointError, config errors
    raise InputError(str(e)) from e
  return Start(config, tok, from_workdir, step, meta)


# ----------------------------------------------------------------------------- one run


def num_train_steps(ft, num_examples: int) -> int:
  """config.finetune's num_steps, or ceil(num_epochs * examples / batch_size)."""
  if ft.num_steps:
    return ft.num_steps
  return max(1, math.ceil(ft.num_epochs * num_examples / ft.batch_size))


def run_config(config, task: tasks.Task, learning_rate: float, seed: int, steps: int):
  """The full ConfigDict of one run: `config` (Start.config) with the fine-tuning batch,
  length, dropout, seed, AdamW (linear warmup and decay, clip 1.0) and training length, and
  the task recorded in `finetune` (written to config.json)."""
  c = copy.deepcopy(config)
  ft = c.finetune
  c.seed = int(seed)
  c.objective = 'mlm'  # bidirectional encoder (models/classifier.py); no LM head is run
  c.model.dropout_rate = float(ft.dropout_rate)
  c.data.global_batch_size, c.data.seq_len = ft.batch_size, ft.max_seq_len
  c.optim = config_schema.get_base_config().optim
  o = c.optim
  o.name, o.learning_rate, o.schedule = 'adamw', float(learning_rate), 'linear'
  o.warmup_steps = int(round(ft.warmup_fraction * steps))
  o.weight_decay, o.grad_clip_norm = float(ft.weight_decay), 1.0
  c.train.num_train_steps, c.train.profile_steps = steps, ''
  if ft.validation_fraction > 0 and not c.train.eval_every_steps:
    # Selection needs evaluations to choose from: one per epoch unless the cadence is set.
    c.train.eval_every_steps = max(1, math.ceil(len(task.train) / ft.batch_size))
  with c.unlocked():
    ft.kind, ft.metric, ft.label_names = task.kind, task.metric, tuple(task.label_names)
    if not ft.task:
      ft.task = task.name
  return c


@dataclasses.dataclass(kw_only=True)
class Run(loop.Run):
  """One (learning rate, seed) run (`loop.Run`) with its task.

  Attributes:
    task, train_data, dev_data: the task and its encoded splits.
    validation_data: the held-out training examples (finetune.validation_fraction > 0), or
      None.
    tokenizer: the encoder's tokenizer.
  """

  task: tasks.Task
  train_data: tasks.Encoded
  dev_data: tasks.Encoded
  validation_data: tasks.Encoded | None = None
  tokenizer: Any


def _settings(
  start: Start, task: tasks.Task, learning_rate: float, seed: int, steps: int
) -> dict[str, Any]:
  """What makes two runs the same run (compared on resume and before reusing result.json)."""
  ft = start.config.finetune
  return {
    'from_workdir': os.path.abspath(start.from_workdir) if start.from_workdir else '',
    'from_step': start.step,
    'task_fingerprint': task.fingerprint,
    'learning_rate': float(learning_rate),
    'seed': int(seed),
    'num_steps': int(steps),
    'batch_size': ft.batch_size,
    'max_seq_len': ft.max_seq_len,
    'pooling': ft.pooling,
    'dropout_rate': float(ft.dropout_rate),
    'warmup_fraction': float(ft.warmup_fraction),
    'validation_fraction': float(ft.validation_fraction),
    'weight_decay': float(ft.weight_decay),
    'tokenizer': start.tokenizer.sha256,
    'model_shape': checkpointing.model_shape(start.config.model),
  }


def _check_settings(saved: dict | None, settings: dict, where: str):
  if not saved:
    return
  diffs = [
    f'{k}: {saved.get(k)!r} there vs {v!r} now'
    for k, v in settings.items()
    if json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(v))
  ]
  if diffs:
    raise InputError(
      f'{where} holds a fine-tuning run with other settings '
      f'({"; ".join(diffs)}); use a new --workdir, or the flags of that run.'
    )


def _classifier(config, task: tasks.Task, rngs: nnx.Rngs):
  return classifier.build(config, task.num_outputs, config.finetune.pooling, rngs=rngs)


def compiled_steps(config, task: tasks.Task, cache: dict | None = None):
  """(setup, train step, eval step, init) of a run config (`run_config`), reused from `cache`
  by every run whose compiled program is the same: runs that differ only in the seed or
  train.stop_after_steps (the seed changes the initial state, the data order and the dropout
  key, which are arguments).

  Raises:
    ValueError: the mesh does not fit the devices or the batch does not divide over it.
  """
  program = copy.deepcopy(config)
  program.seed, program.train.stop_after_steps = 0, 0
  key = (program.to_json_best_effort(), task.kind, task.num_outputs)
  if cache is not None and key in cache:
    return cache[key]
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_global_batch(config.finetune.batch_size, mesh)
  run_setup = train.setup(config, mesh, lambda c: _classifier(c, task, nnx.Rngs(params=c.seed)))
  steps = (
    run_setup,
    train.jit_train_step(run_setup, config, make_loss_fn(task.kind)),
    jit_eval_step(run_setup, config, task.kind),
    jit_init(run_setup, config, task),
  )
  if cache is not None:
    cache[key] = steps
  return steps


def jit_init(run_setup: train.Setup, config, task: tasks.Task) -> Callable:
  """The compiled fresh state `(key, encoder_params or None) -> state`: the classifier
  initialised from `key` (nnx.Rngs(params=key)), its encoder replaced by `encoder_params`
  when given, step 0 and the optimizer's initial state, created directly in the state's
  shardings (as `train.init_state`). One program per sweep: the seed is an argument."""

  def init(key, encoder_params):
    model = _classifier(config, task, nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if encoder_params is not None:
      params = dict(params, encoder=encoder_params)
    return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': run_setup.tx.init(params),
    }

  return mesh_lib.jit(
    init, run_setup.mesh, config.mesh.logical_axis_rules, out_shardings=run_setup.state_shardings
  )


def prepare_run(
  start: Start,
  task: tasks.Task,
  data,
  workdir: str,
  learning_rate: float,
  seed: int,
  encoder_params=None,
  steps_cache=None,
) -> Run:
  """Sets up one run: config, mesh and shardings, the newest checkpoint of `workdir` or a
  fresh state (the classifier initialised from `seed`, its encoder replaced by
  `encoder_params` when given), compiled steps and the metrics writer.

  Args:
    data: (train, dev, validation or None) `tasks.Encoded`; encoder_params: pretrained
      encoder parameters on the run's shardings (copied, never donated), or None (random
      init).
    steps_cache: a dict shared by the runs of a sweep (see `compiled_steps`).

  Raises:
    InputError: the workdir holds a run of other settings; the batch does not divide.
  """
  steps = num_train_steps(start.config.finetune, len(data[0]))
  config = run_config(start.config, task, learning_rate, seed, steps)
  settings = _settings(start, task, learning_rate, seed, steps)
  ckpt = None
  try:
    run_setup, train_step, eval_step, init = compiled_steps(config, task, steps_cache)
    mesh = run_setup.mesh
    ckpt = checkpointing.Checkpointer.for_run(workdir, config.train)
    _check_settings((ckpt.newest_meta() or {}).get('finetune'), settings, f'--workdir={workdir}')
    if jax.process_index() == 0:
      checkpointing.write_config(workdir, config)
    # A new state: encoder_params are copied (the train step donates the state).
    state, start_step, writer = loop.restore_or_init(
      ckpt,
      run_setup.abstract_state,
      lambda: init(jax.random.key(config.seed), encoder_params),
      workdir,
      config=config,
    )
  except BaseException as e:
    if ckpt is not None:
      ckpt.close()
    if isinstance(e, ValueError) and not isinstance(e, InputError):
      raise InputError(str(e)) from e
    raise
  meta = {
    'config': json.loads(config.to_json_best_effort()),
    'model_shape': checkpointing.model_shape(config.model),
    'family': config.model.family,
    'tokenizer': {
      'sha256': start.tokenizer.sha256,
      'vocab_size': start.tokenizer.vocab_size,
      'path': getattr(start.tokenizer, 'path', ''),
    },
    'mesh': dict(mesh.shape),
    'finetune': settings,
    'label_names': list(task.label_names),
  }
  return Run(
    config=config,
    workdir=workdir,
    task=task,
    train_data=data[0],
    dev_data=data[1],
    validation_data=data[2],
    run_setup=run_setup,
    ckpt=ckpt,
    meta=meta,
    state=state,
    start_step=start_step,
    train_step=train_step,
    eval_step=eval_step,
    writer=writer,
    tokenizer=start.tokenizer,
  )


def _local_rows(batch: dict[str, np.ndarray], mesh) -> dict[str, np.ndarray]:
  """This process's rows of the global batch every process builds: those of the batch shards
  its devices address (`mesh_lib.local_rows`; docs/design.md 13). Processes that address the
  same shards (a 'tensor' axis across hosts) get the same rows, as `global_batch` requires."""
  return mesh_lib.local_rows(batch, mesh)


def _device_batch(run: Run, encoded: tasks.Encoded, indices) -> dict[str, jax.Array]:
  batch = tasks.make_batch(encoded, indices, run.config.data.seq_len, run.tokenizer)
  mesh = run.run_setup.mesh
  return mesh_lib.global_batch(_local_rows(batch, mesh), mesh)


def _evaluate_split(run: Run, encoded: tasks.Encoded) -> dict[str, float]:
  """{'loss', metric: value} of every metric of the task on all of `encoded` (the last batch
  padded with filler rows of weight 0)."""
  b, n = run.config.data.global_batch_size, len(encoded)
  outputs, totals = [], None
  for start in range(0, n, b):
    indices = list(range(start, min(start + b, n)))
    indices += [-1] * (b - len(indices))
    logits, sums = run.eval_step(run.state['params'], _device_batch(run, encoded, indices))
    outputs.append(np.asarray(jax.device_get(logits)))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  outputs = np.concatenate(outputs)[:n]
  totals = jax.device_get(totals)
  result = {'loss': float(totals['loss_sum']) / max(float(totals['weight_sum']), 1.0)}
  result.update(task_metrics.compute_metrics(run.task, outputs, encoded.labels))
  return result


def evaluate(run: Run, step: int) -> dict[str, float]:
  """Every metric of the task on the whole dev split, and on the held-out training examples
  when there are some (split 'validation'); logs and writes both, returns the dev result
  {'loss', metric: value}."""
  result = _evaluate_split(run, run.dev_data)
  run.writer.write(step, 'eval', result)
  entry = dict(result, step=step)
  if run.validation_data is not None:
    held = _evaluate_split(run, run.validation_data)
    run.writer.write(step, 'validation', held)
    entry['validation'] = held
    run.bar.log(
      'validation step %d | %s (%d held-out examples)',
      step,
      ' | '.join(f'{k} {v:.4f}' for k, v in held.items()),
      len(run.validation_data),
    )
  run.evals.append(entry)
  run.bar.log(
    'eval step %d | %s (%d dev examples)',
    step,
    ' | '.join(f'{k} {v:.4f}' for k, v in result.items()),
    len(run.dev_data),
  )
  return result


def select_evaluation(evals: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
  """The evaluation a run reports under finetune.validation_fraction > 0: the one with the
  best held-out `metric` (the earliest of equals), or None when no evaluation has one.

  Args:
    evals: the run's evaluations, {'step', 'validation': {metric: value}, dev metrics...}
      (`evaluate`; higher is better for every task metric, docs/finetuning.md 2).
  """
  scored = [e for e in evals if metric in e.get('validation', {})]
  if not scored:
    return None
  return max(scored, key=lambda e: (e['validation'][metric], -e['step']))


def _eval_history(run: Run) -> list[dict[str, Any]]:
  """Every evaluation of the run, before a resume too: the 'eval' and 'validation' rows of
  its metrics.jsonl (truncated to the restored step on resume), merged with the evaluations
  of this process's life (`run.evals`: all there is on a process that did not write the
  file)."""
  rows: dict[int, dict[str, Any]] = {}
  for row in sinks.read_lines(epath.Path(run.workdir) / 'metrics.jsonl'):
    if row.get('split') in ('eval', 'validation'):
      entry = rows.setdefault(int(row['step']), {'step': int(row['step'])})
      values = {k: v for k, v in row.items() if k not in ('step', 'split', 'time')}
      if row['split'] == 'eval':
        entry.update(values)
      else:
        entry['validation'] = values
  merged = {e['step']: e for e in (list(rows.values()) + run.evals)}
  return [merged[k] for k in sorted(merged)]


def train_run(run: Run, signals: guards.StopSignals) -> dict[str, float] | None:
  """Trains one run with the shared loop (`loop.train_loop`): the batch of a step is a
  function of the step and the seed (`tasks.train_indices`), the dev set is evaluated every
  train.eval_every_steps and at the end (not at a stop before the end).

  Returns:
    The final dev metrics, or None when stopped before the end (a checkpoint was saved).

  Raises:
    guards.RunStopped: too many non-finite steps in a row (3) or a failed save (4).
  """
  seed, b, n = run.config.seed, run.config.data.global_batch_size, len(run.train_data)
  result = loop.train_loop(
    run,
    signals,
    next_batch=lambda step: _device_batch(
      run, run.train_data, tasks.train_indices(n, step, b, seed)
    ),
    evaluate=lambda step: evaluate(run, step),
    # Encoder FLOPs only (TrainLog counts an MLM head a classifier does not run).
    flops_per_step=models.flops_per_token(run.config, 0) * b * run.config.data.seq_len,
    evaluate_at_stop=False,
  )
  if result.step < run.config.train.num_train_steps:
    return None
  return result.eval_result or evaluate(run, result.step)


# ----------------------------------------------------------------------------- the sweep


def run_name(learning_rate: float, seed: int) -> str:
  """The subdirectory of one run: 'lr0.0003_seed0'."""
  return f'lr{learning_rate:g}_seed{seed}'


def finetune(
  config,
  workdir: str,
  from_workdir: str = '',
  tokenizer_path: str = '',
  steps_cache: dict | None = None,
  from_step: int | str | None = None,
) -> dict[str, Any] | None:
  """Fine-tunes for every learning rate and seed of `config.finetune`, then writes
  `<workdir>/results.json` and logs the best result (`task_metrics.results_table` formats
  the sweep).

  Args:
    config: the full ConfigDict: `finetune` (task, head, sweep), `train` (the loop's cadence,
      stop_after_steps, progress), `mesh`, and, for a random initialisation, the encoder
      (`model`, `data`); None: the schema's fine-tuning defaults (`get_finetune_config`).
    workdir: the fine-tuning directory: one `lr<lr>_seed<s>/` per run (config.json,
      metrics.jsonl, tensorboard/, checkpoints/, result.json), and results.json,
      metrics.jsonl + config.json (copies of the best run's, for launch.report) at the top.
    from_workdir, tokenizer_path, from_step: the starting point (`resolve_start`; from_step
      is its `step`: a step of from_workdir, 'best' or None for the newest).
    steps_cache: compiled steps shared with other calls in this process (benchmarks, tests);
      None: a fresh cache.

  Returns:
    The results (see `task_metrics.aggregate`), or None when stopped by SIGTERM / Ctrl-C (the same
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
      config = config_schema.get_finetune_config() if config is None else config
      validate(config)
      guards.check_workdir_kind(workdir, 'fine-tuning')  # before the lock writes its file
      lock.acquire()
      start = resolve_start(from_workdir, config, tokenizer_path, from_step)
      ft = start.config.finetune
      task = tasks.load(tasks.TaskOptions.from_config(ft))
      validation = None
      if ft.validation_fraction > 0:
        kept, held = tasks.hold_out(task.train, ft.validation_fraction)
        task = dataclasses.replace(task, train=kept)
        validation = tasks.encode(held, start.tokenizer, ft.max_seq_len)
      if ft.batch_size > len(task.train):
        # A batch of repeats of the same few examples; at 100,000 rows, a traceback from the
        # device allocator at the first step instead of a message.
        raise InputError(
          f'--config.finetune.batch_size={ft.batch_size:,} is more than the '
          f'{len(task.train):,} training examples'
          f'{" left after validation_fraction" if ft.validation_fraction > 0 else ""}; give '
          f'at most {len(task.train):,} (BERT: 16 or 32).'
        )
      data = (
        tasks.encode(task.train, start.tokenizer, ft.max_seq_len),
        tasks.encode(task.dev, start.tokenizer, ft.max_seq_len),
        validation,
      )
    except ValueError as e:
      raise (e if isinstance(e, InputError) else InputError(str(e))) from e
    logging.info(
      'task %s: %s, %d labels, %d train / %d dev examples%s; start: %s',
      task.name,
      task.kind,
      task.num_outputs if task.kind == 'classification' else 0,
      len(task.train),
      len(task.dev),
      ' (pairs)' if task.is_pair else '',
      f'{from_workdir} step {start.step}' if from_workdir else 'random init',
    )
    runs, encoder_params = [], None
    steps_cache = {} if steps_cache is None else steps_cache
    for lr in ft.learning_rates:
      for seed in ft.seeds:
        sub = os.path.join(workdir, run_name(lr, seed))
        steps = num_train_steps(ft, len(task.train))
        settings = _settings(start, task, lr, seed, steps)
        done = rundir.read_json(os.path.join(sub, 'result.json'))
        if done and done.get('settings') == json.loads(json.dumps(settings)):
          logging.info('%s is done (result.json); skipping it', sub)
          runs.append(done)
          continue
        if start.from_workdir and encoder_params is None:
          try:
            run_setup = compiled_steps(
              run_config(start.config, task, lr, seed, steps), task, steps_cache
            )[0]
          except ValueError as e:
            raise (e if isinstance(e, InputError) else InputError(str(e))) from e
          encoder_params = rundir.restore_params(
            start.from_workdir, start.step, run_setup.abstract_state['params']['encoder']
          )
        run = prepare_run(start, task, data, sub, lr, seed, encoder_params, steps_cache)
        began = time.time()
        try:
          dev = train_run(run, signals)
        finally:
          run.close()
        if dev is None:
          return None
        evals = _eval_history(run)
        selected = (
          select_evaluation(evals, task.metric) if run.validation_data is not None else None
        )
        if selected is not None:
          dev = {k: v for k, v in selected.items() if k not in ('step', 'validation')}
        result = {
          'learning_rate': float(lr),
          'seed': int(seed),
          'num_steps': steps,
          'dev': dev,
          'selected_step': selected['step'] if selected else steps,
          'validation': selected['validation'] if selected else None,
          'evals': evals,
          'seconds': time.time() - began,
          'settings': json.loads(json.dumps(settings)),
        }
        if jax.process_index() == 0:
          rundir.write_json(os.path.join(sub, 'result.json'), result)
        runs.append(result)
    results = task_metrics.aggregate(task, runs, start.config, start.from_workdir, start.step)
    if jax.process_index() == 0:
      rundir.write_json(os.path.join(workdir, 'results.json'), results)
      best = os.path.join(workdir, run_name(results['best_learning_rate'], ft.seeds[0]))
      for name in ('metrics.jsonl', 'config.json'):
        if os.path.exists(os.path.join(best, name)):
          shutil.copyfile(os.path.join(best, name), os.path.join(workdir, name))
    logging.info(
      'results in %s: best learning rate %g, dev %s %.4f ± %.4f over %d seed(s)',
      os.path.join(workdir, 'results.json'),
      results['best_learning_rate'],
      results['metric'],
      results[f'dev_{results["metric"]}_mean'],
      results[f'dev_{results["metric"]}_std'],
      results['num_seeds'],
    )
    return results
  finally:
    lock.release()
    signals.restore()
