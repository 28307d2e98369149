r"""Fine-tunes an encoder on a classification or regression task (docs/finetuning.md).

  python -m launch.finetune --from_workdir=runs/roformer_tiny --workdir=runs/mr \
      --config.finetune.train_file=data/MR/train.tsv --config.finetune.dev_file=data/MR/dev.tsv \
      --config.finetune.learning_rates=1e-4,3e-4,1e-3 --config.finetune.seeds=0,1,2
  python -m launch.finetune --from_workdir=runs/base --workdir=runs/base_sst2 \
      --config.finetune.task=glue/sst2
  python -m launch.finetune --config=launch/configs/roformer.py:tiny --tokenizer=PATH \
      --workdir=runs/mr_scratch ...              # random init with the same tokenizer: baseline

--from_workdir takes the encoder (config, tokenizer, parameters) from a launch.pretrain (or
launch.convert / launch.upscale) run: its newest checkpoint that restores, --step=N, or
--step=best (the lowest eval loss recorded at a save; docs/operations.md 1.1). --config is a
fine-tuning preset (launch/configs/finetune.py, the default) or, for the random-init
baseline, a family config;
every fine-tuning setting is a `--config.finetune.<field>` (task, files, columns, head,
batch, length, learning rates, seeds) and the loop's cadence a `--config.train.<field>`
(pretrain/config.py). Each learning rate x seed is a run under --workdir; running the same
command again resumes an interrupted run and skips finished ones. The end prints the table and
writes <workdir>/results.json.

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

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'finetune.py')

try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    f'{DEFAULT_CONFIG}:default',
    'Config file and preset: a fine-tuning preset '
    '(launch/configs/finetune.py:<preset>, the default; the encoder comes from '
    '--from_workdir), or a family config (launch/configs/<family>.py:<preset>) for the '
    'random-init baseline. Override fields with --config.finetune.<field>=...',
    lock_config=True,
  )
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))

_FROM = flags.DEFINE_string(
  'from_workdir',
  '',
  'A launch.pretrain run to fine-tune (its newest checkpoint, config and tokenizer).',
)
_STEP = flags.DEFINE_string(
  'step',
  None,
  "Checkpoint step of --from_workdir, or 'best' (the lowest recorded eval loss); default: the "
  'newest that restores.',
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Fine-tuning directory (runs, results.json).')
_TOKENIZER = flags.DEFINE_string(
  'tokenizer',
  '',
  "The tokenizer file when the run's recorded one is elsewhere (or for a random init).",
)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; all inputs are flags (see --helpfull).')
  if not _WORKDIR.value:
    fail('--workdir is required: the directory for the fine-tuning runs and results.json.')
  config = _CONFIG.value
  if not _FROM.value and not config.model.family:
    fail(
      'give --from_workdir=RUN (fine-tune a pretrained encoder) or '
      '--config=launch/configs/<family>.py:<preset> (random init, the baseline).'
    )
  if not config.finetune.task and not config.finetune.train_file:
    fail(
      'give the task: --config.finetune.task=glue/<name>, or local files with '
      '--config.finetune.train_file and --config.finetune.dev_file.'
    )
  from pretrain import finetune  # pylint: disable=g-import-not-at-top
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import multihost  # pylint: disable=g-import-not-at-top
  from pretrain import rundir  # pylint: disable=g-import-not-at-top
  from pretrain import task_metrics  # pylint: disable=g-import-not-at-top

  try:
    step = rundir.parse_step(_STEP.value)
  except finetune.InputError as e:
    fail(str(e))
  if step is not None and not _FROM.value:
    fail(
      '--step picks a checkpoint of --from_workdir; give --from_workdir=RUN or leave --step out.'
    )

  # As in launch.pretrain: orbax's barriers wait at the coordination service, with a timeout.
  multihost.use_distributed_barriers_in_orbax()

  logging.set_verbosity(logging.INFO)
  try:
    results = finetune.finetune(
      config,
      _WORKDIR.value,
      from_workdir=_FROM.value,
      tokenizer_path=_TOKENIZER.value,
      from_step=step,
    )
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # pylint: disable=protected-access
  except finetune.InputError as e:
    fail(str(e))
  except guards.RunStopped as e:
    fail(str(e), e.exit_code)
  if results is None:
    print('stopped; run the same command to resume.', flush=True)
    return
  print(task_metrics.results_table(results), flush=True)
  print(f'results: {os.path.join(_WORKDIR.value, "results.json")}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
