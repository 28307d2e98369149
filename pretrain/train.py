"""The pretrainer: `train_and_evaluate(config, workdir)` = prepare -> loop.train_loop -> close.

Reads top to bottom: losses and metrics, the pure `train_step` / `eval_step` and their
sharded jit, state setup and initialisation, `validate`, `prepare` (every check, data,
tokenizer, model, restore or init: the initialisation order is decided there), `evaluate`
(the pretraining objective on held-out batches) and `train_and_evaluate`. The loop itself,
with its checkpoint, log and evaluation hooks, is `pretrain/loop.py`, shared with
fine-tuning. Hot loops never call `nnx.jit`: the model is split once into (graphdef,
params) and a pure step is `jax.jit`ted with donated state (docs/design.md 4).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
import models
import optim
from pretrain import checkpointing
from pretrain import guards
from pretrain import loop
from pretrain import mesh as mesh_lib
from pretrain import multihost
from pretrain import metrics as metrics_lib
from pretrain import probe as probe_lib
from pretrain import progress
from pretrain import sinks

State = loop.State


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
  return weighted_sums(xent, (first_argmax(logits) == targets).astype(jnp.float32), weights)


def first_argmax(logits: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first index of the maximum; int32 [...]) as a max and
  a min reduction: XLA on CPU runs argmax's (value, index) reduction unvectorised, 5x slower
  over an 8000-word vocabulary (2 vs 11 ms per step at the throughput benchmark's shapes). A
  row holding NaN has no maximum here (index = size) where argmax returns the NaN's."""
  size = logits.shape[-1]
  is_max = logits == jnp.max(logits, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def weighted_sums(losses: jax.Array, correct: jax.Array, weights: jax.Array):
  """(mean loss over weighted items, {'loss_sum', 'correct_sum', 'weight_sum'}) of per-item
  losses and correctness (float32, any shape, all three alike); the sums aggregate exactly
  over steps and hosts."""
  weight_sum = jnp.sum(weights)
  sums = {
    'loss_sum': jnp.sum(losses * weights),
    'correct_sum': jnp.sum(correct * weights),
    'weight_sum': weight_sum,
  }
  return sums['loss_sum'] / jnp.maximum(weight_sum, 1.0), sums


def model_loss(
  params,
  graphdef,
  batch: dict[str, jax.Array],
  objective: str,
  dropout_rng: jax.Array | None = None,
):
  """The training loss of one batch: (mean loss, sums of `loss_and_metrics`).

  Args:
    params: pure dict of parameters; graphdef: the model structure (nnx.split).
    batch: the pipeline's arrays (inputs, segment_ids, positions, and mlm_* or targets /
      weights); objective: 'mlm' or 'clm'; dropout_rng: a key (training) or None.
  """
  targets, weights, positions = _predictions(batch, objective)
  model = nnx.merge(graphdef, params)
  logits = model(
    batch['inputs'],
    batch['segment_ids'],
    batch['positions'],
    prediction_positions=positions,
    dropout_rng=dropout_rng,
  )
  return loss_and_metrics(logits, targets, weights)


summarize = metrics_lib.summarize  # the public name callers use


# ----------------------------------------------------------------------------- steps


def make_train_step(
  graphdef, tx: optax.GradientTransformation, config, loss_fn: Callable | None = None
) -> Callable:
  """Builds the pure train step `(state, batch, base_key) -> (state, metrics)`.

  Per-step randomness (dropout) is `fold_in(base_key, state['step'])`, so a resumed run draws
  the same numbers as an uninterrupted one.

  Args:
    loss_fn: `(params, graphdef, batch, dropout_rng) -> (mean loss, sums)` with the sums of
      `loss_and_metrics`; None = the pretraining objective's `model_loss` (fine-tuning passes
      its task loss, pretrain/finetune.py).
  """
  objective = config.objective
  use_dropout = config.model.dropout_rate > 0
  if loss_fn is None:
    loss_fn = lambda params, graphdef, batch, rng: model_loss(
      params,
      graphdef,
      batch,  # noqa: E731
      objective,
      rng,
    )

  def train_step(state: State, batch, base_key):
    dropout_rng = jax.random.fold_in(base_key, state['step']) if use_dropout else None
    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params'], graphdef, batch, dropout_rng
    )
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    # The non-finite guard (docs/design.md 9): a step whose loss, gradient or update is not
    # finite leaves params and optimizer state exactly as they were (as optax.apply_if_finite);
    # only the step counter (batches consumed) moves on.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    out = {
      'step': state['step'] + 1,
      'params': keep(params, state['params']),
      'opt_state': keep(opt_state, state['opt_state']),
    }
    step_metrics = dict(
      sums, grad_norm=grad_norm, update_norm=update_norm, skipped=(~finite).astype(jnp.int32)
    )
    step_metrics.update(optim.metrics(out['opt_state']))
    return out, step_metrics

  return train_step


def make_eval_step(graphdef, config) -> Callable:
  """Builds the pure eval step `(params, batch) -> summed metrics` (no dropout)."""
  objective = config.objective

  def eval_step(params, batch):
    return model_loss(params, graphdef, batch, objective)[1]

  return eval_step


def jit_train_step(run_setup: 'Setup', config, loss_fn: Callable | None = None) -> Callable:
  """The compiled train step `(state, batch, base_key) -> (state, metrics)` on the setup's
  mesh: state sharded as `run_setup.state_shardings` and donated, batch split over the batch
  axes, traced under the mesh and logical axis rules (`mesh_lib.jit`, docs/design.md 4).
  loss_fn: see `make_train_step`."""
  mesh = run_setup.mesh
  return mesh_lib.jit(
    make_train_step(run_setup.graphdef, run_setup.tx, config, loss_fn),
    mesh,
    config.mesh.logical_axis_rules,
    in_shardings=(run_setup.state_shardings, mesh_lib.batch_sharding(mesh), None),
    out_shardings=(run_setup.state_shardings, None),
    donate_argnums=0,
  )


def jit_eval_step(run_setup: 'Setup', config) -> Callable:
  """The compiled eval step `(params, batch) -> sums` on the setup's mesh (see
  jit_train_step)."""
  mesh = run_setup.mesh
  return mesh_lib.jit(
    make_eval_step(run_setup.graphdef, config),
    mesh,
    config.mesh.logical_axis_rules,
    in_shardings=(run_setup.state_shardings['params'], mesh_lib.batch_sharding(mesh)),
  )


# ----------------------------------------------------------------------------- state


def _build_model(config):
  return models.build(config, rngs=nnx.Rngs(params=config.seed))


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


def setup(config, mesh, build_model: Callable | None = None) -> Setup:
  """Traces the model and optimizer abstractly (no allocation) and derives the shardings.

  Parameter shardings come from the logical axis names on every parameter and
  `config.mesh.logical_axis_rules`. build_model: `config -> nnx.Module` (None: the
  pretraining encoder, `models.build`; fine-tuning passes the encoder with a task head).
  """
  tx = optim.build(config)
  build_model = build_model or _build_model
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(config.mesh.logical_axis_rules)):
    abstract_model = nnx.eval_shape(lambda: build_model(config))
    graphdef, abstract_param_state = nnx.split(abstract_model, nnx.Param)
    param_shardings = nnx.to_pure_dict(nnx.get_named_sharding(abstract_param_state, mesh))
  abstract_params = nnx.to_pure_dict(abstract_param_state)
  mesh_lib.check_divisible(abstract_params, param_shardings)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  shardings = {
    'step': mesh_lib.replicated(mesh),
    'params': param_shardings,
    'opt_state': mesh_lib.opt_state_shardings(
      abstract_opt_state, abstract_params, param_shardings, mesh
    ),
  }
  abstract = {
    'step': jax.ShapeDtypeStruct((), jnp.int32),
    'params': abstract_params,
    'opt_state': abstract_opt_state,
  }
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  return Setup(
    mesh, graphdef, tx, checkpointing.abstract_like(abstract, shardings), shardings, num_params
  )


def init_state(config, run_setup: Setup) -> State:
  """Initialises the train state directly into its shardings (jit with out_shardings: no
  device ever holds the full unsharded parameters)."""

  def init():
    model = _build_model(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': run_setup.tx.init(params),
    }

  rules = tuple(config.mesh.logical_axis_rules)
  with jax.set_mesh(run_setup.mesh), nnx.logical_axis_rules(rules):
    return jax.jit(init, out_shardings=run_setup.state_shardings)()


# ----------------------------------------------------------------------------- helpers


# The longest row any command accepts (tokens): 16x the longest that fits a TPU v5e chip with
# the splash kernel (docs/tpu_fit.md). A longer one is a slip that would only exhaust host
# memory while the first batches are packed, before any check of the device could say so.
MAX_SEQ_LEN = 2**20


def _validate_data(data, objective: str):
  """The data fields every objective needs in range (ValueError naming the field)."""
  if data.seq_len < 2:
    raise ValueError(f'--config.data.seq_len={data.seq_len} must be >= 2.')
  if data.seq_len > MAX_SEQ_LEN:
    raise ValueError(
      f'--config.data.seq_len={data.seq_len:,} is beyond {MAX_SEQ_LEN:,} tokens per row; the '
      f'longest a TPU chip holds is 65,536 (splash attention on v5e, docs/tpu_fit.md). Give a '
      f'shorter seq_len.'
    )
  if data.global_batch_size < 1:
    raise ValueError(
      f'--config.data.global_batch_size={data.global_batch_size} must be >= 1 '
      '(rows per step over all processes).'
    )
  if data.num_threads < -1:
    raise ValueError(
      f'--config.data.num_threads={data.num_threads} must be >= -1 (-1: one per core up to '
      '16; 0: read on the consuming thread).'
    )
  for field in ('prefetch_buffer_size', 'prefetch_batches'):
    if data[field] < 0:
      raise ValueError(f'--config.data.{field}={data[field]} must be >= 0 (0: no prefetch).')
  if not 0 < data.validation_fraction < 1:
    raise ValueError(
      f'--config.data.validation_fraction={data.validation_fraction} must be in '
      '(0, 1): the fraction of local documents held out for evaluation '
      '(default 0.02).'
    )
  if objective == 'mlm':
    if not 0 < data.mask_rate < 1:
      raise ValueError(
        f'--config.data.mask_rate={data.mask_rate} must be in (0, 1): the '
        'fraction of tokens the MLM predicts (BERT: 0.15); at 0 nothing is '
        'learned.'
      )
    rates = (data.mask_token_rate, data.random_token_rate)
    if not (all(0 <= r <= 1 for r in rates) and sum(rates) <= 1):
      raise ValueError(
        f'--config.data.mask_token_rate={rates[0]} and random_token_rate='
        f'{rates[1]} must be in [0, 1] with a sum <= 1 (BERT: 0.8 and 0.1; '
        'the rest keep the original token).'
      )


def validate_train(t):
  """The loop's fields of `config.train` in range (ValueError naming the field)."""
  if t.progress not in progress.PROGRESS_MODES:
    raise ValueError(
      f'--config.train.progress={t.progress!r}; use one of '
      f'{", ".join(progress.PROGRESS_MODES)} (auto: a bar when on a terminal).'
    )
  for field in (
    'num_train_steps',
    'log_every_steps',
    'eval_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'max_nonfinite_steps',
  ):
    if t[field] < 1:
      raise ValueError(f'--config.train.{field}={t[field]} must be >= 1.')
  for field in ('eval_every_steps', 'stop_after_steps', 'keep_every_steps', 'keep_best'):
    if t[field] < 0:
      raise ValueError(f'--config.train.{field}={t[field]} must be >= 0 (0: off).')
  sinks.validate_loggers(t)


def validate(config, mesh=None):
  """Checks the config before any work starts.

  Raises:
    ValueError: the first problem found, as a sentence naming the field and the fix.
  """
  models.validate(config)  # also config.objective
  optim.validate(config)
  progress.parse_profile_steps(config.train.profile_steps)
  validate_train(config.train)
  _validate_data(config.data, config.objective)
  probe_lib.validate(config.probe)
  if mesh is not None:
    mesh_lib.check_global_batch(config.data.global_batch_size, mesh)


# ----------------------------------------------------------------------------- prepare


@dataclasses.dataclass(kw_only=True)
class Run(loop.Run):
  """A pretraining run (`loop.Run`) with its evaluation batches.

  Attributes:
    eval_set: the evaluation batches of this process (a list of NumPy batches).
    probe: the linear probe of `config.probe` (pretrain/probe.py), or None.
  """

  eval_set: list
  probe: probe_lib.Probe | None = None


def _load_data(config, meta, workdir, mesh):
  """(source, tokenizer, train iterator, eval batches) for this process; checks that the
  tokenizer is the checkpoint's and the same on every process. The process reads the data
  shard of the batch rows its devices address (`mesh_lib.batch_feed`, docs/design.md 13)."""
  source = text_datasets.load_text_source(config.data)
  tokenizer = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  if meta and meta.get('tokenizer', {}).get('sha256') not in (None, tokenizer.sha256):
    raise checkpointing.CheckpointError(
      f'--workdir={workdir} was trained with a different tokenizer '
      f'({meta["tokenizer"].get("path")}); pass --config.data.tokenizer_model= that file, '
      f'or use a new --workdir.'
    )
  if jax.process_count() > 1:
    # Over the coordination service: a process still training its tokenizer is waited for
    # (with a timeout), and no device program is in flight yet to keep in step with.
    digests = multihost.all_gather('tokenizer_sha256', tokenizer.sha256)
    if len(set(digests)) > 1:
      raise ValueError(
        'the processes trained different tokenizers; train one once and pass it to every '
        'host with --config.data.tokenizer_model=PATH.'
      )
  feed = mesh_lib.batch_feed(mesh)
  train_iter = iter(
    pipeline.make_dataset(
      source.train,
      tokenizer,
      config,
      text_key=source.text_key,
      train=True,
      process_index=feed.index,
      process_count=feed.count,
    )
  )
  eval_set = pipeline.eval_batches(
    source.validation,
    tokenizer,
    config,
    text_key=source.text_key,
    process_index=feed.index,
    process_count=feed.count,
  )
  return source, tokenizer, train_iter, eval_set


def prepare(config, workdir: str) -> Run:
  """Validates the config, loads data and tokenizer, builds model and optimizer, and restores
  or initialises the state; every bad input is found here, before the first step.

  Initialisation order (the one place it is decided): (1) the latest checkpoint in
  `<workdir>/checkpoints`, restored onto this run's mesh; a run written by `launch.upscale`
  is step 0 of its workdir, and the values growth fixed (eps / k, the trained DeepNorm alpha,
  the tokenizer) are adopted from its metadata first; (2) else a fresh initialisation from
  `config.seed`, directly into the shardings.

  Raises:
    InputError: bad input (config, data, tokenizer, checkpoint, mesh), as one paragraph.
  """
  ckpt, lock = None, guards.WorkdirLock(workdir)
  try:
    mesh = mesh_lib.make_mesh(config.mesh)
    validate(config, mesh)
    if config.optim.weight_decay is None:  # print and record the value in force
      config.optim.weight_decay = optim.weight_decay(config)
    logging.info('resolved config:\n%s', config)
    guards.check_workdir_kind(workdir, 'pretraining')  # before the lock writes its file
    lock.acquire()  # also checks that the workdir is a writable directory
    ckpt = checkpointing.Checkpointer.for_run(workdir, config.train)
    meta = ckpt.newest_meta()
    checkpointing.adopt_growth_values(config, meta)
    checkpointing.check_compatible(meta, config, workdir)
    source, tokenizer, train_iter, eval_set = _load_data(config, meta, workdir, mesh)
    same_data = checkpointing.same_data(meta, source, config, workdir)
    run_setup = setup(config, mesh)
    probe = probe_lib.make(config, tokenizer, run_setup)
    if jax.process_index() == 0:
      checkpointing.write_config(workdir, config)
    logging.info(
      'model %s: %s parameters; mesh %s; data %s (%d train / %d validation docs); '
      'tokenizer %d pieces',
      config.model.family,
      f'{run_setup.num_params:,}',
      dict(mesh.shape),
      source.name,
      len(source.train),
      len(source.validation),
      tokenizer.vocab_size,
    )
    state, start_step, writer = loop.restore_or_init(
      ckpt,
      run_setup.abstract_state,
      lambda: init_state(config, run_setup),
      workdir,
      train_iter if same_data else None,
      config=config,
    )
  except BaseException as e:
    if ckpt is not None:
      ckpt.close()
    lock.release()
    if isinstance(e, ValueError):  # includes DataError, TokenizerError, CheckpointError
      raise InputError(str(e)) from e
    raise
  lineage = (meta or {}).get('lineage', [])
  return Run(
    config=config,
    workdir=workdir,
    run_setup=run_setup,
    ckpt=ckpt,
    meta=checkpointing.checkpoint_meta(config, tokenizer, mesh, source, lineage),
    train_iter=train_iter,
    eval_set=eval_set,
    state=state,
    start_step=start_step,
    train_step=jit_train_step(run_setup, config),
    eval_step=jit_eval_step(run_setup, config),
    writer=writer,
    lock=lock,
    probe=probe,
  )


# ----------------------------------------------------------------------------- evaluation


def evaluate(run: Run, step: int) -> dict[str, float]:
  """Evaluates run.state on the evaluation batches; logs and writes the result."""
  totals = collections.Counter()
  for batch in run.eval_set:
    sums = run.eval_step(run.state['params'], mesh_lib.global_batch(batch, run.run_setup.mesh))
    # Fetched batch by batch: one eval step (and its all-reduce) in flight at a time.
    # Independent collective programs in flight together are where two-process CPU runs
    # (gloo collectives, which XLA leaves untagged) were seen to hang; eval is off the hot
    # path, and the sums add in float64.
    totals.update({k: float(v) for k, v in jax.device_get(sums).items()})
  result = summarize(totals)
  run.writer.write(step, 'eval', result)
  run.evals.append(dict(result, step=step))
  run.bar.log(
    'eval step %d | loss %.4f | acc %.4f | ppl %.2f (%d batches, %d tokens)',
    step,
    result['loss'],
    result['accuracy'],
    result['perplexity'],
    len(run.eval_set),
    int(totals['weight_sum']),
  )
  return result


def probe_hooks(run: Run) -> list[loop.Hook]:
  """The linear probe as a loop hook (every probe.every_steps, or with every evaluation and
  at the end), writing split 'probe'; [] without a probe."""
  if run.probe is None:
    return []
  t = run.config.train

  def probe(step: int):
    run.writer.write(step, 'probe', run.probe(run.state['params'], step))

  return [
    loop.Hook(probe, run.config.probe.every_steps or t.eval_every_steps, (t.num_train_steps,))
  ]


def mixture_hooks(run: Run) -> list[loop.Hook]:
  """The realised proportions of a data mixture (docs/configuration.md 3) as a loop hook:
  every log step, split 'data' gets `<source>/{documents,tokens,document_share,token_share}`
  (counted since the run's first batch, a resume included, on process 0's data shard) and the
  console a line of the shares next to the weights; [] when the data is not a mixture."""
  if pipeline.mixture_counts(run.train_iter) is None:
    return []
  t = run.config.train

  def log_mixture(step: int):
    counts = pipeline.mixture_counts(run.train_iter)
    run.writer.write(step, 'data', counts.scalars())
    logging.info('step %d data mixture so far: %s', step, counts.summary())

  return [loop.Hook(log_mixture, t.log_every_steps, (t.num_train_steps,))]


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (prepare -> train_loop -> finish), resuming from its
  latest checkpoint; evaluates periodically.

  Args:
    config: the full ConfigDict (pretrain/config.py).
    workdir: run directory: `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`.

  Returns:
    The final evaluation metrics {'loss', 'accuracy', 'perplexity'} (float).

  Raises:
    InputError: bad input, detected before training starts.
    guards.RunStopped: too many non-finite steps in a row, or a checkpoint save failed; the
      message says what happened and what to do; `exit_code` is 3 or 4.
  """
  metrics_lib.quiet_library_logs()
  # From before prepare to after the last save: a signal during set-up or the final wait is
  # served too (during set-up, before the first step: nothing new to save).
  signals = guards.StopSignals()
  try:
    run = prepare(config, workdir)
    start = time.time()
    mesh = run.run_setup.mesh
    try:
      result = loop.train_loop(
        run,
        signals,
        next_batch=lambda step: mesh_lib.global_batch(next(run.train_iter), mesh),
        evaluate=lambda step: evaluate(run, step),
        hooks=probe_hooks(run) + mixture_hooks(run),
      )
    finally:
      run.close()
  finally:
    signals.restore()
  logging.info(
    '%s',
    progress.run_summary(
      workdir=workdir,
      start_step=run.start_step,
      step=result.step,
      num_steps=config.train.num_train_steps,
      tokens=result.tokens_done,
      seconds=time.time() - start,
      evals=run.evals,
      latest_checkpoint=run.ckpt.latest_step(),
      stopped_by=run.stopped_by,
    ),
  )
  return result.eval_result
