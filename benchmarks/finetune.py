r"""Does pretraining help? Pretrained vs random init, fine-tuned on MR and CoLA.

  nice -n 10 .venv/bin/python benchmarks/finetune.py [--data=../shared/data]
      [--root=runs/bench_finetune] [--seeds=0,1,2] [--lr=1e-3] [--epochs=1]

1. Pretrains roformer `tiny` for the `make pretrain` budget (600 steps of 32 x 128 tokens, the
   preset's schedule) with `python -m launch.pretrain`, twice: on WikiText-2 (`<data>/
   wikitext2/*.txt`, one paragraph a line, `text_unit=line`) and on the built-in corpus (the
   Python standard library). Each run trains its own 8000-piece BPE tokenizer.
2. Fine-tunes each checkpoint (`pretrain.finetune.finetune`, the library under
   `launch.finetune`) on MR (`<data>/classification/MR`, `label<TAB>sentence`, dev accuracy)
   and CoLA (`sentence<TAB>label`, dev Matthews correlation), and a random initialisation of
   the same shape with the same tokenizer at the same budget: --epochs over the training set
   at batch 32, AdamW at --lr (10 % warmup, linear decay), dropout 0.1, --pooling, the same
   seeds.
3. Prints a Markdown table: task, pretraining text, init, dev metric mean ± std over the
   seeds (sample std), the per-seed values, and the fine-tuning wall time.

Everything lands under --root; finished pretraining runs and fine-tuning runs (result.json)
are reused, so an interrupted benchmark continues. The data is for experiments only (tests
write their own).
"""

from __future__ import annotations

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
  'The folder holding wikitext2/ and classification/{MR,CoLA}/.',
)
flags.DEFINE_string('root', os.path.join(ROOT, 'runs', 'bench_finetune'), 'Where the runs go.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Fine-tuning seeds.')
flags.DEFINE_float('lr', 1e-3, 'Fine-tuning peak learning rate (both inits).')
flags.DEFINE_float('epochs', 1.0, 'Fine-tuning epochs (both inits).')
flags.DEFINE_enum('pooling', 'mean', ['cls', 'mean'], 'Classifier pooling.')
flags.DEFINE_integer('pretrain_steps', 600, 'Pretraining steps (make pretrain: 600).')
flags.DEFINE_list('corpora', ['wikitext2', 'builtin'], 'Pretraining texts.')
flags.DEFINE_list('tasks', ['MR', 'CoLA'], 'Fine-tuning tasks.')

FLAGS = flags.FLAGS

# Column layout (data/README.md) and metric of each task; max_seq_len covers almost every
# example (longer ones are cut).
TASKS = {
  'MR': dict(label_column='0', text_column='1', metric='accuracy', max_seq_len=64),
  'CoLA': dict(label_column='1', text_column='0', metric='matthews', max_seq_len=32),
}


def pretrain(name: str) -> tuple[str, float]:
  """Runs (or resumes) the pretraining of corpus `name`; returns (workdir, seconds)."""
  workdir = os.path.join(FLAGS.root, f'pretrain_{name}')
  cmd = [
    sys.executable,
    '-m',
    'launch.pretrain',
    '--config=launch/configs/roformer.py:tiny',
    f'--workdir={workdir}',
    f'--config.train.num_train_steps={FLAGS.pretrain_steps}',
    '--config.train.progress=off',
  ]
  if name == 'wikitext2':
    cmd += [
      f'--config.data.text_files={os.path.join(FLAGS.data, "wikitext2", "*.txt")}',
      '--config.data.text_unit=line',
    ]
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'pretrain.log'), 'a', encoding='utf-8') as log:
    result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    raise SystemExit(
      f'pretraining {name} failed (exit {result.returncode}); see {workdir}/pretrain.log'
    )
  return workdir, time.time() - start


def final_eval(workdir: str) -> dict:
  import json  # pylint: disable=g-import-not-at-top

  lines = [
    json.loads(l)
    for l in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')
    if l.strip()
  ]
  evals = [l for l in lines if l.get('split') == 'eval']
  return evals[-1] if evals else {}


def main(argv):
  del argv
  from launch.configs import roformer  # pylint: disable=g-import-not-at-top
  from pretrain import config as config_schema  # pylint: disable=g-import-not-at-top
  from pretrain import finetune  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  seeds = tuple(int(s) for s in FLAGS.seeds)
  began = time.time()
  pretrained = {}
  for corpus in FLAGS.corpora:
    workdir, seconds = pretrain(corpus)
    pretrained[corpus] = workdir
    ev = final_eval(workdir)
    print(
      f'pretrained {corpus}: {workdir} in {seconds:.0f} s; final MLM eval loss '
      f'{ev.get("loss", float("nan")):.3f}, acc {ev.get("accuracy", float("nan")):.3f}',
      flush=True,
    )
  rows, cache = [], {}
  for task_name in FLAGS.tasks:
    spec = TASKS[task_name]
    folder = os.path.join(FLAGS.data, 'classification', task_name)
    for corpus, run in pretrained.items():
      start = finetune.resolve_start(run)
      for init in ('pretrained', 'random'):
        workdir = os.path.join(FLAGS.root, f'{task_name}_{corpus}_{init}')
        # Pretrained: the fine-tuning preset (the encoder is the run's); random: the same
        # family and shape from its preset, with the run's tokenizer.
        config = (
          config_schema.get_finetune_config()
          if init == 'pretrained'
          else roformer.get_config('tiny')
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
            'finetune.learning_rates': (FLAGS.lr,),
            'finetune.seeds': seeds,
            'finetune.pooling': FLAGS.pooling,
            'train.log_every_steps': 100,
            'train.eval_every_steps': 0,
            'train.checkpoint_every_steps': 10_000,
            'train.progress': 'off',
          }
        )
        t0 = time.time()
        if init == 'pretrained':
          results = finetune.finetune(config, workdir, from_workdir=run, steps_cache=cache)
        else:
          results = finetune.finetune(
            config, workdir, tokenizer_path=start.tokenizer.path, steps_cache=cache
          )
        metric = spec['metric']
        values = results['sweep'][0]['dev'][metric]
        rows.append(
          (
            task_name,
            metric,
            corpus,
            init,
            results[f'dev_{metric}_mean'],
            results[f'dev_{metric}_std'],
            values,
            results['num_steps'],
            time.time() - t0,
          )
        )
        print(
          f'{task_name} {corpus} {init}: {metric} {rows[-1][4]:.4f} ± {rows[-1][5]:.4f}', flush=True
        )
  print(
    f'\nroformer tiny (1.8M parameters); fine-tuning: {FLAGS.epochs:g} epoch(s) at batch '
    f'32, lr {FLAGS.lr:g}, pooling {FLAGS.pooling}, seeds {",".join(map(str, seeds))}; '
    f'total {time.time() - began:.0f} s\n'
  )
  print(
    '| task (dev metric) | pretraining text | init | mean ± std | per seed | steps | '
    'fine-tuning time |'
  )
  print('|---|---|---|---|---|---|---|')
  for task_name, metric, corpus, init, mean, std, values, steps, seconds in rows:
    label = 'WikiText-2' if corpus == 'wikitext2' else 'built-in corpus'
    init_label = f'pretrained ({FLAGS.pretrain_steps} steps)' if init == 'pretrained' else 'random'
    print(
      f'| {task_name} ({metric}) | {label} | {init_label} | {mean:.4f} ± {std:.4f} | '
      f'{", ".join(f"{v:.4f}" for v in values)} | {steps} | {seconds:.0f} s |'
    )


if __name__ == '__main__':
  app.run(main)
