r"""What the checkpoint checksums cost on save and restore, and what they catch (issue 22,
item 0; docs/design.md 9).

  python benchmarks/checkpoint_integrity.py [--preset=small --repeats=3]

Builds the preset's train state (params + Adam state, after one real train step so that the
optimizer state is not all zeros) on this machine's devices and times, median of --repeats,
each with and without the checks (`Checkpointer(checksums=False)` is orbax alone):

- save, the part the training loop waits for (`Checkpointer.save`: the checksums, the copy to
  host memory, dispatch of the write) and until written (`+ wait`);
- restore (`Checkpointer.restore` onto the same shardings: read, then the verification);
- the checksum reduction alone (`checksums.state_checksums`), and its first call, which
  compiles it (once per run and mesh).

Then writes 20 KB of random bytes over the largest file of a saved checkpoint (size intact,
the issue's damage), in the middle and at --places - 1 other places, one at a time, and
counts what orbax alone and the checked restore make of each: a read error (the zstd decoder
noticed), 'restored' (other numbers, silently) or 'checksum' (caught by the checks).
"""

import collections
import os
import pathlib
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from bench_utils import time_train_step
from launch.configs import roformer
from pretrain import checkpointing
from pretrain import checksums
from pretrain import mesh as mesh_lib
from pretrain import train

_PRESET = flags.DEFINE_string('preset', 'small', 'RoFormer preset.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per row of the one train step.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows of the one train step.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats of each operation.')
_PLACES = flags.DEFINE_integer('places', 8, 'Places in the file the garbage is written at.')


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  return max(files, key=lambda p: p.stat().st_size)


def main(argv):
  del argv
  config = roformer.get_config(_PRESET.value)
  config.data.seq_len, config.data.global_batch_size = _SEQ_LEN.value, _BATCH.value
  _, state = time_train_step(config, 1)
  abstract = train.setup(config, mesh_lib.make_mesh(config.mesh)).abstract_state
  repeats = _REPEATS.value

  start = time.perf_counter()
  jax.block_until_ready(checksums.state_checksums(state))
  first_checksum = time.perf_counter() - start
  checksum = _median_seconds(lambda: checksums.state_checksums(state), repeats)

  rows = {}
  with tempfile.TemporaryDirectory() as root:
    for checks in (False, True):
      ckpt = checkpointing.Checkpointer(os.path.join(root, str(checks)), keep=1, checksums=checks)
      steps = iter(range(1, 1000))
      blocking, total = [], []
      for _ in range(repeats):
        begin = time.perf_counter()
        ckpt.save(next(steps), state, None, {})
        blocking.append(time.perf_counter() - begin)
        ckpt.wait()
        total.append(time.perf_counter() - begin)
      step = ckpt.latest_step()
      restore = _median_seconds(
        lambda c=ckpt, s=step: jax.block_until_ready(c.restore(s, abstract)), repeats
      )
      rows[checks] = (statistics.median(blocking), statistics.median(total), restore)
      ckpt.close()

    # The damage: 20 KB of random bytes written in place into the largest state file
    # (in the middle, then at other places): does orbax alone notice, and do the checksums?
    step_dir = pathlib.Path(root, 'True', 'checkpoints', str(step))
    blob = _largest_state_file(step_dir)
    original = blob.read_bytes()
    size, garbage = len(original), np.random.default_rng(0).bytes(20_000)
    outcomes = []
    for place in range(_PLACES.value):
      offset = (size // 2 + place * size // _PLACES.value) % (size - len(garbage))
      blob.write_bytes(original[:offset] + garbage + original[offset + len(garbage) :])
      outcome = []
      for checks in (False, True):
        ckpt = checkpointing.Checkpointer(
          os.path.join(root, 'True'), read_only=True, checksums=checks
        )
        try:
          ckpt.restore(step, abstract)
          outcome.append('restored')
        except checksums.ChecksumError:
          outcome.append('checksum')
        except Exception:  # pylint: disable=broad-except
          outcome.append('read error')
        finally:
          ckpt.close()
      outcomes.append(tuple(outcome))

  size_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  print(
    f'\nroformer {_PRESET.value}: params + Adam state {size_mib:,.0f} MiB in '
    f'{len(jax.tree.leaves(state))} arrays, {jax.device_count()} {jax.devices()[0].platform} '
    f'device(s) ({jax.devices()[0].device_kind}); median of {repeats}'
  )
  print('| operation | orbax alone | with checksums | ratio |')
  print('|---|---|---|---|')
  names = ('save: the loop waits', 'save: until written', 'restore')
  for i, name in enumerate(names):
    without, with_checks = rows[False][i], rows[True][i]
    print(f'| {name} | {without:.3f} s | {with_checks:.3f} s | {with_checks / without:.2f}x |')
  print(
    f'| checksums alone (one jitted reduction) | | {checksum:.3f} s | first call (compiles): '
    f'{first_checksum:.2f} s |'
  )
  print(
    f'\n20 KB of random bytes written over {blob.name} ({size / 2**20:.1f} MiB) at '
    f'{len(outcomes)} places (the middle first): orbax alone -> with checksums'
  )
  for (alone, checked), count in sorted(collections.Counter(outcomes).items()):
    print(f'  {count} x: {alone} -> {checked}')


if __name__ == '__main__':
  app.run(main)
