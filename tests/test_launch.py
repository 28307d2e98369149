"""`python -m launch.pretrain` end to end in a subprocess, and its bad-input errors (exit 2)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import cpu_env
from helpers import free_port
from helpers import ROOT
from helpers import run_pretrain
from helpers import run_process_pair
from helpers import tiny_flags
from helpers import two_process_pretrain
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


@pytest.mark.two_process
def test_two_processes_train_and_resume(tmp_path, text_corpus, cache_dir):
  """JAX's multi-controller runtime with two local CPU processes of 2 devices each: both
  finish, process 0 alone writes metrics, and the second launch resumes.

  The processes get a persistent compilation cache that keeps every program: the launcher
  must turn it off, or the resume hangs (process 0 would run the cached train and evaluation
  steps, process 1 fresh compiles of them; helpers.two_process_env). A pair still running
  after the timeout fails with both logs and the stacks of the stuck processes.
  """
  env = two_process_env(compile_cache=tmp_path / 'jax_cache')
  workdir = tmp_path / 'run'

  def launch(steps):
    flags = tiny_flags(
      text_corpus, cache_dir, **{'train.num_train_steps': steps, 'data.text_unit': 'line'}
    )
    cmds = two_process_pretrain(workdir, flags)
    logs = [tmp_path / f'launch{steps}_process{i}.log' for i in range(2)]
    return run_process_pair(cmds, logs, env, timeout=240)

  outs = launch(2)
  assert "mesh {'data': 4" in outs[0]
  outs = launch(4)
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
from pretrain import peak
print('PEAK', peak.measured_matmul_peak())
"""


@pytest.mark.two_process
def test_each_process_measures_its_own_matmul_peak(tmp_path, monkeypatch):
  """MFU's CPU peak, measured by each of two processes into an empty cache, is its own
  device's: process 1 used to time a matmul placed on process 0's device (jax.devices()[0]),
  which ran nothing there, and cached ~1e5x the machine's peak for every later run."""
  from pretrain import peak  # pylint: disable=g-import-not-at-top

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
  own_peak = peak.measured_matmul_peak()
  assert max(peaks) < 5 * own_peak, (peaks, own_peak)
