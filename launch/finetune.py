r"""Fine-tunes an encoder on a classification or regression task (docs/finetuning.md).

  python -m launch.finetune --from_workdir=runs/roformer_tiny --workdir=runs/mr \
      --train_file=data/MR/train.tsv --dev_file=data/MR/dev.tsv \
      --label_column=0 --text_column=1 --lrs=1e-4,3e-4,1e-3 --seeds=0,1,2
  python -m launch.finetune --from_workdir=runs/base --task=glue/sst2 --workdir=runs/base_sst2
  python -m launch.finetune --config=launch/configs/roformer.py:tiny --workdir=runs/mr_scratch \
      --tokenizer=PATH ...                      # random init with the same tokenizer: baseline

--from_workdir takes the encoder (config, tokenizer, parameters) from a launch.pretrain (or
launch.convert / launch.upscale) run; --config alone fine-tunes a random initialisation. Each
learning rate x seed is a run under --workdir; running the same command again resumes an
interrupted run and skips finished ones. The end prints the table and writes
<workdir>/results.json.

Exit codes: 0 done (or stopped by SIGTERM / Ctrl-C after saving a checkpoint), 2 bad input
(the message names the flag or file and the fix), 3 too many non-finite steps in a row, 4 a
checkpoint save failed. A second Ctrl-C exits at once (130).
"""

import os
import signal

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch.cli import FLAG_ERRORS, fail, flag_error_message, parse_flags

try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Optional config file and preset (launch/configs/<family>.py:<preset>): '
      'with --from_workdir it must describe the run\'s encoder (and may set the mesh); alone, '
      'it is the random-init baseline.', lock_config=True)
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))

_FROM = flags.DEFINE_string('from_workdir', '', 'A launch.pretrain run to fine-tune (its '
                            'newest checkpoint, config and tokenizer).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Fine-tuning directory (runs, results.json).')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', 'The tokenizer file when the run\'s '
                                 'recorded one is elsewhere (or for --config alone).')
# Task data.
_TASK = flags.DEFINE_string('task', '', 'A GLUE task from TFDS: glue/cola, glue/sst2, '
                            'glue/mrpc, glue/qqp, glue/stsb, glue/mnli, glue/qnli, glue/rte, '
                            'glue/wnli (downloads once). Empty: local files.')
_TFDS_DIR = flags.DEFINE_string('tfds_data_dir', '', 'TFDS directory for --task '
                                '(default ~/tensorflow_datasets).')
_TRAIN_FILE = flags.DEFINE_string('train_file', '', 'Training examples: TSV, CSV or JSONL.')
_DEV_FILE = flags.DEFINE_string('dev_file', '', 'Dev examples (the metric), same layout.')
_FORMAT = flags.DEFINE_enum('file_format', 'auto', ['auto', 'tsv', 'csv', 'jsonl'],
                            'File format (auto: from the extension; .txt is TSV).')
_HEADER = flags.DEFINE_boolean('header', False, 'TSV/CSV: the first line holds column names.')
_LABEL_COL = flags.DEFINE_string('label_column', '', 'TSV/CSV: 0-based index or header name '
                                 '(default 0); JSONL: field (default label).')
_TEXT_COL = flags.DEFINE_string('text_column', '', 'TSV/CSV: index or name (default 1); '
                                'JSONL: field (default sentence).')
_PAIR_COL = flags.DEFINE_string('text_pair_column', '', 'The second text of sentence-pair '
                                'tasks (index, name or field); empty: single sentences.')
_TASK_TYPE = flags.DEFINE_enum('task_type', 'classification',
                               ['classification', 'regression'], 'Local files: the kind.')
_LABEL_NAMES = flags.DEFINE_list('label_names', [], 'Classification labels in id order '
                                 '(default: sorted training labels); F1\'s positive class is '
                                 'the second of two.')
_METRIC = flags.DEFINE_string('metric', '', 'Dev metric that picks the learning rate: '
                              'accuracy, f1, matthews, pearson or spearman (default: the '
                              'task\'s; accuracy / pearson for local files).')
# Model and training.
_POOLING = flags.DEFINE_enum('pooling', 'mean', ['cls', 'mean'], 'cls: first token through a '
                             'tanh pooler (BERT); mean: mean over non-padding tokens.')
_MAX_LEN = flags.DEFINE_integer('max_seq_len', 128, 'Tokens per example ([CLS] and [SEP]s '
                                'included); longer inputs are cut longest-first.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Examples per step (all processes).')
_EPOCHS = flags.DEFINE_float('num_epochs', 3.0, 'Training passes (when --num_steps is 0).')
_STEPS = flags.DEFINE_integer('num_steps', 0, 'Training steps (0: from --num_epochs).')
_LRS = flags.DEFINE_list('lrs', ['3e-4'], 'Peak AdamW learning rates to sweep.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds per learning rate (mean and std).')
_WARMUP = flags.DEFINE_float('warmup_fraction', 0.1, 'Linear warmup fraction of the steps.')
_WD = flags.DEFINE_float('weight_decay', 0.01, 'AdamW decoupled weight decay.')
_DROPOUT = flags.DEFINE_float('dropout_rate', 0.1, 'Dropout in encoder and head.')
_LOG_EVERY = flags.DEFINE_integer('log_every_steps', 50, 'Log period (steps).')
_EVAL_EVERY = flags.DEFINE_integer('eval_every_steps', 0, 'Dev evaluation period (0: at the '
                                   'end only).')
_CKPT_EVERY = flags.DEFINE_integer('checkpoint_every_steps', 500, 'Checkpoint period (steps).')
_STOP_AFTER = flags.DEFINE_integer('stop_after_steps', 0, 'Stop each run after this many '
                                   'steps in this process (0: off; drills and tests).')
_PROGRESS = flags.DEFINE_enum('progress', 'auto', ['auto', 'on', 'off'], 'Progress bar.')


def _numbers(flag: str, values, kind):
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    fail(f'--{flag}={",".join(values)}: give comma-separated {kind.__name__}s, e.g. '
         f'--lrs=1e-4,3e-4,1e-3 or --seeds=0,1,2.')


def options_from_flags():
  """The fine-tuning Options of the command line."""
  from data_pipelines import tasks  # pylint: disable=g-import-not-at-top
  from pretrain import finetune  # pylint: disable=g-import-not-at-top
  data = tasks.TaskOptions(
      task=_TASK.value, train_file=_TRAIN_FILE.value, dev_file=_DEV_FILE.value,
      file_format=_FORMAT.value, header=_HEADER.value, label_column=_LABEL_COL.value,
      text_column=_TEXT_COL.value, text_pair_column=_PAIR_COL.value,
      task_type=_TASK_TYPE.value, label_names=tuple(_LABEL_NAMES.value),
      metric=_METRIC.value, tfds_data_dir=_TFDS_DIR.value)
  return finetune.Options(
      data=data, max_seq_len=_MAX_LEN.value, batch_size=_BATCH.value,
      num_epochs=_EPOCHS.value, num_steps=_STEPS.value,
      learning_rates=_numbers('lrs', _LRS.value, float),
      seeds=_numbers('seeds', _SEEDS.value, int), warmup_fraction=_WARMUP.value,
      weight_decay=_WD.value, dropout_rate=_DROPOUT.value, pooling=_POOLING.value,
      log_every_steps=_LOG_EVERY.value, eval_every_steps=_EVAL_EVERY.value,
      checkpoint_every_steps=_CKPT_EVERY.value, stop_after_steps=_STOP_AFTER.value,
      progress=_PROGRESS.value)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; all inputs are flags (see --helpfull).')
  if not _WORKDIR.value:
    fail('--workdir is required: the directory for the fine-tuning runs and results.json.')
  if not _FROM.value and _CONFIG.value is None:
    fail('give --from_workdir=RUN (fine-tune a pretrained encoder) or '
         '--config=launch/configs/<family>.py:<preset> (random init, the baseline).')
  if not _TASK.value and not _TRAIN_FILE.value:
    fail('give the task: --task=glue/<name>, or local files with --train_file and --dev_file.')
  from pretrain import finetune  # pylint: disable=g-import-not-at-top
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  options = options_from_flags()
  try:
    results = finetune.finetune(options, _WORKDIR.value, from_workdir=_FROM.value,
                                config=_CONFIG.value, tokenizer_path=_TOKENIZER.value)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # pylint: disable=protected-access
  except finetune.InputError as e:
    fail(str(e))
  except guards.RunStopped as e:
    fail(str(e), e.exit_code)
  if results is None:
    print('stopped; run the same command to resume.', flush=True)
    return
  print(finetune.results_table(results), flush=True)
  print(f'results: {os.path.join(_WORKDIR.value, "results.json")}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
