r"""Does pretraining pay off? Pretrained vs random init at equal budget, on MR and CoLA.

  nice -n 10 .venv/bin/python benchmarks/finetune.py [--data=../shared/data]
      [--root=runs/bench_finetune] [--pretraining=tasks] [--pretrain_steps=6000]
      [--seeds=0,1,2] [--learning_rates=1e-3] [--epochs=3] [--validation_fraction=0.1]

The recipe (docs/finetuning.md 9), with the suite's own commands and library:
1. Pretrains roformer `tiny` with `python -m launch.pretrain` on --pretraining text:
   `tasks` = the training text of the fine-tuning tasks, read from their TSV files'
   text columns (`--config.data.mixture`, one source per task, `text_column`; no labels, no
   dev text: task-adaptive pretraining, Gururangan et al. 2020; Krishna et al. 2022),
   `tasks+wikitext2` adds WikiText-2 (`<data>/wikitext2/*.txt`, one paragraph a line) as one
   more source, `wikitext2` or `builtin` (the Python standard library) alone. The run trains
   its own 8000-piece tokenizer on that text.
2. Fine-tunes the checkpoint (`pretrain.finetune.finetune`, the library under
   `launch.finetune`) and a random initialisation of the same shape with the same tokenizer,
   the same recipe and budget, on each task: --epochs at batch 32, AdamW at each of
   --learning_rates (10 % warmup, linear decay), dropout 0.1, mean pooling. With
   --validation_fraction > 0 a fixed part of the training examples is held out and picks the
   evaluation (once per epoch) and the learning rate; the dev split picks nothing and is
   only reported.
   A linear probe (--probe_task) at every pretraining evaluation logs how useful the frozen
   features get (`python -m launch.report <root>/pretrain_*` plots it).
3. Prints a Markdown table per task: dev metric mean ± std over --seeds for both inits,
   their gap, whether the gap exceeds twice the larger std, and Welch's t-test p-value.

Everything lands under --root; finished pretraining runs and fine-tuning runs (result.json)
are reused, so an interrupted benchmark continues. The data is for experiments only (tests
write their own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

flags.DEFINE_string(
  'data',
  os.path.join(os.path.dirname(ROOT), 'shared', 'data'),
  'The folder holding wikitext2/ and classification/<task>/{train,dev}.tsv.',
)
flags.DEFINE_string('root', os.path.join(ROOT, 'runs', 'bench_finetune'), 'Where the runs go.')
flags.DEFINE_enum(
  'pretraining',
  'tasks',
  ['tasks', 'tasks+wikitext2', 'wikitext2', 'builtin'],
  "Pretraining text: the tasks' training text, plus WikiText-2, WikiText-2, or the "
  'built-in corpus.',
)
flags.DEFINE_string('preset', 'tiny', 'roformer preset (launch/configs/roformer.py).')
flags.DEFINE_integer('pretrain_steps', 6000, 'Pretraining steps of 32 x 128 tokens.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Fine-tuning seeds (both inits).')
flags.DEFINE_list('learning_rates', ['1e-3'], 'Peak fine-tuning learning rates to sweep.')
flags.DEFINE_float('epochs', 3.0, 'Fine-tuning epochs (both inits).')
flags.DEFINE_float(
  'validation_fraction',
  0.1,
  'Held-out training examples that pick the evaluation and learning rate; 0: the last '
  'step, and dev picks the learning rate.',
)
flags.DEFINE_list('tasks', ['MR', 'CoLA'], 'Fine-tuning tasks (keys of TASKS).')
flags.DEFINE_string(
  'probe_task',
  'MR',
  'Task of the linear probe run at every pretraining evaluation ("" = none): its first 4000 '
  'training examples fit it, its dev split scores it (launch.report plots it).',
)

FLAGS = flags.FLAGS

# Column layout (data/README.md) and metric of each task; max_seq_len covers almost every
# example (longer ones are cut).
TASKS = {
  'MR': dict(label_column='0', text_column='1', metric='accuracy', max_seq_len=64),
  'CoLA': dict(label_column='1', text_column='0', metric='matthews', max_seq_len=32),
}


def pretraining_flags() -> list[str]:
  """The --config.data flags of --pretraining (a mixture of the tasks' text columns)."""
  wikitext = os.path.join(FLAGS.data, 'wikitext2', '*.txt')
  if FLAGS.pretraining == 'builtin':
    return []
  if FLAGS.pretraining == 'wikitext2':
    return [f'--config.data.text_files={wikitext}', '--config.data.text_unit=line']
  sources = [
    (name, os.path.join(FLAGS.data, 'classification', name, 'train.tsv'), spec['text_column'])
    for name, spec in TASKS.items()
    if name in FLAGS.tasks
  ]
  mixture = [f"('{n}', 1.0, 'text_files={p}', 'text_column={c}')" for n, p, c in sources]
  if FLAGS.pretraining == 'tasks+wikitext2':
    mixture.append(f"('wikitext2', 1.0, 'text_files={wikitext}', 'text_unit=line')")
  return [f'--config.data.mixture=({", ".join(mixture)},)']


def pretrain() -> tuple[str, float]:
  """Runs (or resumes) the pretraining; returns (workdir, seconds)."""
  workdir = os.path.join(FLAGS.root, f'pretrain_{FLAGS.pretraining}_{FLAGS.preset}')
  cmd = [
    sys.executable,
    '-m',
    'launch.pretrain',
    f'--config=launch/configs/roformer.py:{FLAGS.preset}',
    f'--workdir={workdir}',
    f'--config.train.num_train_steps={FLAGS.pretrain_steps}',
    f'--config.train.eval_every_steps={max(FLAGS.pretrain_steps // 6, 1)}',
    '--config.train.progress=off',
    *pretraining_flags(),
  ]
  if FLAGS.probe_task:
    spec, folder = TASKS[FLAGS.probe_task], os.path.join(FLAGS.data, 'classification')
    cmd += [
      f'--config.probe.train_file={os.path.join(folder, FLAGS.probe_task, "train.tsv")}',
      f'--config.probe.dev_file={os.path.join(folder, FLAGS.probe_task, "dev.tsv")}',
      f'--config.probe.label_column={spec["label_column"]}',
      f'--config.probe.text_column={spec["text_column"]}',
      '--config.probe.max_train_examples=4000',
      '--config.probe.max_dev_examples=2000',
    ]
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'pretrain.log'), 'a', encoding='utf-8') as log:
    result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    raise SystemExit(f'pretraining failed (exit {result.returncode}); see {workdir}/pretrain.log')
  return workdir, time.time() - start


def final_eval(workdir: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in rows if r.get('split') == 'eval']
  return evals[-1] if evals else {}


def compare(pretrained: list[float], random: list[float]) -> tuple[float, bool, float]:
  """(gap of the means, gap > 2 x the larger sample std, Welch's t-test p-value, two-sided;
  nan with fewer than 2 seeds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top

  gap = float(np.mean(pretrained) - np.mean(random))
  if len(pretrained) < 2:
    return gap, False, float('nan')
  spread = max(np.std(pretrained, ddof=1), np.std(random, ddof=1))
  p = stats.ttest_ind(pretrained, random, equal_var=False).pvalue
  return gap, bool(gap > 2 * spread), float(p)


def main(argv):
  del argv
  from launch.configs import roformer  # pylint: disable=g-import-not-at-top
  from pretrain import config as config_schema  # pylint: disable=g-import-not-at-top
  from pretrain import finetune  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  seeds = tuple(int(s) for s in FLAGS.seeds)
  rates = tuple(float(r) for r in FLAGS.learning_rates)
  began = time.time()
  run, seconds = pretrain()
  ev = final_eval(run)
  print(
    f'pretrained on {FLAGS.pretraining}: {run} in {seconds:.0f} s; final MLM eval loss '
    f'{ev.get("loss", float("nan")):.3f}, acc {ev.get("accuracy", float("nan")):.3f}',
    flush=True,
  )
  start = finetune.resolve_start(run)
  results, cache = {}, {}
  for task_name in FLAGS.tasks:
    spec = TASKS[task_name]
    folder = os.path.join(FLAGS.data, 'classification', task_name)
    for init in ('pretrained', 'random'):
      workdir = os.path.join(FLAGS.root, f'{task_name}_{FLAGS.pretraining}_{init}')
      # Pretrained: the fine-tuning preset (the encoder is the run's); random: the same
      # family and shape from its preset, with the run's tokenizer.
      config = (
        config_schema.get_finetune_config()
        if init == 'pretrained'
        else roformer.get_config(FLAGS.preset)
      )
      config.update_from_flattened_dict(
        {
          'finetune.train_file': os.path.join(folder, 'train.tsv'),
          'finetune.dev_file': os.path.join(folder, 'dev.tsv'),
          'finetune.label_column': spec['label_column'],
          'finetune.text_column': spec['text_column'],
          'finetune.metric': spec['metric'],
          'finetune.max_seq_len': spec['max_seq_len'],
          'finetune.batch_size': 32,
          'finetune.num_epochs': FLAGS.epochs,
          'finetune.learning_rates': rates,
          'finetune.seeds': seeds,
          'finetune.pooling': 'mean',
          'finetune.validation_fraction': FLAGS.validation_fraction,
          'train.log_every_steps': 1000,
          'train.eval_every_steps': 0,
          'train.checkpoint_every_steps': 100_000,
          'train.progress': 'off',
        }
      )
      t0 = time.time()
      if init == 'pretrained':
        r = finetune.finetune(config, workdir, from_workdir=run, steps_cache=cache)
      else:
        r = finetune.finetune(
          config, workdir, tokenizer_path=start.tokenizer.path, steps_cache=cache
        )
      best = next(s for s in r['sweep'] if s['learning_rate'] == r['best_learning_rate'])
      results[task_name, init] = (r, best['dev'][spec['metric']], time.time() - t0)
      print(
        f'{task_name} {init}: {spec["metric"]} {r[f"dev_{spec["metric"]}_mean"]:.4f} ± '
        f'{r[f"dev_{spec["metric"]}_std"]:.4f} (lr {r["best_learning_rate"]:g})',
        flush=True,
      )
  selection = (
    f'{FLAGS.validation_fraction:g} of the training examples held out pick the epoch and '
    f'learning rate; dev picks nothing'
    if FLAGS.validation_fraction > 0
    else 'last step; dev picks the learning rate'
  )
  print(
    f'\nroformer {FLAGS.preset}, pretrained {FLAGS.pretrain_steps} steps on '
    f'{FLAGS.pretraining} (final MLM eval loss {ev.get("loss", float("nan")):.3f}); '
    f'fine-tuning: {FLAGS.epochs:g} epochs at batch 32, lr {",".join(map(str, rates))}, '
    f'mean pooling, seeds {",".join(map(str, seeds))}; {selection}. Total '
    f'{time.time() - began:.0f} s (pretraining {seconds:.0f} s).\n'
  )
  print(
    '| task (dev metric) | pretrained: mean ± std | random: mean ± std | gap | '
    'gap > 2 std | Welch p | per seed (pretrained / random) | fine-tuning time |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for task_name in FLAGS.tasks:
    metric = TASKS[task_name]['metric']
    (rp, vp, tp), (rr, vr, tr) = results[task_name, 'pretrained'], results[task_name, 'random']
    gap, clear, p = compare(vp, vr)
    print(
      f'| {task_name} ({metric}) | {rp[f"dev_{metric}_mean"]:.4f} ± '
      f'{rp[f"dev_{metric}_std"]:.4f} | {rr[f"dev_{metric}_mean"]:.4f} ± '
      f'{rr[f"dev_{metric}_std"]:.4f} | {gap:+.4f} | {"yes" if clear else "no"} | {p:.3g} | '
      f'{", ".join(f"{v:.4f}" for v in vp)} / {", ".join(f"{v:.4f}" for v in vr)} | '
      f'{tp:.0f} s / {tr:.0f} s |'
    )


if __name__ == '__main__':
  app.run(main)
