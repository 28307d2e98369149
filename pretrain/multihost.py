"""What the processes of a multi-host run need to agree on, and how they must be set up.

Agreement on host-local facts (a stop request, a tokenizer digest, whether a restore failed)
goes over JAX's distributed runtime, the coordination service that `jax.distributed.initialize`
starts: each process writes its value to the key-value store, waits at a barrier and reads
everyone's values. It never uses a device collective (`multihost_utils.process_allgather`):
that is a program in the device stream, so it must be dispatched by every process in the
same order as every other program, from the thread that dispatches them, and it has no
timeout (a peer that died or hangs leaves the others waiting in the collective). Here a peer
that does not arrive within the timeout gives an `AgreementError` naming it.

  flags = multihost.all_gather_flags('stop_request', requested)  # one per process
  digests = multihost.all_gather('tokenizer_sha256', tokenizer.sha256)
  multihost.barrier('checkpoint_moved_aside')

Every process must call the same agreements in the same order (as with any collective); a
name's calls are numbered per process, so a name can be used again (each call is one round).
One process: no runtime needed, the value comes back as is.

Set-up (`launch.pretrain`, `launch.finetune`): `configure_cpu_processes()` for processes that
stand in for hosts on CPU, `use_distributed_barriers_in_orbax()` once the command line is
parsed.
"""

from __future__ import annotations

import collections
import re
import threading
import time

from absl import flags
from absl import logging
import jax

# Long enough for processes that reach an agreement minutes apart (one still training a
# tokenizer or compiling); the same as XLA's timeout for a CPU collective.
DEFAULT_TIMEOUT_S = 1800.0
_PREFIX = 'pretrain/agree'
_NAME = re.compile(r'[A-Za-z0-9_.:-]+')


class AgreementError(RuntimeError):
  """The processes could not agree: one did not arrive in time, or the runtime failed."""


_lock = threading.Lock()
_rounds: collections.Counter = collections.Counter()


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:
    raise AgreementError(
      f'{jax.process_count()} processes but no distributed runtime: start it with '
      'jax.distributed.initialize() before any agreement.'
    )
  return client


def _next_round(name: str) -> int:
  with _lock:
    _rounds[name] += 1
    return _rounds[name]


def _missing(client, prefix: str, count: int) -> list[int] | None:
  """The processes that have not written their value under `prefix` (None: unknown)."""
  try:
    present = {int(k.rsplit('/', 1)[-1]) for k, _ in client.key_value_dir_get_bytes(prefix + '/')}
  except Exception:  # pylint: disable=broad-except
    return None
  return [p for p in range(count) if p not in present]


def all_gather(name: str, value: bytes | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bytes]:
  """Every process's `value`, in process order (the same list on every process).

  Args:
    name: what is being agreed (letters, digits, `_.:-`); named in the error.
    value: this process's value (a str is UTF-8 encoded).
    timeout_s: how long to wait for the slowest process.

  Raises:
    AgreementError: a process did not arrive within `timeout_s`, or the runtime failed (a
      peer gone); the message names the agreement and the processes that were missing.
  """
  if not _NAME.fullmatch(name):  # checked on one process too: a bad name fails in tests
    raise ValueError(f'agreement name {name!r}: use letters, digits and _.:-')
  if isinstance(value, str):
    value = value.encode('utf-8')
  count = jax.process_count()
  if count == 1:
    return [value]
  client, me, n = _client(), jax.process_index(), _next_round(name)
  prefix = f'{_PREFIX}/{name}/{n}'
  start = time.monotonic()
  try:
    client.key_value_set_bytes(f'{prefix}/{me}', value)
    client.wait_at_barrier(f'{prefix}/barrier', max(1, int(timeout_s * 1000)))
    entries = client.key_value_dir_get_bytes(prefix + '/')
  except jax.errors.JaxRuntimeError as e:
    missing, waited = _missing(client, prefix, count), time.monotonic() - start
    if missing == []:  # pylint: disable=g-explicit-bool-comparison
      # Everyone wrote a value: the barrier had failed before this process reached it.
      detail = f'process {me} arrived after the others had stopped waiting'
    elif missing:
      detail = f'process(es) {missing} did not arrive within {timeout_s:.0f} s'
    else:
      detail = f'not every process arrived within {timeout_s:.0f} s'
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise AgreementError(
      f"the processes could not agree on '{name}' (round {n}; process {me} waited "
      f'{waited:.0f} s): {detail}; a late process may have failed, hung or been preempted: '
      f'see its log. ({cause})'
    ) from None
  values = {int(k.rsplit('/', 1)[-1]): v for k, v in entries}
  if sorted(values) != list(range(count)):
    raise AgreementError(f"'{name}' (round {n}): values from processes {sorted(values)} only")
  if n > 1:
    # Every process has passed this round's barrier, so all have read the previous round:
    # this process's value from it can go (keeps the store small over a long run).
    try:
      client.key_value_delete(f'{_PREFIX}/{name}/{n - 1}/{me}')
    except jax.errors.JaxRuntimeError:
      pass
  return [values[p] for p in range(count)]


def all_gather_flags(name: str, flag: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bool]:
  """Every process's `flag`, in process order (see `all_gather`)."""
  return [v == b'1' for v in all_gather(name, b'1' if flag else b'0', timeout_s)]


def any_flag(name: str, flag: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  """Whether `flag` is set on any process (the same answer on every process)."""
  return any(all_gather_flags(name, flag, timeout_s))


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Returns once every process has called `barrier(name)` (see `all_gather` for errors)."""
  all_gather(name, b'', timeout_s)


# ----------------------------------------------------------------------------- set-up


def configure_cpu_processes() -> None:
  """Settings for processes that stand in for hosts on CPU (local drills, the tests); call
  before `jax.distributed.initialize` and before anything is compiled.

  - Collectives across processes over gloo (a CPU client has none otherwise).
  - No persistent compilation cache. Only process 0 writes it and the processes' cache keys
    differ, so process 0 runs a program deserialized from the cache where the others run a
    fresh compile of it. The two get different launch ids (derived from the executable's
    fingerprint), and a gloo collective whose participants' launch ids differ never
    completes: every process waits inside it (tests/test_multihost.py; docs/testing.md 3).
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_enable_compilation_cache', False)


_ORBAX_BARRIER_FLAG = 'experimental_orbax_use_distributed_barrier'


def use_distributed_barriers_in_orbax() -> bool:
  """Makes orbax's barriers on the main thread use the distributed runtime's barrier (with a
  timeout, like its background thread's) instead of `sync_global_devices`, a device program
  that waits forever for a lost peer. Call after absl parsed the command line.

  Returns:
    Whether the setting exists in the installed orbax (a warning is logged otherwise).
  """
  # Importing orbax defines its absl flags.
  import orbax.checkpoint  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  if _ORBAX_BARRIER_FLAG not in flags.FLAGS:
    logging.warning('orbax has no --%s: its barriers stay device collectives', _ORBAX_BARRIER_FLAG)
    return False
  setattr(flags.FLAGS, _ORBAX_BARRIER_FLAG, True)
  return True
