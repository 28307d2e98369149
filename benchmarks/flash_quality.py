r"""FLASH's quality at linear cost: FLASH (mixed chunk) vs GAU quadratic vs RoFormer at about
equal parameters and equal steps, MLM and CLM at n = 512 and 1024 (issue 12, item 4;
docs/algorithms.md 6.2).

  nice -n 10 .venv/bin/python benchmarks/flash_quality.py [--steps=150] [--seeds=1]
      [--lengths=512,1024] [--objectives=mlm,clm] [--plot=flash_quality.png]

The claim (Hua et al. 2022, kexue 8934): FLASH's mixed-chunk attention (quadratic inside
chunks of c tokens, linear across them) loses little quality against the same GAU stack with
full quadratic attention (FLASH-Quad), and both match or beat a Transformer of equal size,
while FLASH's cost grows linearly in n.

Models, one width --hidden, about equal parameters:
  RoFormer   `roformer:tiny` (v1: softmax multi-head attention + GELU FFN, post-LN), --blocks
             blocks, 4d FFN;
  GAU quad   `gau:flash_tiny` with chunk_size 0: 2 x --blocks GAU layers, relu^2 attention
             over the whole document, e = 2d, s = --shared_dim (FLASH-Quad), kernel init
             N(0, flash_init_std(d)^2) (the paper's 0.02 at d = 768, kept relative to d);
  FLASH      the same with chunk_size --chunk (mixed chunk: local relu^2 + global linear).
Each trains --steps steps of --tokens tokens (batch = tokens / n) with AdamW --lr, warmup 10 %,
linear decay, on the built-in corpus, for every objective and n. Reported: the final eval loss
and accuracy, the unigram level (the loss of a model that ignores its input), and the median
time per step the trainer logged (compilation excluded; this machine, shared, so noisy).
Runs are reused from --root when their settings match.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import claims_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from launch.configs import gau as gau_presets  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEPS = flags.DEFINE_integer('steps', 150, 'Training steps per run.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per setting (init seed = 0 .. seeds-1).')
_LENGTHS = flags.DEFINE_list('lengths', ['512', '1024'], 'Sequence lengths n.')
_OBJECTIVES = flags.DEFINE_list('objectives', ['mlm', 'clm'], 'Objectives.')
_TOKENS = flags.DEFINE_integer('tokens', 1024, 'Tokens per step (batch = tokens / n).')
_HIDDEN = flags.DEFINE_integer('hidden', 64, 'Width d.')
_BLOCKS = flags.DEFINE_integer('blocks', 2, 'RoFormer blocks (GAU: twice as many layers).')
_SHARED = flags.DEFINE_integer('shared_dim', 64, 'GAU s.')
_CHUNK = flags.DEFINE_integer('chunk', 128, 'FLASH chunk size c.')
_LR = flags.DEFINE_float('lr', 2e-3, 'Peak learning rate (AdamW).')
_ROOT = flags.DEFINE_string('root', '/tmp/exp/flash_quality', 'Workdirs go here.')
_PLOT = flags.DEFINE_string('plot', 'flash_quality.png', 'PNG of the loss curves (empty: none).')
_FRESH = flags.DEFINE_bool('fresh', False, 'Rerun runs whose results are in --root.')


def models_() -> dict[str, tuple[str, dict]]:
  d, blocks = _HIDDEN.value, _BLOCKS.value
  gau = {
    'model.hidden_size': d,
    'model.num_layers': 2 * blocks,
    'model.shared_dim': _SHARED.value,
    'model.expansion_factor': 2,
    'model.initializer_range': round(gau_presets.flash_init_std(d), 5),
  }
  return {
    'RoFormer': (
      'roformer:tiny',
      {
        'model.hidden_size': d,
        'model.num_layers': blocks,
        'model.num_heads': max(1, d // 64),
        'model.mlp_dim': 4 * d,
      },
    ),
    'GAU quad': ('gau:flash_tiny', dict(gau, **{'model.chunk_size': 0})),
    'FLASH': ('gau:flash_tiny', dict(gau, **{'model.chunk_size': _CHUNK.value})),
  }


def overrides(model_o: dict, objective: str, n: int, seed: int) -> dict:
  steps = _STEPS.value
  o = dict(model_o)
  o.update(
    {
      'objective': objective,
      'data.seq_len': n,
      'data.global_batch_size': max(1, _TOKENS.value // n),
      'optim.name': 'adamw',
      'optim.schedule': 'linear',
      'optim.learning_rate': _LR.value,
      'optim.warmup_steps': max(1, steps // 10),
      **claims_utils.run_overrides(steps, seed, log_points=10),
    }
  )
  return o


def main(argv):
  del argv
  start = time.time()
  lengths = [int(n) for n in _LENGTHS.value]
  seeds = range(_SEEDS.value)
  print(
    f'd {_HIDDEN.value}, {_BLOCKS.value} RoFormer blocks / {2 * _BLOCKS.value} GAU layers '
    f'(s {_SHARED.value}, e {2 * _HIDDEN.value}), FLASH c {_CHUNK.value}; {_TOKENS.value} '
    f'tokens/step, {_STEPS.value} steps, AdamW {_LR.value:g}; seeds {list(seeds)}'
  )
  results, groups = {}, {}
  for objective in _OBJECTIVES.value:
    for n in lengths:
      for name, (spec, model_o) in models_().items():
        runs = []
        for seed in seeds:
          o = overrides(model_o, objective, n, seed)
          tag = f'{name.replace(" ", "_")}_{objective}_n{n}_s{seed}'
          runs.append(claims_utils.train_run(spec, o, _ROOT.value, tag, fresh=_FRESH.value))
        results[objective, n, name] = runs
        groups[f'{name} {objective} n={n}'] = runs

  unigram = {}  # per evaluation set (objective, n)
  for objective in _OBJECTIVES.value:
    for n in lengths:
      spec, model_o = models_()['RoFormer']
      unigram[objective, n] = claims_utils.unigram_loss(
        claims_utils.make_config(spec, overrides(model_o, objective, n, 0))
      )
  print(
    f'\n{_STEPS.value} steps x {_TOKENS.value} tokens, {len(seeds)} seed(s) (mean ± std '
    f'where > 1); unigram = the eval loss of a model that ignores its input\n'
  )
  print('| objective | n | model | params | eval loss | unigram | eval acc | ms / step | wall |')
  print('|---|---|---|---|---|---|---|---|---|')
  for (objective, n, name), runs in results.items():
    ms = [1e3 / r['steps_per_sec'] for r in runs]
    print(
      f'| {objective.upper()} | {n} | {name} | {runs[0]["params"]:,} | '
      f'{claims_utils.mean_std([r["eval_loss"] for r in runs])} | '
      f'{unigram[objective, n]:.3f} | '
      f'{claims_utils.mean_std([r["eval_accuracy"] for r in runs])} | '
      f'{claims_utils.mean_std(ms, ",.0f")} | '
      f'{sum(r["wall_s"] for r in runs):.0f} s |'
    )
  written = claims_utils.plot_curves(_PLOT.value, groups, 'FLASH vs GAU quad vs RoFormer')
  if written:
    print(f'\nplot: {written}')
  total = sum(r['wall_s'] for runs in results.values() for r in runs)
  print(
    f'total wall time {time.time() - start:.0f} s (training runs: {total:.0f} s when '
    'they ran; reused runs cost nothing now)'
  )


if __name__ == '__main__':
  app.run(main)
