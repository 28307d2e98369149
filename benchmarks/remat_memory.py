r"""Peak memory of the compiled train step per rematerialisation policy (issue 13, item 4).

  python benchmarks/remat_memory.py [--preset=base --seq_len=512 --batch=8 --topology=v5e:1x1]

Compiles the real train step (`train.jit_train_step`, one device, abstract arguments: nothing
is allocated) for `model.remat_policy` in none / dots_with_no_batch_dims / full and prints
`compiled.memory_analysis()`: arguments (params + optimizer state + batch), temporaries
(activations kept for the backward pass, and scratch), and their ratio to `none`. Also the
size of the logits the MLM gather avoids: [b, n, V] float32 for every position vs [b, P, V]
at the masked positions only.
"""

from absl import app
from absl import flags
import jax

from data_pipelines import objectives
from launch.configs import roformer
from pretrain import aot
from pretrain import mesh as mesh_lib
from pretrain import train

_PRESET = flags.DEFINE_string('preset', 'base', 'RoFormer preset (shapes).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 512, 'Tokens per row n.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows per step.')
_LAYERS = flags.DEFINE_integer('num_layers', 12, 'Layers.')
_TOPOLOGY = flags.DEFINE_string(
  'topology',
  '',
  'Compile for one chip of this TPU topology (e.g. v5e:1x1; needs libtpu) instead of this machine.',
)

POLICIES = ('none', 'dots_with_no_batch_dims', 'full')
MIB = 2.0**20


def compile_memory(policy: str):
  config = roformer.get_config(_PRESET.value)
  config.data.seq_len, config.data.global_batch_size = _SEQ_LEN.value, _BATCH.value
  config.model.num_layers, config.model.remat_policy = _LAYERS.value, policy
  config.mesh.shape = (1, 1, 1)
  if _TOPOLOGY.value:
    r = aot.compile_train_step(config, _TOPOLOGY.value)
    return config, r.argument_bytes, r.temp_bytes
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  run_setup = train.setup(config, mesh)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  lowered = train.jit_train_step(run_setup, config).lower(
    run_setup.abstract_state, aot.abstract_batch(config, mesh), key
  )
  m = lowered.compile().memory_analysis()
  return config, m.argument_size_in_bytes, m.temp_size_in_bytes


def main(argv):
  del argv
  rows, base = [], None
  for policy in POLICIES:
    config, args, temps = compile_memory(policy)
    base = base or temps
    rows.append((policy, args, temps, temps / base))
  print(
    f'\nroformer {_PRESET.value} shapes, {_LAYERS.value} layers, n {_SEQ_LEN.value}, '
    f'batch {_BATCH.value}, {config.model.dtype} activations, '
    f'{_TOPOLOGY.value or jax.devices()[0].platform}\n'
  )
  print('| remat policy | arguments | temporaries | temporaries vs none |')
  print('|---|---|---|---|')
  for policy, args, temps, ratio in rows:
    print(f'| {policy} | {args / MIB:,.0f} MiB | {temps / MIB:,.0f} MiB | {ratio:.2f} |')
  b, n, v = _BATCH.value, _SEQ_LEN.value, config.model.vocab_size
  p = objectives.max_predictions(n, config.data.mask_rate)
  print(
    f'\nMLM logits in float32: every position [b={b}, n={n}, V={v}] = '
    f'{b * n * v * 4 / MIB:,.0f} MiB; masked positions only [b, P={p}, V] = '
    f'{b * p * v * 4 / MIB:,.0f} MiB (the gather saves {1 - p / n:.0%}).'
  )


if __name__ == '__main__':
  app.run(main)
