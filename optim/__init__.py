"""Optimizers: optax chains from `config.optim`, plus the pieces optax lacks
(docs/algorithms.md 1-3).

The trainer uses three calls:

  tx = optim.build(config)                          # optax.GradientTransformation
  lr = optim.learning_rate_schedule(config)(step)   # step = optimizer updates applied
  extra = optim.metrics(opt_state)                  # {'eg/scale/<group>': ...} or {}

`tx.update` is called once per micro-batch; with accumulation_steps k > 1 it returns zero
updates inside each window of k micro-steps. Modules: `schedules` (lr schedules,
piecewise_linear), `adafactor` (two AdaFactor placements, float32 statistics),
`accumulation` (accumulation hidden in momentum, every_k), `eg` (EG step-size adaptation),
`assemble` (build, validation, weight-decay mask, metrics). `optim.adafactor` is the
module; its constructor is `optim.adafactor.adafactor`.
"""

from optim.accumulation import AccumulateInMomentumState
from optim.accumulation import AdafactorMoments
from optim.accumulation import AdamMoments
from optim.accumulation import EveryKState
from optim.accumulation import SGDMMoments
from optim.accumulation import accumulate_in_momentum_adafactor
from optim.accumulation import accumulate_in_momentum_adam
from optim.accumulation import accumulate_in_momentum_sgdm
from optim.accumulation import every_k
from optim.adafactor import adafactor_direction
from optim.adafactor import factor_in_matrix_view
from optim.adafactor import factored_dims
from optim.adafactor import matrix_view_shape
from optim.adafactor import per_layer_blocks
from optim.adafactor import scale_by_factored_rms
from optim.adafactor import upcast_to_float32
from optim.assemble import build
from optim.assemble import decay_mask
from optim.assemble import metrics
from optim.assemble import validate
from optim.assemble import weight_decay
from optim.eg import EGState
from optim.eg import eg_adapt
from optim.schedules import learning_rate_schedule
from optim.schedules import piecewise_linear

__all__ = [
  'AccumulateInMomentumState',
  'AdafactorMoments',
  'AdamMoments',
  'EGState',
  'EveryKState',
  'SGDMMoments',
  'accumulate_in_momentum_adafactor',
  'accumulate_in_momentum_adam',
  'accumulate_in_momentum_sgdm',
  'adafactor_direction',
  'build',
  'decay_mask',
  'eg_adapt',
  'every_k',
  'factor_in_matrix_view',
  'factored_dims',
  'learning_rate_schedule',
  'matrix_view_shape',
  'metrics',
  'per_layer_blocks',
  'scale_by_factored_rms',
  'piecewise_linear',
  'upcast_to_float32',
  'validate',
  'weight_decay',
]
