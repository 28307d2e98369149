"""The mesh's device order comes from `mesh_utils.create_device_mesh` (the TPU topology), and
its errors surface outside CPU (docs/design.md 13).

Before, `pretrain.mesh` called `jax.experimental.mesh_utils` without importing it: the
attribute error was swallowed by a bare `except`, so every mesh, on TPU too, used
`jax.devices()` order. The tests hide the attribute as a fresh process has it (nothing else
imports the submodule), and stand in for create_device_mesh to see whether its answer is used.

With libtpu installed (the `tpu` extra), real TPU topologies as libtpu describes them: which
hosts share batch rows on a v5e-32, and multi-slice meshes ('data' across slices), with the
commands and the ahead-of-time compile for several slices.
"""

import dataclasses
import os

from absl import logging
import jax
from jax.experimental import mesh_utils
import ml_collections
import numpy as np
import pytest

import helpers
from pretrain import mesh as mesh_lib


def _config(shape):
  return ml_collections.ConfigDict({'shape': shape})


@pytest.fixture
def fresh_process(monkeypatch):
  """`jax.experimental.mesh_utils` unset, as in a process where nothing imported it."""
  monkeypatch.delattr(jax.experimental, 'mesh_utils', raising=False)


def test_mesh_uses_create_device_mesh(fresh_process, monkeypatch):
  calls = []

  def reversed_order(shape, devices, **kwargs):  # a topology order unlike jax.devices()
    calls.append((tuple(shape), kwargs.get('allow_split_physical_axes', False)))
    return np.asarray(devices[::-1]).reshape(shape)

  monkeypatch.setattr(mesh_utils, 'create_device_mesh', reversed_order)
  mesh = mesh_lib.make_mesh(_config((2, -1, 2)))
  assert calls == [((2, 2, 2), False)]
  assert mesh.devices.ravel().tolist() == jax.devices()[::-1]
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')


def test_real_create_device_mesh_on_cpu(fresh_process):
  """On CPU (no topology) the real create_device_mesh keeps the given order."""
  devices = jax.devices()[::-1]
  mesh = mesh_lib.make_mesh(_config((-1, 1, 4)), devices)
  assert mesh.devices.shape == (2, 1, 4)
  assert mesh.devices.ravel().tolist() == devices


def _fails_unless_split(shape, devices, allow_split_physical_axes=False, **kwargs):
  if not allow_split_physical_axes:
    raise NotImplementedError('Failed to find assignment for logical_axis_index 2 of size 4')
  return np.asarray(devices).reshape(shape)[..., ::-1]


def test_cpu_falls_back_to_plain_order_and_logs(fresh_process, monkeypatch):
  monkeypatch.setattr(mesh_utils, 'create_device_mesh', _fails_unless_split)
  logged = []
  monkeypatch.setattr(logging, 'info', lambda msg, *args: logged.append(msg % args))
  mesh = mesh_lib.make_mesh(_config((2, 1, 4)))
  assert mesh.devices.ravel().tolist() == jax.devices()  # plain order, not the split one
  assert len(logged) == 1 and 'plain device order' in logged[0]
  assert 'Failed to find assignment' in logged[0]


def _pretend_tpu(monkeypatch):
  # raising=False: the test must also run (and fail) against a module without the check.
  monkeypatch.setattr(mesh_lib, '_platform', lambda devices: 'tpu', raising=False)


def test_tpu_splits_a_physical_axis_rather_than_falling_back(fresh_process, monkeypatch):
  _pretend_tpu(monkeypatch)
  monkeypatch.setattr(mesh_utils, 'create_device_mesh', _fails_unless_split)
  warned = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warned.append(msg % args))
  mesh = mesh_lib.make_mesh(_config((2, 1, 4)))
  expected = np.asarray(jax.devices()).reshape(2, 1, 4)[..., ::-1]
  assert mesh.devices.tolist() == expected.tolist()
  assert len(warned) == 1 and 'splits a physical axis' in warned[0]


def test_tpu_error_is_raised_not_swallowed(fresh_process, monkeypatch):
  _pretend_tpu(monkeypatch)

  def no_layout(shape, devices, **kwargs):
    raise ValueError('devices do not form a torus')

  monkeypatch.setattr(mesh_utils, 'create_device_mesh', no_layout)
  with pytest.raises(
    ValueError, match=r'--config.mesh.shape=\(8, 1, 1\) cannot be laid out.*torus'
  ):
    mesh_lib.make_mesh(_config((-1, 1, 1)))


@pytest.fixture
def libtpu(monkeypatch):
  """libtpu set up to describe TPU topologies in this process (skipped without it, the `tpu`
  extra). The environment `aot.quiet_libtpu` sets is undone afterwards: left behind, its
  TPU_WORKER_HOSTNAMES would make later subprocesses (launch.pretrain) think they run on a
  TPU pod."""
  pytest.importorskip('libtpu')
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  # Describing a topology opens no TPU; without this, another process with libtpu loaded (a
  # launch.aot running alongside) holds /tmp/libtpu_lockfile and libtpu refuses to start.
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  before = set(os.environ)
  aot.quiet_libtpu()
  for name in set(os.environ) - before:
    value = os.environ.pop(name)
    monkeypatch.setenv(name, value)  # recorded as unset, so removed again at the end


def _tpu_devices(topology: str, slices: int = 1):
  """The devices of a TPU topology as libtpu describes it (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  kwargs = {'num_slices': slices} if slices > 1 else {}
  return topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs).devices


def _feed_groups(mesh):
  positions = np.indices(mesh.devices.shape)
  process = np.vectorize(lambda d: d.process_index)(mesh.devices)
  return mesh_lib.feed_groups(positions[0] * mesh.shape['fsdp'] + positions[1], process)


def test_tensor_across_hosts_of_a_v5e_32(libtpu):
  """v5e-32 (8 hosts of 4 chips), mesh (4, 1, 8): the topology puts each tensor ring on 4
  hosts, and each host addresses 2 of the 4 batch blocks: 2 feed groups of 4 hosts."""
  mesh = mesh_lib.make_mesh(_config((4, 1, 8)), _tpu_devices('v5e:4x8'))
  assert _feed_groups(mesh) == [(0, 1), (2, 3)]


def test_two_slices_split_data_across_slices(libtpu):
  devices = _tpu_devices('v5e:4x4', slices=2)  # 2 x v5e-16
  mesh = mesh_lib.make_mesh(_config((-1, 1, 4)), devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert mesh.devices.shape == (8, 1, 4)
  assert (slice_of[:4] == 0).all() and (slice_of[4:] == 1).all()  # data rows 0-3: slice 0
  assert len(_feed_groups(mesh)) == 4
  # A whole slice per tensor group: one feed group per slice, 4 hosts each.
  mesh = mesh_lib.make_mesh(_config((2, 1, 16)), devices)
  assert [set(row.ravel().tolist()) for row in slice_of.reshape(2, -1)] == [{0}, {1}]
  assert _feed_groups(mesh) == [(0,), (1,)]
  with pytest.raises(ValueError, match=r'mesh.shape=\(1, 1, 32\) runs on 2 TPU slices.*data'):
    mesh_lib.make_mesh(_config((1, 1, -1)), devices)


# ----------------------------------------------------------------------------- multi-slice


def test_topology_names_of_several_slices():
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  assert aot.split_slices('2xv5e-16') == (2, 'v5e-16')
  assert aot.split_slices('v5e:4x4') == (1, 'v5e:4x4')
  assert aot.topology_name('2xv5e-16') == 'v5e:4x4'
  assert aot.chips('2xv5e-16') == 32 and aot.chips('v5e-16') == 16


def test_tpu_vm_commands_for_two_slices():
  from launch import tpu_vm  # pylint: disable=g-import-not-at-top

  o = tpu_vm.Options(
    tpu='p', zone='z', accelerator_type='v5litepod-16', num_slices=2, workdir='gs://b/r'
  )
  (create,) = tpu_vm.commands('create', o)
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'p']
  assert {'--node-count=2', '--node-prefix=p', '--accelerator-type=v5litepod-16'} <= set(create)
  assert not [a for a in create if a.startswith('--node-id')]
  _, scp, install = tpu_vm.commands('setup', o)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'scp']
  for cmd in (install, *tpu_vm.commands('run', o)):  # every worker of every slice
    assert cmd[3:6] == ['queued-resources', 'ssh', 'p'], cmd
  for cmd in (scp, install, *tpu_vm.commands('run', o)):
    assert {'--node=all', '--worker=all'} <= set(cmd), cmd
  (logs,) = tpu_vm.commands('logs', dataclasses.replace(o, worker='0', node='1'))
  assert {'--node=1', '--worker=0'} <= set(logs)
  with pytest.raises(ValueError, match='--node'):
    tpu_vm.commands('logs', dataclasses.replace(o, worker='0', node='all'))
  assert len(tpu_vm.commands('status', o)) == 1  # the queued resource lists every slice
  with pytest.raises(ValueError, match='--num_slices=0 must be >= 1'):
    tpu_vm.commands('create', dataclasses.replace(o, num_slices=0))


@pytest.mark.slow
def test_aot_compiles_the_train_step_for_two_slices(libtpu):
  """The tiny preset's train step compiled for 2 x v5e-8 (libtpu, no TPU): 16 chips, the data
  axis across both slices."""
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  config = helpers.tiny_config('roformer:tiny', 'mlm')
  config.data.global_batch_size = 16
  r = aot.compile_train_step(config, '2xv5e-8')
  assert (r.slices, r.chips, r.devices) == (2, 16, 16)
  assert r.mesh == {'data': 16, 'fsdp': 1, 'tensor': 1} and r.fits


def test_v4_topology_of_one_device_per_tensorcore_keeps_its_order(libtpu):
  """libtpu describes v4 with a device per TensorCore, which create_device_mesh refuses; the
  ahead-of-time compile for v4 still gets a mesh (the plain order, logged)."""
  devices = _tpu_devices('v4:2x2x1')
  mesh = mesh_lib.make_mesh(_config((1, -1, 1)), devices)
  assert mesh.devices.ravel().tolist() == list(devices)
