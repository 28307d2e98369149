"""`python -m launch.upscale` on a checkpoint written by `launch.pretrain` (docs/algorithms.md 4.8
UP-5):
the grown model's held-out MLM loss equals the small one's, `launch.pretrain` continues from
the grown step 0, and bad input exits with code 2 without writing anything."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import cpu_env
from helpers import ROOT
from helpers import run_pretrain
from helpers import run_upscale
from helpers import UPSCALE_TARGET as TARGET
from helpers import tiny_flags

TRAIN = [
  '--config.train.num_train_steps=2',
  '--config.train.log_every_steps=1',
  '--config.train.eval_every_steps=2',
  '--config.train.checkpoint_every_steps=2',
  '--config.train.eval_steps=1',
]


def _env():
  return cpu_env()


@pytest.fixture(scope='module')
def small_run(text_corpus, cache_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('small')
  result = run_pretrain(
    workdir,
    tiny_flags(text_corpus, cache_dir, **{'train.num_train_steps': 2, 'train.eval_every_steps': 2}),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_upscale_is_lossless_and_pretrain_continues(small_run, tmp_path):
  workdir = tmp_path / 'grown'
  result = run_upscale(
    small_run,
    workdir,
    *TARGET,
    *TRAIN,
    '--config.upscale.symmetry_breaking=zero_out',
    '--config.upscale.optimizer_state=map',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  m = re.search(
    r'max \|logit difference\| (\S+); MLM loss small (\S+) vs grown (\S+); '
    r'accuracy (\S+) vs (\S+)',
    out,
  )
  assert m, out
  diff, loss_small, loss_grown, acc_small, acc_grown = map(float, m.groups())
  assert diff < 1e-4 and abs(loss_small - loss_grown) < 1e-5 and acc_small == acc_grown, out
  assert 'exact: up to O(eps)' in out and 'model.norm_eps=5e-13' in out
  meta = json.loads((workdir / 'checkpoints' / '0' / 'meta' / 'metadata').read_text())
  assert meta['model_shape']['hidden_size'] == 64 and meta['model_shape']['num_layers'] == 3
  assert meta['config']['model']['norm_eps'] == 5e-13
  entry = meta['lineage'][-1]
  assert entry['grown_from'] == str(small_run) and entry['step'] == 2
  assert entry['upscale']['options']['symmetry_breaking'] == 'zero_out'
  assert entry['upscale']['new_layers'] == [2]

  # The printed command continues training from the grown step 0.
  command = out.split('continue training with:')[1].strip()
  args = shlex.split(command)
  assert args[:3] == ['python', '-m', 'launch.pretrain'], command
  cont = subprocess.run(
    [sys.executable, *args[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
  )
  assert cont.returncode == 0, cont.stderr[-3000:]
  assert 'resuming from' in cont.stderr and 'training steps 0 -> 2' in cont.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0', '2']
  meta = json.loads((workdir / 'checkpoints' / '2' / 'meta' / 'metadata').read_text())
  assert meta['lineage'][-1]['grown_from'] == str(small_run)


def test_bad_input_exits_2_and_writes_nothing(small_run, tmp_path):
  bad = run_upscale(small_run, tmp_path / 'w1', '--config.model.hidden_size=48', *TRAIN)
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert 'Traceback' not in bad.stderr
  assert 'hidden_size 32 -> 48 is not a growth by an integer factor' in bad.stderr
  assert not (tmp_path / 'w1').exists()
  missing = run_upscale(tmp_path / 'nothing', tmp_path / 'w2', *TARGET)
  assert missing.returncode == 2 and 'Traceback' not in missing.stderr
  assert 'has no checkpoints/' in missing.stderr
  assert not (tmp_path / 'w2').exists()
