r"""Grows a trained model into a larger one, losslessly: step 0 of a new workdir.

  python -m launch.upscale --from_workdir=runs/roformer_tiny \
      --config=launch/configs/roformer.py:small --workdir=runs/roformer_small_grown \
      [--step=N|best] [--config.upscale.symmetry_breaking=zero_out]

Reads the newest checkpoint of --from_workdir that restores (as launch.pretrain picks it: a
newer damaged one is named in a one-line warning, and the run is left as it is), --step=N or
--step=best (the lowest eval loss recorded at a save; the next best when it does not restore),
checks that --config is a valid growth of the run that wrote it, grows parameters (and
optimizer state with --config.upscale.optimizer_state=map) and writes them as step 0 of
--workdir (`pretrain.grow.grow_run`, docs/algorithms.md 4). Prints the held-out check and the
exact `launch.pretrain` command that continues the grown run. Growth options are the
`--config.upscale.<field>` fields of pretrain/config.py.

Exit codes: 0 written, 2 bad input (one paragraph on stderr, nothing written; a --step that
does not restore is bad input).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch.cli import FLAG_ERRORS, fail, flag_error_message, parse_flags, require

try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Target config file and preset, e.g. launch/configs/roformer.py:small.',
    lock_config=True,
  )
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))
_FROM = flags.DEFINE_string('from_workdir', None, 'Workdir of the trained (small) model.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'New workdir for the grown model (empty).')
_STEP = flags.DEFINE_string(
  'step',
  None,
  "Checkpoint step of --from_workdir, or 'best' (the lowest recorded eval loss); default: the "
  'newest that restores.',
)


def main(argv):
  if len(argv) > 1:
    fail(
      f'unexpected arguments {argv[1:]}; flags are --from_workdir, --config, --workdir, '
      '--step and --config.x.y=v.'
    )
  require(
    'python -m launch.upscale --from_workdir=SMALL_RUN '
    '--config=launch/configs/<family>.py:<preset> --workdir=NEW_RUN',
    from_workdir=_FROM.value,
    workdir=_WORKDIR.value,
    config=_CONFIG.value,
  )
  from pretrain import grow  # pylint: disable=g-import-not-at-top
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import rundir  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  try:
    guards.check_dir_can_be_written(_WORKDIR.value)  # before the small run is restored and grown
  except ValueError as e:
    fail(str(e))
  config_flag = flags.FLAGS['config']
  explicit = frozenset(config_flags.get_override_values(config_flag))
  try:
    step = rundir.parse_step(_STEP.value)
    result = grow.grow_run(_FROM.value, _CONFIG.value, _WORKDIR.value, step, explicit)
  except train.InputError as e:
    fail(str(e))
  print(grow.summary(result, config_flags.get_config_filename(config_flag), _WORKDIR.value))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
