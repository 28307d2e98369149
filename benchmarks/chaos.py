r"""Kills a pretraining run with SIGKILL at random moments and checks that it still ends
bit-identical to an uninterrupted run (issue 9: a run survives what a pod does to it).

  python benchmarks/chaos.py --kills=8 [--steps=600 --seed=0]

1. An uninterrupted `launch.pretrain` run of --steps steps (reference workdir).
2. The same command on a second workdir, killed with SIGKILL --kills times at moments drawn
   uniformly over the reference run's wall time (so kills land during start-up, restore,
   training steps and asynchronous saves alike), rerun after each kill, then run to the end.
3. The final checkpoints are compared leaf by leaf (parameters, optimizer state, step) with
   `np.array_equal`, and the metrics history is checked for one line per logged step.

Prints one line per kill (time, resume step of the next start) and the verdict; exits 1 if
any array differs. The model is the tiny RoFormer shrunk further, on the built-in corpus, with
a checkpoint every 3 steps so that many kills hit a save in flight.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

_KILLS = flags.DEFINE_integer('kills', 8, 'SIGKILLs to deliver.')
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps of the run.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill moments.')
_ROOT = flags.DEFINE_string('root', 'runs/chaos', 'Directory of the two workdirs (deleted first).')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, steps: int) -> list[str]:
  overrides = {
    'model.hidden_size': 64,
    'model.num_layers': 2,
    'model.num_heads': 2,
    'model.mlp_dim': 128,
    'model.vocab_size': 2000,
    'model.dropout_rate': 0.1,
    'data.seq_len': 64,
    'data.global_batch_size': 8,
    'train.num_train_steps': steps,
    'train.log_every_steps': 3,
    'train.eval_every_steps': steps,
    'train.eval_steps': 2,
    'train.checkpoint_every_steps': 3,
    'train.keep_checkpoints': 2,
  }
  return [
    sys.executable,
    '-m',
    'launch.pretrain',
    '--config=launch/configs/roformer.py:tiny',
    f'--workdir={workdir}',
  ] + [f'--config.{k}={v}' for k, v in overrides.items()]


def run(workdir: str, steps: int, kill_after: float | None = None):
  """Runs the command; with kill_after, SIGKILLs it after that many seconds if still alive.

  Returns:
    (exit code, whether a kill was delivered, wall seconds).
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  start = time.time()
  proc = subprocess.Popen(
    command(workdir, steps),
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  if kill_after is not None:
    try:
      proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return proc.returncode, True, time.time() - start
  err = proc.communicate()[1]
  if proc.returncode != 0:
    raise RuntimeError(f'{workdir}: exit {proc.returncode}\n{err[-3000:]}')
  return proc.returncode, False, time.time() - start


def latest_step(workdir: str):
  root = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
  return max(steps) if steps else None


def final_state(workdir: str):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  mngr.close()
  return step, jax.tree.leaves(jax.device_get(state))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  shutil.rmtree(_ROOT.value, ignore_errors=True)
  reference, chaos = os.path.join(_ROOT.value, 'reference'), os.path.join(_ROOT.value, 'chaos')
  run(reference, _STEPS.value)  # warms the dataset and tokenizer caches
  shutil.rmtree(reference)
  _, _, wall = run(reference, _STEPS.value)
  times = [json.loads(l)['time'] for l in open(os.path.join(reference, 'metrics.jsonl'))]
  startup = max(wall - (max(times) - min(times)), 0.0)  # imports, data, compile, restore
  print(
    f'reference: {_STEPS.value} steps uninterrupted in {wall:.1f} s '
    f'({startup:.1f} s of it before the first step)'
  )
  rng = np.random.default_rng(_SEED.value)
  delivered = 0
  while delivered < _KILLS.value:
    resume = latest_step(chaos) or 0
    remaining = startup + (1 - resume / _STEPS.value) * (wall - startup)
    after = float(rng.uniform(0.5 * startup, startup + (remaining - startup) / 3))
    _, killed, _ = run(chaos, _STEPS.value, kill_after=after)
    if not killed:
      print(f'  the run ended before {after:.1f} s: {delivered} kills delivered')
      break
    delivered += 1
    print(
      f'kill {delivered}: SIGKILL {after:.1f} s after start (resumed from step {resume}); '
      f'next start resumes from step {latest_step(chaos)}'
    )
  run(chaos, _STEPS.value)
  step_a, a = final_state(reference)
  step_b, b = final_state(chaos)
  same = [np.array_equal(x, y) for x, y in zip(a, b)]
  lines = [json.loads(l) for l in open(os.path.join(chaos, 'metrics.jsonl'))]
  logged = [l['step'] for l in lines if l['split'] == 'train']
  print(
    f'{delivered} kills survived; final step {step_b} (reference {step_a}); '
    f'{sum(same)}/{len(same)} arrays bit-identical; train metrics lines '
    f'{"one per logged step" if logged == sorted(set(logged)) else "DUPLICATED"}'
  )
  ok = step_a == step_b and all(same) and len(a) == len(b) and logged == sorted(set(logged))
  print('PASS' if ok else 'FAIL')
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main)
