"""Checkpoint retention for long runs (issue 24, item 4; docs/operations.md 1.1): besides the
newest train.keep_checkpoints, every train.keep_every_steps-th step is kept for good and the
train.keep_best checkpoints with the lowest eval loss, through orbax's preservation policies;
`--step=best` reads the lowest-loss checkpoint; the damaged-checkpoint fallback and the
non-finite guard keep their guarantees."""

import shutil

import pytest

from helpers import run_launcher
from helpers import copy_run
from helpers import make_tiny_config
from helpers import truncate_a_read_state_file
from pretrain import checkpointing
from pretrain import finetune
from pretrain import guards
from pretrain import hf_io
from pretrain import rundir
from pretrain import train

# The eval losses the `run` fixture's evaluations report: the best is the oldest evaluated step.
SCRIPTED_LOSSES = {2: 1.0, 4: 2.0, 6: 3.0}


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def run(text_corpus, cache_dir, tmp_path_factory):
  """(config, workdir) of a 6-step run saving every step, evaluated at 2, 4 and 6 with the
  losses SCRIPTED_LOSSES, keep_checkpoints=1 and keep_best=2."""
  config = make_tiny_config(
    text_corpus,
    cache_dir,
    **{
      'train.checkpoint_every_steps': 1,
      'train.eval_every_steps': 2,
      'train.keep_checkpoints': 1,
      'train.keep_best': 2,
    },
  )
  real_evaluate = train.evaluate

  def scripted(prepared, step):
    result = dict(real_evaluate(prepared, step), loss=SCRIPTED_LOSSES[step])
    prepared.evals[-1]['loss'] = result['loss']
    return result

  workdir = tmp_path_factory.mktemp('run')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, 'evaluate', scripted)
    train.train_and_evaluate(config, str(workdir))
  return config, workdir


def test_keep_every_steps_keeps_multiples_besides_the_newest(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(
    text_corpus,
    cache_dir,
    **{
      'train.num_train_steps': 10,
      'train.checkpoint_every_steps': 1,
      'train.eval_every_steps': 0,
      'train.keep_checkpoints': 2,
      'train.keep_every_steps': 4,
    },
  )
  train.train_and_evaluate(config, str(tmp_path))
  assert _steps(tmp_path) == [4, 8, 9, 10]


def _eval_losses(workdir) -> dict:
  """The eval losses orbax recorded with the checkpoints of `workdir`, by step."""
  ckpt = checkpointing.Checkpointer(str(workdir), read_only=True)
  try:
    return ckpt.eval_losses()
  finally:
    ckpt.close()


def test_keep_best_keeps_the_lowest_eval_losses(run):
  _, workdir = run
  # Newest (6) by keep_checkpoints, 2 and 4 (the two lowest losses) by keep_best; 1, 3 and 5
  # were not evaluated: no metric, kept by no rule.
  assert _steps(workdir) == [2, 4, 6]
  assert _eval_losses(workdir) == SCRIPTED_LOSSES


def test_step_best_reads_the_lowest_eval_loss(run, tmp_path):
  _, workdir = run
  result = hf_io.export_run(str(workdir), str(tmp_path / 'hf'), 'best', max_position_embeddings=64)
  assert result.step == 2
  start = finetune.resolve_start(str(workdir), step='best')
  assert start.step == 2
  assert rundir.parse_step('best') == 'best' and rundir.parse_step('7') == 7
  assert rundir.parse_step(None) is None
  with pytest.raises(train.InputError, match=r"--step=x: give a checkpoint step .* or 'best'"):
    rundir.parse_step('x')


def test_launch_export_takes_step_best(run, tmp_path):
  _, workdir = run
  out = tmp_path / 'hf'
  result = run_launcher(
    'launch.export',
    f'--from_workdir={workdir}',
    f'--out={out}',
    '--step=best',
    '--max_position_embeddings=64',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'checkpoint step 2.' in (out / 'README.md').read_text()


def test_step_best_without_eval_losses_names_the_flag(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(text_corpus, cache_dir, **{'train.num_train_steps': 3})
  config.train.eval_every_steps = 0  # evaluated at 3 only; checkpoint 3 gets its loss
  train.train_and_evaluate(config, str(tmp_path))
  assert rundir.read_checkpoint(str(tmp_path), rundir.read_params, 'best')[0] == 3
  # A run whose checkpoints recorded no eval loss (e.g. written before it was recorded).
  shutil.rmtree(tmp_path / 'checkpoints' / '3' / 'metrics')
  with pytest.raises(train.InputError, match=r'--step=best: no checkpoint of .* eval loss'):
    rundir.read_checkpoint(str(tmp_path), rundir.read_params, 'best')


def test_damaged_best_falls_back_to_the_next_best(run, tmp_path, warnings):
  _, workdir = copy_run(run, tmp_path)
  truncate_a_read_state_file(workdir, 2)
  step, _, _ = rundir.read_checkpoint(str(workdir), rundir.read_params, 'best')
  assert step == 4
  [warning] = [w for w in warnings if 'cannot be restored' in w]
  assert f'checkpoint {workdir}/checkpoints/2 cannot be restored' in warning
  assert 'reading step 4 instead' in warning
  assert _steps(workdir) == [2, 4, 6]  # only read


def test_damaged_newest_falls_back_and_keeps_the_best(run, tmp_path, warnings):
  config, workdir = copy_run(run, tmp_path)
  truncate_a_read_state_file(workdir, 6)
  prepared = train.prepare(config, str(workdir))
  prepared.close()
  assert prepared.start_step == 4 and _steps(workdir) == [2, 4]
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()] == ['6']


def test_nonfinite_steps_save_nothing_and_rotate_nothing_out(run, tmp_path):
  config, workdir = copy_run(run, tmp_path)
  # Resumed with a learning rate that overflows float32: every update is non-finite; saves
  # and evaluations are due at every step, none may rotate out the kept checkpoints.
  config.optim.learning_rate, config.optim.warmup_steps = 1e38, 0
  config.train.num_train_steps, config.train.max_nonfinite_steps = 20, 3
  config.train.eval_every_steps = 1
  with pytest.raises(guards.RunStopped, match='3 consecutive steps had a non-finite') as e:
    train.train_and_evaluate(config, str(workdir))
  assert e.value.exit_code == 3
  assert _steps(workdir) == [2, 4, 6]
  assert _eval_losses(workdir) == SCRIPTED_LOSSES


@pytest.mark.parametrize('field', ['keep_every_steps', 'keep_best'])
def test_negative_retention_is_refused(field, text_corpus, cache_dir):
  config = make_tiny_config(text_corpus, cache_dir, **{f'train.{field}': -1})
  with pytest.raises(ValueError, match=rf'--config.train.{field}=-1 must be >= 0'):
    train.validate_train(config.train)
