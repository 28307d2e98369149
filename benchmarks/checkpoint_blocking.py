r"""How long an asynchronous orbax save blocks the training loop, as a fraction of one step
(issue 13, item 6; target <= 10 %).

  python benchmarks/checkpoint_blocking.py [--preset=small --seq_len=256 --batch=16 --repeats=5]

Builds the preset's real train state (params + optimizer state) and train step on this
machine's devices, times the step (median of --repeats, synthetic batch), then times the part
of `Checkpointer.save` the loop waits for (device-to-host copy and dispatch; the write runs in
a background thread), waiting for each write to finish before the next save (not counted).
"""

import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax

from bench_utils import time_train_step
from launch.configs import roformer
from pretrain import checkpointing

_PRESET = flags.DEFINE_string('preset', 'small', 'RoFormer preset.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'Tokens per row.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Rows per step.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats of the step and of the save.')


def main(argv):
  del argv
  config = roformer.get_config(_PRESET.value)
  config.data.seq_len, config.data.global_batch_size = _SEQ_LEN.value, _BATCH.value
  step, state = time_train_step(config, _REPEATS.value)
  save_times = []
  with tempfile.TemporaryDirectory() as workdir:
    ckpt = checkpointing.Checkpointer(workdir, keep=2)
    for i in range(_REPEATS.value):
      start = time.perf_counter()
      ckpt.save(i + 1, state, None, {'step': i + 1})
      save_times.append(time.perf_counter() - start)
      ckpt.wait()
    ckpt.close()
  save = statistics.median(save_times)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  print(
    f'\nroformer {_PRESET.value} (params + optimizer state {size / 2**20:,.0f} MiB), '
    f'batch {_BATCH.value} x {_SEQ_LEN.value}, {jax.device_count()} '
    f'{jax.devices()[0].platform} device(s)'
  )
  print('| train step (median) | save blocks the loop (median) | fraction of a step | target |')
  print('|---|---|---|---|')
  print(
    f'| {step * 1e3:,.0f} ms | {save * 1e3:,.0f} ms | {save / step:.1%} | <= 10 % '
    f'{"met" if save / step <= 0.10 else "NOT met"} |'
  )


if __name__ == '__main__':
  app.run(main)
