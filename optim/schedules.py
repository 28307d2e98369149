"""Learning-rate schedules indexed by optimizer updates (not micro-steps).

`learning_rate_schedule(config)` turns `config.optim` into an `optax.Schedule`:
step (int, number of optimizer updates already applied) -> learning rate (float32; float64
when jax_enable_x64 is on, so float64 tests are not limited by the schedule's rounding).

| schedule           | lr(step), W = warmup_steps, N = train.num_train_steps, f = end factor |
|--------------------|------------------------------------------------------------------------|
| `linear`           | lr * step / W while step < W, then linear from lr to f*lr at N         |
| `cosine`           | same warmup, then cosine from lr to f*lr at N                          |
| `constant`         | same warmup, then lr                                                   |
| `rsqrt`            | same warmup, then min(lr, 1/sqrt(step + 1)) (AdaFactor, algorithms 1.1) |
| `piecewise_linear` | lr * piecewise_linear(schedule_boundaries)(step) (no extra warmup)     |

Warmup starts from 0 at step 0 (the first update has lr 0, as in optax's warmup schedules)
and is skipped when W = 0. After N the decaying schedules stay at f*lr.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ('linear', 'cosine', 'constant', 'rsqrt', 'piecewise_linear')


def piecewise_linear(
  boundaries: Sequence[tuple[float, float]], from_zero: bool = True
) -> optax.Schedule:
  """Multiplier interpolated linearly between (step, value) points (bert4keras semantics).

  bert4keras `backend.piecewise_linear(t, schedule, from_zero=True)`: the points are sorted by
  step; if `from_zero` and no point sits at step 0, the point (0, 0.0) is prepended (so
  {32000: 1.0, 320000: 0.5} warms up linearly from 0 over 32k steps); between points the value
  is interpolated linearly; before the first point it equals the first value and after the last
  point the last value. optax's `piecewise_interpolate_schedule` is multiplicative (it cannot
  start from 0), hence this helper (it is `jnp.interp`).

  Args:
    boundaries: ((step, value), ...) with distinct integer steps >= 0 (optimizer updates; the
      GAU-alpha / RoFormerV2 recipes give micro-steps: divide those by accumulation_steps).
    from_zero: prepend (0, 0.0) when no point is at step 0.

  Returns:
    schedule(step) -> multiplier (default float dtype).

  Raises:
    ValueError: empty boundaries, a negative step or a repeated step.
  """
  points = sorted((float(s), float(v)) for s, v in boundaries)
  if not points:
    raise ValueError('optim.schedule_boundaries is empty; give at least one (step, multiplier)')
  steps = [s for s, _ in points]
  if steps[0] < 0 or len(set(steps)) != len(steps):
    raise ValueError(
      f'optim.schedule_boundaries steps {steps} must be distinct and >= 0; '
      'remove repeated or negative steps'
    )
  if from_zero and steps[0] != 0:
    points = [(0.0, 0.0)] + points
  xs = np.array([s for s, _ in points])
  ys = np.array([v for _, v in points])

  def schedule(step):
    return jnp.interp(jnp.asarray(step, float), jnp.asarray(xs, float), jnp.asarray(ys, float))

  return schedule


def _with_warmup(peak: float, warmup_steps: int, after: optax.Schedule) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then `after(step - warmup_steps)`."""
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def learning_rate_schedule(config) -> optax.Schedule:
  """The learning rate as a function of the optimizer-update count (docs/algorithms.md 1.1, 6.3).

  Args:
    config: the full ConfigDict; reads config.optim.{learning_rate, schedule, warmup_steps,
      end_learning_rate_factor, schedule_boundaries, accumulation_steps} and
      config.train.num_train_steps (micro-batches; total updates = num_train_steps // k).

  Returns:
    schedule(step: int array, updates applied so far) -> learning rate (jax's default float:
    float32, or float64 under jax_enable_x64).

  Raises:
    ValueError: unknown schedule name (see `optim.validate` for the other checks).
  """
  o = config.optim
  lr = float(o.learning_rate)
  name = o.schedule
  warmup = int(o.warmup_steps)
  # train.num_train_steps counts micro-batches; the schedule spans the optimizer updates.
  total = int(config.train.num_train_steps) // max(int(o.accumulation_steps), 1)
  end = lr * float(o.end_learning_rate_factor)
  decay_steps = max(total - warmup, 1)
  if name == 'linear':
    sched = _with_warmup(lr, warmup, optax.linear_schedule(lr, end, decay_steps))
  elif name == 'cosine':
    alpha = end / lr if lr else 0.0
    sched = _with_warmup(lr, warmup, optax.cosine_decay_schedule(lr, decay_steps, alpha))
  elif name == 'constant':
    sched = _with_warmup(lr, warmup, optax.constant_schedule(lr))
  elif name == 'rsqrt':

    def relative_step(step):
      t = jnp.asarray(step, float) + warmup + 1.0
      return jnp.minimum(lr, jax.lax.rsqrt(t))

    sched = _with_warmup(lr, warmup, relative_step)
  elif name == 'piecewise_linear':
    multiplier = piecewise_linear(o.schedule_boundaries)
    sched = lambda step: lr * multiplier(step)  # noqa: E731
  else:
    raise ValueError(f'optim.schedule={name!r} is unknown; choose one of {", ".join(SCHEDULES)}')

  def schedule(step):
    # A float step keeps optax's schedules in the default float dtype (int32 steps give
    # float32 even under x64); steps below 2^24 are exact in float32.
    return jnp.asarray(sched(jnp.asarray(step, float)), float)

  return schedule
