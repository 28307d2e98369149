r"""Will it fit? Compiles the train step for TPU slices ahead of time, on any machine:
`python -m launch.aot --config=launch/configs/roformer.py:base --topology=v5e-8,v5e-32`.

Needs libtpu (`pip install -e '.[tpu]'`), no TPU. For each topology prints the mesh, the bytes
per device (arguments = sharded params + optimizer state + batch; temporaries; generated code)
against the device's HBM (a device is a chip; on v4 libtpu describes one per TensorCore, half
a chip's HBM each), FITS or DOES NOT FIT with the excess, FLOPs per step (XLA's count,
which sees a scanned layer loop once, and the analytic model count), and the MFU a target
throughput (--tokens_per_sec) would take. Any config field can be overridden as in
launch.pretrain (e.g. --config.mesh.shape='(1,-1,1)' for FSDP, --config.model.remat_policy=full).

Exit codes: 0 every topology compiled (fitting or not), 2 bad input or no libtpu.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch.cli import FLAG_ERRORS, fail, flag_error_message

try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config', 'launch/configs/roformer.py:base', 'Config file and preset.', lock_config=True
  )
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))
_TOPOLOGY = flags.DEFINE_list('topology', ['v5e-8'], 'Accelerator types, e.g. v4-8,v5e-32.')
_TOKENS_PER_SEC = flags.DEFINE_float(
  'tokens_per_sec', 0.0, 'Target throughput of the slice; prints the MFU it takes.'
)

GIB = 2.0**30


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}.')
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  aot.quiet_libtpu(_TOPOLOGY.value[0])
  print(
    '| topology | chips (devices) | mesh (data, fsdp, tensor) | arguments / device | '
    'temporaries / device | code | total vs HBM | fits | XLA FLOPs / device | '
    'model FLOPs / device | MFU needed |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for topology in _TOPOLOGY.value:
    try:
      r = aot.compile_train_step(_CONFIG.value, topology)
    except aot.DoesNotFit as e:
      print(
        f'| {topology} | {aot.chips(topology)} | | | | | | DOES NOT FIT (compiler: {e}) | | | |',
        flush=True,
      )
      continue
    except (ValueError, RuntimeError) as e:
      fail(str(e))
    verdict = 'FITS' if r.fits else f'DOES NOT FIT (+{(r.total_bytes - r.hbm_bytes) / GIB:.2f} GiB)'
    needed = (
      f'{r.mfu_needed(_TOKENS_PER_SEC.value):.1%}'
      if _TOKENS_PER_SEC.value and r.peak_flops_per_chip
      else '-'
    )
    mesh = tuple(r.mesh.values())
    print(
      f'| {topology} | {r.chips} ({r.devices}) | {mesh} | {r.argument_bytes / GIB:.2f} GiB | '
      f'{r.temp_bytes / GIB:.2f} GiB | {r.code_bytes / GIB:.3f} GiB | '
      f'{r.total_bytes / GIB:.2f} / {r.hbm_bytes / GIB:.2f} GiB | {verdict} | '
      f'{r.compiled_flops:.3g} | {r.model_flops / r.devices:.3g} | {needed} |',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
