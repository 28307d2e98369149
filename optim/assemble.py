"""`optim.build(config)`: the optimizer the trainer uses, assembled from `config.optim`.

Order of the chain (outermost first):

  upcast_to_float32(                      optimizer state float32 whatever the param dtype
    [MultiSteps(k)](                      accumulation='multisteps', k > 1: exact, +1 buffer
      clip_by_global_norm(grad_clip_norm) [> 0]; per micro-batch outside MultiSteps
      optimizer))                         one of the table below

| name      | optimizer (eta_t = learning_rate_schedule(config)(updates))                    |
|-----------|-------------------------------------------------------------------------------|
| adamw     | optax.adamw(eta, b1, b2, eps, weight_decay, mask=decay_mask)                   |
| lamb      | optax.lamb(eta, b1, b2, eps, weight_decay, mask=decay_mask) (bias-corrected), |
|           | trust ratio per layer for stacked leaves                                      |
| sgdm      | chain(trace(b1), add_decayed_weights(wd, decay_mask), scale_by_learning_rate) |
|           | i.e. m = b1 m + g, theta -= eta (m + wd theta) (decoupled decay)               |
| adafactor | optim.adafactor.adafactor(eta, variant=adafactor_variant, ...), momentum b1    |

accumulation='momentum' (k > 1) replaces the optimizer by its accumulate-in-momentum form
(docs/algorithms.md 2; AdaFactor needs b1 > 0 and adafactor_variant='bert4keras'; grad_clip_norm
must be 0,
since only a window mean could be clipped as a large batch would be and there is no buffer
holding it); accumulation='every_k' wraps it in `every_k` with the schedule read at
count // k (the clip then applies to each micro-batch gradient, which is the gradient every_k's
base optimizer steps on).

Weight decay: `optim.weight_decay` None (the default) means each optimizer's own default,
`weight_decay(config)`: 0.01 where the decay is multiplied by the learning rate (adamw, lamb,
sgdm, adafactor 'bert4keras'), 0 for adafactor 'optax', whose decay is not (theta -= wd theta
every update: 0.01 would leave 0.37 of every weight after 100 updates, docs/algorithms.md 1.2).
eg.enabled wraps the optimizer's
direction in `eg_adapt` (docs/algorithms.md 3): EGDD form (gains before the momentum) for sgdm,
gains on the
output direction for adamw, lamb and adafactor (bert4keras variant); weight decay and the
learning rate stay outside the EG scaling.

Scanned layers (config.model.scan_layers, leaves under 'layers' stacked on a leading L axis):
every per-leaf quantity is per layer - AdaFactor's update clipping and parameter scale,
LAMB's trust ratio, EG's per-leaf scale S - so the optimizer is the same whether or not the
model scans its layers; AdaFactor factors DenseGeneral kernels (L, d, h, d_h) as (L, d, h*d_h)
(`optim.adafactor.matrix_view_shape`).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax

from optim import accumulation as accumulation_lib
from optim import adafactor as adafactor_lib
from optim import eg as eg_lib
from optim import schedules
from optim import tree_paths

NAMES = ('adamw', 'adafactor', 'lamb', 'sgdm')
ACCUMULATIONS = ('multisteps', 'momentum', 'every_k')
NO_DECAY_NAMES = ('bias', 'scale')


def _leaf_name(path) -> str:
  return tree_paths.key_name(path[-1]) if path else ''


def decay_mask(params):
  """Weight-decay mask: False for leaves named 'bias' or 'scale' and for leaves of rank < 2.

  Args:
    params: pytree of arrays (or ShapeDtypeStructs); leaf names are the last path key.

  Returns:
    A bool pytree like params (True = apply weight decay): kernels and embeddings.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, x: _leaf_name(path) not in NO_DECAY_NAMES and len(x.shape) >= 2, params
  )


def _fail(field, value, fix):
  raise ValueError(f'optim.{field}={value!r} is invalid; {fix}')


# Decay per update relative to the learning rate (decoupled, as AdamW's 0.01).
DEFAULT_WEIGHT_DECAY = 0.01


def decay_times_learning_rate(config) -> bool:
  """Whether the optimizer multiplies its weight decay by the learning rate (all but
  AdaFactor in the optax placement, docs/algorithms.md 1.2)."""
  o = config.optim
  return not (o.name == 'adafactor' and o.adafactor_variant == 'optax')


def weight_decay(config) -> float:
  """config.optim.weight_decay, or the optimizer's default when it is None (see the module
  docstring): 0.01 if the decay is multiplied by the learning rate, else 0."""
  wd = config.optim.weight_decay
  if wd is None:
    return DEFAULT_WEIGHT_DECAY if decay_times_learning_rate(config) else 0.0
  return float(wd)


def validate(config) -> None:
  """Checks config.optim (and train.num_train_steps); raises ValueError naming field and fix."""
  o = config.optim
  if o.name not in NAMES:
    _fail('name', o.name, f'choose one of {", ".join(NAMES)}')
  if o.schedule not in schedules.SCHEDULES:
    _fail('schedule', o.schedule, f'choose one of {", ".join(schedules.SCHEDULES)}')
  if o.adafactor_variant not in adafactor_lib.VARIANTS:
    _fail(
      'adafactor_variant', o.adafactor_variant, f'choose one of {", ".join(adafactor_lib.VARIANTS)}'
    )
  if o.accumulation not in ACCUMULATIONS:
    _fail('accumulation', o.accumulation, f'choose one of {", ".join(ACCUMULATIONS)}')
  k = o.accumulation_steps
  if not isinstance(k, int) or k < 1:
    _fail('accumulation_steps', k, 'use an integer >= 1 (1 = no accumulation)')
  if not o.learning_rate > 0:
    _fail('learning_rate', o.learning_rate, 'use a learning rate > 0')
  if o.warmup_steps < 0:
    _fail('warmup_steps', o.warmup_steps, 'use warmup_steps >= 0')
  if config.train.num_train_steps < 1:
    raise ValueError(
      f'train.num_train_steps={config.train.num_train_steps} is invalid; use >= 1 optimizer updates'
    )
  if not 0 <= o.end_learning_rate_factor <= 1:
    _fail('end_learning_rate_factor', o.end_learning_rate_factor, 'use a value in [0, 1]')
  for field in ('b1', 'b2'):
    if not 0 <= o[field] < 1:
      _fail(field, o[field], 'use a decay in [0, 1)')
  for field in ('eps', 'grad_clip_norm', 'clipping_threshold'):
    if o[field] < 0:
      _fail(field, o[field], 'use a value >= 0 (0 disables it)')
  wd = weight_decay(config)
  if not 0 <= wd < 1:
    _fail(
      'weight_decay',
      o.weight_decay,
      "use a value in [0, 1) (0 disables it; unset it for the optimizer's default)",
    )
  if not decay_times_learning_rate(config) and wd > o.learning_rate:
    _fail(
      'weight_decay',
      o.weight_decay,
      f'adafactor_variant="optax" subtracts weight_decay * theta every update, not times '
      f'the learning rate, so {wd:g} outpaces the largest step ({o.learning_rate:g}) and '
      f'shrinks every weight to {(1 - wd) ** 100:.2f} of its value in 100 updates. Use '
      f'adafactor_variant="bert4keras" (decay times the learning rate), a weight_decay '
      f'<= learning_rate, or unset weight_decay (0 for this variant)',
    )
  if not o.decay_rate > 0:
    _fail('decay_rate', o.decay_rate, 'use the AdaFactor exponent c > 0 (paper: 0.8)')
  if o.schedule == 'piecewise_linear':
    schedules.piecewise_linear(o.schedule_boundaries)
  if k > 1 and o.accumulation == 'momentum' and o.grad_clip_norm > 0:
    _fail(
      'grad_clip_norm',
      o.grad_clip_norm,
      f'with optim.accumulation="momentum" (accumulation_steps={k}) the clip would apply to '
      'each micro-batch gradient, not to the window mean that a large batch clips, so the '
      'update would not be the large-batch update. Set --config.optim.grad_clip_norm=0, or '
      'use --config.optim.accumulation=multisteps (clips the window mean; one extra buffer)',
    )
  if k > 1 and o.accumulation == 'momentum' and o.name == 'adafactor':
    if not o.b1 > 0:
      _fail(
        'b1',
        o.b1,
        'accumulation="momentum" with adafactor needs momentum b1 > 0; set '
        'optim.b1 (e.g. 0.9) or use accumulation="multisteps"',
      )
    if o.adafactor_variant != 'bert4keras':
      _fail(
        'adafactor_variant',
        o.adafactor_variant,
        'accumulation="momentum" with adafactor '
        'is implemented for the bert4keras placement; set adafactor_variant="bert4keras"',
      )
  if o.eg.enabled:
    _validate_eg(o, k)


def _validate_eg(o, k: int) -> None:
  """Checks config.optim.eg (enabled) against the optimizer and the accumulation mode."""
  eg = o.eg
  if k > 1 and o.accumulation != 'multisteps':
    _fail(
      'accumulation',
      o.accumulation,
      'eg.enabled=True supports only accumulation="multisteps" when accumulation_steps > 1',
    )
  if o.name == 'adafactor' and o.adafactor_variant != 'bert4keras':
    _fail(
      'adafactor_variant',
      o.adafactor_variant,
      'eg.enabled=True with adafactor needs '
      'adafactor_variant="bert4keras" (the optax placement has the lr mid-chain)',
    )
  if eg.scale_signal not in eg_lib.SCALE_SIGNALS:
    _fail('eg.scale_signal', eg.scale_signal, f'choose one of {eg_lib.SCALE_SIGNALS}')
  if eg.scale_granularity not in eg_lib.SCALE_GRANULARITIES:
    _fail(
      'eg.scale_granularity', eg.scale_granularity, f'choose one of {eg_lib.SCALE_GRANULARITIES}'
    )
  if not 0 < eg.scale_min <= 1 <= eg.scale_max:
    _fail(
      'eg.scale_min/scale_max', (eg.scale_min, eg.scale_max), 'use 0 < scale_min <= 1 <= scale_max'
    )
  if not 0 < eg.gain_min <= 1 <= eg.gain_max:
    _fail('eg.gain_min/gain_max', (eg.gain_min, eg.gain_max), 'use 0 < gain_min <= 1 <= gain_max')
  if eg.scale_lr < 0 or eg.gain_lr < 0:
    _fail('eg.scale_lr/gain_lr', (eg.scale_lr, eg.gain_lr), 'use meta learning rates >= 0')
  if not 0 <= eg.beta < 1:
    _fail('eg.beta', eg.beta, 'use a decay in [0, 1)')


def _stacked_key(config):
  """'layers' when the model scans its layers (leaves stacked on a leading L axis)."""
  return 'layers' if config.model.scan_layers else None


def _adafactor_kwargs(config):
  o = config.optim
  return dict(
    factored=bool(o.factored),
    decay_rate=float(o.decay_rate),
    clipping_threshold=float(o.clipping_threshold),
    min_dim_size_to_factor=int(o.min_dim_size_to_factor),
    merge_small_axes=bool(o.factor_merge_small_axes),
    stacked_key=_stacked_key(config),
  )


def _trust_ratio(config):
  """LAMB's layer adaptation, per layer for stacked leaves (adafactor.per_layer_blocks)."""
  return adafactor_lib.per_layer_blocks(optax.scale_by_trust_ratio(), _stacked_key(config))


def _param_scale(config):
  return adafactor_lib.per_layer_blocks(
    optax.scale_by_param_block_rms(adafactor_lib.EPS2), _stacked_key(config)
  )


def _decay(config):
  return optax.add_decayed_weights(weight_decay(config), mask=decay_mask)


def _direction_and_tail(config, schedule):
  """(direction in gradient sign, tail = decay + lr, EG kwargs) for eg_adapt."""
  o = config.optim
  lr = optax.scale_by_learning_rate(schedule)
  if o.name == 'sgdm':
    return (
      optax.trace(float(o.b1)),
      optax.chain(_decay(config), lr),
      dict(gain_placement='input', direction_from_state=lambda s: s.trace),
    )
  if o.name == 'adamw':
    return (
      optax.scale_by_adam(float(o.b1), float(o.b2), float(o.eps)),
      optax.chain(_decay(config), lr),
      dict(gain_placement='output'),
    )
  if o.name == 'lamb':
    direction = optax.chain(
      optax.scale_by_adam(float(o.b1), float(o.b2), float(o.eps)),
      _decay(config),
      _trust_ratio(config),
    )
    return direction, lr, dict(gain_placement='output')
  direction = adafactor_lib.adafactor_direction(
    momentum=float(o.b1), parameter_scale=bool(o.parameter_scale), **_adafactor_kwargs(config)
  )
  return direction, optax.chain(_decay(config), lr), dict(gain_placement='output')


def _optimizer(config, schedule) -> optax.GradientTransformation:
  """The per-update optimizer (no clipping, no accumulation), EG-wrapped if enabled."""
  o = config.optim
  if o.eg.enabled:
    direction, tail, kwargs = _direction_and_tail(config, schedule)
    eg = o.eg
    if eg.scale_signal == 'gbar':
      kwargs.pop('direction_from_state', None)
    wrapped = eg_lib.eg_adapt(
      direction,
      scale_lr=float(eg.scale_lr),
      gain_lr=float(eg.gain_lr),
      normalized=bool(eg.normalized),
      scale_min=float(eg.scale_min),
      scale_max=float(eg.scale_max),
      gain_min=float(eg.gain_min),
      gain_max=float(eg.gain_max),
      scale_signal=eg.scale_signal,
      scale_granularity=eg.scale_granularity,
      beta=float(eg.beta),
      stacked_key=_stacked_key(config),
      **kwargs,
    )
    return optax.chain(wrapped, tail)
  b1, b2, eps, wd = float(o.b1), float(o.b2), float(o.eps), weight_decay(config)
  if o.name == 'adamw':
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
  if o.name == 'lamb':  # optax.lamb with the trust ratio per layer for stacked leaves
    return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(wd, mask=decay_mask),
      _trust_ratio(config),
      optax.scale_by_learning_rate(schedule),
    )
  if o.name == 'sgdm':
    return optax.chain(optax.trace(b1), _decay(config), optax.scale_by_learning_rate(schedule))
  if o.adafactor_variant == 'optax' and wd > 0:
    logging.warning(
      'adafactor_variant="optax" applies weight decay without the learning '
      'rate (theta -= %g * theta per update, docs/algorithms.md 1.2); use '
      '"bert4keras" for '
      'lr-scaled decay',
      wd,
    )
  return adafactor_lib.adafactor(
    schedule,
    variant=o.adafactor_variant,
    momentum=b1,
    parameter_scale=bool(o.parameter_scale),
    weight_decay=wd,
    weight_decay_mask=decay_mask,
    **_adafactor_kwargs(config),
  )


def _accumulate_in_momentum(config, schedule, k) -> optax.GradientTransformation:
  o = config.optim
  lr = optax.scale_by_learning_rate(schedule)
  b1, b2, eps = float(o.b1), float(o.b2), float(o.eps)
  if o.name == 'sgdm':
    return accumulation_lib.accumulate_in_momentum_sgdm(k, b1, tail=optax.chain(_decay(config), lr))
  if o.name == 'adamw':
    return accumulation_lib.accumulate_in_momentum_adam(
      k, b1, b2, eps, tail=optax.chain(_decay(config), lr)
    )
  if o.name == 'lamb':
    tail = optax.chain(_decay(config), _trust_ratio(config), lr)
    return accumulation_lib.accumulate_in_momentum_adam(k, b1, b2, eps, tail=tail)
  tail = [_param_scale(config)] if o.parameter_scale else []
  tail = optax.chain(*tail, _decay(config), lr)
  return accumulation_lib.accumulate_in_momentum_adafactor(
    k, b1, tail=tail, **_adafactor_kwargs(config)
  )


def build(config) -> optax.GradientTransformation:
  """The optimizer for `config` (see the module docstring for the chain).

  Args:
    config: full ConfigDict (config.optim, config.train.num_train_steps).

  Returns:
    optax.GradientTransformation, called once per micro-batch; with accumulation_steps k > 1
    it returns zero updates on the k - 1 micro-steps inside each window.

  Raises:
    ValueError: invalid config.optim values (see `validate`).
  """
  validate(config)
  o = config.optim
  k = int(o.accumulation_steps)
  schedule = schedules.learning_rate_schedule(config)
  if k > 1 and o.accumulation == 'momentum':
    tx = _accumulate_in_momentum(config, schedule, k)
  elif k > 1 and o.accumulation == 'every_k':
    tx = accumulation_lib.every_k(_optimizer(config, lambda count: schedule(count // k)), k)
  else:
    tx = _optimizer(config, schedule)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(o.grad_clip_norm)), tx)
  if k > 1 and o.accumulation == 'multisteps':
    # float32 buffer (float64 under jax_enable_x64; optax's default is always float32).
    tx = optax.MultiSteps(
      tx, every_k_schedule=k, accumulator_dtype=jnp.result_type(float)
    ).gradient_transformation()
  return adafactor_lib.upcast_to_float32(tx)


def metrics(opt_state) -> dict[str, jax.Array]:
  """Optimizer metrics to log: EG mean scale per layer group ('eg/scale/<group>') and
  'eg/gain_mean' (see `optim.eg.eg_metrics`); {} when nothing adapts."""
  return eg_lib.eg_metrics(opt_state)
