"""Lossless growth of a trained encoder (docs/algorithms.md 4): `plan` decides the map of
every axis (and whether it is exact), `apply` maps parameter trees with it.

  p = growth.plan(small_config, large_config, growth.options_from_config(large_config))
  large_params = growth.grow_params(small_params, p)
  large_config = growth.grown_config(large_config, p)     # eps / k, the trained alpha

The workflow on runs (load a checkpoint, grow, write a new run) is `pretrain.grow`.
"""

from models.growth.apply import grow_like_gradient
from models.growth.apply import grow_params
from models.growth.plan import DEPTH_METHODS
from models.growth.plan import OPTIMIZER_STATE
from models.growth.plan import SYMMETRY_BREAKING
from models.growth.plan import WIDTH_METHODS
from models.growth.plan import AxisMap
from models.growth.plan import GrowthError
from models.growth.plan import Options
from models.growth.plan import Plan
from models.growth.plan import grown_config
from models.growth.plan import options_from_config
from models.growth.plan import plan

__all__ = [
  'AxisMap',
  'DEPTH_METHODS',
  'GrowthError',
  'OPTIMIZER_STATE',
  'Options',
  'Plan',
  'SYMMETRY_BREAKING',
  'WIDTH_METHODS',
  'grow_like_gradient',
  'grow_params',
  'grown_config',
  'options_from_config',
  'plan',
]
