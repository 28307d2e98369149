r"""Pretrains an encoder: `python -m launch.pretrain --config=CONFIG[:PRESET] --workdir=DIR`.

Run the same command on every host of a TPU VM slice; JAX's multi-controller runtime is
initialised automatically there (or from --coordinator_address / --num_processes /
--process_id elsewhere). Any config field can be overridden with `--config.x.y=value`.
Running the command again resumes from the workdir's latest checkpoint.

Exit codes: 0 done (or stopped by SIGTERM / Ctrl-C after saving a checkpoint), 2 bad input
(the message says what to do), 3 stopped after train.max_nonfinite_steps non-finite steps in a
row (the last good checkpoint is kept), 4 a checkpoint save failed (earlier ones are intact),
5 another run took over a gs:// workdir's lease (stopped before its next save).
A second Ctrl-C exits at once (130).
"""

import faulthandler
import os
import signal

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch.cli import (
  FLAG_ERRORS,
  distributed_mode,
  fail,
  flag_error_message,
  parse_flags,
  tpu_chips,
)


try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    'launch/configs/roformer.py:tiny',
    'Config file and preset, e.g. launch/configs/roformer.py:base.',
    lock_config=True,
  )
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))
_WORKDIR = flags.DEFINE_string(
  'workdir', 'runs/roformer_tiny', 'Run directory (checkpoints, metrics.jsonl, tensorboard/).'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 for multi-process runs off TPU VMs.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (0-based).')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
  'distributed_timeout_s', 300, 'Seconds to wait for every host to join the run.'
)


def initialize_distributed():
  """Starts JAX's multi-controller runtime when the run may span several processes.

  On a Cloud TPU VM it is started whenever TPU chips are present, as MaxText does: orbax's
  multi-host saves need it, and JAX finds the slice's hosts itself (a single-host VM is a
  one-process cluster).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from pretrain import multihost  # pylint: disable=g-import-not-at-top

  mode = distributed_mode(_COORDINATOR.value, os.environ, tpu_chips())
  timeout = _DISTRIBUTED_TIMEOUT.value
  if mode == 'explicit':
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      # CPU processes standing in for hosts (local drills, tests): gloo collectives, and no
      # persistent compilation cache, whose programs the processes would not agree on.
      multihost.configure_cpu_processes()
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      initialization_timeout=timeout,
    )
  elif mode == 'auto':
    jax.distributed.initialize(initialization_timeout=timeout)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --config, --workdir and --config.x.y=v.')
  # absl's app.run has enabled faulthandler (a crash in native code leaves the Python stacks
  # in the log); a hung run (a collective waiting for a peer that is stuck or gone, a stuck
  # storage call) shows where every thread is with `kill -USR1 <pid>`, without stopping.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  initialize_distributed()
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import multihost  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top

  # Orbax's barriers on the main thread then wait at the coordination service, with a
  # timeout, instead of in a device all-gather that waits forever for a lost host.
  multihost.use_distributed_barriers_in_orbax()

  logging.set_verbosity(logging.INFO)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    # The run is over and saved: a Ctrl-C while the process winds down just ends it.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # pylint: disable=protected-access
  except train.InputError as e:
    fail(str(e))
  except guards.RunStopped as e:
    fail(str(e), e.exit_code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
