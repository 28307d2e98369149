r"""Pretrains an encoder: `python -m launch.pretrain --config=CONFIG[:PRESET] --workdir=DIR`.

Run the same command on every host of a TPU VM slice; JAX's multi-controller runtime is
initialised automatically there (or from --coordinator_address / --num_processes /
--process_id elsewhere). Any config field can be overridden with `--config.x.y=value`.
Running the command again resumes from the workdir's latest checkpoint.

Exit codes: 0 done (or preempted after saving), 2 bad input (the message says what to do).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


def fail(message: str, code: int = 2):
  """Prints `message` as one paragraph on stderr and exits with `code` (no traceback)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _flag_error_message(e: Exception) -> str:
  """One readable sentence from a flag-parsing error (config_flags nests tracebacks in it)."""
  message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
  if 'Traceback (most recent call last)' in message:  # an error inside the config file
    message = message.strip().splitlines()[-1]
  message = message.replace('\\n', ' ').replace('\\', '').replace("'", '')
  message = ' '.join(message.split()).strip('"')
  return (f'bad flag: {message} -- config fields and their meaning are in '
          f'launch/configs/base.py; run with --helpfull for the flags.')


# config_flags reports an unknown --config.x.y as AttributeError/KeyError and a value of the
# wrong type as TypeError/ValueError; without --config it does so while defining the flag.
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', 'launch/configs/roformer.py:tiny',
      'Config file and preset, e.g. launch/configs/roformer.py:base.', lock_config=True)
except _FLAG_ERRORS as _e:
  fail(_flag_error_message(_e))
_WORKDIR = flags.DEFINE_string('workdir', 'runs/roformer_tiny',
                               'Run directory (checkpoints, metrics.jsonl, tensorboard/).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 for multi-process runs off TPU VMs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (0-based).')


def parse_flags(argv):
  """absl flag parsing whose errors (unknown config field, bad value) exit with code 2."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    fail(_flag_error_message(e))


def initialize_distributed():
  """Starts JAX's multi-controller runtime when there is more than one process."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      # CPU processes need a collectives backend to talk to each other (local drills, tests).
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()  # TPU VM slice: everything is auto-detected.


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --config, --workdir and --config.x.y=v.')
  initialize_distributed()
  from pretrain import train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.InputError as e:
    fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
