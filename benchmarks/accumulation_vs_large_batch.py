"""Gradient accumulation hidden in momentum vs optax.MultiSteps vs one large batch
(docs/algorithms.md 2.7).

  .venv/bin/python benchmarks/accumulation_vs_large_batch.py [--updates 50] [--micro_batch 4]
      [--k 8] [--cache_dir /tmp/exp/cache]

Tiny RoFormer v1 MLM (d 64, 2 layers, 2 heads, FFN 256, n 64, 8000-piece vocabulary) on the
built-in corpus (the Python standard library), float32 on CPU, dropout off, gradient clipping
off (a clip acts per micro-batch in 'momentum' mode but on the window mean in MultiSteps, so it
would break the equivalence), decoupled weight decay 0.01 (applied at window ends only), the
preset's linear warmup (5 updates) + linear decay over `--updates` optimizer updates.

The U * k micro-batches (B rows each) are drawn once from the training pipeline; large batch j
is the concatenation of micro-batches j*k .. j*k + k - 1 (so every window sees exactly the rows
of its large batch, with the same masks). The trainer's pure step functions are driven directly
(train.setup / train.init_state / train.make_train_step, as tests/test_train.py does), because
`train.train_and_evaluate` reads batches of one size from its own pipeline and has no way to
feed the same rows at two batch sizes.

Experiments (all measured in one run):
  (a) SGDM, accumulation='momentum', k micro-batches of B     (accumulation hidden in momentum)
  (b) SGDM, accumulation='multisteps' (optax.MultiSteps), k x B
  (c) SGDM on the large batch of k*B rows, loss = mean over its k row-chunks of the chunk's
      token-mean loss (the objective (a) and (b) optimise: mean of k micro-batch means)
  (c') SGDM on the large batch with the trainer's own loss (token-weighted mean over all k*B
      rows; differs from (c) whenever micro-batches hold different numbers of masked tokens)
  (d) AdamW: accumulation in momentum vs MultiSteps vs large batch (close, not equal:
  docs/algorithms.md 2.2)
  (e) Su's 'every_k' (update every k-th micro-step, betas unchanged) vs plain per-micro-step
      updates at micro-batch B (k times more updates, warmup scaled by k) vs (a)-style exact
      accumulation (MultiSteps; for AdamW also hidden in momentum), for SGDM and AdamW; same
      micro-batches, same peak lr. (d) also reruns hidden-momentum Adam with lr x sqrt(k), a
      check of docs/algorithms.md 2.2's explanation (v inflated by the window's gradient variance).

The per-update loss of an accumulating run is the mean of its k micro-batch losses (the
parameters do not move inside a window, so it is the loss at the same parameters as (c)).
"""

from __future__ import annotations

from absl import app
from absl import flags

import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from data_pipelines import pipeline  # noqa: E402
from data_pipelines import text_datasets  # noqa: E402
from data_pipelines import tokenizer as tokenizer_lib  # noqa: E402
from launch.configs import roformer  # noqa: E402
from pretrain import mesh as mesh_lib  # noqa: E402
from pretrain import train  # noqa: E402


flags.DEFINE_integer('updates', 50, 'optimizer updates U per run')
flags.DEFINE_integer('micro_batch', 4, 'micro-batch rows B')
flags.DEFINE_integer('k', 8, 'accumulation steps')
flags.DEFINE_integer('warmup', 5, 'warmup (optimizer updates)')
flags.DEFINE_float('sgdm_lr', 0.1, 'sgdm lr')
flags.DEFINE_float('adam_lr', 2e-3, 'adam lr')
flags.DEFINE_integer('eval_batches', 4, 'eval batches of k*B rows')
flags.DEFINE_string('cache_dir', '/tmp/exp/cache', 'cache dir')
flags.DEFINE_integer('print_every', 1, 'rows of the loss-curve table')


def make_config(
  args,
  name: str,
  lr: float,
  accumulation: str = 'multisteps',
  k: int = 1,
  num_updates: int | None = None,
  warmup: int | None = None,
):
  """The tiny RoFormer config; train.num_train_steps = U * k micro-batches only sets the
  schedule length (U optimizer updates), since this script drives the loop itself."""
  c = roformer.get_config('tiny')
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = 64, 2, 2, 256
  m.dropout_rate = 0.0
  c.data.seq_len, c.data.global_batch_size = 64, args.micro_batch
  c.data.cache_dir = args.cache_dir
  c.data.num_threads = 1
  c.train.num_train_steps = (num_updates or args.updates) * k
  c.train.eval_steps = args.eval_batches
  o = c.optim
  o.name, o.learning_rate = name, lr
  o.warmup_steps = args.warmup if warmup is None else warmup
  o.grad_clip_norm = 0.0
  o.accumulation, o.accumulation_steps = accumulation, k
  return c


def load_data(args):
  """(U*k micro-batches of B rows, eval batches of k*B rows), NumPy dicts."""
  c = make_config(args, 'sgdm', 1.0)
  source = text_datasets.load_text_source(c.data)
  tok = tokenizer_lib.load_or_train(
    c.data, c.model, source.train, source.text_key, source.fingerprint
  )
  it = iter(pipeline.make_dataset(source.train, tok, c, text_key=source.text_key))
  micro = [next(it) for _ in range(args.updates * args.k)]
  c.data.global_batch_size = args.micro_batch * args.k
  evals = pipeline.eval_batches(source.validation, tok, c, text_key=source.text_key)
  return micro, evals


def concat_windows(micro, k):
  return [
    {key: np.concatenate([b[key] for b in micro[j : j + k]], axis=0) for key in micro[0]}
    for j in range(0, len(micro), k)
  ]


def _loss(batch_sums):
  return float(batch_sums['loss_sum'] / max(float(batch_sums['weight_sum']), 1.0))


class Runner:
  """Builds model + optimizer from a config and trains on given batches."""

  def __init__(self, config):
    self.config = config
    self.mesh = mesh_lib.make_mesh(config.mesh)
    self.s = train.setup(config, self.mesh)
    self.state = train.init_state(config, self.s)
    self.key = jax.random.key(config.seed)
    self.eval_step = train.jit_eval_step(self.s, config)

  def run_micro(self, batches, k):
    """Trainer step per micro-batch; returns per-update loss (mean of its k micro losses)."""
    step = train.jit_train_step(self.s, self.config)
    losses = []
    for b in batches:
      self.state, m = step(self.state, b, self.key)
      losses.append(m)
    losses = np.array([_loss(m) for m in jax.device_get(losses)])
    return losses.reshape(-1, k).mean(axis=1)

  def run_large(self, batches, k, weighting):
    """One update per large batch of k*B rows. weighting: 'chunk_mean' (mean over the k row
    chunks of their token-mean loss) or 'token' (the trainer's loss over all rows). Returns
    the chunk-mean loss per update either way (comparable with run_micro)."""
    graphdef, tx = self.s.graphdef, self.s.tx

    def step(state, batch):
      def loss_fn(params):
        model = nnx.merge(graphdef, params)
        logits = model(
          batch['inputs'],
          batch['segment_ids'],
          batch['positions'],
          prediction_positions=batch['mlm_positions'],
          dropout_rng=None,
        )
        split = lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:])  # noqa: E731
        chunk_loss, _ = jax.vmap(train.loss_and_metrics)(
          split(logits), split(batch['mlm_targets']), split(batch['mlm_weights'])
        )
        token_loss, _ = train.loss_and_metrics(logits, batch['mlm_targets'], batch['mlm_weights'])
        chunk_mean = jnp.mean(chunk_loss)
        return (chunk_mean if weighting == 'chunk_mean' else token_loss), chunk_mean

      (_, chunk_mean), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      return {
        'step': state['step'] + 1,
        'params': optax.apply_updates(state['params'], updates),
        'opt_state': opt_state,
      }, chunk_mean

    step = jax.jit(step, donate_argnums=0)
    losses = []
    for b in batches:
      self.state, loss = step(self.state, b)
      losses.append(loss)
    return np.array(jax.device_get(losses), np.float64)

  def eval_loss(self, evals):
    totals = None
    for b in evals:
      sums = self.eval_step(self.state['params'], b)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return train.summarize(jax.device_get(totals))['loss']

  def params(self):
    return jax.device_get(self.state['params'])


def max_param_diff(p, q):
  return max(
    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q))
  )


def print_curves(title, columns, every):
  names = list(columns)
  n = len(next(iter(columns.values())))
  print(f'\n{title}')
  print('| update | ' + ' | '.join(names) + ' |')
  print('|' + '---|' * (len(names) + 1))
  for i in range(n):
    if i % every and i != n - 1:
      continue
    cells = []
    for name in names:
      v = columns[name][i]
      cells.append(f'{v:.3e}' if name.startswith('|') else f'{v:.6f}')
    print(f'| {i + 1} | ' + ' | '.join(cells) + ' |')


def timed(label, fn):
  t0 = time.time()
  out = fn()
  print(f'  {label}: {time.time() - t0:.1f} s', flush=True)
  return out


def run_all(args, micro, large, evals):
  """Runs (a)-(e); returns (losses per run, final params per run, (e) curves and evals)."""
  k, U = args.k, args.updates
  results, finals = {}, {}
  print('\nruns:', flush=True)
  # ------------------------------------------------------------------ SGDM (a), (b), (c), (c')
  lr = args.sgdm_lr
  for label, acc, kk, mode in (
    ('a momentum', 'momentum', k, 'micro'),
    ('b multisteps', 'multisteps', k, 'micro'),
    ('c large', 'multisteps', 1, 'chunk_mean'),
    ("c' large token-wt", 'multisteps', 1, 'token'),
  ):
    r = Runner(make_config(args, 'sgdm', lr, acc, kk))
    if mode == 'micro':
      results['sgdm ' + label] = timed('sgdm ' + label, lambda: r.run_micro(micro, k))
    else:
      results['sgdm ' + label] = timed('sgdm ' + label, lambda: r.run_large(large, k, mode))
    finals['sgdm ' + label] = r.params()
  # ------------------------------------------------------------------ AdamW (d)
  lr = args.adam_lr
  for label, acc, kk, mode in (
    ('a momentum', 'momentum', k, 'micro'),
    ('b multisteps', 'multisteps', k, 'micro'),
    ('c large', 'multisteps', 1, 'chunk_mean'),
  ):
    r = Runner(make_config(args, 'adamw', lr, acc, kk))
    if mode == 'micro':
      results['adam ' + label] = timed('adam ' + label, lambda: r.run_micro(micro, k))
    else:
      results['adam ' + label] = timed('adam ' + label, lambda: r.run_large(large, k, mode))
    finals['adam ' + label] = r.params()
  # Diagnostic for docs/algorithms.md 2.2: hidden Adam's v holds mean(g^2) >= mean(g)^2, so its
  # steps are
  # up to sqrt(k) smaller; rerun it with the peak lr multiplied by sqrt(k).
  r = Runner(make_config(args, 'adamw', lr * np.sqrt(k), 'momentum', k))
  results['adam a momentum lr*sqrt(k)'] = timed(
    'adam a momentum, lr x sqrt(k)', lambda: r.run_micro(micro, k)
  )
  # ------------------------------------------------------------------ every_k (e)
  evals_e = {}
  for name, lr in (('sgdm', args.sgdm_lr), ('adamw', args.adam_lr)):
    variants = [
      ('every_k', make_config(args, name, lr, 'every_k', k)),
      (
        'per-step',
        make_config(args, name, lr, 'multisteps', 1, num_updates=U * k, warmup=args.warmup * k),
      ),
      ('accumulation (multisteps, exact)', make_config(args, name, lr, 'multisteps', k)),
    ]
    if name == 'adamw':
      variants.append(('accumulation (momentum)', make_config(args, name, lr, 'momentum', k)))
    for label, cfg in variants:
      r = Runner(cfg)
      curve = timed(f'{name} {label}', lambda: r.run_micro(micro, k))
      evals_e[(name, label)] = (curve, r.eval_loss(evals))

  return results, finals, evals_e


def print_adam_table(args, results, finals):
  """(d): AdamW accumulation in momentum vs MultiSteps vs the large batch."""
  a = {key[5:]: v for key, v in results.items() if key.startswith('adam')}
  cols = {
    '(a) momentum': a['a momentum'],
    '(b) multisteps': a['b multisteps'],
    '(c) large': a['c large'],
    '(a) lr x sqrt(k)': a['a momentum lr*sqrt(k)'],
    '|a-b|': np.abs(a['a momentum'] - a['b multisteps']),
    '|b-c|': np.abs(a['b multisteps'] - a['c large']),
  }
  print_curves(
    f'(d) AdamW (lr {args.adam_lr}): training loss per optimizer update', cols, args.print_every
  )
  print('\nAdamW max abs differences over all updates (loss curve; final parameters):')
  print('| pair | max abs loss diff | max abs param diff |')
  print('|---|---|---|')
  for x, y in (
    ('a momentum', 'b multisteps'),
    ('b multisteps', 'c large'),
    ('a momentum', 'c large'),
  ):
    print(
      f'| {x} vs {y} | {np.max(np.abs(a[x] - a[y])):.2e} | '
      f'{max_param_diff(finals["adam " + x], finals["adam " + y]):.2e} |'
    )
  last = slice(-10, None)
  print(
    f'mean loss over the last 10 updates: (a) {np.mean(a["a momentum"][last]):.4f}, '
    f'(b) {np.mean(a["b multisteps"][last]):.4f}, (c) {np.mean(a["c large"][last]):.4f}, '
    f'(a) with lr x sqrt(k) {np.mean(a["a momentum lr*sqrt(k)"][last]):.4f}'
  )


def print_tables(args, results, finals, evals_e):
  """The tables of docs/optimizers.md: SGDM (a)-(c'), AdamW (d), every_k (e)."""
  k, B, U = args.k, args.micro_batch, args.updates
  s = {key[5:]: v for key, v in results.items() if key.startswith('sgdm')}
  cols = {
    '(a) momentum': s['a momentum'],
    '(b) multisteps': s['b multisteps'],
    '(c) large': s['c large'],
    "(c') large token-wt": s["c' large token-wt"],
    '|a-c|': np.abs(s['a momentum'] - s['c large']),
    '|b-c|': np.abs(s['b multisteps'] - s['c large']),
    '|a-b|': np.abs(s['a momentum'] - s['b multisteps']),
  }
  print_curves(
    f'SGDM (lr {args.sgdm_lr}, b1 0.9): training loss per optimizer update '
    f"(mean of the window's micro-batch losses = chunk-mean loss of the large batch)",
    cols,
    args.print_every,
  )
  print('\nSGDM max abs differences over all updates (loss curve; final parameters):')
  print('| pair | max abs loss diff | max abs param diff |')
  print('|---|---|---|')
  for x, y in (
    ('a momentum', 'b multisteps'),
    ('a momentum', 'c large'),
    ('b multisteps', 'c large'),
    ('c large', "c' large token-wt"),
  ):
    print(
      f'| {x} vs {y} | {np.max(np.abs(s[x] - s[y])):.2e} | '
      f'{max_param_diff(finals["sgdm " + x], finals["sgdm " + y]):.2e} |'
    )

  print_adam_table(args, results, finals)
  print(
    f"\n(e) Su's every_k vs per-step updates at micro-batch B={B} (same {U * k} "
    f'micro-batches, same peak lr; per-step: {U * k} updates, warmup {args.warmup * k}):'
  )
  print(
    '| optimizer | variant | updates | train loss, first window | train loss, last 5 '
    'windows | eval loss (final) |'
  )
  print('|---|---|---|---|---|---|')
  for (name, label), (curve, ev) in evals_e.items():
    n_up = U * k if label == 'per-step' else U
    print(f'| {name} | {label} | {n_up} | {curve[0]:.4f} | {np.mean(curve[-5:]):.4f} | {ev:.4f} |')


def main(argv):
  del argv
  args = flags.FLAGS
  k, B, U = args.k, args.micro_batch, args.updates
  t_start = time.time()
  print(
    f'jax {jax.__version__} on {jax.devices()[0].platform}; tiny RoFormer MLM d64 L2 n64; '
    f'micro-batch B={B}, k={k}, large batch {k * B}, {U} optimizer updates; float32',
    flush=True,
  )
  micro, evals = load_data(args)
  large = concat_windows(micro, k)
  w = np.array([b['mlm_weights'].sum() for b in micro]).reshape(U, k)
  unequal = int(np.sum(w.min(axis=1) != w.max(axis=1)))
  print(
    f'data: {len(micro)} micro-batches; masked tokens per micro-batch {w.min():.0f}..'
    f'{w.max():.0f}; {unequal}/{U} windows have unequal counts (token-weighted large-batch '
    f'loss != mean of micro-batch means there)',
    flush=True,
  )
  results, finals, evals_e = run_all(args, micro, large, evals)
  print_tables(args, results, finals, evals_e)
  print(f'\ntotal wall time {time.time() - t_start:.0f} s')


if __name__ == '__main__':
  app.run(main)
