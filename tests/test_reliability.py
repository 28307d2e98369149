"""A run survives what a pod does to it (docs/design.md 9): non-finite steps, damaged
checkpoints, a second process, changed data, a failed save, signals, a one-file corpus."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from data_pipelines import text_datasets
from helpers import cpu_env
from helpers import make_tiny_config
from helpers import packed_batch
from helpers import ROOT
from helpers import tiny_flags
from helpers import two_process_env
from helpers import two_process_pretrain
from pretrain import guards
from pretrain import mesh as mesh_lib
from pretrain import train


def _state(workdir, step=None):
  mngr = ocp.CheckpointManager(str(pathlib.Path(workdir) / 'checkpoints'))
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return jax.device_get(restored['state'])


def _steps(workdir):
  root = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _metric_steps(workdir, split='train'):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(l)['step'] for l in lines if json.loads(l)['split'] == split]


# ----------------------------------------------------------------------------- non-finite


def test_nonfinite_update_leaves_params_and_optimizer_state_unchanged(text_corpus, cache_dir):
  config = make_tiny_config(text_corpus, cache_dir, **{'optim.warmup_steps': 0})
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  s = train.setup(config, mesh)
  state = jax.device_get(train.init_state(config, s))
  batch = packed_batch(config)
  key = jax.random.key(0)
  nan_tx = optax.chain(s.tx, optax.scale(float('nan')))
  bad_state = dict(state, opt_state=nan_tx.init(state['params']))
  out, m = jax.jit(train.make_train_step(s.graphdef, nan_tx, config))(bad_state, batch, key)
  assert int(m['skipped']) == 1 and int(out['step']) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out['params']), state['params'])
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(out['opt_state']), bad_state['opt_state']
  )
  # The same step with a finite optimizer updates (the guard is not always on).
  out, m = jax.jit(train.make_train_step(s.graphdef, s.tx, config))(state, batch, key)
  assert int(m['skipped']) == 0
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), jax.device_get(out['params']), state['params']
  )
  assert all(jax.tree.leaves(changed))


def test_nonfinite_run_stops_and_keeps_the_last_good_checkpoints(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(text_corpus, cache_dir)
  config.train.num_train_steps, config.train.checkpoint_every_steps = 4, 2
  train.train_and_evaluate(config, str(tmp_path))
  good = _state(tmp_path, 4)
  # Resumed with a learning rate that overflows float32: every update is non-finite.
  config.optim.learning_rate, config.optim.warmup_steps = 1e38, 0
  config.train.num_train_steps, config.train.max_nonfinite_steps = 40, 3
  config.train.checkpoint_every_steps = 1  # a save is due at every step: none may happen
  with pytest.raises(guards.RunStopped, match='3 consecutive steps had a non-finite') as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert e.value.exit_code == 3
  assert _steps(tmp_path) == [2, 4]
  jax.tree.map(np.testing.assert_array_equal, _state(tmp_path, 4), good)


def test_health_counts_streaks_and_reports_divergence(monkeypatch):
  warnings = []
  monkeypatch.setattr(guards.logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  health = guards.Health(max_nonfinite_steps=3)
  metrics = lambda loss, skipped=0: {
    'loss_sum': np.float32(loss * 10),
    'weight_sum': np.float32(10),
    'skipped': np.int32(skipped),
  }
  for step in range(1, 31):
    health.observe(step, metrics(5.0))
  health.observe(30, metrics(50.0))  # a step is counted once
  assert not warnings
  health.observe(31, metrics(12.0))
  assert 'step 31: loss 12 is 2.4x its running level 5' in warnings[-1]
  health.observe(32, metrics(float('nan'), skipped=1))
  health.observe(33, metrics(float('nan'), skipped=1))
  assert health.streak == 2 and not health.healthy
  health.observe(34, metrics(5.0))
  assert health.healthy and health.skipped_total == 2
  for step in (35, 36):
    health.observe(step, metrics(float('inf'), skipped=1))
  with pytest.raises(guards.RunStopped, match='stopped at step 37: 3 consecutive'):
    health.observe(37, metrics(float('inf'), skipped=1))


# ----------------------------------------------------------------------------- checkpoints


def _largest_blob(step_dir):
  blobs = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(blobs, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  blob = _largest_blob(step_dir)
  blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])


def _garbage(step_dir):
  blob = _largest_blob(step_dir)
  blob.write_bytes(np.random.default_rng(0).bytes(blob.stat().st_size))


CORRUPTIONS = {
  'truncated_blob': _truncate,
  'garbage_blob': _garbage,
  'deleted_blob': lambda d: _largest_blob(d).unlink(),
  'deleted_METADATA': lambda d: (d / 'state' / '_METADATA').unlink(),
  'deleted_manifest': lambda d: (d / 'state' / 'manifest.ocdbt').unlink(),
  'garbage_iterator_json': lambda d: (d / 'data' / 'process_0-of-1.json').write_text('{x'),
  'deleted_meta': lambda d: shutil.rmtree(d / 'meta'),
}


@pytest.fixture(scope='module')
def full_run(text_corpus, cache_dir, tmp_path_factory):
  """(config, workdir) of an uninterrupted 6-step run with checkpoints 2, 4, 6."""
  config = make_tiny_config(text_corpus, cache_dir)
  config.model.dropout_rate = 0.1
  config.train.num_train_steps, config.train.checkpoint_every_steps = 6, 2
  config.train.keep_checkpoints = 3
  workdir = tmp_path_factory.mktemp('full')
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def _stopped_at_4(full_run, tmp_path):
  """A copy of the full run as if it had stopped at step 4 (checkpoints 2 and 4)."""
  config, full = full_run
  workdir = tmp_path / 'run'
  shutil.copytree(full, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '6')
  return config, workdir


@pytest.mark.parametrize('damage', [k for k in CORRUPTIONS if k != 'truncated_blob'])
def test_damaged_newest_checkpoint_is_moved_aside(damage, full_run, tmp_path):
  config, workdir = _stopped_at_4(full_run, tmp_path)
  CORRUPTIONS[damage](workdir / 'checkpoints' / '4')
  run = train.prepare(config, str(workdir))
  run.close()
  assert run.start_step == 2
  assert _steps(workdir) == [2]
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()] == ['4']


def test_resume_after_damage_is_bit_identical_and_history_is_honest(full_run, tmp_path):
  config, workdir = _stopped_at_4(full_run, tmp_path)
  CORRUPTIONS['truncated_blob'](workdir / 'checkpoints' / '4')
  train.train_and_evaluate(config, str(workdir))
  jax.tree.map(np.testing.assert_array_equal, _state(workdir, 6), _state(full_run[1], 6))
  # Lines past step 2 of the damaged history moved out; each step is logged once.
  steps = _metric_steps(workdir)
  assert steps == sorted(set(steps)) == _metric_steps(full_run[1])
  dropped = (workdir / 'metrics.dropped.jsonl').read_text().splitlines()
  assert dropped and all(json.loads(l)['step'] > 2 for l in dropped)


def test_emptied_checkpoints_start_over_with_history_moved_out(full_run, tmp_path):
  config, workdir = _stopped_at_4(full_run, tmp_path)
  shutil.rmtree(workdir / 'checkpoints')
  config = config.copy_and_resolve_references()
  config.train.num_train_steps = 2
  train.train_and_evaluate(config, str(workdir))
  assert _metric_steps(workdir) == [2]
  assert len((workdir / 'metrics.dropped.jsonl').read_text().splitlines()) >= 3


def test_no_restorable_checkpoint_is_an_input_error_that_moves_nothing(full_run, tmp_path):
  config, workdir = _stopped_at_4(full_run, tmp_path)
  for step in (2, 4):
    CORRUPTIONS['deleted_METADATA'](workdir / 'checkpoints' / str(step))
  with pytest.raises(train.InputError, match=r'no checkpoint in .* can be restored'):
    train.prepare(config, str(workdir))
  assert _steps(workdir) == [2, 4]


def test_failed_save_stops_the_run_and_keeps_earlier_checkpoints(
  text_corpus, cache_dir, tmp_path, monkeypatch
):
  config = make_tiny_config(text_corpus, cache_dir)
  config.train.num_train_steps, config.train.checkpoint_every_steps = 6, 2
  original = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, 'No space left on device', str(self.directory / '4'))
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  with pytest.raises(guards.RunStopped, match=r'checkpoints/4 failed: \[Errno 28\] No space') as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert e.value.exit_code == 4 and '\n' not in str(e.value)
  assert _steps(tmp_path) == [2]
  assert max(_metric_steps(tmp_path)) == 4  # stopped at the failed save, trained no further
  _state(tmp_path, 2)  # restorable


# ----------------------------------------------------------------------------- workdir, data


def test_second_run_on_a_locked_workdir_is_refused(text_corpus, cache_dir, tmp_path):
  holder = guards.WorkdirLock(str(tmp_path)).acquire()
  try:
    config = make_tiny_config(text_corpus, cache_dir)
    with pytest.raises(train.InputError, match=rf'in use by PID {os.getpid()} on host'):
      train.train_and_evaluate(config, str(tmp_path))
  finally:
    holder.release()
  assert not (tmp_path / 'checkpoints').exists()


def test_workdir_that_is_a_file_is_refused(text_corpus, cache_dir, tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('x')
  with pytest.raises(train.InputError, match='is a file, not a directory'):
    train.train_and_evaluate(make_tiny_config(text_corpus, cache_dir), str(path))


def test_changed_corpus_is_refused_unless_allowed(tiny_data, cache_dir, tmp_path):
  _, _, tok = tiny_data
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(4):
    (corpus / f'{i}.txt').write_text((ROOT / 'README.md').read_text()[i * 3000 : (i + 1) * 3000])
  config = make_tiny_config(corpus, cache_dir, **{'data.tokenizer_model': tok.path})
  config.train.num_train_steps, config.train.checkpoint_every_steps = 2, 2
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  # The same bytes copied again (new modification times, as on a new VM) are the same data.
  for path in corpus.iterdir():
    path.write_bytes(path.read_bytes())
    os.utime(path, (1e9, 1e9))
  config.train.num_train_steps = 3
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(corpus / '0.txt', 'a') as f:
    f.write('300 more lines\n' * 300)
  config.train.num_train_steps = 4
  with pytest.raises(train.InputError, match='allow_changed_data=true'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  config.data.allow_changed_data = True
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert _steps(tmp_path / 'run')[-1] == 4


def test_corpus_of_blank_files_is_refused(cache_dir, tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'blank.txt').write_text('\n\n  \n')
  with pytest.raises(train.InputError, match='hold only blank text'):
    train.train_and_evaluate(make_tiny_config(corpus, cache_dir), str(tmp_path / 'run'))


def test_one_file_corpus_trains_and_evaluates(cache_dir, tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'input.txt').write_text((ROOT / 'README.md').read_text())
  config = make_tiny_config(corpus, cache_dir)
  config.train.num_train_steps = 2
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(result['loss'])
  (corpus / 'input.txt').write_text('too short\n')
  with pytest.raises(
    train.InputError, match='too small to hold out a validation part. Give at least 400 characters'
  ):
    train.train_and_evaluate(config, str(tmp_path / 'run2'))


@pytest.mark.parametrize(
  'text', ['line one\n' * 100, 'x' * 1000, 'a\n' + 'b' * 999, 'y' * 1000 + '\n' * 600]
)
def test_single_document_split_keeps_all_text_in_two_nonblank_parts(text):
  head, tail = text_datasets.split_single_document(text, 0.02, 'doc')
  assert head + tail == text.rstrip() and head.strip() and tail.strip()
  assert len(tail) >= text_datasets.MIN_SINGLE_DOCUMENT_CHARS // 8


@pytest.mark.parametrize(
  'overrides, message',
  [
    (
      {'model.vocab_size': 10},
      r'vocab_size=10 is too small for this corpus: the tokenizer '
      r'needs at least \d+ pieces',
    ),
    (
      {'data.text_files': '', 'data.tfds_name': 'imbd_reviews'},
      r"tfds_name='imbd_reviews' is not a TFDS dataset .* Close names: imdb_reviews",
    ),
    ({'data.validation_fraction': 0.0}, r'validation_fraction=0\.0 must be in \(0, 1\)'),
    ({'train.max_nonfinite_steps': 0}, r'max_nonfinite_steps=0 must be >= 1'),
  ],
)
def test_bad_input_is_one_paragraph_naming_the_field(
  overrides, message, text_corpus, cache_dir, tmp_path
):
  config = make_tiny_config(text_corpus, cache_dir, **overrides)
  with pytest.raises(train.InputError, match=message) as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert '\n' not in str(e.value) and 'Traceback' not in str(e.value)


# ----------------------------------------------------------------------------- signals


def test_ctrl_c_saves_once_and_the_host_stays_one_step_ahead(
  text_corpus, cache_dir, tmp_path, monkeypatch
):
  config = make_tiny_config(text_corpus, cache_dir)
  config.train.num_train_steps, config.train.log_every_steps = 50, 1000
  config.train.eval_every_steps = config.train.checkpoint_every_steps = 1000
  compiled, outputs = train.jit_train_step, []

  def watched(run_setup, cfg):
    step_fn = compiled(run_setup, cfg)

    def step(*args):
      # Dispatching step t, step t - 2 must have finished on the device.
      assert all(x.is_ready() for x in jax.tree.leaves(outputs[-2:-1])), (
        'the host ran more than one step ahead of the device'
      )
      if len(outputs) == 3:
        os.kill(os.getpid(), signal.SIGINT)  # while step 4 is dispatched
      state, step_metrics = step_fn(*args)
      outputs.append(step_metrics)
      return state, step_metrics

    return step

  monkeypatch.setattr(train, 'jit_train_step', watched)
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
  train.train_and_evaluate(config, str(tmp_path))
  assert _steps(tmp_path) == [4] and len(outputs) == 4
  assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


def test_sigterm_during_set_up_stops_before_the_first_step(
  text_corpus, cache_dir, tmp_path, monkeypatch
):
  config = make_tiny_config(text_corpus, cache_dir)
  real_setup = train.setup

  def setup_then_preempted(*args, **kwargs):
    result = real_setup(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # as if preempted while restoring or compiling
    return result

  monkeypatch.setattr(train, 'setup', setup_then_preempted)
  assert train.train_and_evaluate(config, str(tmp_path)) == {}
  # Served before any step: nothing trained, nothing new saved, no evaluation.
  assert _steps(tmp_path) == [] and _metric_steps(tmp_path) == []
  assert _metric_steps(tmp_path, 'eval') == []


def test_a_stop_request_is_agreed_before_the_evaluation_of_its_step(
  text_corpus, cache_dir, tmp_path, monkeypatch
):
  config = make_tiny_config(text_corpus, cache_dir)  # evaluates every 3 steps
  config.train.checkpoint_every_steps = 1000
  compiled, calls = train.jit_train_step, []

  def watched(run_setup, cfg):
    step_fn = compiled(run_setup, cfg)

    def step(*args):
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # while step 3, an evaluation step, runs
      return step_fn(*args)

    return step

  monkeypatch.setattr(train, 'jit_train_step', watched)
  train.train_and_evaluate(config, str(tmp_path))
  # The grace period goes to the save: step 3 is saved and not evaluated.
  assert _steps(tmp_path) == [3] and _metric_steps(tmp_path, 'eval') == []


def _child(workdir, corpus, cache_dir, **overrides):
  flags = tiny_flags(
    corpus,
    cache_dir,
    **{
      'train.num_train_steps': 100000,
      'train.log_every_steps': 100000,
      'train.eval_every_steps': 100000,
      'train.checkpoint_every_steps': 100000,
      **overrides,
    },
  )
  env = cpu_env()
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'launch.pretrain',
      '--config=launch/configs/roformer.py:tiny',
      f'--workdir={workdir}',
      *flags,
    ],
    cwd=ROOT,
    env=env,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_first_step(proc) -> str:
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if 'first step' in line:
      return ''.join(seen)
  raise AssertionError(''.join(seen))


def test_sigterm_saves_within_two_steps_and_a_second_ctrl_c_exits_at_once(
  text_corpus, cache_dir, tmp_path
):
  term = _child(tmp_path / 'term', text_corpus, cache_dir)
  double = _child(tmp_path / 'int', text_corpus, cache_dir)
  _wait_for_first_step(term)
  _wait_for_first_step(double)
  time.sleep(2)
  term.send_signal(signal.SIGTERM)
  double.send_signal(signal.SIGINT)
  time.sleep(0.05)
  double.send_signal(signal.SIGINT)
  term_err, double_err = term.communicate(timeout=120)[1], double.communicate(timeout=120)[1]
  assert double.returncode == 130, double_err[-2000:]
  assert 'second Ctrl-C' in double_err
  assert term.returncode == 0, term_err[-2000:]
  requested = int(term_err.split('SIGTERM at step ')[1].split()[0].rstrip(':'))
  saved = _steps(tmp_path / 'term')
  assert len(saved) == 1 and requested <= saved[0] <= requested + 2, (requested, saved)


@pytest.mark.two_process
def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(
  text_corpus, cache_dir, tmp_path
):
  """JAX's preemption sync point: the signalled process and the other save the same step."""
  flags = tiny_flags(
    text_corpus,
    cache_dir,
    **{
      'train.num_train_steps': 100000,
      'train.log_every_steps': 100000,
      'train.eval_every_steps': 100000,
      'train.checkpoint_every_steps': 100000,
      'data.text_unit': 'line',
    },
  )
  env = two_process_env()
  procs = [
    subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    for cmd in two_process_pretrain(tmp_path, flags)
  ]
  _wait_for_first_step(procs[1])
  time.sleep(2)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[1][-2000:]
  stopped = [int(e.split('stopped at step ')[1].split()[0]) for e in errs]
  assert stopped[0] == stopped[1] and _steps(tmp_path) == [stopped[0]]
