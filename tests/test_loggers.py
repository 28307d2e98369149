"""Metric sinks behind one writer (docs/configuration.md 2): metrics.jsonl, TensorBoard and
Weights & Biases, chosen by --config.train.loggers. W&B runs offline (WANDB_MODE=offline, no
network); the test reads the records W&B wrote to `<workdir>/wandb/offline-run-*`."""

import json
import shutil
import struct
import time

import numpy as np
import pytest

from helpers import make_tiny_config
from pretrain import metrics as metrics_lib
from pretrain import sinks
from pretrain import train

wandb = pytest.importorskip('wandb')  # the `wandb` extra (also in `test`)


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
  """W&B without a network, an account or files outside tmp_path."""
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_CONSOLE', 'off')
  monkeypatch.setenv('WANDB_CONFIG_DIR', str(tmp_path / 'wandb_config'))
  monkeypatch.setenv('WANDB_CACHE_DIR', str(tmp_path / 'wandb_cache'))
  monkeypatch.setenv('WANDB_DATA_DIR', str(tmp_path / 'wandb_data'))


# The `.wandb` file is W&B's transaction log: a 7-byte header (':W&B', magic, version), then
# LevelDB-log records (4-byte checksum, 2-byte length, 1-byte type: 1 whole, 2 first,
# 3 middle, 4 last) in 32 KiB blocks whose tails under 7 bytes are padding; each record's data
# is a serialised `wandb_internal_pb2.Record` (what `wandb sync` uploads).
_BLOCK = 32768


def read_wandb_records(path):
  """The Records of one `.wandb` file, in order."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top

  raw = path.read_bytes()
  assert raw[:4] == b':W&B', raw[:7]
  records, pos, data = [], 7, b''
  while pos + 7 <= len(raw):
    room = _BLOCK - pos % _BLOCK
    if room < 7:
      pos += room
      continue
    _, length, kind = struct.unpack('<IHB', raw[pos : pos + 7])
    if kind == 0:  # zero padding: the end of what was written
      break
    chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
    data = chunk if kind in (1, 2) else data + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(data)
      records.append(record)
  return records


def finished_records(path, timeout=60.0):
  """The Records of a `.wandb` file once it holds the run's exit record: `run.finish()`
  returns before W&B's service has written everything (it does by the process's exit)."""
  deadline = time.monotonic() + timeout
  while True:
    records = read_wandb_records(path)
    if any(r.WhichOneof('record_type') == 'exit' for r in records):
      return records
    assert time.monotonic() < deadline, f'{path}: no exit record after {timeout} s'
    time.sleep(0.1)


def offline_runs(workdir):
  """[(run record, {step: {key: value}}), ...] of every offline run directory, oldest first."""
  runs = []
  paths = (workdir / 'wandb').glob('offline-run-*/run-*.wandb')
  for path in sorted(paths, key=lambda p: p.stat().st_ctime):
    run, history = None, {}
    for record in finished_records(path):
      kind = record.WhichOneof('record_type')
      if kind == 'run':
        run = record.run
      elif kind == 'history':
        row = {
          i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in record.history.item
        }
        step = row.pop('_step')
        assert step not in history, f'{path}: step {step} twice'
        history[step] = {k: v for k, v in row.items() if not k.startswith('_')}
    runs.append((run, history))
  return runs


def _config(run):
  return {i.key: json.loads(i.value_json) for i in run.config.update if i.key != '_wandb'}


def test_every_sink_gets_the_same_scalars(tmp_path):
  config = make_tiny_config(tmp_path, tmp_path, **{'train.wandb_tags': 'tiny, test'})
  config.train.loggers = 'jsonl,tensorboard,wandb'
  writer = metrics_lib.MetricWriter(str(tmp_path), config=config)
  assert [type(s).__name__ for s in writer.sinks] == ['JsonlSink', 'TensorBoardSink', 'WandbSink']
  writer.write(2, 'train', {'loss': 5.0, 'learning_rate': np.float32(1e-3)})
  writer.write(2, 'eval', {'loss': 5.5})
  writer.write(4, 'train', {'loss': 4.0, 'learning_rate': 2e-3})
  writer.close()
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['step'], l['split'], l['loss']) for l in lines] == [
    (2, 'train', 5.0),
    (2, 'eval', 5.5),
    (4, 'train', 4.0),
  ]
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  [(run, history)] = offline_runs(tmp_path)
  assert (run.display_name, list(run.tags), run.project) == (
    tmp_path.name,
    ['tiny', 'test'],
    'encoder-pretrain',
  )
  assert _config(run)['model']['hidden_size'] == 32 and _config(run)['train']['loggers']
  assert history == {
    2: {'train/loss': 5.0, 'train/learning_rate': pytest.approx(1e-3), 'eval/loss': 5.5},
    4: {'train/loss': 4.0, 'train/learning_rate': 2e-3},
  }
  record = json.loads((tmp_path / sinks.WANDB_RUN_FILE).read_text())
  assert record == {'id': run.run_id, 'last_step': 4}


def test_a_resume_continues_the_wandb_run_and_sends_each_step_once(tmp_path):
  """The killed run logged steps 2..6 but its last checkpoint is step 4: the resumed run
  (start_step 4) continues the same W&B run id and does not send steps 5, 6 again; a fresh
  start (step 0) in the same workdir begins a new W&B run."""
  workdir = str(tmp_path)
  first = metrics_lib.MetricWriter(workdir, loggers='wandb')
  for step in (2, 4, 6):
    first.write(step, 'train', {'loss': 10.0 - step})
  first.close()  # as far as W&B is concerned, a killed run stops here too
  resumed = metrics_lib.MetricWriter(workdir, loggers='wandb', start_step=4)
  for step in (6, 8):
    resumed.write(step, 'train', {'loss': 100.0 + step})
  resumed.write(8, 'eval', {'loss': 1.0})
  resumed.close()
  runs = offline_runs(tmp_path)
  assert len(runs) == 2 and runs[0][0].run_id == runs[1][0].run_id
  merged = {}
  for _, history in runs:
    assert not merged.keys() & history.keys()  # every step once over both directories
    merged.update(history)
  assert merged == {
    2: {'train/loss': 8.0},
    4: {'train/loss': 6.0},
    6: {'train/loss': 4.0},  # the killed run's value: W&B cannot take it back
    8: {'train/loss': 108.0, 'eval/loss': 1.0},
  }
  fresh = metrics_lib.MetricWriter(workdir, loggers='wandb', start_step=0)
  fresh.write(1, 'train', {'loss': 1.0})
  fresh.close()
  assert offline_runs(tmp_path)[-1][0].run_id != runs[0][0].run_id


def test_bad_loggers_are_refused_naming_the_flag(tmp_path, monkeypatch):
  config = make_tiny_config(tmp_path, tmp_path, **{'train.loggers': 'tensorboard,mlflow'})
  with pytest.raises(sinks.LoggerError, match=r"loggers='tensorboard,mlflow': 'mlflow' is not"):
    sinks.validate_loggers(config.train)
  config.train.loggers = 'wandb'
  monkeypatch.setattr(sinks.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(sinks.LoggerError, match=r"pip install 'encoder-pretrain\[wandb\]'"):
    sinks.validate_loggers(config.train)
  # Disabled (processes other than 0): nothing is written, names are still checked.
  assert metrics_lib.MetricWriter(str(tmp_path / 'off'), enabled=False, loggers='wandb').sinks == []
  assert not (tmp_path / 'off').exists()
  assert metrics_lib.MetricWriter(str(tmp_path), loggers='').sinks == []


def test_pretraining_logs_every_step_to_wandb_once_across_a_resume(
  text_corpus, cache_dir, tmp_path
):
  config = make_tiny_config(text_corpus, cache_dir, **{'train.loggers': 'jsonl,wandb'})
  config.train.num_train_steps, config.train.log_every_steps = 6, 1
  config.train.checkpoint_every_steps, config.train.eval_every_steps = 3, 3
  config.train.stop_after_steps = 4  # steps 1..4 logged
  train.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / 'checkpoints' / '4')  # killed before that save: resumes from 3
  config.train.stop_after_steps = 0
  train.train_and_evaluate(config, str(tmp_path))
  runs = offline_runs(tmp_path)
  assert len(runs) == 2, 'the trainer did not pass its config (train.loggers) to MetricWriter'
  assert runs[0][0].run_id == runs[1][0].run_id
  assert _config(runs[0][0])['train']['loggers'] == 'jsonl,wandb'
  assert _config(runs[1][0])['train']['stop_after_steps'] == 0  # each start records its config
  steps = [sorted(history) for _, history in runs]
  assert steps == [[1, 2, 3, 4], [5, 6]]  # step 4 (after checkpoint 3) is not sent again
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  for line in lines:  # metrics.jsonl holds the resumed run's values, W&B step 4 the first's
    history = runs[0][1] if line['step'] <= 4 else runs[1][1]
    if line['step'] != 4:
      assert history[line['step']][f'{line["split"]}/loss'] == pytest.approx(line['loss'])
  assert {l['split'] for l in lines} == {'train', 'eval'}
