r"""Cloud TPU VMs through the `gcloud` CLI: `python -m launch.tpu_vm COMMAND --tpu=NAME ...`.

  create   a queued resource (spot, reserved or on-demand) and wait until it is ACTIVE
  setup    copy this repository (or clone --repo_url) onto every worker and install it
  run      the same `launch.pretrain` command on every worker, in the background, one log
           file per worker (`~/encoder-pretrain/logs/<run_name>.log`)
  logs     the last lines of one worker's log (--worker=N, --follow to keep reading)
  ssh      a shell or --command on --worker (all or an index)
  status   the queued resource and the TPU VM as gcloud describes them
  delete   the queued resource and its TPU VM

`--num_slices=N` (N > 1) makes a multi-slice resource: N slices of --accelerator_type joined
by the data-centre network, one queued resource <tpu> whose nodes are named from the prefix
<tpu>; give the same --num_slices to every later command, which then reaches the slices'
workers through `gcloud compute tpus queued-resources ssh/scp --node=... --worker=...`. The
trainer splits the mesh's data axis across the slices (docs/design.md 13).

`--dry_run` (or `--dry-run`) prints the exact commands and runs nothing. Flag names mirror
gcloud's (`--accelerator-type` works as `--accelerator_type`). A full sequence, from nothing to
a resumed `base` run after a preemption, is in docs/operations.md 5.

Exit codes: 0 done, 1 a gcloud command failed (its exit code is printed), 2 bad flags.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import time

from absl import app
from absl import flags

from launch.cli import fail

COMMANDS = ('create', 'setup', 'run', 'logs', 'ssh', 'status', 'delete')
REMOTE_DIR = '~/encoder-pretrain'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TPU = flags.DEFINE_string('tpu', None, 'TPU VM (and queued resource) name.')
_ZONE = flags.DEFINE_string('zone', None, 'Zone, e.g. us-west4-a (v5e) or us-east5-b (v6e).')
_PROJECT = flags.DEFINE_string('project', None, "Google Cloud project (default: gcloud's).")
_ACCELERATOR = flags.DEFINE_string(
  'accelerator_type', 'v5litepod-8', 'create: e.g. v4-8, v5litepod-32 (v5e-32), v5p-8, v6e-8.'
)
_RUNTIME = flags.DEFINE_string(
  'runtime_version', None, 'create: TPU software version; default by accelerator family.'
)
_SPOT = flags.DEFINE_bool('spot', False, 'create: spot capacity (cheaper, preemptible).')
_RESERVED = flags.DEFINE_bool('reserved', False, "create: use the project's reservation.")
_WAIT = flags.DEFINE_bool('wait', True, 'create: poll until the resource is ACTIVE.')
_REPO_URL = flags.DEFINE_string(
  'repo_url', None, 'setup: git URL to clone on the workers instead of copying this checkout.'
)
_BRANCH = flags.DEFINE_string('branch', 'main', 'setup: branch or tag of --repo_url.')
_CONFIG = flags.DEFINE_string(
  'config', 'launch/configs/roformer.py:base', 'run: config file and preset.'
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'run: run directory shared by all workers, e.g. gs://bucket/runs/base.'
)
_ARGS = flags.DEFINE_string(
  'args', '', 'run: more launch.pretrain flags, e.g. "--config.train.num_train_steps=100000".'
)
_RUN_NAME = flags.DEFINE_string(
  'run_name', None, "run/logs: log file name (default: the workdir's last component)."
)
_WORKER = flags.DEFINE_string('worker', 'all', 'ssh/logs: `all` or a worker index.')
_NUM_SLICES = flags.DEFINE_integer(
  'num_slices', 1, 'Slices of --accelerator_type joined by the data-centre network (every command).'
)
_NODE = flags.DEFINE_string(
  'node', '0', 'ssh/logs with --num_slices > 1: the slice, `all` or an index.'
)
_COMMAND = flags.DEFINE_string('command', None, 'ssh: command to run (default: a shell).')
_FOLLOW = flags.DEFINE_bool('follow', False, 'logs: keep printing new lines.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the gcloud commands; run nothing.')

# Default runtime per accelerator family (Cloud TPU "TPU software versions" page).
RUNTIMES = {
  'v4': 'tpu-ubuntu2204-base',
  'v5litepod': 'v2-alpha-tpuv5-lite',
  'v5p': 'v2-alpha-tpuv5',
  'v6e': 'v2-alpha-tpuv6e',
}


@dataclasses.dataclass
class Options:
  """Everything a command needs (the flags, as plain values, so tests need no flag parsing)."""

  tpu: str
  zone: str
  project: str | None = None
  accelerator_type: str = 'v5litepod-8'
  runtime_version: str | None = None
  spot: bool = False
  reserved: bool = False
  repo_url: str | None = None
  branch: str = 'main'
  config: str = 'launch/configs/roformer.py:base'
  workdir: str | None = None
  args: str = ''
  run_name: str | None = None
  worker: str = 'all'
  command: str | None = None
  follow: bool = False
  num_slices: int = 1
  node: str = '0'


def _location(o: Options) -> list[str]:
  return [f'--zone={o.zone}'] + ([f'--project={o.project}'] if o.project else [])


def _tpu_vm(o: Options, verb: str, *rest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, o.tpu, *_location(o), *rest]


def _queued(o: Options, verb: str, *rest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'queued-resources', verb, o.tpu, *_location(o), *rest]


def runtime_for(accelerator_type: str) -> str:
  """The default TPU software version for an accelerator type such as 'v5litepod-32'.

  Raises:
    ValueError: an accelerator family without a default (pass --runtime_version).
  """
  family = accelerator_type.rsplit('-', 1)[0]
  if family not in RUNTIMES:
    raise ValueError(
      f'--accelerator_type={accelerator_type}: no default runtime for '
      f'{family!r}; pass --runtime_version (known: {", ".join(RUNTIMES)}).'
    )
  return RUNTIMES[family]


def _ssh(o: Options, *rest: str) -> list[str]:
  """ssh to --worker of the TPU VM, or of slice --node of a multi-slice queued resource."""
  if o.num_slices > 1:
    return _queued(o, 'ssh', f'--node={o.node}', f'--worker={o.worker}', *rest)
  return _tpu_vm(o, 'ssh', f'--worker={o.worker}', *rest)


def _remote(o: Options, script: str) -> list[str]:
  return _ssh(o, f'--command={script}')


def _every_worker(o: Options) -> Options:
  return dataclasses.replace(o, worker='all', node='all')


def run_name(o: Options) -> str:
  """The log file's name: --run_name, else the workdir's last component.

  Raises:
    ValueError: neither is given, or the name has characters other than letters, digits,
      '.', '_' and '-' (it goes into a remote shell command).
  """
  if not (o.run_name or o.workdir):
    raise ValueError('give --workdir (the run directory) or --run_name (the log file name).')
  name = o.run_name or o.workdir.rstrip('/').rsplit('/', 1)[-1]
  if not re.fullmatch(r'[A-Za-z0-9._-]+', name):
    raise ValueError(
      f'run name {name!r} (from --run_name or the last part of --workdir) may '
      f'only hold letters, digits, ".", "_" and "-"; pass --run_name.'
    )
  return name


# The workers' Python is the image's (3.10 on Ubuntu 22.04): uv provides 3.12 for jax >= 0.11.
INSTALL = (
  'python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --python 3.12 .venv '
  "&& ~/.local/bin/uv pip install -q --python .venv/bin/python -e '.[tpu]'"
)


def commands(name: str, o: Options) -> list[list[str]]:
  """The commands of subcommand `name`, in order (each an argv list).

  Raises:
    ValueError: a flag the command needs is missing or invalid (message names it).
  """
  if o.num_slices < 1:
    raise ValueError(f'--num_slices={o.num_slices} must be >= 1 (1: one slice).')
  if name == 'create':
    if o.spot and o.reserved:
      raise ValueError(
        '--spot and --reserved exclude each other; pass one (or neither for on-demand capacity).'
      )
    capacity = ['--spot'] if o.spot else ['--reserved'] if o.reserved else []
    nodes = (
      [f'--node-count={o.num_slices}', f'--node-prefix={o.tpu}']
      if o.num_slices > 1
      else [f'--node-id={o.tpu}']
    )
    return [
      _queued(
        o,
        'create',
        *nodes,
        f'--accelerator-type={o.accelerator_type}',
        f'--runtime-version={o.runtime_version or runtime_for(o.accelerator_type)}',
        *capacity,
      )
    ]
  if name == 'setup':
    if o.repo_url:
      fetch = (
        f'rm -rf {REMOTE_DIR} && git clone -q --branch {shlex.quote(o.branch)} '
        f'{shlex.quote(o.repo_url)} {REMOTE_DIR}'
      )
      return [_remote(_every_worker(o), f'{fetch} && cd {REMOTE_DIR} && {INSTALL}')]
    archive = '/tmp/encoder-pretrain.tar.gz'
    scp = ['gcloud', 'compute', 'tpus', 'queued-resources' if o.num_slices > 1 else 'tpu-vm']
    return [
      ['git', '-C', ROOT, 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD'],
      [
        *scp,
        'scp',
        archive,
        f'{o.tpu}:encoder-pretrain.tar.gz',
        *_location(o),
        *(['--node=all'] if o.num_slices > 1 else []),
        '--worker=all',
      ],
      _remote(
        _every_worker(o),
        f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf '
        f'~/encoder-pretrain.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && {INSTALL}',
      ),
    ]
  if name == 'run':
    if not o.workdir:
      raise ValueError(
        'run needs --workdir (a gs:// path every worker can reach, e.g. gs://my-bucket/runs/base).'
      )
    if not o.workdir.startswith('gs://'):
      raise ValueError(
        f'--workdir={o.workdir}: on a TPU pod every worker writes the same '
        f'checkpoints; give a gs:// path.'
      )
    log = f'logs/{run_name(o)}.log'
    train = (
      f'.venv/bin/python -m launch.pretrain --config={shlex.quote(o.config)} '
      f'--workdir={shlex.quote(o.workdir)} {o.args}'
    ).strip()
    return [
      _remote(
        _every_worker(o),
        f'cd {REMOTE_DIR} && mkdir -p logs && (nohup {train} < /dev/null > {log} '
        f'2>&1 &) && echo "worker $(hostname): logging to {REMOTE_DIR}/{log}"',
      )
    ]
  if name == 'logs':
    if o.worker == 'all' or (o.num_slices > 1 and o.node == 'all'):
      raise ValueError(
        'logs needs one --worker index (0 is the one that writes metrics) and, with '
        '--num_slices, one --node (slice) index.'
      )
    tail = 'tail -n 100' + (' -F' if o.follow else '')
    return [_remote(o, f'{tail} {REMOTE_DIR}/logs/{run_name(o)}.log')]
  if name == 'ssh':
    return [_ssh(o, *([f'--command={o.command}'] if o.command else []))]
  if name == 'status':
    # The queued resource lists every slice's state; <tpu> names a TPU VM only for one slice.
    return [_queued(o, 'describe')] + ([_tpu_vm(o, 'describe')] if o.num_slices == 1 else [])
  if name == 'delete':
    return [_queued(o, 'delete', '--force', '--quiet')]
  raise ValueError(f'unknown command {name!r}; choose one of {", ".join(COMMANDS)}.')


def wait_active(o: Options, poll_s: float = 30.0, timeout_s: float = 3 * 3600):
  """Polls the queued resource until ACTIVE; raises RuntimeError on FAILED/SUSPENDED."""
  describe = _queued(o, 'describe', '--format=value(state.state)')
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    result = subprocess.run(describe, capture_output=True, text=True)
    state = result.stdout.strip() if result.returncode == 0 else 'UNKNOWN (describe failed)'
    print(f'{o.tpu}: {state}', flush=True)
    if state == 'ACTIVE':
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise RuntimeError(f'{o.tpu} is {state}; delete it and create again.')
    time.sleep(poll_s)
  raise RuntimeError(f'{o.tpu} not ACTIVE after {timeout_s:.0f} s')


def normalize_argv(argv: list[str]) -> list[str]:
  """gcloud-style `--dry-run` / `--accelerator-type=...` -> absl's underscores."""
  out = []
  for arg in argv:
    if arg.startswith('--') and not arg.startswith('--config.'):
      flag, eq, value = arg.partition('=')
      arg = flag.replace('-', '_').replace('__', '--', 1) + eq + value
    out.append(arg)
  return out


def parse_flags(argv):
  try:
    return flags.FLAGS(normalize_argv(argv))
  except flags.Error as e:
    fail(f'bad flag: {e}; see python -m launch.tpu_vm --helpfull.')


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    fail(
      f'give one command: python -m launch.tpu_vm {{{"|".join(COMMANDS)}}} --tpu=NAME '
      f'--zone=ZONE [flags]; got {argv[1:]}.'
    )
  if not _TPU.value or not _ZONE.value:
    fail('--tpu and --zone are required.')
  o = Options(
    tpu=_TPU.value,
    zone=_ZONE.value,
    project=_PROJECT.value,
    accelerator_type=_ACCELERATOR.value,
    runtime_version=_RUNTIME.value,
    spot=_SPOT.value,
    reserved=_RESERVED.value,
    repo_url=_REPO_URL.value,
    branch=_BRANCH.value,
    config=_CONFIG.value,
    workdir=_WORKDIR.value,
    args=_ARGS.value,
    run_name=_RUN_NAME.value,
    worker=_WORKER.value,
    command=_COMMAND.value,
    follow=_FOLLOW.value,
    num_slices=_NUM_SLICES.value,
    node=_NODE.value,
  )
  try:
    cmds = commands(argv[1], o)
  except ValueError as e:
    fail(str(e))
  for cmd in cmds:
    print(shlex.join(cmd), flush=True)
    if _DRY_RUN.value:
      continue
    try:
      result = subprocess.run(cmd)
    except FileNotFoundError:
      fail(f'{cmd[0]} is not installed here: install the Google Cloud CLI (gcloud) and run again.')
    if result.returncode:
      fail(f'{cmd[0]} exited {result.returncode}: {shlex.join(cmd)}', 1)
  if argv[1] == 'create' and _WAIT.value:
    if _DRY_RUN.value:
      print(
        shlex.join(_queued(o, 'describe', '--format=value(state.state)')), '# polled until ACTIVE'
      )
    else:
      try:
        wait_active(o)
      except RuntimeError as e:
        fail(str(e), 1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
