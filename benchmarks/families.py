r"""Trains every family's `tiny` preset for the same number of steps on the built-in corpus and
prints parameters, throughput, MFU and losses side by side (issue: all three model families).

  python benchmarks/families.py --steps=300 [--only=gau:tiny:clm,...]

Each run uses a fresh workdir under runs/bench_families/ (deleted first), the preset's own
optimizer and schedule (with num_train_steps overridden), and the same data order. The plots of
all runs (launch.report's) go to runs/bench_families/report/.
"""

import json
import math
import os
import shutil
import time


from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import numpy as np

from launch.configs import deepnet, gau, roformer, roformer_v2
from pretrain import mesh as mesh_lib
from pretrain import report
from pretrain import train

_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps per run.')
_ONLY = flags.DEFINE_string('only', '', 'Comma-separated family:preset:objective to run.')

RUNS = (
  ('roformer', 'tiny', 'mlm'),
  ('roformer', 'tiny', 'clm'),
  ('roformer_v2', 'tiny', 'mlm'),
  ('roformer_v2', 'tiny', 'clm'),
  ('gau', 'tiny', 'mlm'),
  ('gau', 'tiny', 'clm'),
  ('gau', 'flash_tiny', 'mlm'),
  ('gau', 'flash_tiny', 'clm'),
  ('deepnet', 'tiny', 'mlm'),
  ('deepnet', 'deep', 'mlm'),
)
MODULES = {'roformer': roformer, 'roformer_v2': roformer_v2, 'gau': gau, 'deepnet': deepnet}


def run_one(family, preset, objective, steps):
  config = MODULES[family].get_config(preset)
  config.objective = objective
  # Same length for everyone; presets with schedule boundaries get them rescaled.
  old_steps = config.train.num_train_steps
  config.train.num_train_steps = steps
  config.train.eval_every_steps = config.train.checkpoint_every_steps = steps
  config.train.log_every_steps = max(1, steps // 10)
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
  if config.optim.schedule == 'piecewise_linear':
    config.optim.schedule_boundaries = tuple(
      (round(s * steps / old_steps), v) for s, v in config.optim.schedule_boundaries
    )
  workdir = os.path.join('runs', 'bench_families', f'{family}_{preset}_{objective}')
  shutil.rmtree(workdir, ignore_errors=True)
  setup = train.setup(config, mesh_lib.make_mesh(config.mesh))
  start = time.time()
  result = train.train_and_evaluate(config, workdir)
  wall = time.time() - start
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_lines = [l for l in lines if l['split'] == 'train']
  return {
    'run': f'{family}:{preset}:{objective}',
    'params': setup.num_params,
    'tokens_per_sec': float(np.median([l['tokens_per_sec'] for l in train_lines[1:]])),
    'mfu': float(np.median([l.get('mfu', math.nan) for l in train_lines[1:]])),
    'first_loss': train_lines[0]['loss'],
    'last_loss': train_lines[-1]['loss'],
    'eval_loss': result['loss'],
    'eval_accuracy': result['accuracy'],
    'wall_s': wall,
    'workdir': workdir,
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  only = set(filter(None, _ONLY.value.split(',')))
  rows = [run_one(f, p, o, _STEPS.value) for f, p, o in RUNS if not only or f'{f}:{p}:{o}' in only]
  print(
    f'\n{_STEPS.value} steps each, {jax.device_count()} device(s) '
    f'({jax.devices()[0].device_kind})\n'
  )
  print(
    '| run | params | tokens/s | MFU | first train loss | last train loss | eval loss | '
    'eval acc | wall |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["run"]} | {r["params"]:,} | {r["tokens_per_sec"]:,.0f} | {r["mfu"]:.1%} | '
      f'{r["first_loss"]:.3f} | {r["last_loss"]:.3f} | {r["eval_loss"]:.3f} | '
      f'{r["eval_accuracy"]:.3f} | {r["wall_s"]:.0f} s |'
    )
  # The same runs as pictures (loss vs step and tokens, throughput, MFU): launch.report's.
  written = report.write_report(
    [r['workdir'] for r in rows],
    os.path.join('runs', 'bench_families', 'report'),
    [r['run'] for r in rows],
  )
  print('\nplots: ' + ', '.join(written))


if __name__ == '__main__':
  app.run(main)
