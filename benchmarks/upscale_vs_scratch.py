"""Growing a trained small model (launch.upscale) vs training the large one from scratch.

  .venv/bin/python benchmarks/upscale_vs_scratch.py [--small_steps 200] [--grown_steps 200]
      [--variants none,zero_out,noise] [--root /tmp/exp/upscale] [--plot upscale_vs_scratch.png]

CPU-scale RoFormer v1 MLM on the built-in corpus (the Python standard library, 8000-piece
vocabulary), seq_len 64, batch 16, AdamW lr 1e-3 with linear warmup (10 % of each run) and
linear decay, dropout off, float32:
  small  d 128, 2 blocks, 2 heads x 64, FFN 512: trained S = --small_steps steps;
  grown  launch.upscale to d 256, 4 blocks (2x depth: exact for v1 with norm_transfer), 4 heads
         x 64, FFN 1024, then T = --grown_steps steps with its own schedule (fresh warmup),
         one run per variant: symmetry breaking none / zero_out / noise (sigma
         --noise_sigma), and 'none:map' (Adam moments mapped instead of reset);
  scratch the large shape from a fresh init for S + T steps with the same schedule shape, and
         once more for the equal-compute step count (S small + T large steps' FLOPs) with its
         own full schedule (a mid-schedule point of the longer run is not annealed).
Every run is a real `python -m launch.pretrain` / `python -m launch.upscale` subprocess (the
user's path); validation loss comes from each run's metrics.jsonl (the trainer's fixed eval
set, --eval_batches batches). Compute is the trainer's analytic FLOPs per step
(models.flops_per_token; 3x forward). Runs whose workdir already holds the final step are
reused, so an interrupted benchmark continues.

Prints, per variant: the validation loss at equal total compute (grown: S small steps + T large
steps; scratch: the equal-compute run, and the S+T run interpolated there) and at equal
large-model steps (T), plus the held-out loss before/after growth (equal when exact). Saves a
PNG of validation loss vs training FLOPs (matplotlib, installed with the package).
"""

from __future__ import annotations

from absl import app
from absl import flags

import json
import os
import shlex
import subprocess
import sys
import time

from pretrain import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(hidden_size=128, num_layers=2, num_heads=2, mlp_dim=512)
LARGE = dict(hidden_size=256, num_layers=4, num_heads=4, mlp_dim=1024)


flags.DEFINE_integer('small_steps', 200, 'S: small-model steps')
flags.DEFINE_integer('grown_steps', 200, 'T: steps after growth')
flags.DEFINE_string(
  'variants',
  'none,zero_out,noise,none:map',
  'comma-separated upscale.symmetry_breaking values, each optionally with '
  ':map (upscale.optimizer_state=map; default reset)',
)
flags.DEFINE_float('noise_sigma', 1e-2, 'noise sigma')
flags.DEFINE_integer('eval_every', 25, 'eval every')
flags.DEFINE_integer('eval_batches', 16, 'eval batches')
flags.DEFINE_integer('seq_len', 64, 'seq len')
flags.DEFINE_integer('batch', 16, 'batch')
flags.DEFINE_float('lr', 1e-3, 'lr')
flags.DEFINE_string('root', '/tmp/exp/upscale', 'workdirs go here')
flags.DEFINE_string('plot', 'upscale_vs_scratch.png', 'PNG path (empty: no plot)')


def common_flags(args, steps: int) -> list[str]:
  warmup = max(1, steps // 10)
  values = {
    'data.seq_len': args.seq_len,
    'data.global_batch_size': args.batch,
    'train.num_train_steps': steps,
    'train.eval_every_steps': args.eval_every,
    'train.eval_steps': args.eval_batches,
    'train.log_every_steps': args.eval_every,
    'train.checkpoint_every_steps': steps,
    'optim.learning_rate': args.lr,
    'optim.warmup_steps': warmup,
    'model.dropout_rate': 0.0,
  }
  return [f'--config.{k}={v}' for k, v in values.items()]


def shape_flags(shape: dict) -> list[str]:
  return [f'--config.model.{k}={v}' for k, v in shape.items()]


def run(cmd: list[str], log_path: str):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  start = time.time()
  with open(log_path, 'w') as log:
    result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  if result.returncode != 0:
    raise SystemExit(f'{" ".join(cmd)} failed ({result.returncode}); see {log_path}')
  print(f'  {os.path.basename(log_path)}: {time.time() - start:.0f} s', flush=True)
  return result.stdout


def done(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))


def pretrain(args, workdir: str, shape: dict, steps: int, extra=()):
  if not done(workdir, steps):
    run(
      [
        sys.executable,
        '-m',
        'launch.pretrain',
        '--config=launch/configs/roformer.py:tiny',
        f'--workdir={workdir}',
        *shape_flags(shape),
        *common_flags(args, steps),
        *extra,
      ],
      workdir.rstrip('/') + '.log',
    )


def eval_curve(workdir: str) -> list[tuple[int, float]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  lines = [json.loads(l) for l in open(path).read().splitlines()]
  curve = {}
  for l in lines:
    if l['split'] == 'eval':
      curve[l['step']] = l['loss']
  return sorted(curve.items())


def flops_per_step(args, shape: dict) -> float:
  import models  # pylint: disable=g-import-not-at-top
  from data_pipelines import objectives  # pylint: disable=g-import-not-at-top
  from launch.configs import roformer  # pylint: disable=g-import-not-at-top

  config = roformer.get_config('tiny')
  for k, v in shape.items():
    config.model[k] = v
  config.data.seq_len = args.seq_len
  preds = objectives.max_predictions(args.seq_len, config.data.mask_rate)
  return models.flops_per_token(config, preds) * args.seq_len * args.batch


def interpolate(curve, x: float) -> float:
  xs, ys = [c[0] for c in curve], [c[1] for c in curve]
  if x <= xs[0]:
    return ys[0]
  for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
    if x0 <= x <= x1:
      return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  return ys[-1]


def grow_variants(args, small_dir, variants):
  """launch.upscale + launch.pretrain for every variant (skipped when already done); returns
  ({variant: workdir}, {variant: the held-out lines launch.upscale printed})."""
  T = args.grown_steps
  S = args.small_steps
  grown_dirs, growth_lines = {}, {}
  for variant in variants:
    symmetry, _, state = variant.partition(':')
    grown = os.path.join(args.root, f'grown_{symmetry}_{state or "reset"}_{S}_{T}')
    grown_dirs[variant] = grown
    if not done(grown, T):
      if not done(grown, 0):
        out = run(
          [
            sys.executable,
            '-m',
            'launch.upscale',
            f'--from_workdir={small_dir}',
            '--config=launch/configs/roformer.py:tiny',
            f'--workdir={grown}',
            *shape_flags(LARGE),
            *common_flags(args, T),
            f'--config.upscale.symmetry_breaking={symmetry}',
            f'--config.upscale.optimizer_state={state or "reset"}',
            f'--config.upscale.noise_sigma={args.noise_sigma}',
          ],
          grown.rstrip('/') + '.upscale.log',
        )
        with open(grown.rstrip('/') + '.upscale.out', 'w') as f:
          f.write(out)
      cont = open(grown.rstrip('/') + '.upscale.out').read()
      command = shlex.split(cont.split('continue training with:')[1])[3:]  # after python -m x
      run([sys.executable, '-m', 'launch.pretrain', *command], grown.rstrip('/') + '.log')
    growth_lines[variant] = [
      l
      for l in open(grown.rstrip('/') + '.upscale.out').read().splitlines()
      if l.startswith('held-out')
    ]
  return grown_dirs, growth_lines


def plot(args, curves_all, flops, budget, equal_steps):
  """Validation loss vs training FLOPs of every run, as a PNG at --plot."""
  S, T = args.small_steps, args.grown_steps
  small, scratch, equal, curves = curves_all
  f_small, f_large = flops
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('matplotlib is not installed: pip install -e . for the plot')
    return
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot([s * f_small for s, _ in small], [l for _, l in small], 'k-', label='small (d 128, 2L)')
  ax.plot(
    [s * f_large for s, _ in scratch],
    [l for _, l in scratch],
    'r-',
    label=f'large from scratch (d 256, 4L), {S + T} steps',
  )
  ax.plot(
    [s * f_large for s, _ in equal],
    [l for _, l in equal],
    'm-',
    label=f'large from scratch, {equal_steps} steps (equal compute)',
  )
  for variant, curve in curves.items():
    ax.plot(
      [S * f_small + s * f_large for s, _ in curve],
      [l for _, l in curve],
      '--',
      label=f'grown ({variant})',
    )
  ax.axvline(budget, color='gray', lw=0.5)
  ax.set_xlabel('training FLOPs')
  ax.set_ylabel('validation MLM loss')
  ax.set_title(f'RoFormer v1: grow after {S} small steps vs scratch')
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.plot, dpi=120)
  print(f'plot: {os.path.abspath(args.plot)}')


def main(argv):
  del argv
  args = flags.FLAGS
  os.makedirs(args.root, exist_ok=True)
  S, T = args.small_steps, args.grown_steps
  variants = [v for v in args.variants.split(',') if v]
  small_dir = os.path.join(args.root, f'small_{S}')
  scratch_dir = os.path.join(args.root, f'scratch_{S + T}')
  print(f'small {SMALL} x {S} steps, grown {LARGE} x {T} steps, scratch x {S + T} steps')
  pretrain(args, small_dir, SMALL, S)
  grown_dirs, growth_lines = grow_variants(args, small_dir, variants)
  pretrain(args, scratch_dir, LARGE, S + T)
  f_small, f_large = flops_per_step(args, SMALL), flops_per_step(args, LARGE)
  budget = S * f_small + T * f_large
  equal_steps = round(budget / f_large)
  equal_dir = os.path.join(args.root, f'scratch_{equal_steps}')
  pretrain(args, equal_dir, LARGE, equal_steps)  # equal compute, its own full schedule

  small = eval_curve(small_dir)
  scratch = eval_curve(scratch_dir)
  equal = eval_curve(equal_dir)
  print(
    f'\nFLOPs/step: small {f_small:.3g}, large {f_large:.3g} (ratio {f_large / f_small:.2f}); '
    f'budget S*small + T*large = {budget:.3g} FLOPs = {equal_steps} large steps'
  )
  print(f'small model after {S} steps: val loss {small[-1][1]:.4f}')
  print(
    f'scratch large, {S + T}-step schedule: val loss {interpolate(scratch, T):.4f} at step '
    f'{T}, {interpolate(scratch, budget / f_large):.4f} at equal compute (step '
    f'{budget / f_large:.0f}, mid-schedule), {scratch[-1][1]:.4f} at step {S + T}'
  )
  print(f'scratch large, {equal_steps}-step schedule (equal compute): val loss {equal[-1][1]:.4f}')
  print(
    f'\n| variant | held-out batch loss small -> grown | grown after T={T} | scratch, equal '
    f'compute ({equal_steps} steps, own schedule) | scratch at T={T} of {S + T} | scratch '
    f'at {S + T} |'
  )
  print('|---|---|---|---|---|---|')
  curves = {}
  for variant in variants:
    curve = eval_curve(grown_dirs[variant])
    curves[variant] = [(0, small[-1][1])] + curve  # lossless: the small model's loss at 0
    m = [l for l in growth_lines[variant] if 'MLM loss small' in l]
    moved = (
      m[0].split('MLM loss small ')[1].split(';')[0].replace(' vs grown ', ' -> ') if m else '?'
    )
    print(
      f'| {variant} | {moved} | {curve[-1][1]:.4f} | {equal[-1][1]:.4f} | '
      f'{interpolate(scratch, T):.4f} | {scratch[-1][1]:.4f} |'
    )
  for variant in variants:
    print(f'  {variant}: {" ".join(growth_lines[variant])}')

  if args.plot:
    plot(args, (small, scratch, equal, curves), (f_small, f_large), budget, equal_steps)
  # Every run's curves vs step and tokens, throughput and MFU (launch.report's plots).
  dirs = [small_dir, scratch_dir, equal_dir] + [grown_dirs[v] for v in variants]
  names = ['small', f'scratch_{S + T}', f'scratch_{equal_steps}'] + [f'grown_{v}' for v in variants]
  print('plots: ' + ', '.join(report.write_report(dirs, os.path.join(args.root, 'report'), names)))


if __name__ == '__main__':
  app.run(main)
