"""Shared machinery of the length-extrapolation claims (train short, evaluate long).

Used by `benchmarks/entropy_scale_extrapolation.py` (issue 12, claim 1: the entropy-invariant
attention scale, docs/algorithms.md 7.4) and `benchmarks/rope_vs_learned_positions.py` (claim 5:
RoPE vs learned absolute positions, docs/algorithms.md 7.1, 7.6); each names its variants (config
overrides) and its reference numbers and calls `run_claim`.

For every variant and seed: the library's trainer (`pretrain.train.train_and_evaluate`, the
same code path as `python -m launch.pretrain`) trains a small RoFormer v1 MLM at
`--train_len` tokens per row in its own workdir under `--root`, named by everything that
defines the run (a workdir that already holds the final step is reused: an interrupted
benchmark continues, and the two claims share their common baseline, RoPE with the standard
scale). Then the final checkpoint is
restored with `pretrain.checkpointing.Checkpointer` onto the run's own parameter tree (config
rebuilt from the checkpoint's metadata by `pretrain.rundir.config_from_meta`) and evaluated with
the trainer's eval step (`train.jit_eval_step`, summed loss / accuracy over MLM predictions)
on the held-out split read by the pipeline (`data_pipelines.pipeline.eval_batches`) at every
`--eval_lens` n. Every model sees the same evaluation text at every n (the first
`--eval_batches` x `--eval_tokens` tokens of the held-out documents, packed into rows of n,
one fixed mask seed), so only the row length changes. Positions restart at 0 in every packed
document: the table reports, per n, the share of predictions at positions >= train_len (the
built-in corpus has long documents, so most of them are; WikiText paragraphs are short).

Prints a Markdown table of accuracy (mean +- std over seeds) per n, next to the reference
numbers, one of the MLM loss, and writes a PNG of both against n (matplotlib).

Defaults (CPU scale): RoFormer-v2 (`--family=roformer_v2`: bias-free, parameter-free RMS
post-norm, ReLU FFN, tied head, RoPE) at d 128, 2 blocks, 2 heads x 64, FFN 512, dropout 0,
batch 32 x 64 tokens, AdamW 2e-3 with 10 % linear warmup and linear decay, the built-in corpus
(Python standard library, 8000-piece SentencePiece) with 10 % of the documents held out. At
this budget RoFormer v1 (`--family=roformer`: post-LN with LayerNorm, biases, GELU, 0.02 init)
is still near the unigram accuracy (0.13-0.14 after 600 steps, against 0.45 for v2), which
would make a length table meaningless; the claims concern the attention scale and the
position encoding, which both families share. Roughly 5 minutes for the defaults on 2 idle
CPU cores (2-3 times that when the machine is shared).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
from launch.configs import roformer
from launch.configs import roformer_v2
from pretrain import checkpointing
from pretrain import rundir
from pretrain import mesh as mesh_lib
from pretrain import train

flags.DEFINE_enum(
  'family',
  'roformer_v2',
  ['roformer_v2', 'roformer'],
  "the model: the 'tiny' preset of launch/configs/<family>.py at the shape below",
)
flags.DEFINE_integer('steps', 300, 'training steps per run')
flags.DEFINE_integer('seeds', 2, 'seeds per variant (0..seeds-1: init and data order)')
flags.DEFINE_integer('train_len', 64, 'training seq_len n')
flags.DEFINE_string('eval_lens', '64,128,256,512', 'comma-separated evaluation seq_lens')
flags.DEFINE_integer('batch', 32, 'training rows per step')
flags.DEFINE_float('lr', 2e-3, 'AdamW peak learning rate')
flags.DEFINE_integer('hidden', 128, 'model width d')
flags.DEFINE_integer('layers', 2, 'blocks L')
flags.DEFINE_integer('heads', 2, 'attention heads')
flags.DEFINE_integer('mlp', 512, 'FFN width')
flags.DEFINE_integer('eval_tokens', 4096, 'tokens per evaluation batch (rows = this // n)')
flags.DEFINE_integer('eval_batches', 8, 'evaluation batches per length')
flags.DEFINE_string(
  'text_files',
  '',
  'training/held-out text (glob; empty: built-in corpus), '
  'e.g. ../shared/data/wikitext2/*.txt with --text_unit=line',
)
flags.DEFINE_string('text_unit', 'file', "'file' or 'line' documents (config.data.text_unit)")
flags.DEFINE_float('validation_fraction', 0.1, 'held-out fraction of the documents')
flags.DEFINE_string('root', '/tmp/exp/length_extrapolation', 'workdirs go under ROOT/runs')
flags.DEFINE_string('plot', '', 'PNG path (default ROOT/CLAIM.png; "none": no plot)')

FLAGS = flags.FLAGS


def base_config(args, seed: int):
  """The shared training config (variants override model fields): --family's tiny preset
  (its norm, biases, activation, init and optimizer) at the flags' shape and schedule."""
  config = {'roformer': roformer, 'roformer_v2': roformer_v2}[args.family].get_config('tiny')
  m, d, t, o = config.model, config.data, config.train, config.optim
  m.hidden_size, m.num_layers = args.hidden, args.layers
  m.num_heads, m.mlp_dim = args.heads, args.mlp
  m.dropout_rate = 0.0
  d.seq_len, d.global_batch_size = args.train_len, args.batch
  d.text_files, d.text_unit = args.text_files, args.text_unit
  d.validation_fraction = args.validation_fraction
  d.shuffle_seed = seed
  config.seed = seed
  t.num_train_steps = args.steps
  t.log_every_steps = max(1, args.steps // 10)
  t.eval_every_steps = t.checkpoint_every_steps = args.steps
  t.eval_steps, t.keep_checkpoints, t.progress = 4, 1, 'off'
  o.name, o.schedule = 'adamw', 'linear'
  o.learning_rate, o.warmup_steps = args.lr, max(1, args.steps // 10)
  return config


def run_name(config, args, seed: int) -> str:
  """The workdir name: every field the variants or the flags set (equal runs share it)."""
  m = config.model
  position = m.position_embedding + (
    f'{m.max_position}' if m.position_embedding == 'learned' else ''
  )
  data = (
    os.path.basename(args.text_files.split(',')[0]).replace('*', 'x') + f'_{args.text_unit}'
    if args.text_files
    else 'stdlib'
  )
  return (
    f'{args.family}_{m.attention_scale}_{position}_L{args.layers}_d{args.hidden}_'
    f'h{args.heads}_f{args.mlp}_n{args.train_len}_b{args.batch}_lr{args.lr:g}_'
    f'{data}_v{args.validation_fraction:g}_s{args.steps}_seed{seed}'
  )


def train_run(config, workdir: str) -> float:
  """Trains with the library trainer unless workdir already holds the final step; returns
  the wall seconds spent (0 when reused)."""
  steps = config.train.num_train_steps
  if os.path.isdir(os.path.join(workdir, 'checkpoints', str(steps))):
    return 0.0
  start = time.time()
  train.train_and_evaluate(config, workdir)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', str(steps))):
    raise SystemExit(
      f'{workdir} stopped before step {steps} (signal?); run the same command again to resume it'
    )
  return time.time() - start


def last_train_loss(workdir: str) -> float:
  """Mean training loss of the last logged interval (metrics.jsonl)."""
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [line['loss'] for line in lines if line['split'] == 'train'][-1]


class Evaluator:
  """Evaluates checkpoints at several seq_lens on one fixed held-out text.

  The evaluation batches depend only on the data settings and n (shuffle_seed fixed at 0 for
  the masks), so they are built once per n and shared by every variant and seed.
  """

  def __init__(self, eval_lens, eval_tokens: int, eval_batches: int):
    self.eval_lens, self.eval_tokens, self.eval_batches = eval_lens, eval_tokens, eval_batches
    self._batches = {}
    self._data = {}

  def _eval_config(self, config, n: int):
    c = copy.deepcopy(config)
    c.data.seq_len = n
    c.data.global_batch_size = max(1, self.eval_tokens // n)
    c.data.shuffle_seed = 0
    c.train.eval_steps = self.eval_batches
    c.mesh.shape = (-1, 1, 1)
    return c

  def batches(self, config, n: int, tokenizer_sha: str):
    """The evaluation batches at n, and the share of predictions at positions >= train_len."""
    key = (config.data.text_files, config.data.text_unit, config.data.validation_fraction, n)
    if key not in self._batches:
      data_key = key[:3]
      if data_key not in self._data:
        source = text_datasets.load_text_source(config.data)
        tokenizer = tokenizer_lib.load_or_train(
          config.data, config.model, source.train, source.text_key, source.fingerprint
        )
        self._data[data_key] = (source, tokenizer)
      source, tokenizer = self._data[data_key]
      if tokenizer.sha256 != tokenizer_sha:
        raise SystemExit(
          f'the cached tokenizer ({tokenizer.sha256[:12]}) is not the one the '
          f'checkpoint was trained with ({tokenizer_sha[:12]})'
        )
      c = self._eval_config(config, n)
      batches = pipeline.eval_batches(source.validation, tokenizer, c, text_key=source.text_key)
      pos = np.concatenate(
        [np.take_along_axis(b['positions'], b['mlm_positions'], 1) for b in batches]
      )
      weights = np.concatenate([b['mlm_weights'] for b in batches])
      self._batches[key] = (batches, pos, weights)
    return self._batches[key]

  def __call__(self, workdir: str, train_len: int) -> dict[int, dict[str, float]]:
    """{n: {'loss', 'accuracy', 'perplexity', 'beyond'}} of workdir's newest checkpoint."""
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
      step = ckpt.latest_step()
      meta = ckpt.read_meta(step)
      config = rundir.config_from_meta(meta['config'])
      c0 = self._eval_config(config, self.eval_lens[0])
      mesh = mesh_lib.make_mesh(c0.mesh, jax.devices()[:1])
      run_setup = train.setup(c0, mesh)
      params = ckpt.restore(step, run_setup.abstract_state)['params']
    finally:
      ckpt.close()
    eval_step = train.jit_eval_step(run_setup, c0)  # retraced per n (shapes only)
    out = {}
    for n in self.eval_lens:
      c = self._eval_config(config, n)
      train.validate(c)  # e.g. n > model.max_position for learned positions
      batches, pos, weights = self.batches(c, n, meta['tokenizer']['sha256'])
      totals = None
      for batch in batches:
        sums = eval_step(params, mesh_lib.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      result = train.summarize(jax.device_get(totals))
      result['beyond'] = float((weights * (pos >= train_len)).sum() / weights.sum())
      out[n] = result
    return out


def mean_std(values):
  if len(values) == 1:
    return values[0], float('nan')
  return statistics.mean(values), statistics.stdev(values)


def fmt(values, scale=1.0, digits=2):
  mean, std = mean_std([v * scale for v in values])
  return f'{mean:.{digits}f}' if math.isnan(std) else f'{mean:.{digits}f} ± {std:.{digits}f}'


def run_claim(
  claim: str,
  title: str,
  variants: dict[str, dict],
  reference: dict | None = None,
  reference_note: str = '',
):
  """Trains every variant x seed, evaluates at every n, prints the tables, writes the plot.

  Args:
    claim: the default plot's name (ROOT/CLAIM.png).
    title: the table's heading line ('{train_len}' is replaced by --train_len).
    variants: {name: {config.model field: value}}.
    reference: {name: {n: accuracy in %}} (another paper's numbers), printed beside ours.
    reference_note: what the reference numbers are.
  """
  logging.set_verbosity(logging.WARNING)
  args = FLAGS
  title = title.format(train_len=args.train_len)
  eval_lens = [int(n) for n in args.eval_lens.split(',') if n]
  root = os.path.join(args.root, 'runs')
  os.makedirs(root, exist_ok=True)
  start = time.time()
  evaluator = Evaluator(eval_lens, args.eval_tokens, args.eval_batches)
  results = {name: [] for name in variants}
  train_losses = {name: [] for name in variants}
  for seed in range(args.seeds):
    for name, overrides in variants.items():
      config = base_config(args, seed)
      config.model.update(overrides)
      workdir = os.path.join(root, run_name(config, args, seed))
      seconds = train_run(config, workdir)
      results[name].append(evaluator(workdir, args.train_len))
      train_losses[name].append(last_train_loss(workdir))
      accs = ' '.join(f'{n}:{r["accuracy"]:.3f}' for n, r in results[name][-1].items())
      print(f'{name} seed {seed}: trained {seconds:.0f} s ({workdir}); accuracy {accs}', flush=True)
  wall = time.time() - start

  print(f'\n{title}')
  print(
    f'{args.family}, {args.steps} steps of {args.batch} x {args.train_len} tokens, '
    f'd {args.hidden}, {args.layers} blocks, {args.heads} heads, {args.seeds} seed(s) '
    f'(mean ± std), data: {args.text_files or "built-in corpus"}; wall {wall / 60:.1f} min\n'
  )
  head = ' | '.join(f'n={n}' for n in eval_lens)
  print(f'| variant | final train loss | {head} |')
  print('|---|---|' + '---|' * len(eval_lens))
  for name in variants:
    cells = [fmt([r[n]['accuracy'] for r in results[name]], 100.0) for n in eval_lens]
    print(
      f'| {name}, ours (MLM acc %) | {fmt(train_losses[name], digits=3)} | {" | ".join(cells)} |'
    )
  for name, numbers in (reference or {}).items():
    cells = [f'{numbers[n]:.2f}' if n in numbers else '' for n in eval_lens]
    print(f'| {name}, {reference_note} | | {" | ".join(cells)} |')
  print('\nheld-out MLM loss (mean ± std):\n')
  print(f'| variant | {head} |')
  print('|---|' + '---|' * len(eval_lens))
  for name in variants:
    cells = [fmt([r[n]['loss'] for r in results[name]], digits=3) for n in eval_lens]
    print(f'| {name} | {" | ".join(cells)} |')
  first = next(iter(results.values()))[0]
  beyond = ', '.join(f'{n}: {first[n]["beyond"] * 100:.0f} %' for n in eval_lens)
  print(f'\npredictions at positions >= {args.train_len} (never seen in training), per n: {beyond}')
  plot_path = args.plot or os.path.join(args.root, f'{claim}.png')
  if plot_path != 'none':
    plot(plot_path, title, eval_lens, results, reference, reference_note, args.train_len)
  cpu = time.process_time()
  print(
    f'wall time {time.time() - start:.0f} s, CPU time of this process {cpu:.0f} s (on a '
    f'shared machine the wall time depends on the load)'
  )
  return results


def plot(path, title, eval_lens, results, reference, reference_note, train_len):
  """Accuracy and loss against evaluation length, one line per variant (error bars: std)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
  for i, (name, runs) in enumerate(results.items()):
    color = f'C{i}'
    for ax, key, scale in ((ax_acc, 'accuracy', 100.0), (ax_loss, 'loss', 1.0)):
      stats = [mean_std([r[n][key] * scale for r in runs]) for n in eval_lens]
      ax.errorbar(
        eval_lens,
        [s[0] for s in stats],
        yerr=[0.0 if math.isnan(s[1]) else s[1] for s in stats],
        color=color,
        marker='o',
        capsize=3,
        label=f'{name} (ours)',
      )
    if reference and name in reference:
      xs = [n for n in eval_lens if n in reference[name]]
      ax_acc.plot(
        xs,
        [reference[name][n] for n in xs],
        color=color,
        ls='--',
        marker='x',
        label=f'{name} ({reference_note})',
      )
  for ax, label in ((ax_acc, 'MLM accuracy (%)'), (ax_loss, 'MLM loss')):
    ax.set_xscale('log', base=2)
    ax.set_xticks(eval_lens, [str(n) for n in eval_lens])
    ax.axvline(train_len, color='gray', lw=0.5)
    ax.set_xlabel('evaluation length n (tokens)')
    ax.set_ylabel(label)
  ax_acc.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'plot: {os.path.abspath(path)}')
