r"""Will every preset fit? The ahead-of-time TPU compile (`pretrain/aot.py`) for every preset of
every family on several TPU slices, and the first setting that fits (issue 13, items 9, 11).

  pip install -e '.[tpu]'   # libtpu; no TPU needed
  python benchmarks/aot_table.py [--topologies=v4-8,v5e-8,v5p-8,v6e-8,v5e-32]
      [--configs=roformer,roformer_v2,gau,deepnet] [--out=aot_table.jsonl]

For each (preset, topology) it compiles the preset as it is; if that does not fit one chip's
HBM it tries, in order, FSDP over every chip (mesh (1, -1, 1)), then full rematerialisation,
then half the batch per step with twice the gradient accumulation (same tokens per update),
until it fits or the batch is one row per chip. Each result is appended to --out as one JSON
line (an interrupted run resumes where it stopped) and the markdown table is printed from
that file at the end.

With --roofline (issue 25, item 4) the setting that fits is also costed with every layer
counted (`aot.layer_corrected_cost`: two more compiles, 1 and 2 layers unrolled) and bounded
on every TPU generation's datasheet peak and HBM bandwidth (`aot.CHIPS`): a second table gives
per preset the step's FLOPs and bytes per device, its arithmetic intensity, the bound step
time and MFU on each chip, and for a memory-bound step the config's levers (`aot.lever`):

  python benchmarks/aot_table.py --topologies=v5e-8 --roofline --out=roofline.jsonl
"""

import dataclasses
import importlib
import json
import os
import time

from absl import app
from absl import flags

from pretrain import aot

_TOPOLOGIES = flags.DEFINE_list(
  'topologies', ['v4-8', 'v5e-8', 'v5p-8', 'v6e-8', 'v5e-32'], 'Accelerator types.'
)
_CONFIGS = flags.DEFINE_list(
  'configs', ['roformer', 'roformer_v2', 'gau', 'deepnet'], 'Config modules under launch/configs.'
)
_PRESETS = flags.DEFINE_list('presets', [], 'Only these presets (default: all of each module).')
_OUT = flags.DEFINE_string('out', 'aot_table.jsonl', 'Results, one JSON line per compile.')
_ROOFLINE = flags.DEFINE_bool(
  'roofline', False, 'Also cost the fitting setting per layer and bound it on every TPU chip.'
)

GIB = 2.0**30


def presets_of(module_name: str) -> tuple[str, ...]:
  module = importlib.import_module(f'launch.configs.{module_name}')
  if hasattr(module, 'PRESETS'):
    return module.PRESETS
  return importlib.import_module('launch.configs.roformer').PRESETS


def attempts(config, chips: int):
  """(description, config) to try in order: as is, FSDP, + full remat, then halved batches."""
  yield 'preset as is', config
  config = config.copy_and_resolve_references()
  changes = []
  if tuple(config.mesh.shape) != (1, -1, 1):
    config.mesh.shape = (1, -1, 1)
    changes.append('FSDP')
    yield ' + '.join(changes), config
  if config.model.remat_policy != 'full':
    config = config.copy_and_resolve_references()
    config.model.remat_policy = 'full'
    changes.append('full remat')
    yield ' + '.join(changes), config
  while config.data.global_batch_size // 2 >= chips:
    config = config.copy_and_resolve_references()
    config.data.global_batch_size //= 2
    config.optim.accumulation_steps = max(config.optim.accumulation_steps, 1) * 2
    yield (
      ' + '.join(
        changes
        + [
          f'batch {config.data.global_batch_size} x {config.optim.accumulation_steps} accumulation'
        ]
      ),
      config,
    )


def roofline_of(config, topology: str, model_flops: float) -> dict:
  """The layer-corrected cost of `config`'s step compiled for `topology`, per device, and its
  roofline bound on one chip of each generation in aot.CHIPS: {'flops', 'bytes_accessed',
  'intensity', 'chips': {chip: {'bound_ms', 'mfu', 'memory_bound', 'lever'}}}."""
  devices = aot.topology_devices(topology)
  cost = aot.layer_corrected_cost(config, devices)
  # Bounded per chip (a v4 compile has 2 devices per chip): one chip's share of the step.
  per_chip = max(len(devices) // aot.chips(topology), 1)
  chip_cost = aot.StepCost(cost.flops * per_chip, cost.bytes_accessed * per_chip)
  chips = {}
  for name in aot.CHIPS:
    bound = aot.roofline(chip_cost, name, model_flops / aot.chips(topology))
    chips[name] = {
      'bound_ms': bound.bound_s * 1e3,
      'mfu': bound.mfu,
      'memory_bound': bound.memory_bound,
      'lever': aot.lever(bound, config, len(devices)),
    }
  return {
    'flops': cost.flops,
    'bytes_accessed': cost.bytes_accessed,
    'intensity': cost.intensity,
    'chips': chips,
  }


def run_one(module_name: str, preset: str, topology: str, roofline: bool = False) -> dict:
  config = importlib.import_module(f'launch.configs.{module_name}').get_config(preset)
  row = {'config': module_name, 'preset': preset, 'topology': topology}
  start = time.time()
  for description, candidate in attempts(config, aot.chips(topology)):
    try:
      r = aot.compile_train_step(candidate, topology)
    except ValueError as e:  # e.g. a batch that does not split over this many chips
      row.update(setting=description, error=str(e).splitlines()[0])
      continue
    except aot.DoesNotFit as e:  # the compiler's own out-of-HBM verdict: try the next setting
      row.update(setting=description, fits=False, error=f'compiler: {e}')
      continue
    row.update(
      dataclasses.asdict(r),
      setting=description,
      fits=r.fits,
      total_bytes=r.total_bytes,
      remat=candidate.model.remat_policy,
      dtype=candidate.model.dtype,
      global_batch_size=candidate.data.global_batch_size,
      accumulation_steps=candidate.optim.accumulation_steps,
    )
    row.pop('error', None)
    if r.fits:
      if roofline:
        row['roofline'] = roofline_of(candidate, topology, r.model_flops)
      break
  row['compile_seconds'] = round(time.time() - start, 1)
  return row


def table(rows: list[dict]) -> str:
  lines = [
    '| config:preset | topology | fits with | mesh (data, fsdp, tensor) | remat | '
    'batch x accumulation | arguments / device | temporaries / device | total / HBM |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    if 'mesh' not in r:
      what = 'DOES NOT FIT (last try: ' if r.get('fits') is False else 'error: '
      lines.append(
        f'| {r["config"]}:{r["preset"]} | {r["topology"]} | {what}{r["setting"]}: '
        f'{r["error"]}) | | | | | | |'
      )
      continue
    verdict = r['setting'] if r['fits'] else f'DOES NOT FIT ({r["setting"]})'
    lines.append(
      f'| {r["config"]}:{r["preset"]} | {r["topology"]} | {verdict} | '
      f'{tuple(r["mesh"].values())} | {r["remat"]} | {r["global_batch_size"]} x '
      f'{r["accumulation_steps"]} | {r["argument_bytes"] / GIB:.2f} GiB | '
      f'{r["temp_bytes"] / GIB:.2f} GiB | {r["total_bytes"] / GIB:.1f} / '
      f'{r["hbm_bytes"] / GIB:.0f} GiB |'
    )
  return '\n'.join(lines)


def _sci(x: float) -> str:
  """3 significant digits, exponent without '+' or leading zeros: 3.65e9."""
  return f'{x:.3g}'.replace('e+0', 'e').replace('e+', 'e')


def roofline_table(rows: list[dict]) -> str:
  """Markdown: per costed row, FLOPs and bytes per device, intensity, and per chip the bound
  step time, the MFU it allows and whether memory bounds it; then the levers."""
  rows = [r for r in rows if 'roofline' in r]
  chips = list(aot.CHIPS)
  lines = [
    '| config:preset | compiled for | FLOPs / step / device | bytes / step / device | intensity '
    '(FLOPs/B) | '
    + ' | '.join(f'{c} (ridge {aot.CHIPS[c].ridge_point:.0f})' for c in chips)
    + ' | lever where memory-bound |',
    '|---|---|---|---|---|' + '---|' * len(chips) + '---|',
  ]
  for r in rows:
    rf = r['roofline']
    cells = []
    for c in chips:
      b = rf['chips'][c]
      by = 'memory' if b['memory_bound'] else 'compute'
      ms = b['bound_ms']
      bound = f'{ms:,.0f} ms' if ms >= 100 else f'{ms:.3g} ms'
      cells.append(f'{bound}, {b["mfu"]:.1%}, {by}')
    levers = {b['lever'] for b in rf['chips'].values() if b['lever']}
    lines.append(
      f'| {r["config"]}:{r["preset"]} | {r["topology"]} ({r["setting"]}) | '
      f'{_sci(rf["flops"])} | {_sci(rf["bytes_accessed"])} | {rf["intensity"]:.0f} | '
      + ' | '.join(cells)
      + f' | {"; ".join(sorted(levers)) or "-"} |'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  aot.quiet_libtpu(_TOPOLOGIES.value[0])
  rows = {}  # the last line of each (config, preset, topology) wins
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          rows[r['config'], r['preset'], r['topology']] = r
  # With --roofline a fitting row compiled without it is compiled again.
  done = [r for r in rows.values() if not _ROOFLINE.value or 'roofline' in r or not r.get('fits')]
  seen = {(r['config'], r['preset'], r['topology']) for r in done}
  for module_name in _CONFIGS.value:
    for preset in presets_of(module_name):
      if _PRESETS.value and preset not in _PRESETS.value:
        continue
      for topology in _TOPOLOGIES.value:
        if (module_name, preset, topology) in seen:
          continue
        row = run_one(module_name, preset, topology, _ROOFLINE.value)
        print(
          f'{module_name}:{preset} {topology}: {row.get("setting")} '
          f'fits={row.get("fits")} ({row["compile_seconds"]} s)',
          flush=True,
        )
        with open(_OUT.value, 'a') as f:
          f.write(json.dumps(row) + '\n')
        done.append(row)
  print()
  print(table(done))
  if _ROOFLINE.value:
    print()
    print(roofline_table(done))


if __name__ == '__main__':
  app.run(main)
