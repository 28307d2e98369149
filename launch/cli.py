"""Command-line helpers shared by the absl entry points: one-paragraph errors, exit code 2."""

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
  return (f'bad flag: {message} -- config fields and their meaning are in '
          f'launch/configs/base.py; run with --helpfull for the flags.')


# config_flags reports an unknown --config.x.y as AttributeError/KeyError and a value of the
# wrong type as TypeError/ValueError; without --config it does so while defining the flag.
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)
