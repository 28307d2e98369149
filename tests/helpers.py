"""Helpers shared by the tests: tiny configs, synthetic packed batches, sharded losses and
gradients, tree comparisons, and the launcher in a subprocess. Fixtures live in conftest.py."""

import importlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from data_pipelines import pipeline
from pretrain import mesh as mesh_lib
from pretrain import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_tiny_config(
  corpus: pathlib.Path, cache_dir: pathlib.Path, *, preset: str = 'roformer:tiny', **overrides
):
  """A family preset (`file:preset` under launch/configs) shrunk for tests: d 32, 2 layers,
  n 32, batch 8, vocab 512 (GAU: s 16; FLASH: chunk 8). Overrides use dotted keys."""
  module, name = preset.split(':')
  config = importlib.import_module(f'launch.configs.{module}').get_config(name)
  config.data.text_files = str(corpus / '*.txt')
  config.data.cache_dir = str(cache_dir)
  config.data.validation_fraction = 0.1
  config.data.seq_len, config.data.global_batch_size = 32, 8
  config.data.num_threads = 1
  m = config.model
  m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = 512, 32, 2, 2, 64
  m.shared_dim, m.chunk_size = 16, 8 if m.chunk_size else 0
  t = config.train
  t.num_train_steps, t.log_every_steps, t.eval_every_steps = 6, 2, 3
  t.eval_steps, t.checkpoint_every_steps = 2, 3
  config.optim.warmup_steps = 2
  config.update_from_flattened_dict(overrides)
  return config


def assert_trees_close(actual, expected, rtol=1e-5):
  """Per leaf of two pytrees: ||actual - expected|| <= rtol ||expected|| (+ 1e-12 so all-zero
  leaves compare exactly), naming the first leaf that differs."""
  expected_leaves = jax.tree.leaves(expected)
  actual_leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
  assert len(actual_leaves) == len(expected_leaves)
  for (path, a), e in zip(actual_leaves, expected_leaves):
    a, e = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(e, np.float64))
    err, norm = np.linalg.norm(a - e), np.linalg.norm(e)
    assert err <= rtol * norm + 1e-12, (
      f'{jax.tree_util.keystr(path)}: relative error {err / max(norm, 1e-30):.2e}'
    )


FAMILIES = ('roformer:tiny', 'roformer_v2:tiny', 'gau:tiny', 'gau:flash_tiny', 'deepnet:tiny')
MESHES = ((2, 2, 2), (1, 4, 2), (8, 1, 1))


def jaxpr_equations(jaxpr):
  """Every equation of a jaxpr (e.g. `jax.make_jaxpr(f)(*args).jaxpr`), those of nested
  jaxprs (cond branches, custom derivatives, jit) included, depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from jaxpr_equations(sub)


def interior_pads(jaxpr) -> list:
  """The pad equations of a jaxpr (nested ones included) with interior padding: the
  transpose of a strided slice, which XLA on CPU runs at under 1 GB/s (docs/performance.md
  2). Edge pads fuse into element-wise passes and are not listed."""
  return [
    e
    for e in jaxpr_equations(jaxpr)
    if e.primitive.name == 'pad' and any(i for _, _, i in e.params['padding_config'])
  ]


def packed_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch like the pipeline's: rows of 1-3 packed documents, some padding, MLM and CLM
  fields (mlm_positions [b, P] with some zero weights; targets = next token in the document)."""
  rng = np.random.default_rng(seed)
  b, n, vocab = config.data.global_batch_size, config.data.seq_len, config.model.vocab_size
  inputs = rng.integers(5, vocab, (b, n)).astype(np.int32)
  segment_ids = np.zeros((b, n), np.int32)
  positions = np.zeros((b, n), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(3, n - 3), size=row % 3, replace=False))
    end = n - (row % 4) * 2  # rows 1, 2, 3 (mod 4) end in padding
    start = 0
    for doc, stop in enumerate(list(cuts[cuts < end]) + [end]):
      segment_ids[row, start:stop] = doc + 1
      positions[row, start:stop] = np.arange(stop - start)
      start = stop
  inputs[segment_ids == 0] = 0
  same_doc_next = np.zeros((b, n), bool)
  same_doc_next[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
  targets = np.zeros((b, n), np.int32)
  targets[:, :-1] = inputs[:, 1:]
  num_predictions = 5
  mlm_positions = np.stack([rng.choice(n, num_predictions, replace=False) for _ in range(b)])
  mlm_weights = (np.take_along_axis(segment_ids, mlm_positions, 1) > 0).astype(np.float32)
  return {
    'inputs': inputs,
    'segment_ids': segment_ids,
    'positions': positions,
    'targets': targets,
    'weights': same_doc_next.astype(np.float32),
    'mlm_positions': mlm_positions.astype(np.int32),
    'mlm_targets': rng.integers(5, vocab, (b, num_predictions)).astype(np.int32),
    'mlm_weights': mlm_weights,
  }


def tiny_config(preset: str, objective: str):
  """make_tiny_config's model and batch shapes without data (for synthetic batches)."""
  config = make_tiny_config(
    pathlib.Path('/nonexistent'), pathlib.Path('/nonexistent'), preset=preset, objective=objective
  )
  config.model.num_layers = 2
  return config


def loss_and_grads(config, batch, devices):
  """(loss, gradient pytree) of the trainer's loss on a mesh over `devices`."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  s = train.setup(config, mesh)
  params = train.init_state(config, s)['params']
  fn = mesh_lib.jit(
    jax.value_and_grad(
      lambda p, b: train.model_loss(p, s.graphdef, b, config.objective), has_aux=True
    ),
    mesh,
    config.mesh.logical_axis_rules,
    in_shardings=(s.state_shardings['params'], mesh_lib.batch_sharding(mesh)),
  )
  (loss, _), grads = fn(params, mesh_lib.global_batch(batch, mesh))
  return float(loss), jax.device_get(grads)


def train_losses(config, data, devices, num_steps=4):
  source, tok = data
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  s = train.setup(config, mesh)
  state = train.init_state(config, s)
  step_fn = train.jit_train_step(s, config)
  it = iter(pipeline.make_dataset(source.train, tok, config))
  losses = []
  for _ in range(num_steps):
    state, m = step_fn(state, mesh_lib.global_batch(next(it), mesh), jax.random.key(0))
    losses.append(float(m['loss_sum'] / m['weight_sum']))
  return np.array(losses), state


def tiny_flags(corpus, cache_dir, **overrides) -> list[str]:
  """Command-line overrides that shrink the tiny preset (see conftest.make_tiny_config)."""
  values = {
    'data.text_files': f'{corpus}/*.txt',
    'data.cache_dir': str(cache_dir),
    'data.validation_fraction': 0.1,
    'data.seq_len': 32,
    'data.global_batch_size': 8,
    'model.vocab_size': 512,
    'model.hidden_size': 32,
    'model.num_layers': 2,
    'model.num_heads': 2,
    'model.mlp_dim': 64,
    'train.num_train_steps': 4,
    'train.log_every_steps': 2,
    'train.eval_every_steps': 4,
    'train.eval_steps': 2,
    'train.checkpoint_every_steps': 2,
    'optim.warmup_steps': 1,
  }
  values.update(overrides)
  return [f'--config.{k}={v}' for k, v in values.items()]


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """Environment of a subprocess the tests start: this one's, on CPU with `devices` fake
  devices (conftest gives the test process 8), plus `extra` variables."""
  return dict(
    os.environ,
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_PLATFORMS='cpu',
    **extra,
  )


def free_port() -> int:
  """A TCP port on localhost that was free a moment ago (for a JAX coordinator)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def two_process_env(compile_cache=None) -> dict[str, str]:
  """Environment of each process of a two-process (multi-controller) test: CPU, 2 devices.

  No persistent compilation cache (`make test` sets one) unless `compile_cache`, a directory,
  is given. Only process 0 writes that cache and the processes' keys differ, so process 0
  loads a cached program where process 1 compiles it afresh; the two get different launch ids
  and a gloo collective between them never completes: both processes wait inside it (this was
  the two-process hang, tests/test_multihost.py). The launchers turn the cache off themselves
  (`pretrain.multihost.configure_cpu_processes`); `compile_cache` checks that they do.
  """
  env = cpu_env(2)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  if compile_cache is None:
    env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  else:
    env.update(
      JAX_ENABLE_COMPILATION_CACHE='true',
      JAX_COMPILATION_CACHE_DIR=str(compile_cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    )
  return env


def run_launcher(module: str, *args: str, devices: int = 1, timeout: float = 300):
  """`python -m <module> <args>` from the repository root on `devices` CPU devices, output
  captured as text (a subprocess.CompletedProcess)."""
  cmd = [sys.executable, '-m', module, *args]
  return subprocess.run(
    cmd, cwd=ROOT, env=cpu_env(devices), capture_output=True, text=True, timeout=timeout
  )


# Flags of a grown target of tiny_flags' shape (width 32 -> 64, depth 2 -> 3) for launch.upscale.
UPSCALE_TARGET = [
  '--config.model.hidden_size=64',
  '--config.model.num_heads=4',
  '--config.model.mlp_dim=128',
  '--config.model.num_layers=3',
  '--config.data.seq_len=32',
  '--config.data.global_batch_size=8',
]


def run_upscale(from_workdir, workdir, *flags, config='launch/configs/roformer.py:tiny'):
  """`python -m launch.upscale` from `from_workdir` into `workdir` (see `run_launcher`)."""
  return run_launcher(
    'launch.upscale',
    f'--from_workdir={from_workdir}',
    f'--config={config}',
    f'--workdir={workdir}',
    *flags,
  )


def run_pretrain(workdir, flags, devices=1, timeout=300):
  return run_launcher(
    'launch.pretrain',
    '--config=launch/configs/roformer.py:tiny',
    f'--workdir={workdir}',
    *flags,
    devices=devices,
    timeout=timeout,
  )


def two_process_pretrain(workdir, flags, launcher=('-m', 'launch.pretrain')) -> list[list[str]]:
  """The command lines of the two processes of a launch.pretrain pair (tiny preset, a fresh
  coordinator port) on `workdir`; `launcher` replaces `-m launch.pretrain` (e.g. `-c CODE`)."""
  port = free_port()
  return [
    [
      sys.executable,
      *launcher,
      '--config=launch/configs/roformer.py:tiny',
      f'--workdir={workdir}',
      f'--coordinator_address=localhost:{port}',
      '--num_processes=2',
      f'--process_id={i}',
      *flags,
    ]
    for i in range(2)
  ]


class ProcessPairStuck(AssertionError):
  """A process of a pair (run_process_pair) was still running at the deadline."""


def run_process_pair(cmds, logs, env, timeout: float, expect_ok: bool = True):
  """Runs two commands (one per process of a jax.distributed pair) from ROOT, output to `logs`.

  Output goes to files, not pipes: a pipe read only after the other process finishes could
  fill and block its writer while the other waits for it in a collective.

  Returns:
    Both processes' output, once both exited 0; with `expect_ok` False, (both exit codes,
    both outputs) once both exited, whatever the codes.

  Raises:
    ProcessPairStuck: one still ran after `timeout` seconds (or 30 s after the other died by
      a signal) and none had exited with an error; the message has both outputs, with the
      stacks of the ones still running at the end (the commands must register SIGUSR1 with
      faulthandler).
    AssertionError: one exited with an error and `expect_ok` (the message has both outputs).
    With `expect_ok` False, ProcessPairStuck also when one still ran after the other exited
    with an error (a failure that did not stop both).
  """
  procs = []
  for cmd, log in zip(cmds, logs):
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
  start, failed_at = time.time(), None
  while any(p.poll() is None for p in procs):
    now = time.time()
    if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
      failed_at = now
    if now - start > timeout or (failed_at is not None and now - failed_at > 30):
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGUSR1)
      time.sleep(3)
      break
    time.sleep(0.2)
  codes = [p.poll() for p in procs]
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  outs = [pathlib.Path(log).read_text() for log in logs]
  message = f'exit codes {codes} (None: stuck, stacks at the end) after ' + (
    f'{time.time() - start:.0f} s\n'
    + '\n'.join(f'--- process {i}\n{out[-6000:]}' for i, out in enumerate(outs))
  )
  if None in codes and (not expect_ok or not any(c for c in codes if c is not None and c > 0)):
    raise ProcessPairStuck(message)  # not a peer's error: one waits in a collective
  if not expect_ok:
    return codes, outs
  assert codes == [0, 0], message
  return outs


def orbax_state(workdir, step):
  """The state of checkpoint `step` of `workdir` as orbax alone restores it (no checksums),
  on this process's first device, whatever devices and processes wrote it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from pretrain import checkpointing  # pylint: disable=g-import-not-at-top

  checkpoints = pathlib.Path(workdir) / 'checkpoints'
  one_device = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',)), jax.sharding.PartitionSpec()
  )
  manager = ocp.CheckpointManager(str(checkpoints))
  try:
    with checkpointing.quiet_failed_reads():
      metadata = ocp.StandardCheckpointHandler().metadata(checkpoints / str(step) / 'state')
      target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
        getattr(metadata, 'item_metadata', metadata),
      )
      args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
      return jax.device_get(manager.restore(step, args=args)['state'])
  finally:
    manager.close()


def state_files(step_dir):
  """The data files of a checkpoint's state, largest first. With 8 devices orbax writes
  replicas in parallel and some files end up holding values the checkpoint no longer
  references, so damage meant to be read goes to the largest file that is read."""
  step_dir = pathlib.Path(step_dir)
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def truncate_a_read_state_file(workdir, step) -> pathlib.Path:
  """Cuts in half the largest state file of checkpoint `step` whose loss makes orbax's restore
  fail (files the checkpoint no longer references are put back); returns it."""
  for blob in state_files(pathlib.Path(workdir) / 'checkpoints' / str(step)):
    original = blob.read_bytes()
    blob.write_bytes(original[: len(original) // 2])
    try:
      orbax_state(workdir, step)
    except Exception:  # pylint: disable=broad-except
      return blob
    blob.write_bytes(original)
  raise AssertionError(f'no truncated file makes checkpoint {step} fail to restore')


def copy_workdir(workdir, tmp_path) -> pathlib.Path:
  """A copy of a fixture's workdir at tmp_path/run, to damage or resume without touching the
  fixture's run."""
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.copytree(workdir, tmp_path / 'run')
  return tmp_path / 'run'


def copy_run(run, tmp_path):
  """(a copy of the config, `copy_workdir` of the workdir) of a (config, workdir) fixture."""
  config, workdir = run
  return config.copy_and_resolve_references(), copy_workdir(workdir, tmp_path)
