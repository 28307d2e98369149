r"""Will it fit? Compiles the train step for TPU slices ahead of time, on any machine:
`python -m launch.aot --config=launch/configs/roformer.py:base --topology=v5e-8,v5e-32`.

Several slices joined by the data-centre network are written `2xv5e-16` (multi-slice: 'data'
is split across the slices first, so the data axis must be a multiple of the slice count).

Needs libtpu (`pip install -e '.[tpu]'`), no TPU. For each topology prints the mesh, the bytes
per device (arguments = sharded params + optimizer state + batch; temporaries; generated code)
against the device's HBM (a device is a chip; on v4 libtpu describes one per TensorCore, half
a chip's HBM each), FITS or DOES NOT FIT with the excess, FLOPs per step (XLA's count,
which sees a scanned layer loop once, and the analytic model count), and the MFU a target
throughput (--tokens_per_sec) would take. Any config field can be overridden as in
launch.pretrain (e.g. --config.mesh.shape='(1,-1,1)' for FSDP, --config.model.remat_policy=full).

--roofline adds a second table: the step's FLOPs and HBM bytes per device with every layer
counted (XLA's cost analysis counts the scanned layer loop once; two more compiles of the step
unrolled at 1 and 2 layers give the exact per-layer cost, pretrain/aot.py
`layer_corrected_cost`), its arithmetic intensity against each chip's ridge point, the roofline
bound on step time and MFU from the Cloud TPU datasheet figures (`aot.CHIPS`), compute- or
memory-bound, and for a memory-bound step what would change it. --roofline_chips=v4,v5e,v5p,v6e
also bounds the same per-device cost on other chips (an estimate: their compilers may differ).

Exit codes: 0 every topology compiled (fitting or not), 2 bad input or no libtpu.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch.cli import FLAG_ERRORS, fail, flag_error_message, parse_flags

try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config', 'launch/configs/roformer.py:base', 'Config file and preset.', lock_config=True
  )
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))
_TOPOLOGY = flags.DEFINE_list(
  'topology', ['v5e-8'], 'Accelerator types, e.g. v4-8,v5e-32; 2xv5e-16 for two slices.'
)
_TOKENS_PER_SEC = flags.DEFINE_float(
  'tokens_per_sec', 0.0, 'Target throughput of the slice; prints the MFU it takes.'
)
_ROOFLINE = flags.DEFINE_bool(
  'roofline', False, 'Also print the roofline: intensity, bound step time and MFU per chip.'
)
_ROOFLINE_CHIPS = flags.DEFINE_list(
  'roofline_chips', [], 'Chips to bound the step on (v4,v5e,v5p,v6e); default its own chip.'
)

GIB = 2.0**30


def print_roofline(config, reports) -> None:
  """The roofline table of the compiled reports (aot.roofline per topology and chip)."""
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  print()
  print(
    '| topology | chip | FLOPs / step / device | bytes / step / device | intensity (FLOPs/B) | '
    'ridge point | bound step time | bound MFU | bound by | lever |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in reports:
    for chip in _ROOFLINE_CHIPS.value or [r.chip]:
      # Per chip (a v4 compile has 2 devices per chip, one per TensorCore): another chip's
      # figures bound the work of one chip of this compile.
      n = r.devices_per_chip
      cost = aot.StepCost(r.cost.flops * n, r.cost.bytes_accessed * n)
      bound = aot.roofline(cost, chip, r.model_flops / r.chips)
      print(
        f'| {r.topology} | {chip} | {r.cost.flops:.3g} | {r.cost.bytes_accessed:.3g} | '
        f'{bound.intensity:.0f} | {bound.ridge_point:.0f} | {bound.bound_s * 1e3:.3g} ms | '
        f'{bound.mfu:.1%} | {"memory" if bound.memory_bound else "compute"} | '
        f'{aot.lever(bound, config, r.devices) or "-"} |',
        flush=True,
      )


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}.')
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  try:
    for topology in _TOPOLOGY.value:
      aot.topology_name(topology)  # every name checked before any compile
    aot.quiet_libtpu(_TOPOLOGY.value[0])
  except ValueError as e:
    fail(str(e))
  if _TOKENS_PER_SEC.value < 0:
    fail(
      f"--tokens_per_sec={_TOKENS_PER_SEC.value}: give the slice's target throughput in "
      f'tokens per second (> 0), or leave it out (0: no MFU column).'
    )
  for chip in _ROOFLINE_CHIPS.value:
    if chip not in aot.CHIPS:
      fail(f'--roofline_chips: unknown chip {chip!r}; use one of {",".join(aot.CHIPS)}.')
  roofline = _ROOFLINE.value or bool(_ROOFLINE_CHIPS.value)
  print(
    '| topology | chips (devices) | mesh (data, fsdp, tensor) | arguments / device | '
    'temporaries / device | code | total vs HBM | fits | XLA FLOPs / device | '
    'model FLOPs / device | MFU needed |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  reports = []
  for topology in _TOPOLOGY.value:
    try:
      r = aot.compile_train_step(_CONFIG.value, topology, roofline=roofline)
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
    reports.append(r)
  if roofline and reports:
    print_roofline(_CONFIG.value, reports)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
