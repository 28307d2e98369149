"""Agreement between processes over JAX's distributed runtime (`pretrain.multihost`), and the
set-up that keeps two CPU processes from hanging in a collective.

Two local processes (jax.distributed on CPU, 2 devices each) run this file as a script:
`python tests/test_multihost.py PORT PROCESS_ID MODE OUT_FILE`, MODE 'agree' (the helpers'
answers and their timeout error) or 'programs' (a psum program after
`multihost.configure_cpu_processes()`, with a persistent compilation cache in the
environment).

The two-process hang (docs/testing.md 3): only process 0 writes JAX's persistent compilation
cache and the processes' cache keys differ, so on a run after the first process 0 loaded
cached programs while process 1 compiled them afresh. The two executables get different
launch ids (derived from their fingerprints) and a gloo collective between them never
completes. With a cache in the environment, the second of two identical runs of the 'programs'
worker hung every time; `configure_cpu_processes` turns the cache off.
"""

import faulthandler
import json
import pathlib
import signal
import sys
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import helpers  # noqa: E402
from pretrain import multihost  # noqa: E402


def _agree(process_id: int) -> dict:
  """The helpers' answers on this process, including a barrier process 1 reaches too late."""
  out = {
    'gather': [v.decode() for v in multihost.all_gather('value', f'process {process_id}')],
    # One name, many rounds: each call is its own agreement.
    'flags': [multihost.all_gather_flags('stop', process_id == 1 and i % 3 == 0) for i in range(7)],
    'any': [multihost.any_flag('any', process_id == 0 and i == 2) for i in range(4)],
  }
  multihost.barrier('ready')
  start = time.monotonic()
  if process_id == 1:
    time.sleep(6)  # process 0 waits 2 s at most
  try:
    multihost.barrier('late', timeout_s=2)
    out['late'] = 'passed'
  except multihost.AgreementError as e:
    out['late'] = str(e)
  out['late_s'] = time.monotonic() - start
  # Both carry on in step after a failed agreement.
  out['after'] = [v.decode() for v in multihost.all_gather('after', str(process_id))]
  return out


def _programs(process_id: int) -> dict:
  """A psum over both processes' devices, after a process_allgather, three times."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices()), ('d',))
  x = jax.make_array_from_callback(
    (4, 3), NamedSharding(mesh, P('d')), lambda index: np.ones((1, 3), np.float32)
  )
  psum = jax.jit(
    jax.shard_map(
      lambda x: jax.lax.psum(2 * x, 'd') + jax.lax.psum(x, 'd'),
      mesh=mesh,
      in_specs=P('d'),
      out_specs=P(),
    )
  )
  sums = []
  for i in range(3):
    multihost_utils.process_allgather(np.array(i))
    sums.append(np.asarray(psum(x)).ravel().tolist())
  return {'sums': sums}


def _worker(port: int, process_id: int, mode: str, out_file: str):
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  if mode == 'programs':
    multihost.configure_cpu_processes()
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  out = _agree(process_id) if mode == 'agree' else _programs(process_id)
  pathlib.Path(out_file).write_text(json.dumps(out))


def _run_pair(tmp_path, mode: str, env, name: str) -> list[dict]:
  port = helpers.free_port()
  outs = [tmp_path / f'{name}_process{i}.json' for i in range(2)]
  cmds = [[sys.executable, __file__, str(port), str(i), mode, str(outs[i])] for i in range(2)]
  logs = [tmp_path / f'{name}_process{i}.log' for i in range(2)]
  helpers.run_process_pair(cmds, logs, env, timeout=90)
  return [json.loads(out.read_text()) for out in outs]


def test_one_process_needs_no_runtime():
  assert multihost.all_gather('value', b'x') == [b'x']
  assert multihost.all_gather_flags('flag', True) == [True]
  assert multihost.any_flag('flag', False) is False
  multihost.barrier('done')
  with pytest.raises(ValueError, match='agreement name'):
    multihost.all_gather('a/b', b'')


@pytest.mark.two_process
def test_two_processes_agree_and_a_late_one_is_an_error(tmp_path):
  """Values in process order on both; a barrier process 1 reaches 6 s late fails on process 0
  after its 2 s timeout, naming process 1 and what was agreed, and on process 1 at once."""
  results = _run_pair(tmp_path, 'agree', helpers.two_process_env(), 'agree')
  for r in results:
    assert r['gather'] == ['process 0', 'process 1']
    assert r['flags'] == [[False, i % 3 == 0] for i in range(7)]
    assert r['any'] == [False, False, True, False]
    assert r['after'] == ['0', '1']
  early, late = results
  assert "could not agree on 'late'" in early['late'], early['late']
  assert 'process(es) [1] did not arrive within 2 s' in early['late'], early['late']
  assert early['late_s'] < 5, early['late_s']
  assert 'process 1 arrived after the others had stopped waiting' in late['late'], late['late']
  assert late['late_s'] < 9, late['late_s']


@pytest.mark.two_process
def test_cached_programs_cannot_meet_fresh_ones(tmp_path):
  """The second of two runs with a compilation cache in the environment (where process 0 used
  to load the psum program that process 1 compiled afresh, and both hung in it) finishes,
  and nothing was cached."""
  cache = tmp_path / 'jax_cache'
  env = helpers.two_process_env(compile_cache=cache)
  for run in range(2):
    for r in _run_pair(tmp_path, 'programs', env, f'run{run}'):
      assert r['sums'] == [[12.0] * 3] * 3
  assert not cache.exists() or not any(cache.iterdir())


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
