"""Shared pieces of the research-claim benchmarks (deepnorm_depth.py, gau_alpha_warmup.py,
flash_quality.py; issue 12): runs of the real trainer with `--config.x=y`-style overrides,
their metrics.jsonl, the trainer's first batch, per-layer gradient norms at step 1, mean ± std
and a loss-curve plot.

Every run is `pretrain.train.train_and_evaluate` in this process (the function `python -m
launch.pretrain` calls; no second training loop) on a workdir named after the preset and the
overrides, so a rerun with the same settings reuses a finished run (`--fresh` reruns it). The
equivalent command line of every run is printed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

import models
from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
from launch.configs import deepnet, gau, roformer, roformer_v2
from pretrain import guards
from pretrain import train

MODULES = {'roformer': roformer, 'roformer_v2': roformer_v2, 'gau': gau, 'deepnet': deepnet}


def make_config(spec: str, overrides: dict):
  """'family:preset' + {'model.num_layers': 24, ...} -> the full ConfigDict, as
  `--config=launch/configs/<family>.py:<preset> --config.model.num_layers=24` gives it."""
  family, _, preset = spec.partition(':')
  config = MODULES[family].get_config(preset)
  for key, value in overrides.items():
    *path, field = key.split('.')
    node = config
    for p in path:
      node = node[p]
    if field not in node:
      raise KeyError(f'unknown config field {key}')
    node[field] = value
  return config


def command(spec: str, overrides: dict, workdir: str) -> str:
  """The `python -m launch.pretrain` line that trains the same run."""
  family, _, preset = spec.partition(':')
  flags = ' '.join(f'--config.{k}={v}' for k, v in overrides.items())
  return (
    f'python -m launch.pretrain --config=launch/configs/{family}.py:{preset} '
    f'--workdir={workdir} {flags}'
  )


def workdir_for(root: str, name: str, spec: str, overrides: dict) -> str:
  key = json.dumps([spec, sorted((k, repr(v)) for k, v in overrides.items())])
  return os.path.join(root, f'{name}_{hashlib.sha1(key.encode()).hexdigest()[:8]}')


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train lines, eval lines) of a run's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  lines = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
  return ([l for l in lines if l['split'] == 'train'], [l for l in lines if l['split'] == 'eval'])


def train_run(
  spec: str, overrides: dict, root: str, name: str, fresh: bool = False, verbose: bool = True
) -> dict:
  """Trains one run (or reuses a finished one) and returns its outcome.

  Returns a dict: name, workdir, command, params, wall_s, status ('ok', or 'diverged' when
  the trainer stopped on train.max_nonfinite_steps non-finite steps: exit code 3),
  curve [(step, train loss)], eval_loss / eval_accuracy (final evaluation; nan if diverged),
  skipped (non-finite steps skipped), steps_per_sec (median of the logged windows, compilation
  excluded), first_loss, last_loss.
  """
  workdir = workdir_for(root, name, spec, overrides)
  result_path = os.path.join(workdir, 'result.json')
  cmd = command(spec, overrides, workdir)
  if not fresh and os.path.exists(result_path):
    with open(result_path) as f:
      out = json.load(f)
    if verbose:
      print(f'  {name}: reused {workdir}', flush=True)
    return out
  shutil.rmtree(workdir, ignore_errors=True)
  config = make_config(spec, overrides)
  if verbose:
    print(f'  {name}: {cmd}', flush=True)
  logging.set_verbosity(logging.WARNING)
  start = time.time()
  status, final = 'ok', {}
  try:
    final = train.train_and_evaluate(config, workdir)
  except guards.RunStopped as e:
    if e.exit_code != guards.EXIT_NONFINITE:
      raise
    status = 'diverged'
  wall = time.time() - start
  train_lines, eval_lines = read_metrics(workdir)
  num_params = sum(
    math.prod(x.shape)
    for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0))), nnx.Param)
    )
  )
  rates = [l['steps_per_sec'] for l in train_lines[1:]] or [l['steps_per_sec'] for l in train_lines]
  out = {
    'name': name,
    'spec': spec,
    'overrides': {k: repr(v) for k, v in overrides.items()},
    'workdir': workdir,
    'command': cmd,
    'params': num_params,
    'wall_s': wall,
    'status': status,
    'curve': [(l['step'], l['loss']) for l in train_lines],
    'eval_curve': [(l['step'], l['loss']) for l in eval_lines],
    'eval_loss': float(final.get('loss', math.nan)),
    'eval_accuracy': float(final.get('accuracy', math.nan)),
    'skipped': int(sum(l.get('skipped_steps', 0) for l in train_lines)),
    'steps_per_sec': float(statistics.median(rates)) if rates else math.nan,
    'first_loss': train_lines[0]['loss'] if train_lines else math.nan,
    'last_loss': train_lines[-1]['loss'] if train_lines else math.nan,
  }
  with open(result_path, 'w') as f:
    json.dump(out, f)
  if verbose:
    print(f'    {status}, eval loss {out["eval_loss"]:.4f}, {wall:.0f} s', flush=True)
  return out


def first_batch(config) -> dict:
  """The first training batch the trainer draws for `config` (same data, seed and masking)."""
  source = text_datasets.load_text_source(config.data)
  tokenizer = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  data = pipeline.make_dataset(
    source.train,
    tokenizer,
    config,
    text_key=source.text_key,
    train=True,
    process_index=0,
    process_count=1,
  )
  return {k: jnp.asarray(v) for k, v in next(iter(data)).items()}


def unigram_loss(config, num_batches: int = 50) -> float:
  """The eval loss of the best model that ignores its input: the cross-entropy (nats) of the
  token unigram distribution, counted on `num_batches` training batches of 64 x 128 tokens
  (add-0.5 smoothing), on the targets of the trainer's evaluation set for `config` (its
  objective, seq_len, batch and train.eval_steps). An eval loss at this level means the model
  predicts one distribution everywhere (accuracy = the commonest token's share)."""
  source = text_datasets.load_text_source(config.data)
  tokenizer = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  counting = config.copy_and_resolve_references()
  counting.objective, counting.data.global_batch_size, counting.data.seq_len = 'clm', 64, 128
  data = iter(
    pipeline.make_dataset(
      source.train,
      tokenizer,
      counting,
      text_key=source.text_key,
      train=True,
      process_index=0,
      process_count=1,
    )
  )
  counts = np.zeros(config.model.vocab_size)
  for _ in range(num_batches):
    batch = next(data)
    np.add.at(counts, np.asarray(batch['targets']).ravel(), np.asarray(batch['weights']).ravel())
  log_p = np.log((counts + 0.5) / (counts + 0.5).sum())
  key, wkey = (
    ('mlm_targets', 'mlm_weights') if config.objective == 'mlm' else ('targets', 'weights')
  )
  total = weight = 0.0
  for batch in pipeline.eval_batches(
    source.validation, tokenizer, config, text_key=source.text_key
  ):
    w = np.asarray(batch[wkey]).ravel()
    total -= float((log_p[np.asarray(batch[key]).ravel()] * w).sum())
    weight += float(w.sum())
  return total / weight


def layer_grad_norms(config, batch: dict | None = None) -> np.ndarray:
  """||dL/dtheta_l|| of every block l at initialisation on the trainer's first batch: the
  gradient of step 1 (the trainer's init from config.seed and its loss, `train.model_loss`).
  Needs scan_layers (blocks stacked on a leading L axis)."""
  batch = first_batch(config) if batch is None else batch
  model = models.build(config, rngs=nnx.Rngs(params=config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)

  @jax.jit
  def per_layer(params, batch):
    grads = jax.grad(lambda p: train.model_loss(p, graphdef, batch, config.objective)[0])(params)
    squares = [
      jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
      for g in jax.tree.leaves(grads['layers'])
    ]
    return jnp.sqrt(sum(squares))

  return np.asarray(per_layer(params, batch))


def run_overrides(steps: int, seed: int, log_points: int = 20) -> dict:
  """The trainer fields every claim run shares: `steps` steps with `log_points` logged losses
  (the curve), one evaluation and one checkpoint at the end, no progress bar."""
  return {
    'train.num_train_steps': steps,
    'train.log_every_steps': max(1, steps // log_points),
    'train.eval_every_steps': steps,
    'train.checkpoint_every_steps': steps,
    'train.progress': 'off',
    'seed': seed,
  }


def mean_std(values, fmt: str = '.3f') -> str:
  """'m ± s' over seeds (sample std), or 'm' for one value; nan-aware ('nan' if all are)."""
  values = [v for v in values if v is not None]
  finite = [v for v in values if math.isfinite(v)]
  if not finite:
    return 'nan'
  if len(values) == 1:
    return format(values[0], fmt)
  m = statistics.mean(finite)
  s = statistics.stdev(finite) if len(finite) > 1 else 0.0
  extra = f' ({len(values) - len(finite)} nan)' if len(finite) < len(values) else ''
  return f'{format(m, fmt)} ± {format(s, fmt.replace("+", ""))}{extra}'


def plot_curves(
  path: str,
  groups: dict[str, list[dict]],
  title: str,
  ylabel: str = 'train loss',
  log_y: bool = False,
) -> str | None:
  """Train-loss curves, one colour per label (every seed drawn), saved as a PNG at `path`."""
  if not path:
    return None
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('matplotlib is not installed: pip install -e . for the plot')
    return None
  fig, ax = plt.subplots(figsize=(8, 5))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (label, runs) in enumerate(groups.items()):
    for j, run in enumerate(runs):
      if run['curve']:
        steps, losses = zip(*run['curve'])
        ax.plot(
          steps,
          losses,
          color=colours[i % len(colours)],
          alpha=0.9 if j == 0 else 0.5,
          label=label if j == 0 else None,
          linestyle='--' if run['status'] != 'ok' else '-',
        )
  ax.set_xlabel('step')
  ax.set_ylabel(ylabel)
  if log_y:
    ax.set_yscale('log')
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return os.path.abspath(path)
