r"""Does GAU-alpha train without learning-rate warmup where RoFormer v2 needs it? (issue 12,
item 3; docs/algorithms.md 6.4, kexue 8990)

  nice -n 10 .venv/bin/python benchmarks/gau_alpha_warmup.py [--steps=100] [--seeds=1]
      [--lrs=2e-3,1e-2] [--warmup_fraction=0.1] [--plot=gau_alpha_warmup.png]

The claim (Su, kexue 8990 and the GAU-alpha release): a post-norm GAU stack starts with each
branch ~1/100 of the residual stream (a DeepNorm-like start), so GAU-alpha trains without
warmup (its released recipe has none), while a post-norm Transformer such as RoFormer v2 uses
one (its released recipe: a linear warmup over the first 1/80 of training).

Both models are their family's `tiny` preset at one small width (--hidden), about equal
parameters: RoFormer v2 (`roformer_v2:tiny`: bias-free, parameter-free RMS post-norm, ReLU
FFN, L^-1/2 init) with --blocks blocks of attention + FFN, and GAU-alpha (`gau:tiny`:
softmax_plus, L^-1/3 init) with 2 x --blocks GAU layers, e = 2d, s = --shared_dim. Each trains
with warmup (a linear warmup over --warmup_fraction of the steps) and without, at every
learning rate of --lrs, AdamW (the tiny presets' optimizer; --optimizer=lamb for the released
recipe's), linear decay to 0, the same steps, data order and seeds. Reported: eval MLM loss
and accuracy, the largest train loss after the first 10 % of the steps (a spike), and the
no-warmup minus warmup eval loss per model and rate (the claim predicts ~0 for GAU-alpha and
> 0 for RoFormer v2). Runs are reused from --root when their settings match.
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import claims_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEPS = flags.DEFINE_integer('steps', 100, 'Training steps per run.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per setting (init seed = 0 .. seeds-1).')
_LRS = flags.DEFINE_list('lrs', ['2e-3', '1e-2'], 'Peak learning rates.')
_WARMUP = flags.DEFINE_float(
  'warmup_fraction', 0.1, 'Warmup length as a fraction of --steps (the "with warmup" runs).'
)
_OPTIMIZER = flags.DEFINE_enum('optimizer', 'adamw', ['adamw', 'lamb'], 'Optimizer of both.')
_HIDDEN = flags.DEFINE_integer('hidden', 64, 'Width d of both models.')
_BLOCKS = flags.DEFINE_integer(
  'blocks', 4, 'RoFormer v2 blocks (GAU-alpha: twice as many GAU layers).'
)
_SHARED = flags.DEFINE_integer('shared_dim', 64, 'GAU-alpha s.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per row.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Rows per step.')
_ROOT = flags.DEFINE_string('root', '/tmp/exp/gau_alpha_warmup', 'Workdirs go here.')
_PLOT = flags.DEFINE_string('plot', 'gau_alpha_warmup.png', 'PNG of the loss curves (empty: none).')
_FRESH = flags.DEFINE_bool('fresh', False, 'Rerun runs whose results are in --root.')


def models_() -> dict[str, tuple[str, dict]]:
  d = _HIDDEN.value
  return {
    'RoFormer v2': (
      'roformer_v2:tiny',
      {
        'model.hidden_size': d,
        'model.num_layers': _BLOCKS.value,
        'model.num_heads': max(1, d // 64),
        'model.mlp_dim': 4 * d,
      },
    ),
    'GAU-alpha': (
      'gau:tiny',
      {
        'model.hidden_size': d,
        'model.num_layers': 2 * _BLOCKS.value,
        'model.shared_dim': _SHARED.value,
        'model.expansion_factor': 2,
      },
    ),
  }


def overrides(model_overrides: dict, lr: float, warmup: bool, seed: int) -> dict:
  steps = _STEPS.value
  o = dict(model_overrides)
  o.update(
    {
      'data.seq_len': _SEQ_LEN.value,
      'data.global_batch_size': _BATCH.value,
      'optim.name': _OPTIMIZER.value,
      'optim.schedule': 'linear',
      'optim.learning_rate': lr,
      'optim.warmup_steps': max(1, round(_WARMUP.value * steps)) if warmup else 0,
      **claims_utils.run_overrides(steps, seed),
    }
  )
  return o


def spike(run: dict) -> float:
  later = [l for s, l in run['curve'] if s > _STEPS.value // 10]
  return max(later) if later else math.nan


def main(argv):
  del argv
  start = time.time()
  lrs = [float(x) for x in _LRS.value]
  seeds = range(_SEEDS.value)
  print(
    f'd {_HIDDEN.value}; MLM n {_SEQ_LEN.value} x batch {_BATCH.value}; {_OPTIMIZER.value}, '
    f'lrs {lrs}, warmup {_WARMUP.value:.0%} of {_STEPS.value} steps or none, linear decay; '
    f'seeds {list(seeds)}'
  )
  results, groups = {}, {}
  for lr in lrs:
    for name, (spec, model_o) in models_().items():
      for warmup in (True, False):
        runs = []
        for seed in seeds:
          tag = (
            f'{name.replace(" ", "_").replace("-", "_")}_lr{lr:g}_'
            f'{"warmup" if warmup else "nowarmup"}_s{seed}'
          )
          runs.append(
            claims_utils.train_run(
              spec, overrides(model_o, lr, warmup, seed), _ROOT.value, tag, fresh=_FRESH.value
            )
          )
        results[name, lr, warmup] = runs
        groups[f'{name}, lr {lr:g}, {"warmup" if warmup else "no warmup"}'] = runs

  spec, model_o = next(iter(models_().values()))
  unigram = claims_utils.unigram_loss(
    claims_utils.make_config(spec, overrides(model_o, lrs[0], True, 0))
  )
  print(
    f'\n{_STEPS.value} steps, {len(seeds)} seed(s) (mean ± std where > 1); unigram level '
    f'(a model that ignores its input) {unigram:.3f}\n'
  )
  print(
    '| model | params | lr | warmup | max train loss after 10 % | final train loss | '
    'eval loss | eval acc | non-finite steps | wall |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for (name, lr, warmup), runs in results.items():
    w = f'{runs[0]["overrides"]["optim.warmup_steps"]} steps' if warmup else 'none'
    print(
      f'| {name} | {runs[0]["params"]:,} | {lr:g} | {w} | '
      f'{claims_utils.mean_std([spike(r) for r in runs])} | '
      f'{claims_utils.mean_std([r["last_loss"] for r in runs])} | '
      f'{claims_utils.mean_std([r["eval_loss"] for r in runs])} | '
      f'{claims_utils.mean_std([r["eval_accuracy"] for r in runs])} | '
      f'{sum(r["skipped"] for r in runs)} | {sum(r["wall_s"] for r in runs):.0f} s |'
    )
  print('\nEval loss without warmup minus with warmup (> 0: warmup helped):\n')
  print('| model | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) + ' |')
  print('|---|' + '---|' * len(lrs))
  for name in models_():
    cells = []
    for lr in lrs:
      diffs = [
        a['eval_loss'] - b['eval_loss']
        for a, b in zip(results[name, lr, False], results[name, lr, True])
      ]
      cells.append(claims_utils.mean_std(diffs, '+.3f'))
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  written = claims_utils.plot_curves(
    _PLOT.value, groups, 'GAU-alpha vs RoFormer v2, with and without warmup'
  )
  if written:
    print(f'\nplot: {written}')
  total = sum(r['wall_s'] for runs in results.values() for r in runs)
  print(
    f'total wall time {time.time() - start:.0f} s (training runs: {total:.0f} s when '
    'they ran; reused runs cost nothing now)'
  )


if __name__ == '__main__':
  app.run(main)
