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
_THREADS = flags.DEFINE_list(
  'threads', ['1', '2'], 'data.num_threads values to time (each with and without prefetch).'
)
_NEED_PRESETS = flags.DEFINE_list(
  'need_presets', ['tiny', 'small', 'base', 'large'], 'Presets of the per-host need table.'
)
_TARGET_MFU = flags.DEFINE_float('target_mfu', 0.5, 'MFU the per-host need table assumes.')

# Chips one host of a multi-host slice drives (Cloud TPU system architecture pages, cited in
# pretrain/aot.py CHIPS): 4 on v4, v5e, v5p and v6e slices of more than one host.
CHIPS_PER_HOST = {'v4': 4, 'v5e': 4, 'v5p': 4, 'v6e': 4}


def needed_tokens_per_sec_per_host(config, chip: str, target_mfu: float) -> float:
  """Tokens/s one host must feed so that its chips run at `target_mfu`: target_mfu x the
  chips' bf16 peak FLOP/s / training FLOPs per token (models.flops)."""
  import models  # pylint: disable=g-import-not-at-top
  from data_pipelines import objectives  # pylint: disable=g-import-not-at-top
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  predictions = objectives.max_predictions(config.data.seq_len, config.data.mask_rate)
  per_token = models.flops_per_token(config, predictions)
  return target_mfu * aot.CHIPS[chip].peak_flops * CHIPS_PER_HOST[chip] / per_token


def need_table(per_core: dict[str, float], target_mfu: float) -> str:
  """Markdown: for each preset, the tokens/s one host needs at `target_mfu` on each chip, and
  how many cores of the pipeline (at the measured single-thread rate) that takes."""
  chips = list(CHIPS_PER_HOST)
  lines = [
    '| preset | seq_len | pipeline tokens/s per core | '
    + ' | '.join(f'{c}: needed per host (cores)' for c in chips)
    + ' |',
    '|---|---|---|' + '---|' * len(chips),
  ]
  for preset, rate in per_core.items():
    config = roformer.get_config(preset)
    cells = []
    for chip in chips:
      need = needed_tokens_per_sec_per_host(config, chip, target_mfu)
      cells.append(f'{need:,.0f} ({need / rate:.1f})')
    lines.append(f'| {preset} | {config.data.seq_len} | {rate:,.0f} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def pipeline_tokens_per_sec(config, source, tok, num_batches: int) -> float:
  it = iter(pipeline.make_dataset(source.train, tok, config, text_key=source.text_key))
  next(it)  # start-up (threads, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  return num_batches * config.data.global_batch_size * config.data.seq_len / elapsed


def loop_thread_ms_per_batch(config, source, tok, step_seconds: float, num_batches: int) -> float:
  """Median ms the consuming thread spends in next() when it takes a batch every
  `step_seconds` (a sleep standing in for the train step): with data.prefetch_batches > 0 the
  batch is ready and next() only takes it; with 0 next() packs, batches and masks."""
  it = iter(pipeline.make_dataset(source.train, tok, config, text_key=source.text_key))
  next(it)
  waits = []
  for _ in range(num_batches):
    time.sleep(step_seconds)
    start = time.perf_counter()
    next(it)
    waits.append(time.perf_counter() - start)
  it.close()
  return 1e3 * sorted(waits)[len(waits) // 2]


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
  print(
    '| data.num_threads | data.prefetch_batches | pipeline tokens/s | headroom over the step | '
    'loop thread ms per batch (step %.0f ms) |' % (1e3 * seconds)
  )
  print('|---|---|---|---|---|')
  for threads in _THREADS.value:
    for prefetch in (0, 4):
      config.data.num_threads, config.data.prefetch_batches = int(threads), prefetch
      made = pipeline_tokens_per_sec(config, source, tok, _BATCHES.value)
      waited = loop_thread_ms_per_batch(config, source, tok, seconds, 20)
      print(
        f'| {threads} | {prefetch} | {made:,.0f} | {made / consumed:.1f}x | {waited:.2f} |',
        flush=True,
      )
  # What a TPU host needs: each preset's pipeline rate on one core (reads, packing, batching
  # and masking all on one thread; its own seq_len, batch and tokenizer) against the tokens/s
  # its chips take at the target MFU.
  per_core = {}
  for preset in _NEED_PRESETS.value:
    c = roformer.get_config(preset)
    c.data.num_threads, c.data.prefetch_batches = 0, 0
    src = text_datasets.load_text_source(c.data)
    t = tokenizer_lib.load_or_train(c.data, c.model, src.train, src.text_key, src.fingerprint)
    per_core[preset] = pipeline_tokens_per_sec(c, src, t, _BATCHES.value)
  print(f'\nper host at {_TARGET_MFU.value:.0%} MFU ({CHIPS_PER_HOST} chips per host):')
  print(need_table(per_core, _TARGET_MFU.value))


if __name__ == '__main__':
  app.run(main)
