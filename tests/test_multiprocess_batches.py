"""Batches fed by two processes when a mesh axis other than 'data' spans them (docs/design.md 13).

Two local processes (jax.distributed on CPU, 2 devices each, one pair for every mesh in turn)
assemble global batches the way training does: the pipeline reads the data shard of
`mesh.batch_feed` and `mesh.global_batch` assembles it; fine-tuning's `_local_rows` cuts this
process's rows from a batch every process holds. The loss gradient of a tiny model on the
assembled batch must equal one device's on the same global batch. Before, each process fed
consecutive rows by process index and the global shape was inferred: with 'tensor' across the
processes both addressed the same rows with different data, and the batch came out half as
large.

Run as a script, this file is one process of the pair: `python tests/test_multiprocess_batches.py
PORT PROCESS_ID OUT_FILE`.
"""

import faulthandler
import pathlib
import pickle
import signal
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tests')]

import helpers  # noqa: E402
from data_pipelines import pipeline  # noqa: E402
from data_pipelines import tokenizer as tokenizer_lib  # noqa: E402
from pretrain import finetune  # noqa: E402
from pretrain import mesh as mesh_lib  # noqa: E402
from pretrain import train  # noqa: E402

# (mesh shape, order of the 4 devices or None for jax.devices(), expected number of data shards).
# Process 0 owns devices 0 and 1 of jax.devices(), process 1 devices 2 and 3.
CASES = (
  ((4, 1, 1), None, 2),
  ((1, 4, 1), None, 2),  # fsdp across the processes
  ((1, 1, 4), None, 1),  # tensor across them: both feed the whole batch
  ((2, 1, 2), None, 2),
  ((1, 2, 2), None, 2),  # fsdp across, tensor within
  ((2, 1, 2), (0, 2, 1, 3), 1),  # tensor pairs a device of each process, data within each
  ((2, 2, 1), (0, 2, 1, 3), 2),  # process 0 addresses batch blocks {0, 2}, process 1 {1, 3}
)


class _ByteTokenizer:
  """Text -> one id per UTF-8 byte, above the special ids (no model to train or load)."""

  vocab_size = 512

  def encode(self, text):
    data = np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)
    return tokenizer_lib.NUM_SPECIAL + data % (self.vocab_size - tokenizer_lib.NUM_SPECIAL)


def _config():
  config = helpers.tiny_config('roformer:tiny', 'mlm')
  config.model.num_heads = 4  # so that tensor = 4 divides the heads
  config.model.num_layers, config.model.scan_layers = 1, False  # compiles faster
  config.data.num_threads, config.data.prefetch_buffer_size = 0, 0
  return config


def _records():
  return [{'text': f'document {i}: ' + 'abcdefghij'[i % 10] * (7 + 5 * i)} for i in range(24)]


def _first_batch(config, index=0, count=1, train_order=True):
  it = pipeline.make_dataset(
    _records(),
    _ByteTokenizer(),
    config,
    train=train_order,
    process_index=index,
    process_count=count,
  )
  return next(iter(it))


def _host_params(config):
  """Parameters of the tiny model's shapes, N(0, 0.1) from a fixed seed, as NumPy arrays: the
  same in every process without compiling an initialisation."""
  config = config.copy_and_resolve_references()
  config.mesh.shape = (1, 1, 1)
  s = train.setup(config, mesh_lib.make_mesh(config.mesh, jax.local_devices()[:1]))
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), s.abstract_state['params']
  )


def _loss_and_grads_fn(config, mesh, host_params):
  """(params on `mesh`, a compiled (params, global batch) -> ((loss, aux), grads)), with the
  outputs replicated so that each process can read them."""
  s = train.setup(config, mesh)
  params = jax.device_put(host_params, s.state_shardings['params'])
  fn = mesh_lib.jit(
    jax.value_and_grad(
      lambda p, b: train.model_loss(p, s.graphdef, b, config.objective), has_aux=True
    ),
    mesh,
    config.mesh.logical_axis_rules,
    in_shardings=(s.state_shardings['params'], mesh_lib.batch_sharding(mesh)),
    out_shardings=mesh_lib.replicated(mesh),
  )
  return params, fn


def _feed_and_differentiate(config, devices, known, host_params):
  """Gradients on the global batch the pipeline feeds, and which rows of `known` fine-tuning's
  path puts where."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_global_batch(config.data.global_batch_size, mesh)
  feed = mesh_lib.batch_feed(mesh)
  params, fn = _loss_and_grads_fn(config, mesh, host_params)
  # Pretraining: this process's data shard from the pipeline.
  local = _first_batch(config, feed.index, feed.count)
  (loss, _), grads = fn(params, mesh_lib.global_batch(local, mesh))
  # Fine-tuning: this process's rows of a batch every process holds; each device's block
  # must be the batch's rows at its index (read locally: no collective, no compile).
  assembled = mesh_lib.global_batch(finetune._local_rows(known, mesh), mesh)
  wrong_rows = [
    f'{k} {a.shape} on {shard.device}: rows {shard.index[0]}'
    for k, a in assembled.items()
    for shard in a.addressable_shards
    if a.shape != known[k].shape or not np.array_equal(shard.data, known[k][shard.index])
  ]
  return {
    'feed': (feed.index, feed.count, feed.shards, feed.num_shards),
    'pipeline': (float(loss), jax.device_get(grads)),
    'wrong_rows': wrong_rows,
  }


def _worker(port: int, process_id: int, out_file: str):
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  config = _config()
  # The same global batch in both processes, with per-example weights as fine-tuning's have.
  known = _first_batch(config, train_order=False)
  known['weights'] = np.arange(len(known['inputs']), dtype=np.float32)
  host_params = _host_params(config)
  results = []
  for shape, order, _ in CASES:
    print('mesh', shape, order, flush=True)
    config.mesh.shape = shape
    devices = jax.devices() if order is None else [jax.devices()[i] for i in order]
    try:
      results.append(_feed_and_differentiate(config, devices, known, host_params))
    except Exception as e:  # noqa: BLE001  (both processes raise alike: report, go on)
      results.append({'error': repr(e)})
  with open(out_file, 'wb') as f:
    pickle.dump(results, f)
  print('done', flush=True)


def test_feed_groups_of_meshes():
  """Blocks per process on meshes that are and are not feedable (no devices needed)."""
  # 2 processes x 2 devices, tensor = 4 across both: one group, both address block 0.
  assert mesh_lib.feed_groups(np.zeros(4, int), np.array([0, 0, 1, 1])) == [(0,)]
  # Interleaved: process 0 addresses blocks 0 and 2, process 1 blocks 1 and 3.
  assert mesh_lib.feed_groups(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1])) == [(0, 2), (1, 3)]
  # 3 processes x 2 devices, mesh (2, 1, 3): process 1 shares block 0 with process 0 and
  # block 1 with process 2, so it cannot load its rows independently.
  with pytest.raises(ValueError, match=r'--config.mesh.shape cannot be fed.*process 1: \[0, 1\]'):
    mesh_lib.feed_groups(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2]))


@pytest.mark.two_process
def test_two_processes_feed_every_mesh(tmp_path):
  """Gradients on 7 meshes over 2 processes equal one device's on the global batch."""
  env = helpers.two_process_env()
  # Seven programs per process: XLA's backend optimisations would double the compile time.
  env['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
  port = helpers.free_port()
  outs = [tmp_path / f'process{i}.pkl' for i in range(2)]
  logs = [tmp_path / f'process{i}.log' for i in range(2)]
  cmds = [[sys.executable, __file__, str(port), str(i), str(outs[i])] for i in range(2)]
  helpers.run_process_pair(cmds, logs, env, timeout=150)
  results = [pickle.loads(out.read_bytes()) for out in outs]

  config = _config()
  config.mesh.shape = (1, 1, 1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  params, reference = _loss_and_grads_fn(config, mesh, _host_params(config))
  failures = []
  for (shape, order, count), *per_process in zip(CASES, *results):
    try:
      _check_case(config, per_process, count, reference, params)
    except AssertionError as e:
      failures.append(f'mesh {shape} device order {order}: {e}')
  assert not failures, '\n'.join(failures)


def _check_case(config, per_process, count, reference, params):
  """Asserts one mesh's results of both processes against one device's."""
  errors = [r['error'] for r in per_process if 'error' in r]
  assert not errors, errors
  # The global batch the processes assembled: each one's data shard at the rows it addresses.
  b = config.data.global_batch_size
  batch = {}
  for feed in (mesh_lib.BatchFeed(*r['feed']) for r in per_process):
    rows = feed.rows(b)
    for k, v in _first_batch(config, feed.index, feed.count).items():
      batch.setdefault(k, np.zeros((b, *v.shape[1:]), v.dtype))[rows] = v
  (loss, _), grads = reference(params, batch)
  for i, r in enumerate(per_process):
    np.testing.assert_allclose(r['pipeline'][0], loss, rtol=1e-6, err_msg=f'pipeline, process {i}')
    helpers.assert_trees_close(r['pipeline'][1], grads)
    assert not r['wrong_rows'], f'fine-tuning rows, process {i}: {r["wrong_rows"]}'
  assert [r['feed'][1] for r in per_process] == [count, count], 'number of data shards'


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
