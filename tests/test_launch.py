"""`python -m launch.pretrain` end to end in a subprocess, and its bad-input errors (exit 2)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from helpers import cpu_env
from helpers import free_port
from helpers import ROOT
from helpers import run_pretrain
from helpers import tiny_flags
from helpers import two_process_env


@pytest.fixture(scope='module')
def trained_workdir(text_corpus, cache_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  result = run_pretrain(workdir, tiny_flags(text_corpus, cache_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_pretrain_writes_checkpoints_metrics_and_events(trained_workdir):
  workdir, result = trained_workdir
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert {'data', 'meta', 'state'} <= set(os.listdir(workdir / 'checkpoints' / '4'))
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [l for l in lines if l['split'] == 'train']
  assert [l['step'] for l in train_lines] == [2, 4]
  assert {'loss', 'accuracy', 'learning_rate', 'tokens_per_sec', 'mfu'} <= set(train_lines[0])
  assert [l['step'] for l in lines if l['split'] == 'eval'] == [4]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['hidden_size'] == 32
  meta = json.loads((workdir / 'checkpoints' / '4' / 'meta' / 'metadata').read_text())
  assert meta['model_shape']['hidden_size'] == 32 and len(meta['tokenizer']['sha256']) == 64
  log = result.stderr
  assert 'resolved config' in log and 'tokens/s' in log and 'ETA' in log and 'eval step 4' in log


def test_second_run_resumes(trained_workdir, text_corpus, cache_dir):
  workdir, _ = trained_workdir
  result = run_pretrain(workdir, tiny_flags(text_corpus, cache_dir, **{'train.num_train_steps': 6}))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from' in result.stderr and 'training steps 4 -> 6' in result.stderr
  steps = [
    json.loads(l)['step']
    for l in (workdir / 'metrics.jsonl').read_text().splitlines()
    if json.loads(l)['split'] == 'train'
  ]
  assert steps == [2, 4, 6]


def _without_config(log: str) -> str:
  """A launch.pretrain log without the resolved-config dump (its lines after 'resolved config:'
  up to the next absl log line)."""
  lines, in_config = [], False
  for line in log.splitlines():
    if 'resolved config:' in line:
      in_config = True
    elif in_config and line[:1] in 'IWEF' and line[1:5].isdigit():
      in_config = False
    if not in_config:
      lines.append(line)
  return '\n'.join(lines)


def _expect_input_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in result.stderr, result.stderr[-3000:]


def test_glob_matching_nothing(tmp_path, cache_dir, text_corpus):
  flags = tiny_flags(text_corpus, cache_dir, **{'data.text_files': f'{tmp_path}/none/*.txt'})
  _expect_input_error(
    run_pretrain(tmp_path / 'w', flags), 'matches no files', '--config.data.text_files'
  )


def test_corpus_without_usable_text(tmp_path, cache_dir, text_corpus):
  (tmp_path / 'empty.txt').write_text('')
  (tmp_path / 'blob.txt').write_bytes(b'\x00\xff' * 100)
  flags = tiny_flags(text_corpus, cache_dir, **{'data.text_files': f'{tmp_path}/*.txt'})
  _expect_input_error(run_pretrain(tmp_path / 'w', flags), 'no usable text')


def test_unknown_config_field(tmp_path, cache_dir, text_corpus):
  flags = tiny_flags(text_corpus, cache_dir) + ['--config.model.hiden_size=64']
  _expect_input_error(run_pretrain(tmp_path / 'w', flags), 'hiden_size')


def test_hidden_size_not_divisible_by_heads(tmp_path, cache_dir, text_corpus):
  flags = tiny_flags(text_corpus, cache_dir, **{'model.hidden_size': 30, 'model.num_heads': 4})
  _expect_input_error(run_pretrain(tmp_path / 'w', flags), 'num_heads=4', 'hidden_size=30')
  assert not (tmp_path / 'w' / 'checkpoints').exists() or not os.listdir(
    tmp_path / 'w' / 'checkpoints'
  )


def test_global_batch_not_dividing_devices(tmp_path, cache_dir, text_corpus):
  flags = tiny_flags(text_corpus, cache_dir, **{'data.global_batch_size': 6})
  _expect_input_error(
    run_pretrain(tmp_path / 'w', flags, devices=4), 'global_batch_size=6', 'multiple of 4'
  )


def test_workdir_with_other_model_shape(trained_workdir, text_corpus, cache_dir):
  workdir, _ = trained_workdir
  before = sorted(os.listdir(workdir / 'checkpoints'))
  flags = tiny_flags(text_corpus, cache_dir, **{'model.hidden_size': 64})
  _expect_input_error(
    run_pretrain(workdir, flags), 'different model', 'hidden_size: checkpoint 32 vs config 64'
  )
  assert sorted(os.listdir(workdir / 'checkpoints')) == before  # nothing touched


class _PairStuck(Exception):
  """Two-process launch that hung or died by a signal; the message has both logs and stacks."""


def _wait_for_pair(procs, logs, timeout: float):
  """Waits for both processes. Raises _PairStuck when one is still running after `timeout`
  seconds, or 30 s after the other died by a signal (a peer that is gone leaves the other
  waiting in a collective); the message has each log and, via SIGUSR1 (launch.pretrain's
  faulthandler), the stacks of the ones still running."""
  start, died_at = time.time(), None
  while any(p.poll() is None for p in procs):
    now = time.time()
    if died_at is None and any(p.returncode is not None and p.returncode < 0 for p in procs):
      died_at = now
    if now - start > timeout or (died_at is not None and now - died_at > 30):
      codes = [p.poll() for p in procs]
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGUSR1)
      time.sleep(3)
      for p in procs:
        p.kill()
        p.wait()
      raise _PairStuck(
        f'exit codes {codes} (None: still running) after {now - start:.0f} s; '
        'logs without the config dump, stacks at the end:\n'
        + '\n'.join(
          f'--- process {i}\n' + _without_config(log.read_text()) for i, log in enumerate(logs)
        )
      )
    time.sleep(0.5)


@pytest.mark.slow
def test_two_processes_train_and_resume(tmp_path, text_corpus, cache_dir):
  """JAX's multi-controller runtime with two local CPU processes of 2 devices each: both
  finish, process 0 alone writes metrics, and the second launch resumes.

  Slow: the CPU collectives (gloo) standing in for a TPU interconnect sometimes hang inside
  XLA's all-reduce (see helpers.two_process_env). A pair that hangs or dies by a signal is
  retried once in a fresh workdir, with the first attempt's logs and stacks shown as a
  warning; a second hang, or any wrong result, fails.
  """
  env = two_process_env()

  def launch(workdir, port, steps):
    # Output goes to files, not pipes: a pipe read only after the other process finishes
    # could fill (64 KiB) and block its writer, deadlocking the pair in a collective.
    logs = [workdir.parent / f'{workdir.name}_launch{steps}_process{i}.log' for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
      with open(log, 'w') as f:
        procs.append(
          subprocess.Popen(
            [
              sys.executable,
              '-m',
              'launch.pretrain',
              '--config=launch/configs/roformer.py:tiny',
              f'--workdir={workdir}',
              f'--coordinator_address=localhost:{port}',
              '--num_processes=2',
              f'--process_id={i}',
              *tiny_flags(
                text_corpus, cache_dir, **{'train.num_train_steps': steps, 'data.text_unit': 'line'}
              ),
            ],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
          )
        )
    _wait_for_pair(procs, logs, timeout=180)
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-3000:]
    return outs

  for attempt in range(2):
    workdir = tmp_path / f'run{attempt}'
    port = free_port()
    try:
      outs = launch(workdir, port, 2)
      assert "mesh {'data': 4" in outs[0]
      outs = launch(workdir, port, 4)
      break
    except _PairStuck as e:
      if attempt:
        raise
      warnings.warn(f'two-process launch stuck, retrying once: {e}', stacklevel=2)
  assert all('resuming from' in out for out in outs)
  steps = [
    json.loads(l)['step']
    for l in (workdir / 'metrics.jsonl').read_text().splitlines()
    if json.loads(l)['split'] == 'train'
  ]
  assert steps == [2, 4]  # one writer: process 0


_PEAK_SCRIPT = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from pretrain import metrics
print('PEAK', metrics.measured_matmul_peak())
"""


def test_each_process_measures_its_own_matmul_peak(tmp_path, monkeypatch):
  """MFU's CPU peak, measured by each of two processes into an empty cache, is its own
  device's: process 1 used to time a matmul placed on process 0's device (jax.devices()[0]),
  which ran nothing there, and cached ~1e5x the machine's peak for every later run."""
  from pretrain import metrics  # pylint: disable=g-import-not-at-top

  port = free_port()
  caches = [tmp_path / f'cache_process{i}' for i in range(2)]
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _PEAK_SCRIPT, f'localhost:{port}', str(i)],
      cwd=ROOT,
      env=cpu_env(XDG_CACHE_HOME=str(caches[i])),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  peaks = [float(out.split('PEAK ')[1].split()[0]) for out in outs]
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'own_cache'))
  own_peak = metrics.measured_matmul_peak()
  assert max(peaks) < 5 * own_peak, (peaks, own_peak)
