"""`launch.pretrain` on a gs:// workdir, against a local GCS emulator (tests/gcs_emulator.py,
docs/buckets.md): orbax/TensorStore, etils/gcsfs and google-cloud-storage all write to the
bucket.

Each test runs the real launcher in a subprocess on `gs://bucket/<test>/run` with the tiny
settings of helpers.tiny_flags: checkpoints, a kill -9 while training and in the middle of a
save (resumes are bit-identical), a damaged newest checkpoint (moved aside by copy and delete),
the upload volume of TensorBoard events (rotated local files, one object each) and of
metrics.jsonl (appended by object composition) counted by the CountingProxy, a bucket that
refuses TensorBoard writes, and the workdir lease (`<workdir>/.lease`: a second run is refused,
an expired lease is taken over, the holder refreshes it and deletes it at the end).
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gcs_emulator import CountingProxy
from gcs_emulator import gcs_fixture  # noqa: F401 (the `gcs` fixture)
from helpers import ROOT
from helpers import cpu_env
from helpers import tiny_flags

# 12 steps with dropout (the resumed run must also replay the dropout keys), a log line every
# 2 steps, evaluations at 6 and 12, checkpoints every 2 steps of which 3 are kept (8, 10, 12).
RUN = {
  'train.num_train_steps': 12,
  'train.log_every_steps': 2,
  'train.eval_every_steps': 6,
  'train.checkpoint_every_steps': 2,
  'train.keep_checkpoints': 3,
  'model.dropout_rate': 0.1,
}

# Runs the launcher with orbax's commit step patched: SIGKILL just before the commit file of
# step $KILL_AT_STEP is written (every item of the step is on the bucket, the step's own
# commit_success.txt is not): a kill -9 in the middle of a save, at a chosen step.
_KILL_BEFORE_COMMIT = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.CommitFileTemporaryPath.finalize
async def killing_finalize(self):
  if self.get_final().name == os.environ['KILL_AT_STEP']:
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self)
atomicity.CommitFileTemporaryPath.finalize = killing_finalize
sys.argv = ['launch.pretrain', *sys.argv[1:]]
runpy.run_module('launch.pretrain', run_name='__main__', alter_sys=True)
"""


def _slow_launcher(setup: str = '') -> str:
  """Code that runs the launcher with a 0.2 s pause after each metrics write (a run that lives
  long but leaves the CPU to the others), after the `setup` lines (`guards` is imported)."""
  return f"""
import runpy, sys, time
from pretrain import guards, metrics
{setup}
write = metrics.MetricWriter.write
def slow_write(self, *args, **kwargs):
  write(self, *args, **kwargs)
  time.sleep(0.2)
metrics.MetricWriter.write = slow_write
sys.argv = ['launch.pretrain', *sys.argv[1:]]
runpy.run_module('launch.pretrain', run_name='__main__', alter_sys=True)
"""


# The workdir's holder in the two-run test.
_SLOW = _slow_launcher()
# A 1.5 s lease (refreshed every 0.5 s): a takeover by another run, which takes
# LEASE_TTL_SECONDS of failed refreshes on a real bucket, is then seen within a second.
_SHORT_LEASE = _slow_launcher('guards.LEASE_TTL_SECONDS = 1.5')

# Runs the launcher with pretrain.sinks.REMOTE_UPLOAD_SECONDS = 0: every log step is an
# upload interval, as every 30 s is in a run of hours (a long run, compressed).
_UPLOAD_EVERY_WRITE = """
import runpy, sys
from pretrain import sinks
assert hasattr(sinks, 'REMOTE_UPLOAD_SECONDS'), 'pretrain.sinks.REMOTE_UPLOAD_SECONDS is gone'
sinks.REMOTE_UPLOAD_SECONDS = 0.0
sys.argv = ['launch.pretrain', *sys.argv[1:]]
runpy.run_module('launch.pretrain', run_name='__main__', alter_sys=True)
"""


def _command(gcs, workdir, corpus, cache_dir, code=None, **overrides):
  flags = tiny_flags(corpus, cache_dir, **{**RUN, **overrides})
  launcher = ['-c', code] if code else ['-m', 'launch.pretrain']
  return [
    sys.executable,
    *launcher,
    '--config=launch/configs/roformer.py:tiny',
    f'--workdir={gcs.uri(workdir)}',
    *flags,
  ]


def _start(gcs, workdir, corpus, cache_dir, env=None, code=None, output=None, **overrides):
  """The launcher on gs://bucket/<workdir>, started; its output goes to the file `output`,
  or to the Popen's pipe (for runs whose output is read at their end)."""
  return subprocess.Popen(
    _command(gcs, workdir, corpus, cache_dir, code, **overrides),
    cwd=ROOT,
    env=cpu_env(1, **(env or gcs.env)),
    stdout=output or subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _run(gcs, workdir, corpus, cache_dir, env=None, code=None, timeout=120, **overrides):
  """The launcher on gs://bucket/<workdir>, to its end: (exit code, output)."""
  proc = _start(gcs, workdir, corpus, cache_dir, env, code, **overrides)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f'the run did not end within {timeout} s:\n{out[-4000:]}')
  return proc.returncode, out


def _ok(result):
  code, out = result
  assert code == 0, f'exit code {code}:\n{out[-4000:]}'
  return out


def _state(gcs, workdir, step):
  """The train state of checkpoint `step` of gs://bucket/<workdir>, as NumPy arrays."""
  manager = ocp.CheckpointManager(gcs.uri(f'{workdir}/checkpoints'))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return jax.device_get(restored['state'])


def _committed_steps(gcs, workdir):
  """The steps of gs://bucket/<workdir>/checkpoints with their own commit_success.txt."""
  prefix = f'{workdir}/checkpoints/'
  rest = [n[len(prefix) :].split('/') for n in gcs.names(prefix)]
  return sorted(int(r[0]) for r in rest if len(r) == 2 and r[1] == 'commit_success.txt')


def _metrics(gcs, workdir):
  return [json.loads(line) for line in gcs.read(f'{workdir}/metrics.jsonl').splitlines()]


def _event_tags(data: bytes) -> dict[str, list[int]]:
  """{tag: [steps]} of the scalars in a TensorBoard event file (TFRecord framing: length,
  its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  tags, i = {}, 0
  while i + 12 <= len(data):
    (n,) = struct.unpack('<Q', data[i : i + 8])
    event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    i += 12 + n + 4
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  return tags


@pytest.fixture(scope='module', autouse=True)
def _compilation_cache(tmp_path_factory):
  """A JAX compilation cache for the module's runs (`make test` sets one; else a temporary
  one): they compile the same steps, and each later run skips most of its compile (about
  10 s of each run on a busy 2-core machine)."""
  with pytest.MonkeyPatch.context() as m:
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
      m.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path_factory.mktemp('jax_cache')))
    m.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    yield


@pytest.fixture(scope='module')
def reference(gcs, text_corpus, cache_dir):
  """An uninterrupted run on gs://bucket/reference/run (checkpoints 8, 10, 12)."""
  _ok(_run(gcs, 'reference/run', text_corpus, cache_dir))
  return 'reference/run'


def _assert_same_state(gcs, workdir, reference, step=12):
  jax.tree.map(
    np.testing.assert_array_equal, _state(gcs, workdir, step), _state(gcs, reference, step)
  )


def test_run_writes_checkpoints_metrics_and_events_to_the_bucket(gcs, reference):
  names = gcs.names(f'{reference}/')
  assert f'{reference}/config.json' in names
  assert _committed_steps(gcs, reference) == [8, 10, 12]
  records = _metrics(gcs, reference)
  assert [r['step'] for r in records if r['split'] == 'train'] == [2, 4, 6, 8, 10, 12]
  assert [r['step'] for r in records if r['split'] == 'eval'] == [6, 12]
  events = [n for n in names if n.startswith(f'{reference}/tensorboard/events.out.tfevents.')]
  assert events, names
  tags = {}
  for name in events:
    for tag, steps in _event_tags(gcs.read(name)).items():
      tags.setdefault(tag, []).extend(steps)
  assert sorted(tags['train/loss']) == [2, 4, 6, 8, 10, 12]
  assert sorted(tags['eval/loss']) == [6, 12]


def test_kill9_while_training_then_resume_is_bit_identical(gcs, reference, text_corpus, cache_dir):
  workdir = 'kill9/run'
  proc = _start(gcs, workdir, text_corpus, cache_dir)
  deadline = time.time() + 90
  while not gcs.exists(f'{workdir}/checkpoints/2/commit_success.txt'):  # then at once
    assert proc.poll() is None, f'exited {proc.returncode} early:\n{proc.stdout.read()[-4000:]}'
    assert time.time() < deadline, 'no checkpoint 2 within 90 s'
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, 'the run ended before the kill; nothing was tested'
  committed = _committed_steps(gcs, workdir)
  assert committed and max(committed) < 12
  out = _ok(_run(gcs, workdir, text_corpus, cache_dir))
  assert f'resuming from {gcs.uri(workdir)}/checkpoints/{max(committed)}' in out
  _assert_same_state(gcs, workdir, reference)


def test_kill9_in_the_middle_of_a_save_then_resume_is_bit_identical(
  gcs, reference, text_corpus, cache_dir
):
  workdir = 'kill9_in_save/run'
  env = dict(gcs.env, KILL_AT_STEP='8')
  code, out = _run(gcs, workdir, text_corpus, cache_dir, env=env, code=_KILL_BEFORE_COMMIT)
  assert code == -signal.SIGKILL, f'exit code {code}:\n{out[-4000:]}'
  # Step 8 is on the bucket without its commit file: not a checkpoint (and 2 is still kept).
  assert gcs.names(f'{workdir}/checkpoints/8/')
  assert _committed_steps(gcs, workdir) == [2, 4, 6]
  out = _ok(_run(gcs, workdir, text_corpus, cache_dir))
  assert f'resuming from {gcs.uri(workdir)}/checkpoints/6' in out
  assert _committed_steps(gcs, workdir) == [8, 10, 12]
  _assert_same_state(gcs, workdir, reference)


def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(
  gcs, reference, text_corpus, cache_dir
):
  workdir = 'damaged/run'
  gcs.copy(f'{reference}/', f'{workdir}/')
  gcs.delete(f'{workdir}/checkpoints/12/')  # as if stopped at step 10
  sizes = gcs.sizes(f'{workdir}/checkpoints/10/state/')
  blob = max((n for n in sizes if '/d/' in n), key=sizes.get)
  gcs.write(blob, gcs.read(blob)[: sizes[blob] // 2])  # a truncated array blob
  out = _ok(_run(gcs, workdir, text_corpus, cache_dir))
  assert f'resuming from {gcs.uri(workdir)}/checkpoints/8' in out
  assert 'cannot be restored' in out
  aside = gcs.names(f'{workdir}/checkpoints_damaged/')
  assert aside and all(n.split('/')[3].startswith('10-') for n in aside), out[-4000:]
  assert _committed_steps(gcs, workdir) == [8, 10, 12]
  _assert_same_state(gcs, workdir, reference)


def _upload_report(proxy, gcs, prefix):
  """(bytes uploaded under prefix, bytes stored there at the end, the upload sizes)."""
  uploads = proxy.uploads(prefix)
  return sum(r.sent for r in uploads), sum(gcs.sizes(prefix).values()), [r.sent for r in uploads]


def test_tensorboard_upload_bytes_per_log_step_stay_flat(gcs, text_corpus, cache_dir):
  workdir = 'uploads/run'
  steps = 40
  with CountingProxy(gcs) as proxy:
    _ok(
      _run(
        gcs,
        workdir,
        text_corpus,
        cache_dir,
        env=proxy.env,
        **{
          'train.num_train_steps': steps,
          'train.log_every_steps': 1,
          'train.eval_every_steps': steps,
          'train.checkpoint_every_steps': steps,
        },
      )
    )
  sent, stored, sizes = _upload_report(proxy, gcs, f'{workdir}/tensorboard/')
  jsonl_sent, jsonl_stored, _ = _upload_report(proxy, gcs, f'{workdir}/metrics.jsonl')
  report = (
    f'{steps} log steps: {sent:,} bytes uploaded for {stored:,} bytes of events '
    f'({sent / max(stored, 1):.1f}x; {len(sizes)} uploads of {sizes[:3]} ... {sizes[-3:]} '
    f'bytes); metrics.jsonl {jsonl_sent:,} for {jsonl_stored:,}'
  )
  print(report)  # shown with -rP
  # Flat: each event byte goes up a bounded number of times (a file closed and re-opened, a
  # final flush), not once per later log step.
  assert sent <= 3 * stored + 4096, report


def test_upload_bytes_stay_flat_when_every_log_step_is_an_upload_interval(
  gcs, text_corpus, cache_dir
):
  """A long run, compressed: with REMOTE_UPLOAD_SECONDS = 0 every log step uploads, as every
  30 s does in a run of hours; the last uploads must be no larger than the first ones."""
  workdir = 'uploads_long/run'
  steps = 40
  with CountingProxy(gcs) as proxy:
    _ok(
      _run(
        gcs,
        workdir,
        text_corpus,
        cache_dir,
        env=proxy.env,
        code=_UPLOAD_EVERY_WRITE,
        **{
          'train.num_train_steps': steps,
          'train.log_every_steps': 1,
          'train.eval_every_steps': steps,
          'train.checkpoint_every_steps': steps,
        },
      )
    )
  report, growing = {}, []
  for name in ('metrics.jsonl', 'tensorboard/'):
    sent, stored, sizes = _upload_report(proxy, gcs, f'{workdir}/{name}')
    quarter = max(len(sizes) // 4, 1)
    early, late = sum(sizes[:quarter]), sum(sizes[-quarter:])
    report[name] = (
      f'{sent:,} bytes in {len(sizes)} uploads for {stored:,} stored; first quarter of the '
      f'uploads {early:,} bytes, last quarter {late:,}'
    )
    if late > 2 * early + 4096:
      growing.append(name)
  print(report)  # shown with -rP
  assert not growing, f'{steps} log steps, uploads grow for {growing}: {report}'


def test_failed_tensorboard_uploads_do_not_stop_the_run(gcs, text_corpus, cache_dir):
  workdir = 'tensorboard_denied/run'
  with CountingProxy(gcs) as proxy:
    # The bucket refuses every write under tensorboard/ (403: not retried by the clients).
    proxy.fail = lambda method, name: (
      403 if method in ('POST', 'PUT') and '/tensorboard/' in name else None
    )
    code, out = _run(gcs, workdir, text_corpus, cache_dir, env=proxy.env)
  assert code == 0 and _committed_steps(gcs, workdir) == [8, 10, 12], (
    f'exit code {code}, checkpoints {_committed_steps(gcs, workdir)}:\n{out[-3000:]}'
  )
  # A warning, once for this kind of failure (not at every upload).
  assert out.count('could not upload TensorBoard events') == 1, out[-3000:]


def test_second_run_on_a_bucket_workdir_is_refused(gcs, text_corpus, cache_dir, tmp_path):
  workdir = 'two_runs/run'
  long_run = {
    'train.num_train_steps': 100000,
    'train.log_every_steps': 1,
    'train.eval_every_steps': 100000,
    'train.checkpoint_every_steps': 100000,
  }
  log = tmp_path / 'first.log'
  with open(log, 'w') as output:  # a file: a pipe nobody reads would fill and stall the run
    first = _start(gcs, workdir, text_corpus, cache_dir, code=_SLOW, output=output, **long_run)
  try:
    deadline = time.time() + 90
    while not gcs.exists(f'{workdir}/config.json'):  # past the workdir guard, training
      assert first.poll() is None, log.read_text()[-4000:]
      assert time.time() < deadline, 'the first run did not start within 90 s'
      time.sleep(0.05)
    code, out = _run(
      gcs, workdir, text_corpus, cache_dir, **long_run, **{'train.stop_after_steps': 2}
    )
    assert first.poll() is None, 'the first run ended while the second ran'
  finally:
    first.send_signal(signal.SIGTERM)  # it saves and stops
    try:
      first.wait(timeout=60)
    except subprocess.TimeoutExpired:
      first.kill()
      first.wait()
  # Refused at start (exit 2), naming the holder as the local lock does ('PID n on host h').
  assert code == 2 and f'PID {first.pid}' in out, f'the second run exited {code}:\n{out[-3000:]}'


def _lease(holder: str, pid: int, expires: float, host: str = 'elsewhere') -> str:
  return json.dumps({'holder': holder, 'host': host, 'pid': pid, 'expires': expires})


def test_expired_lease_is_taken_over_with_a_warning(gcs, text_corpus, cache_dir):
  """A killed run's lease (past its expiry, held on another host) does not block the workdir:
  the next run takes it over with one warning and deletes it at its clean end."""
  workdir = 'stale_lease/run'
  holder = 'PID 4242 on host elsewhere (since 2026-01-01 00:00:00)'
  gcs.write(f'{workdir}/.lease', _lease(holder, 4242, time.time() - 5))
  out = _ok(_run(gcs, workdir, text_corpus, cache_dir, **{'train.num_train_steps': 2}))
  warnings = [line for line in out.splitlines() if 'taking over the lease' in line]
  assert len(warnings) == 1 and holder in warnings[0] and 'expired' in warnings[0], out[-3000:]
  assert not gcs.exists(f'{workdir}/.lease')


def test_live_lease_of_another_host_refuses_the_run(gcs, text_corpus, cache_dir):
  workdir = 'live_lease/run'
  holder = 'PID 4242 on host elsewhere (since 2026-01-01 00:00:00)'
  gcs.write(f'{workdir}/.lease', _lease(holder, 4242, time.time() + 600))
  code, out = _run(gcs, workdir, text_corpus, cache_dir)
  assert code == 2 and f'in use by {holder}' in out, f'exit code {code}:\n{out[-3000:]}'
  assert gcs.exists(f'{workdir}/.lease') and not gcs.exists(f'{workdir}/config.json')


def test_a_run_whose_lease_another_run_took_over_stops_with_exit_5(gcs, text_corpus, cache_dir):
  """Another run takes the lease over while this one trains (as after this run's refreshes
  failed for the lease's lifetime): this run stops before its next save with exit code 5
  naming the new holder, and leaves the other's lease in place. (The old code logged an
  error and trained on, saving and rotating checkpoints in a workdir two runs now write.)"""
  workdir = 'lease_lost/run'
  other = 'PID 4242 on host elsewhere (since 2026-01-01 00:00:00)'
  proc = _start(
    gcs,
    workdir,
    text_corpus,
    cache_dir,
    code=_SHORT_LEASE,
    **{
      'train.num_train_steps': 100000,
      'train.log_every_steps': 1,
      'train.eval_every_steps': 100000,
      'train.checkpoint_every_steps': 2,
    },
  )
  try:
    deadline = time.time() + 90
    while not _committed_steps(gcs, workdir):  # training, one checkpoint written
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
      time.sleep(0.05)
    taken = _lease(other, 4242, time.time() + 600)
    gcs.write(f'{workdir}/.lease', taken)  # a new generation: the refresh's precondition fails
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 5, f'exit code {proc.returncode}:\n{out[-4000:]}'
  assert f'was taken over by {other}' in out and 'stopped without saving' in out, out[-3000:]
  assert gcs.read(f'{workdir}/.lease').decode() == taken  # not deleted by this run's release


def test_lease_is_refreshed_while_held_and_deleted_at_release(gcs, monkeypatch):
  """In this process: the holder's thread rewrites the lease every TTL / 3 (later expiry, new
  generation); a second holder on a live lease is refused naming this PID; release deletes it."""
  from pretrain import guards  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(guards, 'LEASE_TTL_SECONDS', 0.6)
  name = 'lease_refresh/run/.lease'
  lock = guards.WorkdirLock(gcs.uri('lease_refresh/run')).acquire()
  try:
    first = json.loads(gcs.read(name))
    assert first['holder'].startswith(f'PID {os.getpid()} on host ')
    deadline = time.time() + 10
    while json.loads(gcs.read(name))['expires'] <= first['expires']:
      assert time.time() < deadline, 'the lease was not refreshed within 10 s'
      time.sleep(0.05)
    with pytest.raises(ValueError, match=f'in use by PID {os.getpid()} on host'):
      guards.WorkdirLock(gcs.uri('lease_refresh/run')).acquire()
  finally:
    lock.release()
  assert not gcs.exists(name)
