"""Failures seen by one process of two (jax.distributed on CPU, 2 devices each): every process
stops at the same point with the same documented exit code, or falls back together, within a
bounded time, and the newest good checkpoint stays intact (docs/design.md 13).

The failure is injected into one process from the test, without flags in the product: the
launcher runs under a wrapper (`_INJECT`) that patches one function on that process only.
"""

import json
import time

import pytest

from helpers import copy_workdir
from helpers import ROOT
from helpers import orbax_state
from helpers import run_pretrain
from helpers import run_process_pair
from helpers import tiny_flags
from helpers import two_process_env
from helpers import two_process_pretrain

pytestmark = pytest.mark.two_process

# Runs launch.pretrain with a failure on process $FAIL_PROCESS from step $FAIL_AT_STEP on:
# 'async_save' (its background save reports an error), 'data' (its batch cannot be read),
# 'metrics' (process 0's metrics.jsonl write fails, as on a full disk).
_INJECT = """
import os, runpy, sys
import jax
from pretrain import checkpointing, sinks
where, at = os.environ['FAIL_WHERE'], int(os.environ['FAIL_AT_STEP'])
who = int(os.environ['FAIL_PROCESS'])
if where == 'async_save':
  check = checkpointing.Checkpointer.check_for_errors
  def failing_check(self):
    if jax.process_index() == who and (self.latest_step() or 0) >= at:
      raise checkpointing.SaveError(f'saving checkpoint {at} failed: injected on process {who}')
    return check(self)
  checkpointing.Checkpointer.check_for_errors = failing_check
elif where == 'data':
  import json
  from pretrain import train
  class FailingBatches:  # the training iterator, failing on process `who` from batch `at` on
    def __init__(self, it):
      self.it, self.taken = it, 0
    def __iter__(self):
      return self
    def __next__(self):
      self.taken += 1
      if jax.process_index() == who and self.taken >= at:
        raise OSError(5, f'Input/output error reading the corpus (injected at batch {self.taken})')
      return next(self.it)
    def get_state(self):
      return json.dumps(self.it.get_state()).encode()
    def set_state(self, state):
      self.it.set_state(json.loads(state))
    def start_prefetch(self):
      pass
  load_data = train._load_data
  def failing_load_data(*args, **kwargs):
    source, tokenizer, train_iter, eval_set = load_data(*args, **kwargs)
    return source, tokenizer, FailingBatches(train_iter), eval_set
  train._load_data = failing_load_data
elif where == 'metrics':
  write = sinks.JsonlSink.write
  def failing_write(self, step, split, scalars):
    if step >= at:
      raise OSError(28, f'No space left on device (injected at step {step})')
    return write(self, step, split, scalars)
  sinks.JsonlSink.write = failing_write
sys.argv = ['launch.pretrain', *sys.argv[1:]]
runpy.run_module('launch.pretrain', run_name='__main__', alter_sys=True)
"""


def _launch(workdir, corpus, cache_dir, logs, inject=None, expect_ok=True, **overrides):
  """Both processes of a two-process launch.pretrain to their end: (exit codes, outputs,
  seconds)."""
  flags = tiny_flags(corpus, cache_dir, **{'data.text_unit': 'line', **overrides})
  launcher = ['-c', _INJECT] if inject else ['-m', 'launch.pretrain']
  cmds = two_process_pretrain(workdir, flags, launcher)
  env = two_process_env()
  env.update(inject or {})
  start = time.time()
  if expect_ok:
    codes, outs = [0, 0], run_process_pair(cmds, logs, env, timeout=240)
  else:
    codes, outs = run_process_pair(cmds, logs, env, timeout=240, expect_ok=False)
  return codes, outs, time.time() - start


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def pair_run(tmp_path_factory, text_corpus, cache_dir):
  """The workdir of a two-process run of 4 steps (checkpoints 2 and 4), to copy (`copy_workdir`)."""
  root = tmp_path_factory.mktemp('pair_run')
  logs = [root / f'process{i}.log' for i in range(2)]
  _launch(root / 'run', text_corpus, cache_dir, logs, **{'train.num_train_steps': 4})
  assert _steps(root / 'run') == [2, 4]
  return root / 'run'


def _assert_stopped_together(codes, outs, seconds, workdir, code, steps):
  """Both processes exited with `code` within 60 s of the launch, the checkpoints are `steps`
  and the newest of them restores."""
  assert codes == [code, code], (codes, outs[0][-3000:], outs[1][-3000:])
  assert seconds < 60, seconds
  assert _steps(workdir) == steps
  assert orbax_state(workdir, steps[-1])['step'] == steps[-1]


def _signal_processes(
  workdir, corpus, cache_dir, logs, when: str, signum, log_every_steps: int, targets=(1,)
):
  """Runs an endless two-process launch.pretrain, sends `signum` to each process of `targets`
  once its own log holds `when`, and waits for both: (exit codes, outputs)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  flags = tiny_flags(
    corpus,
    cache_dir,
    **{
      'data.text_unit': 'line',
      'train.num_train_steps': 100000,
      'train.log_every_steps': log_every_steps,
      'train.eval_every_steps': 100000,
      'train.checkpoint_every_steps': 100000,
    },
  )
  procs = []
  for cmd, log in zip(two_process_pretrain(workdir, flags), logs):
    with open(log, 'w') as f:
      procs.append(
        subprocess.Popen(cmd, cwd=ROOT, env=two_process_env(), stdout=f, stderr=subprocess.STDOUT)
      )
  try:
    deadline, waiting = time.time() + 180, set(targets)
    while waiting:
      for i in sorted(waiting):
        assert time.time() < deadline and procs[i].poll() is None, logs[i].read_text()[-3000:]
        if when in logs[i].read_text():
          procs[i].send_signal(signum)
          waiting.discard(i)
      time.sleep(0.01)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return codes, [log.read_text() for log in logs]


def test_a_failed_background_save_on_one_process_stops_both_with_exit_4(
  tmp_path, text_corpus, cache_dir
):
  """Process 1's background save reports a failure after step 4: both processes stop at the
  next agreement point (a log or save step: step 6) with exit code 4 before saving again,
  and the checkpoints written before are intact."""
  workdir = tmp_path / 'run'
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  inject = {'FAIL_WHERE': 'async_save', 'FAIL_AT_STEP': '4', 'FAIL_PROCESS': '1'}
  codes, outs, seconds = _launch(
    workdir, text_corpus, cache_dir, logs, inject, expect_ok=False, **{'train.num_train_steps': 8}
  )
  # Agreed before the save of step 6: no process starts one after the failure.
  _assert_stopped_together(codes, outs, seconds, workdir, 4, [2, 4])
  assert 'injected on process 1' in outs[1]
  assert 'process 1 stopped the run' in outs[0] and 'injected on process 1' in outs[0]
  # The run resumes from what is there (the failure was transient).
  codes, outs, _ = _launch(workdir, text_corpus, cache_dir, logs, **{'train.num_train_steps': 8})
  assert all('resuming from' in out for out in outs)


def test_a_failed_metrics_write_on_process_0_stops_both(tmp_path, text_corpus, cache_dir):
  """Process 0's metrics.jsonl write fails at step 4 (a full disk): both processes stop
  together (process 0 with the error, exit 1; process 1 naming it), nobody waits in a
  collective."""
  workdir = tmp_path / 'run'
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  inject = {'FAIL_WHERE': 'metrics', 'FAIL_AT_STEP': '4', 'FAIL_PROCESS': '0'}
  codes, outs, seconds = _launch(
    workdir, text_corpus, cache_dir, logs, inject, expect_ok=False, **{'train.num_train_steps': 8}
  )
  _assert_stopped_together(codes, outs, seconds, workdir, 1, [2])
  assert 'No space left on device' in outs[0]
  assert 'process 0 stopped the run' in outs[1] and 'No space left on device' in outs[1]


def test_a_checkpoint_damaged_for_one_process_only_is_skipped_by_both(
  tmp_path, text_corpus, cache_dir, pair_run
):
  """Process 1's data position file of the newest checkpoint is garbage (process 0's reads):
  the processes agree that the checkpoint does not restore before orbax reads it, and both
  resume from the one before."""
  workdir = copy_workdir(pair_run, tmp_path)
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  (workdir / 'checkpoints' / '4' / 'data' / 'process_1-of-2.json').write_text('{x')
  codes, outs, _ = _launch(workdir, text_corpus, cache_dir, logs, **{'train.num_train_steps': 6})
  for out in outs:
    assert f'resuming from {workdir}/checkpoints/2' in out, out[-3000:]
    assert 'data/process_1-of-2.json does not read' in out
  assert [r['step'] for r in map(json.loads, (workdir / 'metrics.jsonl').open())][-1] == 6


def test_resume_on_another_number_of_processes(tmp_path, text_corpus, cache_dir, pair_run):
  """2 processes -> 1 process -> 2 processes (4 devices in all each time): each resume restores
  the model and optimizer state, warns once that the data position is per process and reads
  the data from the start, instead of calling the checkpoint damaged."""
  workdir = copy_workdir(pair_run, tmp_path)
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  flags = tiny_flags(text_corpus, cache_dir, **{'data.text_unit': 'line'})
  one = run_pretrain(workdir, [*flags, '--config.train.num_train_steps=6'], devices=4)
  assert one.returncode == 0, one.stderr[-3000:]
  assert f'resuming from {workdir}/checkpoints/4' in one.stderr, one.stderr[-3000:]
  assert one.stderr.count('written by 2 processes and this run has 1') == 1
  _, outs, _ = _launch(workdir, text_corpus, cache_dir, logs, **{'train.num_train_steps': 8})
  for out in outs:
    assert f'resuming from {workdir}/checkpoints/6' in out, out[-3000:]
    assert out.count('written by 1 processes and this run has 2') == 1
  assert not (workdir / 'checkpoints_damaged').exists()
  assert _steps(workdir)[-1] == 8


def test_a_failed_data_read_on_one_process_stops_both(tmp_path, text_corpus, cache_dir):
  """Process 1 cannot read its 3rd batch: it reuses its last one until the next agreement
  point (step 4, a log and save step), where both stop with exit code 1 before saving; the
  checkpoint of step 2 is the newest."""
  workdir = tmp_path / 'run'
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  inject = {'FAIL_WHERE': 'data', 'FAIL_AT_STEP': '3', 'FAIL_PROCESS': '1'}
  codes, outs, seconds = _launch(
    workdir, text_corpus, cache_dir, logs, inject, expect_ok=False, **{'train.num_train_steps': 8}
  )
  _assert_stopped_together(codes, outs, seconds, workdir, 1, [2])
  assert 'Input/output error reading the corpus' in outs[1]
  assert 'process 1 stopped the run' in outs[0] and 'Input/output error' in outs[0]


def test_sigterm_during_compile_of_a_resumed_run_stops_both_before_a_step(
  tmp_path, text_corpus, cache_dir, pair_run
):
  """A resumed two-process run is preempted during set-up: SIGTERM reaches each process just
  after its restore, before its loop has reported any step to JAX's preemption sync manager
  (a preemption signals every host of a slice). Both serve it before the first step or at
  the first step boundary, the same on both, and save there. The sync-point ids count from
  the resumed step (`guards.StopSignals.should_stop`), so a sync point set before any report
  lies ahead of the run. (With JAX 0.12.1 the old absolute ids stop at the same step here,
  planted and seen: its sync point follows the first id reported after the notice. The
  relative ids are right under either placement.)"""
  import signal  # pylint: disable=g-import-not-at-top

  workdir = copy_workdir(pair_run, tmp_path)
  logs = [tmp_path / f'resumed{i}.log' for i in range(2)]
  # Restored, not yet training: nothing reported to the preemption sync manager yet.
  codes, outs = _signal_processes(
    workdir, text_corpus, cache_dir, logs, 'resuming from', signal.SIGTERM, 100000, (0, 1)
  )
  assert codes == [0, 0], (codes, outs[0][-3000:], outs[1][-3000:])
  # Served at the first step boundary (step 5), or before step 4 when the notice was agreed
  # before the first step: the same on both processes, with its checkpoint.
  stopped = []
  for out in outs:
    if 'stopped before step 4 after SIGTERM during set-up' in out:
      stopped.append(4)
    else:
      stopped.append(int(out.split('stopped at step ')[1].split()[0]))
  assert stopped[0] == stopped[1] <= 5, (stopped, outs[1][-3000:])
  assert _steps(workdir)[-1] == stopped[0]


def test_ctrl_c_on_one_process_stops_both_at_the_same_log_step(tmp_path, text_corpus, cache_dir):
  """Ctrl-C reaches process 1 only (a user's terminal on one host): both agree on it at the
  next log step (over the coordination service), save that step and exit 0 together."""
  import signal  # pylint: disable=g-import-not-at-top

  logs = [tmp_path / f'run{i}.log' for i in range(2)]
  workdir = tmp_path / 'run'
  codes, outs = _signal_processes(
    workdir, text_corpus, cache_dir, logs, 'step 4/', signal.SIGINT, 4
  )
  assert codes == [0, 0], (codes, outs[0][-3000:], outs[1][-3000:])
  stopped = [int(out.split('stopped at step ')[1].split()[0]) for out in outs]
  assert stopped[0] == stopped[1] and stopped[0] % 4 == 0, stopped
  assert 'after Ctrl-C' in outs[0] and _steps(workdir) == [stopped[0]]
