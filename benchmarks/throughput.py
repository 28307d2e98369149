r"""Training throughput against the Hugging Face reference, and MFU against a measured peak
(issue 13, items 1 and 2).

  python benchmarks/throughput.py [--repeats=7 --steps=5 --e2e_steps=120]

At identical shapes (MLM, hidden 256, 4 layers, 4 heads, mlp 1024, seq 128, batch 32, vocab
8000, float32, AdamW, no dropout) it times, alternating in one run:
  * ours: the real trainer step (`train.jit_train_step`, with its mesh, sharding and donated
    state) on a batch held in device memory;
  * reference: `transformers.FlaxRoFormerForMaskedLM` with an optax AdamW step under `jax.jit`
    (logits at every position, cross-entropy weighted to the masked ones, as a user of that
    class writes it);
then ours end to end (`python -m launch.pretrain` at the same shapes on the built-in corpus:
input pipeline, logging, one evaluation at the end, checkpoints on), so their cost shows as its
own line.

MFU: model FLOPs (models/flops.py: matmuls only, attention in full, MLM head at masked
positions, no rematerialisation) per second over this machine's measured matmul peak
(`peak.measured_matmul_peak`, the rate of a large jitted float32 matmul on all cores).
The reference is credited with the FLOPs it needs for the same task (head at masked
positions), and also shown per FLOP it actually executes (head at every position).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_utils import synthetic_batch
from data_pipelines import objectives
from launch.configs import roformer
import models
from pretrain import mesh as mesh_lib
from pretrain import peak
from pretrain import train

_REPEATS = flags.DEFINE_integer('repeats', 7, 'Alternating timed repeats of each step.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Train steps per timed repeat.')
_E2E_STEPS = flags.DEFINE_integer(
  'e2e_steps', 120, 'Steps of the end-to-end launch.pretrain run (0 skips it).'
)
_HIDDEN = flags.DEFINE_integer('hidden_size', 256, 'Model width (head size 64).')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(hidden_size: int):
  """The benchmark shape as our config (RoFormer v1, MLM, float32, AdamW)."""
  config = roformer.get_config('tiny')
  m = config.model
  m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = (
    hidden_size,
    4,
    hidden_size // 64,
    4 * hidden_size,
  )
  m.vocab_size = 8000
  config.data.seq_len, config.data.global_batch_size = 128, 32
  return config


def override_flags(config) -> list[str]:
  m = config.model
  return [
    f'--config.model.hidden_size={m.hidden_size}',
    f'--config.model.num_layers={m.num_layers}',
    f'--config.model.num_heads={m.num_heads}',
    f'--config.model.mlp_dim={m.mlp_dim}',
    f'--config.model.vocab_size={m.vocab_size}',
    f'--config.data.seq_len={config.data.seq_len}',
    f'--config.data.global_batch_size={config.data.global_batch_size}',
  ]


def ours(config):
  """(step function over (state) -> state, initial state): the trainer's own step."""
  mesh = mesh_lib.make_mesh(config.mesh)
  run_setup = train.setup(config, mesh)
  state = train.init_state(config, run_setup)
  step_fn = train.jit_train_step(run_setup, config)
  batch, key = synthetic_batch(config, mesh), jax.random.key(0)
  return (lambda s: step_fn(s, batch, key)[0]), state


def reference(config):
  """The same training step written for transformers' FlaxRoFormerForMaskedLM."""
  from transformers import FlaxRoFormerForMaskedLM, RoFormerConfig  # pylint: disable=g-import-not-at-top

  m = config.model
  hf_config = RoFormerConfig(
    vocab_size=m.vocab_size,
    embedding_size=m.hidden_size,
    hidden_size=m.hidden_size,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    intermediate_size=m.mlp_dim,
    max_position_embeddings=config.data.seq_len,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    hidden_act='gelu',
  )
  model = FlaxRoFormerForMaskedLM(hf_config, seed=0, dtype=jnp.float32)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  b, n = config.data.global_batch_size, config.data.seq_len
  p = objectives.max_predictions(n, config.data.mask_rate)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(1, m.vocab_size, (b, n)), jnp.int32)
  targets = jnp.asarray(rng.integers(1, m.vocab_size, (b, n)), jnp.int32)
  weights = np.zeros((b, n), np.float32)
  weights[:, :p] = 1.0
  weights = jnp.asarray(weights)

  def loss_fn(params):
    logits = model(inputs, attention_mask=jnp.ones_like(inputs), params=params, train=False).logits
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.sum(weights)

  def step(state):
    params, opt_state = state
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=0), (model.params, tx.init(model.params))


def time_steps(step, state, steps: int):
  start = time.perf_counter()
  for _ in range(steps):
    state = step(state)
  jax.block_until_ready(state)
  return time.perf_counter() - start, state


def end_to_end(config, steps: int) -> float:
  """Median logged tokens/s of `launch.pretrain` at the benchmark shape (first window, which
  holds compilation, dropped)."""
  log_every = max(steps // 6, 1)
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [
      sys.executable,
      '-m',
      'launch.pretrain',
      '--config=launch/configs/roformer.py:tiny',
      f'--workdir={workdir}',
      f'--config.train.num_train_steps={steps}',
      f'--config.train.log_every_steps={log_every}',
      f'--config.train.eval_every_steps={steps}',
      f'--config.train.checkpoint_every_steps={steps // 2}',
      '--config.train.progress=off',
      *override_flags(config),
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [r['tokens_per_sec'] for r in map(json.loads, f) if 'tokens_per_sec' in r]
  return statistics.median(rates[1:])


def main(argv):
  del argv
  config = bench_config(_HIDDEN.value)
  tokens = config.data.global_batch_size * config.data.seq_len
  n = config.data.seq_len
  p = objectives.max_predictions(n, config.data.mask_rate)
  needed = models.flops_per_token(config, p) * tokens  # what the task needs
  executed_ref = models.flops_per_token(config, n) * tokens  # head at every position
  peak_rate = peak.measured_matmul_peak('float32', refresh=True)
  print(
    f'\nmachine: {os.cpu_count()} cores, {jax.devices()[0].platform}, '
    f'measured float32 matmul peak {peak_rate / 1e9:.0f} GFLOP/s\n'
  )

  # The default (model.scan_unroll=0) runs the scanned layers without a loop on CPU; the
  # loop (one layer per iteration, as on TPU) is timed beside it.
  looped = bench_config(_HIDDEN.value)
  looped.model.scan_unroll = 1
  runners = {
    'ours (train step)': ours(config),
    'ours, scanned layers in a loop (model.scan_unroll=1)': ours(looped),
    'reference (HF Flax)': reference(config),
  }
  states, times = {}, {k: [] for k in runners}
  for name, (step, state) in runners.items():
    _, states[name] = time_steps(step, state, 2)  # compile + warm up
  for _ in range(_REPEATS.value):
    for name, (step, _) in runners.items():
      seconds, states[name] = time_steps(step, states[name], _STEPS.value)
      times[name].append(seconds / _STEPS.value)
  rate = {k: tokens / statistics.median(v) for k, v in times.items()}
  if _E2E_STEPS.value:
    rate['ours (launch.pretrain, end to end)'] = end_to_end(config, _E2E_STEPS.value)
  ref = rate['reference (HF Flax)']

  print(
    f'MLM, hidden {config.model.hidden_size}, {config.model.num_layers} layers, seq {n}, '
    f'batch {config.data.global_batch_size}, vocab {config.model.vocab_size}, float32, '
    f'AdamW; medians of {_REPEATS.value} alternating repeats of {_STEPS.value} steps\n'
  )
  print(
    '| run | tokens/s | vs reference | model FLOPs / step | MFU (needed FLOPs) | '
    'executed FLOPs / peak |'
  )
  print('|---|---|---|---|---|---|')
  for name, r in rate.items():
    is_ref = name.startswith('reference')
    executed = executed_ref if is_ref else needed
    print(
      f'| {name} | {r:,.0f} | {r / ref:.2f}x | {needed / 1e9:.1f} GFLOP | '
      f'{needed * r / tokens / peak_rate:.1%} | {executed * r / tokens / peak_rate:.1%} |'
    )


if __name__ == '__main__':
  app.run(main)
