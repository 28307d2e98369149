"""Every preset of every family passes the trainer's validation and sets up abstractly (model,
optimizer state and shardings on the 8-device mesh, nothing allocated), for both objectives."""

import importlib

import jax
import pytest

from launch.configs import roformer
from pretrain import mesh as mesh_lib
from pretrain import train

FAMILY_FILES = ('roformer', 'roformer_v2', 'gau', 'deepnet')
PRESETS = [
  (family, preset)
  for family in FAMILY_FILES
  for preset in getattr(
    importlib.import_module(f'launch.configs.{family}'), 'PRESETS', roformer.PRESETS
  )
]


@pytest.mark.parametrize('family, preset', PRESETS)
def test_preset_validates_and_sets_up_abstractly(family, preset):
  config = importlib.import_module(f'launch.configs.{family}').get_config(preset)
  for objective in ('mlm', 'clm'):
    config.objective = objective
    mesh = mesh_lib.make_mesh(config.mesh)
    train.validate(config, mesh)
    run_setup = train.setup(config, mesh)
    params = run_setup.abstract_state['params']
    assert run_setup.num_params > 1e6
    assert jax.tree.leaves(run_setup.abstract_state['opt_state'])
    # Every parameter and optimizer leaf has a sharding on this mesh.
    for leaf in jax.tree.leaves(run_setup.abstract_state):
      assert leaf.sharding.mesh.shape == mesh.shape
    assert params['embedder']['token']['embedding'].shape == (
      config.model.vocab_size,
      config.model.hidden_size,
    )
