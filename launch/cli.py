"""Command-line helpers shared by the absl entry points: one-paragraph errors (exit code 2),
flag-error wording, and when to start JAX's distributed runtime."""

import sys

from absl import flags


def fail(message: str, code: int = 2):
  """Prints `message` as one paragraph on stderr and exits with `code` (no traceback)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def flag_error_message(e: Exception) -> str:
  """One readable sentence from a flag-parsing error (config_flags nests tracebacks in it)."""
  message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
  if 'Traceback (most recent call last)' in message:  # an error inside the config file
    message = message.strip().splitlines()[-1]
  message = message.replace('\\n', ' ').replace('\\', '').replace("'", '')
  message = ' '.join(message.split()).strip('"')
  return (
    f'bad flag: {message} -- config fields and their meaning are in '
    f'pretrain/config.py; run with --helpfull for the flags.'
  )


# config_flags reports an unknown --config.x.y as AttributeError/KeyError and a value of the
# wrong type as TypeError/ValueError; without --config it does so while defining the flag.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def parse_flags(argv):
  """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) whose errors (an unknown
  config field, a bad value, a config file that cannot be loaded) exit with code 2 and one
  readable sentence."""
  try:
    rest = flags.FLAGS(argv)
  except FLAG_ERRORS as e:
    fail(flag_error_message(e))
  check_config_files()
  return rest


def check_config_files():
  """Exits with code 2 if a config flag (`config_flags.DEFINE_config_file`) names a file that
  could not be loaded: config_flags keeps that error until the config is first read, which
  would be a traceback in the middle of a run's setup."""
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    # config_flags' stand-in for a config that failed to load (a private class, so by name).
    if type(value).__name__ != '_ErrorConfig':
      continue
    lines = [l.strip() for l in str(getattr(value, '_error', '')).splitlines() if l.strip()]
    fail(
      f'bad flag: --{name}: the config file cannot be loaded '
      f'({lines[-1] if lines else "no such file"}); give one of the files in launch/configs '
      f'and a preset, e.g. --{name}=launch/configs/roformer.py:tiny.'
    )


def require(usage: str, **flag_values):
  """Exits with code 2 naming the first of `flag_values` (flag name -> value) that is None,
  followed by `usage` (the command line that works)."""
  for name, value in flag_values.items():
    if value is None:
      fail(f'--{name} is required: {usage}')


# Variables that a multi-host TPU environment sets (GKE, multislice); a Cloud TPU VM slice sets
# none of them, so TPU chips on the machine also count (JAX then asks the metadata server).
CLUSTER_ENV_VARS = (
  'TPU_WORKER_HOSTNAMES',
  'MEGASCALE_COORDINATOR_ADDRESS',
  'TPU_PROCESS_ADDRESSES',
)


def distributed_mode(coordinator: str | None, environ, num_tpu_chips: int) -> str | None:
  """How to start JAX's multi-controller runtime: 'explicit' (--coordinator_address),
  'auto' (a TPU VM or TPU cluster: JAX detects hosts and ids), or None (one process)."""
  if coordinator:
    return 'explicit'
  if any(environ.get(v) for v in CLUSTER_ENV_VARS):
    return 'auto'
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if num_tpu_chips > 0 and (not platforms or 'tpu' in platforms):
    return 'auto'
  return None


def tpu_chips() -> int:
  """TPU chips on this machine (0 off TPU VMs), without starting a backend."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

  try:
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
  except Exception:  # pylint: disable=broad-except
    return 0
