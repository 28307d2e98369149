r"""XLA attention vs the splash kernel: per-device memory of the train step as n grows
(issue 25, item 1; docs/tpu_fit.md, "Long sequences").

  pip install -e '.[tpu]'   # libtpu; no TPU needed
  python benchmarks/splash_aot.py [--topology=v5e-8] [--preset=roformer:base]
      [--seq_lens=2048,8192,32768] [--impls=xla,splash] [--search] [--out=splash_aot.jsonl]

Compiles the real train step (`pretrain.aot.compile_train_step`, as `python -m launch.aot`)
ahead of time for the TPU slice with model.attention_impl = xla and = splash at each sequence
length, with the global batch = one row per device (the least a data-parallel step can
take), and prints arguments, temporaries and total per device against HBM, side by side.
With --search it then doubles n past the last length that fits, per implementation, until a
compile does not fit (or --max_seq_len), to find the longest power-of-two length each fits.
Each compile is appended to --out as one JSON line; lines already there are reused, so an
interrupted run resumes.
"""

import importlib
import json
import os
import re
import time

from absl import app
from absl import flags

from pretrain import aot

_TOPOLOGY = flags.DEFINE_string('topology', 'v5e-8', 'Accelerator type, e.g. v5e-8.')
_PRESET = flags.DEFINE_string('preset', 'roformer:base', 'config module:preset.')
_SEQ_LENS = flags.DEFINE_list('seq_lens', ['2048', '8192', '32768'], 'Sequence lengths n.')
_IMPLS = flags.DEFINE_list('impls', ['xla', 'splash'], 'model.attention_impl values.')
_SEARCH = flags.DEFINE_bool('search', False, 'Double n past the longest that fits.')
_MAX_SEQ_LEN = flags.DEFINE_integer('max_seq_len', 1 << 20, 'Upper bound of --search.')
_OUT = flags.DEFINE_string('out', 'splash_aot.jsonl', 'Results, one JSON line per compile.')

GIB = 2.0**30


def make_config(preset: str, impl: str, seq_len: int, rows: int):
  """The preset with attention_impl, seq_len and a global batch of `rows` rows."""
  module, name = preset.split(':')
  config = importlib.import_module(f'launch.configs.{module}').get_config(name)
  config.model.attention_impl = impl
  config.data.seq_len, config.data.global_batch_size = seq_len, rows
  return config


def compile_one(preset: str, topology: str, impl: str, seq_len: int) -> dict:
  """One ahead-of-time compile -> a JSON-able record (bytes per device, seconds)."""
  rows = aot.chips(topology)
  config = make_config(preset, impl, seq_len, rows)
  record = dict(preset=preset, topology=topology, impl=impl, seq_len=seq_len, batch=rows)
  start = time.time()
  try:
    r = aot.compile_train_step(config, topology)
  except aot.DoesNotFit as e:
    record.update(fits=False, compiler=str(e)[:300])
  else:
    record.update(
      fits=r.fits,
      argument_bytes=r.argument_bytes,
      temp_bytes=r.temp_bytes,
      code_bytes=r.code_bytes,
      total_bytes=r.total_bytes,
      hbm_bytes=r.hbm_bytes,
      mesh=list(r.mesh.values()),
    )
  record['compile_s'] = round(time.time() - start, 1)
  return record


def gib(record: dict, key: str) -> str:
  return f'{record[key] / GIB:.2f}' if key in record else '-'


def row(record: dict) -> str:
  temps = gib(record, 'temp_bytes')
  if 'total_bytes' not in record:
    verdict = 'DOES NOT FIT (compiler stopped: out of HBM)'
    # The TPU compiler's message names what the temporaries would have needed, e.g.
    # "the total memory required for HLO temporaries (80.59G) exceeds available HBM".
    found = re.search(r'temporaries \(([\d.]+)G\)', record.get('compiler', ''))
    temps = f'{found.group(1)} (compiler)' if found else '-'
  else:
    verdict = 'FITS' if record['fits'] else 'DOES NOT FIT'
  return (
    f'| {record["seq_len"]} | {record["impl"]} | {gib(record, "argument_bytes")} | '
    f'{temps} | {gib(record, "total_bytes")} | {verdict} | {record["compile_s"]} |'
  )


def main(argv):
  del argv
  aot.quiet_libtpu(_TOPOLOGY.value)
  done = {}
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      for line in f:
        r = json.loads(line)
        done[(r['preset'], r['topology'], r['impl'], r['seq_len'])] = r

  def get(impl: str, n: int) -> dict:
    key = (_PRESET.value, _TOPOLOGY.value, impl, n)
    if key not in done:
      done[key] = compile_one(*key)
      with open(_OUT.value, 'a') as f:
        f.write(json.dumps(done[key]) + '\n')
    print(row(done[key]), flush=True)
    return done[key]

  print(f'{_PRESET.value} on {_TOPOLOGY.value}, one row per device (GiB per device)')
  print('| n | attention | arguments | temporaries | total | fits | compile s |')
  print('|---|---|---|---|---|---|---|')
  seq_lens = [int(n) for n in _SEQ_LENS.value]
  results = {impl: [get(impl, n) for n in seq_lens] for impl in _IMPLS.value}
  if not _SEARCH.value:
    return
  for impl, records in results.items():
    fitting = [r['seq_len'] for r in records if r['fits']]
    if not fitting:
      continue
    n = max(fitting) * 2
    while n <= _MAX_SEQ_LEN.value and n not in seq_lens and get(impl, n)['fits']:
      n *= 2
    longest = max(
      r['seq_len']
      for (p, t, i, _), r in done.items()
      if (p, t, i) == (_PRESET.value, _TOPOLOGY.value, impl) and r['fits']
    )
    print(f'longest power-of-two n that fits with {impl}: {longest}')


if __name__ == '__main__':
  app.run(main)
