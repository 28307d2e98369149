"""Does EG step-size adaptation recover a mis-set learning rate? (docs/algorithms.md 3.7 (a))

  .venv/bin/python benchmarks/eg_step_size.py [--steps 300] [--workdir_root /tmp/exp/eg_step_size]
      [--cache_dir /tmp/exp/cache] [--no_fast_eg]

Tiny RoFormer v1 MLM (d 64, 2 layers, 2 heads, FFN 256, n 64, batch 16, 8000-piece vocabulary)
on the built-in corpus (the Python standard library), float32 on CPU, trained with the real
trainer, `pretrain.train.train_and_evaluate(config, workdir)`, one fresh workdir per run. Every
run uses the preset's schedule (linear warmup 50 updates, then linear decay to 0 at --steps),
gradient clip 1.0 and weight decay 0.01; only the optimizer, its peak lr and EG change.

For each optimizer (AdamW, SGDM with heavy-ball momentum 0.9):
  1. tiny sweep without EG over three or four peak lrs (factor ~3 apart); "tuned" = lowest
     final eval loss;
  2. tuned / 10 and tuned x 10 without EG;
  3. the same three lrs with EG (optim.eg.enabled=True, the defaults: EGDD form, per-leaf S,
     scale_lr eta_S = 1e-3, gain_lr eta_p = 1e-2, S in [0.1, 10], p in [0.01, 100]);
  4. (unless --no_fast_eg) the same three lrs with a 10x faster scale meta-lr (eta_S = 1e-2):
     with eta_S = 1e-3 and normalised (cosine) signals S moves by at most a factor
     exp(eta_S * steps) = exp(0.3) = 1.35 in 300 steps, so it cannot undo a 10x lr error in a
     run this short no matter what the signal says.

Printed: final eval loss per (optimizer, lr, EG variant); for EG runs the final mean S over
the layer groups (the 'eg/scale/<group>' train metrics in <workdir>/metrics.jsonl), its
min/max over groups, the mean gain ('eg/gain_mean'), and the mean-S trajectory. The logged
mean gain is dominated by the 512k-entry token embedding (tied with the MLM decoder) and the
8000 output biases, so the geometric mean of the gains over all parameters and over the
transformer layers only is also read from the final checkpoint's optimizer state.
"""

from __future__ import annotations

from absl import app
from absl import flags

import json
import os
import shutil
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from launch.configs import roformer  # noqa: E402
from pretrain import train  # noqa: E402

SWEEPS = {'adamw': (7e-4, 2e-3, 6e-3), 'sgdm': (0.03, 0.1, 0.3, 1.0)}


flags.DEFINE_integer('steps', 300, 'optimizer updates per run')
flags.DEFINE_integer('batch', 16, 'batch')
flags.DEFINE_string('workdir_root', '/tmp/exp/eg_step_size', 'workdir root')
flags.DEFINE_string('cache_dir', '/tmp/exp/cache', 'cache dir')
flags.DEFINE_bool('no_fast_eg', False, 'skip the eta_S = 1e-2 runs')
flags.DEFINE_string('optimizers', 'adamw,sgdm', 'optimizers')


def make_config(args, name, lr, eg=None):
  c = roformer.get_config('tiny')
  m = c.model
  m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = 64, 2, 2, 256
  m.dropout_rate = 0.0
  c.data.seq_len, c.data.global_batch_size = 64, args.batch
  c.data.cache_dir = args.cache_dir
  c.data.num_threads = 1
  t = c.train
  t.num_train_steps = args.steps
  t.log_every_steps = 25
  t.eval_every_steps = args.steps  # evaluate once, at the end
  t.checkpoint_every_steps = args.steps
  t.keep_checkpoints = 1
  t.eval_steps = 8
  c.optim.name, c.optim.learning_rate = name, lr
  if eg is not None:
    c.optim.eg.enabled = True
    for key, value in eg.items():
      c.optim.eg[key] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def eg_summary(lines):
  """(final mean S, min S, max S over groups, mean gain, [(step, mean S)]) from train lines."""
  traj, last = [], None
  for line in lines:
    if line.get('split') != 'train':
      continue
    scales = [v for k, v in line.items() if k.startswith('eg/scale/')]
    if scales:
      traj.append((line['step'], float(np.mean(scales))))
      last = line
  if last is None:
    return None
  scales = {k[len('eg/scale/') :]: v for k, v in last.items() if k.startswith('eg/scale/')}
  return (
    float(np.mean(list(scales.values()))),
    min(scales.values()),
    max(scales.values()),
    last.get('eg/gain_mean', float('nan')),
    traj,
    scales,
  )


def _find_eg_state(tree):
  """The restored EGState (a dict with 'gain' and 'scale') inside a restored opt_state."""
  if isinstance(tree, dict):
    if {'gain', 'scale', 'gbar', 'base'} <= set(tree):
      return tree
    children = tree.values()
  elif isinstance(tree, (list, tuple)):
    children = tree
  else:
    return None
  for child in children:
    found = _find_eg_state(child)
    if found is not None:
      return found
  return None


def gain_geomeans(workdir):
  """(geometric mean of all gains p, of the gains of leaves under 'layers') at the end."""
  try:
    mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
    restored = mngr.restore(
      mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    eg = _find_eg_state(restored['state']['opt_state'])
    logs, layer_logs = [], []
    for path, p in jax.tree_util.tree_leaves_with_path(eg['gain']):
      lp = np.log(np.ravel(np.asarray(p, np.float64)))
      logs.append(lp)
      if 'layers' in jax.tree_util.keystr(path):
        layer_logs.append(lp)
    return (
      float(np.exp(np.concatenate(logs).mean())),
      float(np.exp(np.concatenate(layer_logs).mean())) if layer_logs else float('nan'),
    )
  except Exception as e:  # pylint: disable=broad-except
    print(f'  (could not read gains from {workdir}: {e})')
    return (float('nan'), float('nan'))


def run(args, tag, name, lr, eg=None):
  workdir = os.path.join(args.workdir_root, tag)
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
  t0 = time.time()
  result = train.train_and_evaluate(make_config(args, name, lr, eg), workdir)
  lines = read_metrics(workdir)
  train_losses = [l['loss'] for l in lines if l.get('split') == 'train']
  wall = time.time() - t0
  out = {
    'tag': tag,
    'name': name,
    'lr': lr,
    'eg': eg,
    'eval': result['loss'],
    'train': train_losses[-1],
    'wall': wall,
    'eg_summary': eg_summary(lines),
    'gains': gain_geomeans(workdir) if eg is not None else None,
  }
  s = out['eg_summary']
  extra = f', final mean S {s[0]:.3f}' if s else ''
  print(f'  {tag}: eval loss {result["loss"]:.4f}{extra} ({wall:.0f} s)', flush=True)
  return out


def fmt_lr(lr):
  return f'{lr:.0e}' if lr < 0.01 else f'{lr:g}'


def main(argv):
  del argv
  args = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  t_start = time.time()
  print(
    f'jax {jax.__version__} on {jax.devices()[0].platform}; tiny RoFormer MLM d64 L2 n64, '
    f'batch {args.batch}, {args.steps} updates, linear warmup 50 + linear decay, clip 1.0',
    flush=True,
  )
  eg_variants = [('EG', {})]
  if not args.no_fast_eg:
    eg_variants.append(('EG eta_S=1e-2', {'scale_lr': 1e-2}))
  rows = []
  for name in args.optimizers.split(','):
    print(f'\n{name}: lr sweep without EG {SWEEPS[name]}', flush=True)
    sweep = {lr: run(args, f'{name}_lr{fmt_lr(lr)}', name, lr) for lr in SWEEPS[name]}
    tuned = min(sweep, key=lambda lr: sweep[lr]['eval'])
    print(f'{name}: tuned lr = {fmt_lr(tuned)}', flush=True)
    settings = (('tuned', tuned), ('10x small', tuned / 10), ('10x large', tuned * 10))
    for label, lr in settings:
      base = sweep.get(lr) or run(args, f'{name}_lr{fmt_lr(lr)}', name, lr)
      rows.append((name, label, lr, 'none', base))
      for eg_label, eg in eg_variants:
        tag = f'{name}_lr{fmt_lr(lr)}_' + eg_label.replace(' ', '_').replace('=', '')
        rows.append((name, label, lr, eg_label, run(args, tag, name, lr, eg)))
    rows.append((name, 'sweep', None, None, sweep))

  print(
    '\nFinal eval loss after {} updates (8 eval batches of {} rows x 64 tokens); '
    'S = EG per-leaf scale, mean over layer groups at the last step:'.format(args.steps, args.batch)
  )
  print(
    '| optimizer | lr setting | peak lr | EG | final eval loss | vs tuned no-EG | '
    'final train loss | mean S | S min..max | mean gain | gain geo-mean all / layers |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  ref = {}
  for name, label, lr, eg_label, r in rows:
    if label == 'tuned' and eg_label == 'none':
      ref[name] = r['eval']
  for name, label, lr, eg_label, r in rows:
    if label == 'sweep':
      continue
    s = r['eg_summary']
    s_cells = (
      f'{s[0]:.3f} | {s[1]:.3f}..{s[2]:.3f} | {s[3]:.3f} | '
      f'{r["gains"][0]:.3f} / {r["gains"][1]:.3f}'
      if s
      else '- | - | - | -'
    )
    rel = 100 * (r['eval'] / ref[name] - 1)
    print(
      f'| {name} | {label} | {fmt_lr(lr)} | {eg_label} | {r["eval"]:.4f} | {rel:+.1f} % | '
      f'{r["train"]:.4f} | {s_cells} |'
    )

  print('\nLr sweep without EG (final eval loss):')
  print('| optimizer | lr: final eval loss |')
  print('|---|---|')
  for name, label, lr, eg_label, sweep in rows:
    if label == 'sweep':
      print(
        f'| {name} | '
        + ', '.join(f'{fmt_lr(lr)}: {r["eval"]:.4f}' for lr, r in sweep.items())
        + ' |'
      )

  print('\nMean S trajectory of the EG runs (step: mean S over layer groups):')
  for name, label, lr, eg_label, r in rows:
    if label != 'sweep' and r['eg_summary']:
      traj = r['eg_summary'][4]
      pts = [f'{st}: {v:.3f}' for st, v in traj if st % 50 == 0 or st == traj[-1][0]]
      print(f'  {name} {label} ({fmt_lr(lr)}) {eg_label}: ' + ', '.join(pts))
  print('\nFinal S per layer group (EG runs):')
  for name, label, lr, eg_label, r in rows:
    if label != 'sweep' and r['eg_summary']:
      groups = r['eg_summary'][5]
      print(
        f'  {name} {label} ({fmt_lr(lr)}) {eg_label}: '
        + ', '.join(f'{g} {v:.3f}' for g, v in sorted(groups.items()))
      )
  total = time.time() - t_start
  print(f'\ntotal wall time {total:.0f} s ({sum(1 for x in rows if x[1] != "sweep")} table rows)')


if __name__ == '__main__':
  app.run(main)
