r"""Step time against sequence length for softmax attention (RoFormer), quadratic GAU and
FLASH's mixed-chunk attention at about equal parameters (issue 13, item 5).

  python benchmarks/seq_len_scaling.py [--lengths=512,1024,2048,4096,8192 --tokens=8192]

Each model is its family's `tiny` preset (about 1.9M parameters; FLASH with the preset's chunk
c = 32 unless --chunk_size is set), trained on a synthetic batch of --tokens tokens (batch =
tokens / n), MLM objective; the real train step, median of --repeats after compiling.
Documents: --doc_len=0 (the default) puts one document in each row, the common case at long n
(FLASH's global part then skips its per-document corrections); --doc_len=L packs documents of
L tokens (the general path); --doc_len=-1 gives every token random ids (the synthetic batch of
bench_utils: a new document at nearly every token, the benchmark's figures before issue 25).
Targets: FLASH >= 3x faster than RoFormer at n = 4096; FLASH time per token within 25 % from
n = 1024 to 8192.
"""

from absl import app
from absl import flags

import bench_utils
import numpy as np
from bench_utils import time_train_step
from data_pipelines import objectives
from launch.configs import gau
from launch.configs import roformer
from models import flops as model_flops

_LENGTHS = flags.DEFINE_list('lengths', ['512', '1024', '2048', '4096', '8192'], 'Values of n.')
_TOKENS = flags.DEFINE_integer('tokens', 8192, 'Tokens per step (batch = tokens / n).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed steps per point.')
_CHUNK = flags.DEFINE_integer('chunk_size', 0, "FLASH chunk size c (0: the preset's, 32).")
_DOC_LEN = flags.DEFINE_integer(
  'doc_len', 0, 'Tokens per packed document (0: one per row; -1: random ids per token).'
)
_MODELS = flags.DEFINE_list('models', [], 'Subset of the model names (default: all).')

MODELS = {
  'roformer (softmax)': lambda: roformer.get_config('tiny'),
  'gau (quadratic)': lambda: gau.get_config('tiny'),
  'flash (mixed chunk)': lambda: gau.get_config('flash_tiny'),
}


_synthetic_batch = bench_utils.synthetic_batch


def documents_batch(config, mesh):
  """bench_utils' batch with segment ids and positions of packed documents (--doc_len)."""
  batch = _synthetic_batch(config, mesh)
  if _DOC_LEN.value < 0:
    return batch
  b, n = batch['segment_ids'].shape
  doc_len = _DOC_LEN.value or n
  t = np.arange(n, dtype=np.int32)
  batch['segment_ids'] = np.broadcast_to(t // doc_len + 1, (b, n)).astype(np.int32)
  batch['positions'] = np.broadcast_to(t % doc_len, (b, n)).astype(np.int32)
  return bench_utils.mesh_lib.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)


def main(argv):
  del argv
  bench_utils.synthetic_batch = documents_batch
  lengths = [int(n) for n in _LENGTHS.value]
  models = {k: v for k, v in MODELS.items() if not _MODELS.value or k in _MODELS.value}
  times, flops = {}, {}
  for name, make in models.items():
    for n in lengths:
      config = make()
      config.data.seq_len, config.data.global_batch_size = n, max(_TOKENS.value // n, 1)
      config.mesh.shape = (1, 1, 1)
      if config.model.chunk_size:
        config.model.chunk_size = min(_CHUNK.value or config.model.chunk_size, n)
      predictions = objectives.max_predictions(n, config.data.mask_rate)
      flops[name, n] = model_flops.flops_per_token(config, predictions)
      seconds, _ = time_train_step(config, _REPEATS.value)
      times[name, n] = seconds
      print(f'{name} n={n}: {seconds * 1e3:,.0f} ms/step', flush=True)
  print(f'\n{_TOKENS.value} tokens per step, ms per step (and microseconds per token)\n')
  print('| model | ' + ' | '.join(f'n={n}' for n in lengths) + ' |')
  print('|---|' + '---|' * len(lengths))
  for name in models:
    cells = [
      f'{times[name, n] * 1e3:,.0f} ({times[name, n] / _TOKENS.value * 1e6:.0f})' for n in lengths
    ]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  flash, soft = 'flash (mixed chunk)', 'roformer (softmax)'
  if 4096 in lengths and {flash, soft} <= set(models):
    ratio = times[soft, 4096] / times[flash, 4096]
    print(
      f'\nFLASH vs RoFormer at n=4096: {ratio:.2f}x faster (target >= 3x: '
      f'{"met" if ratio >= 3 else "not met"})'
    )
    # The speed-up FLASH would have at RoFormer's FLOP rate: above it, FLASH runs its (smaller,
    # d-wide) matmuls at a higher rate than RoFormer its n-wide attention ones.
    flop_ratio = flops[soft, 4096] / flops[flash, 4096]
    rates = [flops[k, 4096] * _TOKENS.value / times[k, 4096] / 1e9 for k in (soft, flash)]
    print(
      f'model FLOPs per token at n=4096, RoFormer / FLASH: {flop_ratio:.2f}x; '
      f'GFLOP/s RoFormer {rates[0]:.0f}, FLASH {rates[1]:.0f}'
    )
  if 1024 in lengths and max(lengths) >= 4096 and flash in models:
    spread = times[flash, max(lengths)] / times[flash, 1024] - 1
    print(
      f'FLASH time per token n=1024 -> {max(lengths)}: {spread:+.0%} (target within 25 %: '
      f'{"met" if abs(spread) <= 0.25 else "not met"})'
    )


if __name__ == '__main__':
  app.run(main)
