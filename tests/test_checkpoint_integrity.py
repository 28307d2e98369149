"""Checkpoint data that is damaged after the save is found on restore, and every command picks
the checkpoint of a run the way pretraining does (docs/design.md 9; issue 22, items 0 and 3).

Orbax stores arrays as zstd-compressed zarr chunks without a checksum, so damage inside a
chunk often decodes into other numbers without an error: the old code resumed from them. The
checksums saved in each checkpoint's metadata catch it; the run falls back to the previous
checkpoint and moves the damaged one aside. Readers of another run (`launch.upscale`,
`launch.export`, `launch.finetune`) skip a damaged newest checkpoint with a one-line warning
and never modify the run.
"""

import os
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import tensorstore as ts

from helpers import run_upscale
from helpers import UPSCALE_TARGET
from helpers import copy_run
from helpers import make_tiny_config
from helpers import orbax_state as _orbax_state
from helpers import state_files as _state_files
from pretrain import checksums
from pretrain import finetune
from pretrain import guards
from pretrain import hf_io
from pretrain import train


@pytest.fixture(scope='module')
def run(text_corpus, cache_dir, tmp_path_factory):
  """(config, workdir) of a 4-step run of the tiny test config with checkpoints 2 and 4."""
  config = make_tiny_config(text_corpus, cache_dir)
  config.train.num_train_steps, config.train.checkpoint_every_steps = 4, 2
  config.train.eval_every_steps, config.train.keep_checkpoints = 4, 3
  workdir = tmp_path_factory.mktemp('run')
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _differs(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _garbage_in_place(workdir):
  """Random bytes written over a file of checkpoint 4's state that is read (size and
  structure intact), where zstd decodes them without an error: 4 KB in the middle of the
  largest file or, from there outwards, at 15 other offsets; where the decoder notices every
  one (the compressed bytes follow the trained numbers, which vary with thread timing), the
  same with 1 KB, 256 and 64 bytes, which fit inside one block's literals more often. The
  issue's 20 KB spans several zstd blocks of this tiny model's files and is mostly caught by
  the decoder (on the `small` preset it often is not: benchmarks/checkpoint_integrity.py)."""
  good, rng = _orbax_state(workdir, 4), np.random.default_rng(0)
  for length in (4096, 1024, 256, 64):
    garbage = rng.bytes(length)
    for blob in _state_files(workdir / 'checkpoints' / '4'):
      original = blob.read_bytes()
      size = len(original)
      for k in range(16 if size > 4 * length else 0):
        offset = size // 2 - length // 2 + (-1) ** k * ((k + 1) // 2) * (size // 40)
        blob.write_bytes(original[:offset] + garbage + original[offset + length :])
        try:
          restored = _orbax_state(workdir, 4)
        except Exception:  # pylint: disable=broad-except
          continue  # the decoder noticed: damage the old code already handled
        if _differs(restored, good):
          return
        break  # the same values: a file the checkpoint no longer references
      blob.write_bytes(original)
  pytest.fail('no placement of the garbage decodes silently')


def _flip_bit(workdir, array: str, bit: int, element: int = 100):
  """Flips one bit of one stored element of `array` (its name in the OCDBT store: a prefix
  match on 'params.layers.mlp.wi.kernel'-style keys), written through TensorStore: a bit that
  flips inside a compressed chunk on disk decodes the same way, and this puts it on a chosen
  element."""
  base = f'file://{workdir}/checkpoints/4/state/'
  keys = [
    k.decode() for k in ts.KvStore.open({'driver': 'ocdbt', 'base': base}).result().list().result()
  ]
  name = next(k.split('/')[0] for k in keys if re.fullmatch(array, k.split('/')[0]))
  driver = 'zarr' if f'{name}/.zarray' in keys else 'zarr3'
  spec = {'driver': driver, 'kvstore': {'driver': 'ocdbt', 'base': base, 'path': f'{name}/'}}
  stored = ts.open(spec, open=True).result()
  values = stored.read().result()
  words = values.reshape(-1).view(np.uint32)
  words[element] ^= np.uint32(1 << bit)
  stored.write(words.view(values.dtype).reshape(values.shape)).result()


DAMAGE = {
  'garbage_in_largest_file': _garbage_in_place,
  # The lowest exponent bit: the weight halves or doubles, finite (training would go on).
  'bit_in_parameter': lambda w: _flip_bit(w, r'params\.layers\.mlp\.wi\.kernel', bit=23),
  # The lowest mantissa bit of Adam's second moment: the smallest change there is.
  'bit_in_optimizer_state': lambda w: _flip_bit(
    w, r'opt_state\..*\.nu\.layers\.mlp\.wi\.kernel', bit=0
  ),
}


# ----------------------------------------------------------------------------- item 0


def test_checksums_do_not_depend_on_the_sharding_and_see_one_bit():
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  rng = np.random.default_rng(0)
  tree = {
    'w': rng.normal(size=(8, 6)).astype(np.float32),
    'b': rng.normal(size=(4, 8)).astype(jnp.bfloat16),
    'mask': rng.random((2, 4)) < 0.5,
    'step': np.int32(7),
  }
  specs = {'w': P('data', 'fsdp'), 'b': P(None, 'tensor'), 'mask': P(), 'step': P()}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
  sums = checksums.state_checksums(sharded)
  assert sums == checksums.state_checksums(tree)  # on one device
  assert set(sums) == {'w', 'b', 'mask', 'step'} and sums['b'].startswith('bfloat16:')
  for bit in (0, 23, 31):
    flipped = dict(tree, w=tree['w'].copy())
    flipped['w'].reshape(-1).view(np.uint32)[13] ^= np.uint32(1 << bit)
    assert checksums.state_checksums(flipped)['w'] != sums['w']
  swapped = dict(tree, w=tree['w'][::-1].copy())  # the same values elsewhere
  assert checksums.state_checksums(swapped)['w'] != sums['w']


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_silent_damage_fails_the_checksum_and_the_run_falls_back(damage, run, tmp_path, warnings):
  config, workdir = copy_run(run, tmp_path)
  good = _orbax_state(workdir, 4)
  DAMAGE[damage](workdir)
  # The damage decodes without an error: orbax alone (the old code) restores other numbers.
  assert _differs(_orbax_state(workdir, 4), good)
  prepared = train.prepare(config, str(workdir))
  prepared.close()
  assert prepared.start_step == 2 and _steps(workdir) == [2]
  assert [p.name.split('-')[0] for p in (workdir / 'checkpoints_damaged').iterdir()] == ['4']
  [line] = [w for w in warnings if 'cannot be restored' in w]
  assert f'{workdir}/checkpoints/4 cannot be restored (its data failed the checksum' in line
  assert 'resuming from step 2' in line


def test_first_steps_all_nonfinite_after_a_resume_name_the_checkpoint_as_suspect(run, tmp_path):
  # A checkpoint whose checksums match a state that is not finite (saved from a run that was
  # already going wrong, or damaged before the checksum): every step after the resume fails.
  config, workdir = copy_run(run, tmp_path)
  prepared = train.prepare(config, str(workdir))
  prepared.state['params']['layers']['mlp']['wi']['kernel'] *= np.float32('nan')
  prepared.ckpt.save(6, prepared.state, prepared.train_iter, prepared.meta)
  prepared.close()
  config.train.num_train_steps, config.train.max_nonfinite_steps = 14, 6
  with pytest.raises(guards.RunStopped) as stopped:
    train.train_and_evaluate(config, str(workdir))
  message = str(stopped.value)
  assert stopped.value.exit_code == guards.EXIT_NONFINITE
  assert f'the first steps after resuming from {workdir}/checkpoints/6;' in message
  assert 'that checkpoint is suspect' in message and 'learning rate' not in message
  assert f'move {workdir}/checkpoints/6 into {workdir}/checkpoints_damaged/' in message
  assert _steps(workdir) == [2, 4, 6]  # nothing was moved or saved


def test_suspect_only_when_the_first_steps_after_a_resume_all_fail():
  metrics = lambda skipped: {
    'loss_sum': np.float32(np.nan if skipped else 5.0),
    'weight_sum': np.float32(1),
    'skipped': np.int32(skipped),
  }
  health = guards.Health(10, resumed_from='w/checkpoints/8')
  health.observe(9, metrics(1))
  health.observe(10, metrics(1))
  with pytest.raises(guards.RunStopped, match='from w/checkpoints/8;.* checkpoint is suspect'):
    health.observe(11, metrics(1))
  # A config changed for the resume is named as the likelier cause.
  change = 'optim.learning_rate: 0.002 -> 0.2'
  health = guards.Health(3, resumed_from='w/checkpoints/8', resume_changes=(change,))
  for step in (9, 10):
    health.observe(step, metrics(1))
  with pytest.raises(guards.RunStopped, match=f'differs .*\\({change}\\): that change is'):
    health.observe(11, metrics(1))
  for resumed_from, first in (('w/checkpoints/8', 0), ('', 1)):
    health = guards.Health(10, resumed_from=resumed_from)
    health.observe(9, metrics(first))
    for step in range(10, 13):
      health.observe(step, metrics(1))  # a streak later on, or after a fresh start: no stop
    assert health.streak == 3 + first


# ----------------------------------------------------------------------------- item 3


def _truncated_newest(run, tmp_path):
  """A copy of the run whose newest checkpoint (4) has its largest state file that is read cut
  in half, and the listing of every path in it (size and modification time)."""
  config, workdir = copy_run(run, tmp_path)
  for blob in _state_files(workdir / 'checkpoints' / '4'):
    original = blob.read_bytes()
    blob.write_bytes(original[: len(original) // 2])
    try:
      _orbax_state(workdir, 4)
    except Exception:  # pylint: disable=broad-except
      return config, workdir, _listing(workdir)
    blob.write_bytes(original)  # a file the checkpoint no longer references
  pytest.fail('no truncated file makes checkpoint 4 fail to restore')


def _listing(root):
  return sorted(
    (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*')
  )


def test_upscale_reads_the_newest_checkpoint_that_restores(run, tmp_path):
  _, workdir, before = _truncated_newest(run, tmp_path)
  grown = tmp_path / 'grown'
  result = run_upscale(workdir, grown, *UPSCALE_TARGET)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'never retrieved' not in result.stderr
  [warning] = [l for l in result.stderr.splitlines() if 'cannot be restored' in l]
  assert f'checkpoint {workdir}/checkpoints/4 cannot be restored (ValueError: OUT_OF_RANGE' in (
    warning
  )
  assert 'reading step 2 instead' in warning
  assert ') from step 2\n' in result.stdout
  assert _listing(workdir) == before


def test_export_reads_the_newest_checkpoint_that_restores_and_refuses_a_damaged_step(
  run, tmp_path, warnings
):
  _, workdir, before = _truncated_newest(run, tmp_path)
  result = hf_io.export_run(str(workdir), str(tmp_path / 'hf'), max_position_embeddings=64)
  assert result.step == 2
  [warning] = warnings
  assert f'checkpoint {workdir}/checkpoints/4 cannot be restored' in warning
  with pytest.raises(train.InputError, match=r'--step=4: checkpoint .*/checkpoints/4 cannot be'):
    hf_io.export_run(str(workdir), str(tmp_path / 'hf4'), step=4)
  assert not os.path.exists(tmp_path / 'hf4')
  assert _listing(workdir) == before


def test_finetune_starts_from_the_newest_checkpoint_that_restores(run, tmp_path, warnings):
  _, workdir, before = _truncated_newest(run, tmp_path)
  start = finetune.resolve_start(str(workdir))
  assert start.step == 2 and start.meta['model_shape']['hidden_size'] == 32
  [warning] = warnings
  assert f'checkpoint {workdir}/checkpoints/4 cannot be restored' in warning
  assert _listing(workdir) == before
