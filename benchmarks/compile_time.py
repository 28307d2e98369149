r"""Compile time of the train step vs depth: scanning over layers keeps it flat.

  python benchmarks/compile_time.py [--layers=12,128] [--preset=deepnet:deep]

Lowers and compiles the jitted train step (no data needed) for the preset at each depth, with
scan_layers on and off, and prints the seconds side by side with the ratio to the shallowest.
"""

import importlib
import time


from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp

from data_pipelines import objectives
from pretrain import mesh as mesh_lib
from pretrain import train

_LAYERS = flags.DEFINE_string('layers', '12,128', 'Comma-separated depths.')
_PRESET = flags.DEFINE_string('preset', 'deepnet:deep', 'launch/configs file:preset.')
_UNSCANNED_MAX = flags.DEFINE_integer(
  'unscanned_max_layers', 24, 'Also compile without scan up to this depth.'
)


def compile_seconds(config) -> float:
  mesh = mesh_lib.make_mesh(config.mesh)
  s = train.setup(config, mesh)
  b, n = config.data.global_batch_size, config.data.seq_len
  p = objectives.max_predictions(n, config.data.mask_rate)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  batch = {
    'inputs': i32(b, n),
    'segment_ids': i32(b, n),
    'positions': i32(b, n),
    'mlm_positions': i32(b, p),
    'mlm_targets': i32(b, p),
    'mlm_weights': jax.ShapeDtypeStruct((b, p), jnp.float32),
  }
  step = train.jit_train_step(s, config)
  start = time.time()
  step.lower(s.abstract_state, batch, jax.random.key(0)).compile()
  return time.time() - start


def main(argv):
  del argv
  module, preset = _PRESET.value.split(':')
  make = importlib.import_module(f'launch.configs.{module}').get_config
  rows = []
  for layers in map(int, _LAYERS.value.split(',')):
    for scan in (True, False):
      if not scan and layers > _UNSCANNED_MAX.value:
        continue
      config = make(preset)
      config.model.num_layers, config.model.scan_layers = layers, scan
      # The loop itself (model.scan_unroll=0 would drop it on CPU up to 12 layers).
      config.model.scan_unroll = 1
      rows.append((layers, scan, compile_seconds(config)))
  base = rows[0][2]
  print(f'\ncompile time of the train step, {_PRESET.value} ({jax.devices()[0].device_kind})')
  print('| layers | scan_layers | compile s | ratio to first row |\n|---|---|---|---|')
  for layers, scan, sec in rows:
    print(f'| {layers} | {scan} | {sec:.1f} | {sec / base:.2f}x |')


if __name__ == '__main__':
  app.run(main)
