r"""Input pipeline headroom: tokens/s the grain pipeline makes (read, tokenize, pack, mask)
against tokens/s the train step consumes (issue 13, item 3; target >= 20x on one core).

  python benchmarks/input_pipeline.py [--preset=tiny --batches=200 --threads=1,2]

Uses the built-in corpus and the preset's tokenizer (built and cached on first use), the
real `pipeline.make_dataset` with `data.num_threads` from --threads, and the preset's real
train step on a synthetic batch of the same shape.
"""

import time

from absl import app
from absl import flags
import jax

from bench_utils import time_train_step
from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
from launch.configs import roformer

_PRESET = flags.DEFINE_string('preset', 'tiny', 'RoFormer preset.')
_BATCHES = flags.DEFINE_integer('batches', 200, 'Batches drawn from the pipeline (timed).')
_THREADS = flags.DEFINE_list('threads', ['1', '2'], 'data.num_threads values to time.')


def pipeline_tokens_per_sec(config, source, tok, num_batches: int) -> float:
  it = iter(pipeline.make_dataset(source.train, tok, config, text_key=source.text_key))
  next(it)  # start-up (threads, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  elapsed = time.perf_counter() - start
  return num_batches * config.data.global_batch_size * config.data.seq_len / elapsed


def main(argv):
  del argv
  config = roformer.get_config(_PRESET.value)
  source = text_datasets.load_text_source(config.data)
  tok = tokenizer_lib.load_or_train(
    config.data, config.model, source.train, source.text_key, source.fingerprint
  )
  seconds, _ = time_train_step(config)
  consumed = config.data.global_batch_size * config.data.seq_len / seconds
  print(
    f'\nroformer {_PRESET.value}, batch {config.data.global_batch_size} x '
    f'{config.data.seq_len}, {jax.devices()[0].platform}: the train step consumes '
    f'{consumed:,.0f} tokens/s\n'
  )
  print('| data.num_threads | pipeline tokens/s | headroom over the step |')
  print('|---|---|---|')
  for threads in _THREADS.value:
    config.data.num_threads = int(threads)
    made = pipeline_tokens_per_sec(config, source, tok, _BATCHES.value)
    print(f'| {threads} | {made:,.0f} | {made / consumed:.1f}x |', flush=True)


if __name__ == '__main__':
  app.run(main)
