r"""DeepNorm vs Post-LN with depth (issue 12, item 2; docs/algorithms.md 5).

  nice -n 10 .venv/bin/python benchmarks/deepnorm_depth.py [--depths=6,24,96] [--steps=100]
      [--seeds=1] [--lr=5e-3] [--warmup=0] [--variants=post_ln,post_ln_xavier,deepnorm]
      [--plot=deepnorm_depth.png]
  # the separate deep run (scan over layers + full remat above 128 blocks):
  nice -n 10 .venv/bin/python benchmarks/deepnorm_depth.py --depths= --deep=256 --steps=30 \
      --variants=post_ln_xavier,deepnorm --plot=deepnorm_deep.png

The claim (Wang et al. 2022, "DeepNet"; kexue 8978): Post-LN Transformers become untrainable
as they get deep (the paper: 1,000 layers), DeepNorm's x <- LN(alpha x + G(x)) with
beta-scaled init (alpha = (2N)^(1/4), beta = (8N)^(-1/4)) trains them.

Every run is the `deepnet:deep` preset (RoFormer v1 blocks: post-LN, biases, GELU, RoPE;
AdamW, linear decay) at a fixed tiny width (--hidden, --heads, --mlp), causal LM by default
(--objective) on the built-in corpus, in three variants (VARIANTS below: the suite's
`model.residual=post_ln` with BERT's N(0, 0.02^2) init, the paper's Post-LN baseline with
Xavier init, and DeepNorm), with the same learning rate, warmup, data order and seed. Depths
--depths and the separate deep run(s) --deep. Reported per run: the gradient norm of the first
block and of the last at step 1 (the trainer's loss on the trainer's first batch at its
initialisation: `claims_utils.layer_grad_norms`), the largest train loss after step 10 (a
spike), the final train and eval loss and accuracy, non-finite (skipped) steps, and a verdict:
  diverged  the trainer stopped after train.max_nonfinite_steps non-finite steps (exit 3);
  unstable  some steps were non-finite, or the train loss rose above the first logged one;
  stalled   eval loss not 0.1 below the unigram level (the loss of a model that ignores its
            input, `claims_utils.unigram_loss`);
  trains    otherwise.
Runs are reused from --root when their settings match (--fresh reruns them).
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

# name -> model overrides. post_ln is the suite's `model.residual=post_ln` (RoFormer v1's
# N(0, 0.02^2) init, which at d = 32 is already a small init: about 0.2x Xavier);
# post_ln_xavier is the DeepNet paper's Post-LN baseline (Xavier init, gain 1), written as
# DeepNorm with alpha = beta = 1; deepnorm is alpha = (2N)^(1/4), beta = (8N)^(-1/4).
VARIANTS = {
  'post_ln': {'model.residual': 'post_ln'},
  'post_ln_xavier': {
    'model.residual': 'deepnorm',
    'model.deepnorm_alpha': 1.0,
    'model.deepnorm_beta': 1.0,
  },
  'deepnorm': {'model.residual': 'deepnorm'},
}

_DEPTHS = flags.DEFINE_list('depths', ['6', '24', '96'], 'Block counts N of the main sweep.')
_DEEP = flags.DEFINE_list('deep', [], 'Block counts of the separate deep run(s) (empty: none).')
_STEPS = flags.DEFINE_integer('steps', 100, 'Training steps per run.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Seeds per setting (init seed = 0 .. seeds-1).')
_OBJECTIVE = flags.DEFINE_enum(
  'objective',
  'clm',
  ['mlm', 'clm'],
  'Training objective (CLM: a loss on every token, so a short run says more).',
)
_LR = flags.DEFINE_float('lr', 5e-3, 'Peak learning rate (AdamW), the same for both.')
_WARMUP = flags.DEFINE_integer('warmup', 0, 'Warmup steps, the same for both.')
_HIDDEN = flags.DEFINE_integer('hidden', 32, 'Width d.')
_HEADS = flags.DEFINE_integer('heads', 2, 'Attention heads.')
_MLP = flags.DEFINE_integer('mlp', 128, 'FFN width.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 64, 'Tokens per row.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Rows per step.')
_ROOT = flags.DEFINE_string('root', '/tmp/exp/deepnorm_depth', 'Workdirs go here.')
_PLOT = flags.DEFINE_string('plot', 'deepnorm_depth.png', 'PNG of the loss curves (empty: none).')
_VARIANTS = flags.DEFINE_list(
  'variants', list(VARIANTS), 'Which of ' + ', '.join(VARIANTS) + ' to run.'
)
_FRESH = flags.DEFINE_bool('fresh', False, 'Rerun runs whose results are in --root.')


def overrides(variant: str, depth: int, seed: int) -> dict:
  steps = _STEPS.value
  return {
    **VARIANTS[variant],
    'objective': _OBJECTIVE.value,
    'model.num_layers': depth,
    'model.hidden_size': _HIDDEN.value,
    'model.num_heads': _HEADS.value,
    'model.mlp_dim': _MLP.value,
    'model.remat_policy': 'full' if depth > 128 else 'none',
    'data.seq_len': _SEQ_LEN.value,
    'data.global_batch_size': _BATCH.value,
    'optim.learning_rate': _LR.value,
    'optim.warmup_steps': _WARMUP.value,
    **claims_utils.run_overrides(steps, seed),
  }


def verdict(run: dict, unigram: float) -> str:
  if run['status'] == 'diverged':
    return 'diverged'
  later = [l for s, l in run['curve'] if s > 10]
  if run['skipped'] or (later and max(later) > run['first_loss']):
    return 'unstable'
  if not math.isfinite(run['eval_loss']) or run['eval_loss'] > unigram - 0.1:
    return 'stalled'
  return 'trains'


def main(argv):
  del argv
  start = time.time()
  depths = [int(d) for d in _DEPTHS.value] + [int(d) for d in _DEEP.value if d]
  seeds = range(_SEEDS.value)
  print(
    f'width d {_HIDDEN.value}, {_HEADS.value} heads, FFN {_MLP.value}; '
    f'{_OBJECTIVE.value.upper()} n '
    f'{_SEQ_LEN.value} x batch {_BATCH.value}; AdamW lr {_LR.value:g}, warmup '
    f'{_WARMUP.value}, linear decay, {_STEPS.value} steps; seeds {list(seeds)}'
  )
  rows, groups = [], {}
  for depth in depths:
    for residual in _VARIANTS.value:
      runs, grads = [], []
      for seed in seeds:
        o = overrides(residual, depth, seed)
        name = f'{residual}_L{depth}_s{seed}'
        grad_path = os.path.join(
          claims_utils.workdir_for(_ROOT.value, name, 'deepnet:deep', o), 'grad_norms.txt'
        )
        run = claims_utils.train_run('deepnet:deep', o, _ROOT.value, name, fresh=_FRESH.value)
        if os.path.exists(grad_path) and not _FRESH.value:
          g = [float(x) for x in open(grad_path).read().split()]
        else:
          g = list(claims_utils.layer_grad_norms(claims_utils.make_config('deepnet:deep', o)))
          with open(grad_path, 'w') as f:
            f.write(' '.join(f'{x:.6g}' for x in g))
        runs.append(run)
        grads.append(g)
      groups[f'{residual} L={depth}'] = runs
      rows.append((residual, depth, runs, grads))

  unigram = claims_utils.unigram_loss(
    claims_utils.make_config('deepnet:deep', overrides(_VARIANTS.value[0], depths[0], 0))
  )
  print(
    f'\n{_STEPS.value} steps, {len(seeds)} seed(s) (mean ± std where > 1); unigram level '
    f'(eval loss of a model that ignores its input) {unigram:.3f}\n'
  )
  print(
    '| variant | blocks | params | grad norm block 1, step 1 | grad norm block N, '
    'step 1 | max train loss after step 10 | final train loss | eval loss | eval acc | '
    'non-finite steps | verdict | wall |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for residual, depth, runs, grads in rows:
    later = [max([l for s, l in r['curve'] if s > 10] or [math.nan]) for r in runs]
    verdicts = sorted({verdict(r, unigram) for r in runs})
    print(
      f'| {residual} | {depth} | {runs[0]["params"]:,} | '
      f'{claims_utils.mean_std([g[0] for g in grads], ".3g")} | '
      f'{claims_utils.mean_std([g[-1] for g in grads], ".3g")} | '
      f'{claims_utils.mean_std(later)} | '
      f'{claims_utils.mean_std([r["last_loss"] for r in runs])} | '
      f'{claims_utils.mean_std([r["eval_loss"] for r in runs])} | '
      f'{claims_utils.mean_std([r["eval_accuracy"] for r in runs])} | '
      f'{sum(r["skipped"] for r in runs)} | {", ".join(verdicts)} | '
      f'{sum(r["wall_s"] for r in runs):.0f} s |'
    )
  written = claims_utils.plot_curves(
    _PLOT.value,
    groups,
    f'Post-LN vs DeepNorm, d {_HIDDEN.value}, lr {_LR.value:g}, warmup {_WARMUP.value}',
  )
  if written:
    print(f'\nplot: {written}')
  total = sum(r['wall_s'] for _, _, runs, _ in rows for r in runs)
  print(
    f'total wall time {time.time() - start:.0f} s (training runs: {total:.0f} s when '
    'they ran; reused runs cost nothing now)'
  )


if __name__ == '__main__':
  app.run(main)
