"""Operating a run: the TPU VM launcher's commands, when JAX's distributed runtime starts,
report plots and tables, the progress bar and the run summary."""

import dataclasses
import json
import shlex
import subprocess
import sys

from absl import logging as absl_logging
import numpy as np
import pytest

from helpers import make_tiny_config
from helpers import ROOT
from helpers import run_launcher
from launch import cli
from launch import tpu_vm
from pretrain import progress
from pretrain import report
from pretrain import storage
from pretrain import train

POD = tpu_vm.Options(
  tpu='pod',
  zone='us-west4-a',
  project='proj',
  accelerator_type='v5litepod-32',
  spot=True,
  workdir='gs://bucket/runs/base',
  config='launch/configs/roformer.py:base',
)


# ----------------------------------------------------------------------------- tpu_vm


def test_create_is_a_queued_spot_resource_with_the_family_runtime():
  (cmd,) = tpu_vm.commands('create', POD)
  assert shlex.join(cmd) == (
    'gcloud compute tpus queued-resources create pod --zone=us-west4-a --project=proj '
    '--node-id=pod --accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite '
    '--spot'
  )
  reserved = tpu_vm.commands(
    'create', tpu_vm.Options(tpu='p', zone='z', reserved=True, accelerator_type='v6e-8')
  )[0]
  assert '--reserved' in reserved and '--runtime-version=v2-alpha-tpuv6e' in reserved
  with pytest.raises(ValueError, match='--spot and --reserved exclude each other'):
    tpu_vm.commands('create', tpu_vm.Options(tpu='p', zone='z', spot=True, reserved=True))
  with pytest.raises(ValueError, match='no default runtime'):
    tpu_vm.commands('create', tpu_vm.Options(tpu='p', zone='z', accelerator_type='v9-8'))


def test_setup_copies_this_checkout_to_every_worker_and_installs_it():
  archive, scp, install = tpu_vm.commands('setup', POD)
  assert archive[:2] == ['git', '-C'] and 'HEAD' in archive
  assert scp[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/encoder-pretrain.tar.gz']
  assert '--worker=all' in scp and '--worker=all' in install
  script = install[-1]
  assert 'tar -xzf ~/encoder-pretrain.tar.gz' in script and "-e '.[tpu]'" in script
  assert '--python 3.12' in script  # the TPU images' Python is too old for jax >= 0.11
  (clone,) = tpu_vm.commands('setup', tpu_vm.Options(tpu='p', zone='z', repo_url='https://x/r.git'))
  assert 'git clone -q --branch main https://x/r.git ~/encoder-pretrain' in clone[-1]


def test_run_starts_the_same_pretrain_command_on_every_worker_with_a_log_each():
  (cmd,) = tpu_vm.commands(
    'run', dataclasses.replace(POD, args='--config.train.num_train_steps=1000')
  )
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  assert '--worker=all' in cmd
  script = cmd[-1]
  assert script.startswith('--command=cd ~/encoder-pretrain && mkdir -p logs && (nohup ')
  assert (
    '.venv/bin/python -m launch.pretrain --config=launch/configs/roformer.py:base '
    '--workdir=gs://bucket/runs/base --config.train.num_train_steps=1000 < /dev/null > '
    'logs/base.log 2>&1 &)'
  ) in script
  with pytest.raises(ValueError, match='give a gs:// path'):
    tpu_vm.commands('run', tpu_vm.Options(tpu='p', zone='z', workdir='runs/base'))
  (logs,) = tpu_vm.commands('logs', dataclasses.replace(POD, worker='3', follow=True))
  assert '--worker=3' in logs and logs[-1] == (
    '--command=tail -n 100 -F ~/encoder-pretrain/logs/base.log'
  )
  assert tpu_vm.commands('delete', POD)[0][-2:] == ['--force', '--quiet']
  for bad in ('gs://b/runs/my run', 'gs://b/$(id)'):
    with pytest.raises(ValueError, match='may only hold letters'):
      tpu_vm.commands('run', dataclasses.replace(POD, workdir=bad))
  with pytest.raises(ValueError, match='give --workdir'):
    tpu_vm.commands('logs', tpu_vm.Options(tpu='p', zone='z', worker='0'))


def test_dry_run_cli_prints_the_commands_and_accepts_gcloud_spelling():
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.tpu_vm',
      'create',
      '--dry-run',
      '--tpu=pod',
      '--zone=us-west4-a',
      '--accelerator-type=v5litepod-32',
      '--spot',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith('gcloud compute tpus queued-resources create pod')
  assert '--accelerator-type=v5litepod-32' in lines[0]
  assert lines[1].startswith(
    'gcloud compute tpus queued-resources describe pod '
    "--zone=us-west4-a '--format=value(state.state)'"
  )
  bad = subprocess.run(
    [sys.executable, '-m', 'launch.tpu_vm', 'run', '--dry_run', '--tpu=p', '--zone=z'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert bad.returncode == 2 and 'run needs --workdir' in bad.stderr


@pytest.mark.parametrize(
  'coordinator, environ, chips, mode',
  [
    ('host:1234', {}, 0, 'explicit'),
    (None, {'TPU_WORKER_HOSTNAMES': 'a,b'}, 0, 'auto'),
    (None, {'MEGASCALE_COORDINATOR_ADDRESS': 'a'}, 0, 'auto'),
    (None, {}, 4, 'auto'),  # a Cloud TPU VM: no variable is set
    (None, {'JAX_PLATFORMS': 'cpu'}, 4, None),  # TPU chips, but told to use the CPU
    (None, {'JAX_PLATFORMS': 'tpu,cpu'}, 4, 'auto'),
    (None, {}, 0, None),  # a laptop, a GPU box, CI
  ],
)
def test_distributed_runtime_starts_on_tpu_vms_and_clusters_only(coordinator, environ, chips, mode):
  assert cli.distributed_mode(coordinator, environ, chips) == mode


# ----------------------------------------------------------------------------- report


def _fake_run(path, losses, tokens_per_step=(8, 32), evals=((4, 5.0),), results=None):
  path.mkdir()
  lines = [
    {
      'step': i + 1,
      'split': 'train',
      'time': 100.0 + i,
      'loss': l,
      'learning_rate': 1e-3,
      'tokens_per_sec': 1000.0 + i,
      'mfu': 0.3,
    }
    for i, l in enumerate(losses)
  ]
  lines += [
    {'step': s, 'split': 'eval', 'time': 100.0 + s, 'loss': l, 'accuracy': 0.1} for s, l in evals
  ]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines) + '{torn')
  batch, seq = tokens_per_step
  (path / 'config.json').write_text(
    json.dumps({'data': {'global_batch_size': batch, 'seq_len': seq}})
  )
  if results:
    (path / 'results.json').write_text(json.dumps(results))
  return path


def test_report_draws_one_curve_per_run_and_split_and_a_table(tmp_path):
  a = _fake_run(tmp_path / 'grown', [6.0, 5.5, 5.0, 4.5])
  b = _fake_run(
    tmp_path / 'scratch',
    [7.0, 6.5, 6.2, 6.0],
    tokens_per_step=(4, 32),
    evals=((2, 6.6), (4, 6.1)),
    results={'accuracy': 0.81},
  )
  runs = [report.load_run(str(a)), report.load_run(str(b))]
  fig = report.plot_loss(runs, 'tokens')
  (ax,) = fig.axes
  labels = [line.get_label() for line in ax.get_lines()]
  assert labels == ['grown train', 'grown eval', 'scratch train', 'scratch eval']
  np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [256, 512, 768, 1024])
  np.testing.assert_array_equal(ax.get_lines()[3].get_ydata(), [6.6, 6.1])
  lr = report.plot_train_scalar(runs, 'learning_rate', 'lr', 'lr')
  assert len(lr.axes[0].get_lines()) == 2
  written = report.write_report([str(a), str(b)], str(tmp_path / 'out'))
  # Every plot but the probe's and the mixture's (these runs have neither), and the table.
  optional = {'probe_accuracy.png', 'data_mixture.png'}
  assert sorted(p.rsplit('/', 1)[1] for p in written) == sorted(
    [p for p in report.PLOTS if p not in optional] + ['summary.md']
  )
  table = (tmp_path / 'out' / 'summary.md').read_text()
  assert '| grown | 4 | 1,024 | 4.5000 | 5.0000 | 5.0000 (4) | 4 s | 1,002 | 30.0% |' in table
  assert '| scratch | fine-tuning results' not in table and '| scratch | accuracy 0.81 |' in table
  with pytest.raises(report.ReportError, match='has no metrics.jsonl'):
    report.load_run(str(tmp_path))


def test_report_skips_lines_that_are_not_metrics_records(tmp_path, warnings):
  """Valid JSON of the wrong shape (a step that is not an integer, no step, a text value)
  ended `launch.report` in a traceback; such lines are skipped with one warning, as torn ones
  always were."""
  run = _fake_run(tmp_path / 'run', [6.0, 5.5, 5.0, 4.5])
  with open(run / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": "x", "split": "train", "loss": 1.0}\n')
    f.write('{"split": "train", "loss": 1.0}\n')
    f.write('{"step": 9, "split": "train", "loss": "low"}\n')
    f.write('[1, 2]\n{"step": 10, "spl')
  loaded = report.load_run(str(run))
  assert [r['step'] for r in loaded.train] == [1, 2, 3, 4]
  assert len(warnings) == 1 and 'skipped 5 line(s) that are not metrics records' in warnings[0]
  report.write_report([str(run)], str(tmp_path / 'out'))  # draws and tabulates what is left


def test_report_cli_writes_the_files(tmp_path):
  a = _fake_run(tmp_path / 'a', [6.0, 5.0])
  out = subprocess.run(
    [sys.executable, '-m', 'launch.report', str(a), f'--out={tmp_path}/r'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  assert (tmp_path / 'r' / 'loss_vs_step.png').stat().st_size > 1000
  assert '| a | 4 |' in out.stdout
  bad = subprocess.run(
    [sys.executable, '-m', 'launch.report', str(a), '--outt=x'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 2 and 'bad flag' in bad.stderr and 'Traceback' not in bad.stderr


# ----------------------------------------------------------------------------- progress


def test_progress_bar_on_shows_steps_and_the_run_ends_with_a_summary(
  text_corpus, cache_dir, tmp_path, capfd, caplog
):
  config = make_tiny_config(text_corpus, cache_dir, **{'train.progress': 'on'})
  config.train.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  err = capfd.readouterr().err
  assert '4/4' in err and 'tok/s' in err  # tqdm's bar with our postfix
  config.train.progress, config.train.num_train_steps = 'auto', 6  # stderr is not a terminal
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    train.train_and_evaluate(config, str(tmp_path))
  finally:
    absl_logging.set_verbosity(verbosity)
  assert '6/6' not in capfd.readouterr().err
  assert 'run summary (at step 6 of 6)' in caplog.text
  assert 'steps        4 -> 6 (2 this run' in caplog.text


def test_run_summary_says_how_to_resume_or_continue(tmp_path):
  evals = [{'step': 2, 'loss': 5.0, 'accuracy': 0.2}, {'step': 4, 'loss': 5.5, 'accuracy': 0.1}]
  text = progress.run_summary(
    workdir=str(tmp_path),
    start_step=0,
    step=4,
    num_steps=10,
    tokens=4096,
    seconds=2.0,
    evals=evals,
    latest_checkpoint=4,
    stopped_by='SIGTERM',
  )
  assert text.startswith('run summary (stopped by SIGTERM at step 4 of 10)')
  assert 'final loss 5.5000, acc 0.1000 (step 4); best loss 5.0000 (step 2)' in text
  assert '2,048 tokens/s overall' in text and 'resume' in text
  assert progress.resume_command(['/x/launch/pretrain.py', '--workdir=runs/a b']) == (
    "python -m launch.pretrain '--workdir=runs/a b'"
  )


# ----------------------------------------------------------------------------- gs:// paths


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://bucket/... served from tmp_path/gcs/bucket/... through etils.epath's test mock (no
  network): the path handling of every workdir file is exercised, not GCS itself. What goes
  through google-cloud-storage instead (the lease, metrics.jsonl appends) finds no GCS here
  and takes its fallback (tests/test_bucket_workdir.py runs those against an emulator)."""
  from etils.epath import testing as epath_testing  # pylint: disable=g-import-not-at-top

  def no_gcs(shared=True):
    raise OSError('no GCS API in this test (etils.epath is faked)')

  monkeypatch.setattr(storage, 'gcs_client', no_gcs)

  root = tmp_path / 'gcs'
  root.mkdir()

  def local(path):
    path = str(path)
    return str(root / path.split('://', 1)[1]) if '://' in path else path

  one = lambda orig, path, *a, **k: orig(local(path), *a, **k)
  two = lambda orig, path, dst, *a, **k: orig(local(path), local(dst), *a, **k)
  fns = {
    n: one
    for n in (
      'open',
      'exists',
      'isdir',
      'listdir',
      'glob',
      'makedirs',
      'mkdir',
      'rmtree',
      'remove',
      'stat',
      'walk',
    )
  }
  fns.update(rename=two, replace=two, copy=two)
  with epath_testing.mock_epath(**fns):
    yield root


def test_workdir_files_on_gs_paths(fake_gcs, text_corpus, cache_dir):
  from pretrain import checkpointing  # pylint: disable=g-import-not-at-top
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  workdir = 'gs://bucket/runs/base'
  guards.check_writable_dir(workdir)
  guards.WorkdirLock(workdir).acquire().release()  # no POSIX lock on a bucket: a no-op
  checkpointing.write_config(workdir, make_tiny_config(text_corpus, cache_dir))
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': 7.0 - step, 'tokens_per_sec': 10.0})
  writer.close()
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)  # a resumed run appends
  writer.write(4, 'eval', {'loss': 3.5})
  local = fake_gcs / 'bucket' / 'runs' / 'base'
  assert len((local / 'metrics.jsonl').read_text().splitlines()) == 4
  assert metrics_lib.truncate_history(workdir, 2) == 2
  assert len((local / 'metrics.dropped.jsonl').read_text().splitlines()) == 2
  run = report.load_run(workdir)
  assert run.name == 'base' and [l['step'] for l in run.train] == [1, 2]
  assert run.tokens_per_step == 8 * 32  # from config.json in the bucket
  assert checkpointing.checkpoint_directory(workdir + '/') == 'gs://bucket/runs/base/checkpoints'


def test_profile_steps_write_a_trace_of_the_window(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(text_corpus, cache_dir, **{'train.profile_steps': '2,2'})
  config.train.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  traces = list((tmp_path / 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((tmp_path / 'profile').rglob('*.trace.json.gz'))  # what Perfetto opens
  for bad in ('5', '0,3', 'a,b'):
    config.train.profile_steps = bad
    with pytest.raises(train.InputError, match='profile_steps=.*give START,COUNT'):
      train.train_and_evaluate(config, str(tmp_path / 'bad'))


# ----------------------------------------------------------------------------- AOT for TPU


def test_topology_names_and_the_mfu_a_target_throughput_needs():
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  assert aot.topology_name('v5e-32') == aot.topology_name('v5litepod-32') == 'v5e:4x8'
  assert aot.topology_name('v6e:4x4') == 'v6e:4x4'
  with pytest.raises(ValueError, match="--topology='v9-8' is not known"):
    aot.topology_name('v9-8')
  report_ = aot.AotReport(
    topology='v5e-8',
    chips=8,
    devices=8,
    mesh={},
    argument_bytes=2**30,
    output_bytes=2**30,
    temp_bytes=15 * 2**30,
    code_bytes=0,
    hbm_bytes=16 * 2**30,
    compiled_flops=0.0,
    model_flops=8e12,
    tokens_per_step=1000,
    peak_flops_per_chip=1e12,
  )
  assert report_.total_bytes == 16 * 2**30 and report_.fits  # donated outputs not counted
  assert report_.mfu_needed(1000) == pytest.approx(1.0)  # 8e12 FLOPs/s over 8 x 1e12


@pytest.mark.slow
def test_aot_compiles_the_train_step_for_a_tpu_slice(text_corpus, cache_dir):
  """Needs libtpu (`pip install -e '.[tpu]'`): compiles for v5e-8 with no TPU."""
  pytest.importorskip('libtpu', reason="libtpu is not installed (pip install -e '.[tpu]')")
  from pretrain import aot  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(text_corpus, cache_dir, **{'mesh.shape': (1, -1, 1)})
  r = aot.compile_train_step(config, 'v5e-8')
  assert r.chips == r.devices == 8 and r.mesh == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert 0 < r.argument_bytes < r.hbm_bytes and r.fits and r.compiled_flops > 0
  # libtpu describes v4 with one device per TensorCore: 4 chips, 8 devices, each with half a
  # chip's 32 GiB; the MFU divides by the 4 chips' peak, not 8.
  r = aot.compile_train_step(config, 'v4-8')
  assert (r.chips, r.devices, r.hbm_bytes) == (4, 8, 16 * 2**30)
  assert r.mfu_needed(1e6) == pytest.approx(
    r.model_flops * 1e6 / r.tokens_per_step / (4 * r.peak_flops_per_chip)
  )
  # The compiler's own out-of-HBM verdict is DoesNotFit, not a crash.
  config.data.global_batch_size = 2**20
  with pytest.raises(aot.DoesNotFit, match='HBM'):
    aot.compile_train_step(config, 'v5e-8')


def test_report_plots_the_probe_and_the_mixture_only_for_runs_that_have_them(tmp_path):
  a = _fake_run(tmp_path / 'probed', [6.0, 5.0])
  extra = [
    {'step': 2, 'split': 'probe', 'time': 1.0, 'accuracy': 0.55, 'train_accuracy': 0.7},
    {'step': 4, 'split': 'probe', 'time': 2.0, 'accuracy': 0.6, 'train_accuracy': 0.8},
    {'step': 2, 'split': 'data', 'time': 1.0, 'wiki/document_share': 0.7},
    {'step': 2, 'split': 'data', 'time': 1.0, 'wiki/token_share': 0.8},
  ]
  with open(a / 'metrics.jsonl', 'a') as f:
    f.write('\n' + ''.join(json.dumps(l) + '\n' for l in extra))
  b = _fake_run(tmp_path / 'plain', [6.0, 5.0])
  runs = [report.load_run(str(a)), report.load_run(str(b))]
  (ax,) = report.plot_probe(runs).axes
  assert [l.get_label() for l in ax.get_lines()] == ['probed dev', 'probed train']
  np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [0.55, 0.6])
  (ax,) = report.plot_mixture(runs).axes
  assert [l.get_label() for l in ax.get_lines()] == ['probed wiki documents', 'probed wiki tokens']
  written = report.write_report([str(b)], str(tmp_path / 'plain_report'))
  assert not {p.rsplit('/', 1)[1] for p in written} & {'probe_accuracy.png', 'data_mixture.png'}
  written = report.write_report([str(a), str(b)], str(tmp_path / 'both'))
  assert any(p.endswith('probe_accuracy.png') for p in written)
  assert any(p.endswith('data_mixture.png') for p in written)


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--config=launch/configs/roformer.py:tiny', '--config.model.bogus=1'], 'bad flag: bogus'),
    (['--topology=0xv5e-8'], 'the number of slices must be >= 1'),
    (['--topology=v9-8'], "--topology='v9-8' is not known"),
    (['--topology=v5e-8', '--tokens_per_sec=-5'], '--tokens_per_sec=-5.0: give the slice'),
  ],
)
def test_aot_bad_flags_exit_2_without_a_traceback(flags, message):
  out = run_launcher('launch.aot', *flags, timeout=120)
  assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


@pytest.mark.parametrize('module', ['pretrain', 'finetune', 'convert', 'upscale', 'aot'])
def test_a_config_file_that_does_not_exist_exits_2_before_any_work(module, tmp_path):
  """config_flags keeps a failed load until the config is first read: the launchers used to
  start (build data, restore a run) and end in a traceback there."""
  out = run_launcher(f'launch.{module}', '--config=launch/configs/roformr.py:tiny', timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'bad flag: --config: the config file cannot be loaded ([Errno 2] No such file' in (
    out.stderr
  )
  assert 'launch/configs/roformr.py' in out.stderr and 'Traceback' not in out.stderr


@pytest.mark.parametrize(
  'module, flags',
  [
    ('export', ['--from_workdir=RUN', '--out=FILE/x']),
    ('convert', ['--from_hf=RUN', '--workdir=FILE']),
    (
      'upscale',
      ['--from_workdir=RUN', '--config=launch/configs/roformer.py:small', '--workdir=FILE/x'],
    ),
    ('report', ['RUN', '--out=FILE']),
  ],
)
def test_an_output_directory_that_is_a_file_exits_2_before_any_work(module, flags, tmp_path):
  """export, convert, upscale and report wrote their output where they first needed it: a
  path that is (or is under) a file ended in a traceback, upscale's after restoring and
  growing the model."""
  (tmp_path / 'file').write_text('not a directory')
  (tmp_path / 'run').mkdir()
  flags = [
    f.replace('FILE', str(tmp_path / 'file')).replace('RUN', str(tmp_path / 'run')) for f in flags
  ]
  out = run_launcher(f'launch.{module}', *flags, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert str(tmp_path / 'file') in out.stderr and 'Traceback' not in out.stderr
  assert 'is a file, not a directory' in out.stderr or 'which is a file' in out.stderr
