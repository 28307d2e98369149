"""Fine-tuning (pretrain/finetune.py, models/classifier.py, data_pipelines/tasks.py,
launch/finetune.py; docs/finetuning.md): a task the model learns in seconds (label = whether
a marker word occurs) reaches high dev accuracy from a pretraining checkpoint whose encoder
weights are loaded exactly; an interrupted run resumes to the uninterrupted result; the
metrics match scikit-learn and scipy; bad inputs give a message naming the flag or file
(exit code 2 from the launcher)."""

import functools
import json
import os
import socket

from flax import nnx
import jax
import numpy as np
import pytest

from data_pipelines import tasks
from helpers import run_launcher
from helpers import make_tiny_config
import models
import optim
from pretrain import checkpointing
from pretrain import config as config_schema
from pretrain import finetune
from pretrain import mesh as mesh_lib
from pretrain import report
from pretrain import rundir
from pretrain import task_metrics
from pretrain import train

WORDS = (
  'the a of to and in is it for on with as by this that from value list name file data'
).split()
MARKER = 'zebra'


def _marker_rows(rng, n):
  """(label, sentence) rows: label 1 iff the marker word occurs (half of them)."""
  rows = []
  for _ in range(n):
    words = list(rng.choice(WORDS, rng.integers(4, 10)))
    label = int(rng.random() < 0.5)
    if label:
      words.insert(int(rng.integers(0, len(words) + 1)), MARKER)
    rows.append((label, ' '.join(words)))
  return rows


@pytest.fixture(scope='module')
def marker_task(tmp_path_factory):
  """train.tsv (512) and dev.tsv (128) as `label<TAB>sentence` (the MR layout)."""
  root = tmp_path_factory.mktemp('marker')
  rng = np.random.default_rng(0)
  for name, n in (('train.tsv', 512), ('dev.tsv', 128)):
    (root / name).write_text(''.join(f'{y}\t{s}\n' for y, s in _marker_rows(rng, n)))
  return root


@pytest.fixture(scope='module')
def pretrained_run(tiny_data, tmp_path_factory):
  """A launch.pretrain-style workdir: checkpoint 7 (params, optimizer state, metadata with
  config and tokenizer) of the tiny test config, initialised from seed 123."""
  config, source, tok = tiny_data
  config = make_tiny_config_like(config, seed=123)
  workdir = tmp_path_factory.mktemp('pretrained')
  model = models.build(config, rngs=nnx.Rngs(params=config.seed))  # eager, unsharded
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  state = {
    'step': np.int32(7),
    'params': params,
    'opt_state': jax.device_get(optim.build(config).init(params)),
  }
  ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
  mesh = mesh_lib.make_mesh(config.mesh)
  ckpt.save(7, state, None, checkpointing.checkpoint_meta(config, tok, mesh, source))
  ckpt.close()
  return workdir, params


def make_tiny_config_like(config, **fields):
  config = config.copy_and_resolve_references()
  for key, value in fields.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def steps_cache():
  """Compiled steps shared by the tests (one compile for the module)."""
  return {}


def _config(marker_task, **overrides):
  """The fine-tuning config of the marker task (`finetune.<field>` / `train.<field>`)."""
  config = config_schema.get_finetune_config()
  values = {
    'finetune.train_file': str(marker_task / 'train.tsv'),
    'finetune.dev_file': str(marker_task / 'dev.tsv'),
    'finetune.max_seq_len': 24,
    'finetune.batch_size': 16,
    'finetune.num_steps': 40,
    'finetune.learning_rates': (3e-3,),
    'finetune.seeds': (0,),
    'finetune.pooling': 'mean',
    'train.log_every_steps': 20,
    'train.checkpoint_every_steps': 20,
    'train.progress': 'off',
  }
  values.update(overrides)
  config.update_from_flattened_dict(values)
  return config


@pytest.fixture(scope='module')
def sweep(pretrained_run, marker_task, steps_cache, tmp_path_factory):
  """The whole library path once: two seeds from the pretraining checkpoint."""
  workdir = tmp_path_factory.mktemp('sweep')
  config = _config(marker_task, **{'finetune.seeds': (0, 1)})
  results = finetune.finetune(
    config, str(workdir), from_workdir=str(pretrained_run[0]), steps_cache=steps_cache
  )
  return workdir, config, results


# ----------------------------------------------------------------------------- learning


def test_finetune_from_a_checkpoint_learns_the_task_and_writes_results(sweep, pretrained_run):
  workdir, config, results = sweep
  assert results['init'] == 'pretrained' and results['from_step'] == 7
  assert results['metric'] == 'accuracy' and results['num_seeds'] == 2
  assert results['dev_accuracy_mean'] >= 0.9, results['sweep']
  assert [r['seed'] for r in results['runs']] == [0, 1]
  on_disk = json.loads((workdir / 'results.json').read_text())
  assert on_disk['dev_accuracy_mean'] == results['dev_accuracy_mean']
  values = results['sweep'][0]['dev']['accuracy']
  assert results['dev_accuracy_std'] == pytest.approx(np.std(values, ddof=1))
  for seed in (0, 1):
    run_dir = workdir / finetune.run_name(3e-3, seed)
    assert (run_dir / 'result.json').exists() and (run_dir / 'checkpoints' / '40').is_dir()
  # launch.report reads the fine-tuning directory (metrics of the best run, results.json).
  run = report.load_run(str(workdir))
  assert run.results['dev_accuracy_mean'] == results['dev_accuracy_mean']
  assert f'dev_accuracy_mean {results["dev_accuracy_mean"]:.4g}' in report.summary_table([run])
  table = task_metrics.results_table(results)
  assert '| 0.003 (best) |' in table and 'accuracy (mean ± std)' in table
  # Running the same command again skips the finished runs and gives the same results.
  again = finetune.finetune(
    config, str(workdir), from_workdir=str(pretrained_run[0]), steps_cache={}
  )
  assert again['sweep'] == results['sweep']


def test_the_encoder_starts_from_the_checkpoint_weights(
  pretrained_run, marker_task, steps_cache, tmp_path
):
  run_dir, saved = pretrained_run
  start = finetune.resolve_start(str(run_dir), _config(marker_task))
  ft = start.config.finetune
  task = tasks.load(tasks.TaskOptions.from_config(ft))
  data = (
    tasks.encode(task.train, start.tokenizer, ft.max_seq_len),
    tasks.encode(task.dev, start.tokenizer, ft.max_seq_len),
    None,
  )
  config = finetune.run_config(start.config, task, 3e-3, 0, 40)
  run_setup = finetune.compiled_steps(config, task, steps_cache)[0]
  encoder = rundir.restore_params(str(run_dir), 7, run_setup.abstract_state['params']['encoder'])
  run = finetune.prepare_run(
    start, task, data, str(tmp_path / 'run'), 3e-3, 0, encoder, steps_cache
  )
  try:
    params = jax.device_get(run.state['params'])
  finally:
    run.close()
  assert run.start_step == 0 and 'head' not in params['encoder']
  expected = {k: v for k, v in saved.items() if k != 'head'}
  jax.tree.map(np.testing.assert_array_equal, params['encoder'], expected)
  assert set(params) == {'encoder', 'output'}  # mean pooling: no pooler


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
  sweep, pretrained_run, marker_task, steps_cache, tmp_path
):
  workdir, _, results = sweep
  interrupted = tmp_path / 'interrupted'
  stopped = finetune.finetune(
    _config(marker_task, **{'train.stop_after_steps': 15}),
    str(interrupted),
    from_workdir=str(pretrained_run[0]),
    steps_cache=steps_cache,
  )
  assert stopped is None
  name = finetune.run_name(3e-3, 0)
  assert sorted(os.listdir(interrupted / name / 'checkpoints')) == ['15']
  resumed = finetune.finetune(
    _config(marker_task),
    str(interrupted),
    from_workdir=str(pretrained_run[0]),
    steps_cache=steps_cache,
  )
  assert resumed['runs'][0]['dev'] == results['runs'][0]['dev']
  states = []
  for root in (workdir, interrupted):
    ckpt = checkpointing.Checkpointer(str(root / name))
    run_setup = next(iter(steps_cache.values()))[0]
    states.append(jax.device_get(ckpt.restore(40, run_setup.abstract_state)))
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
  lines = [json.loads(l) for l in (interrupted / name / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if l['split'] == 'train'] == [15, 20, 40]


# ----------------------------------------------------------------------------- metrics


def test_held_out_selection_reports_dev_at_the_best_validation_step_across_a_resume(
  pretrained_run, marker_task, steps_cache, tmp_path
):
  # finetune.validation_fraction: a fixed quarter of train.tsv is held out (never trained
  # on), evaluated beside dev at every evaluation; the run reports dev at the evaluation
  # with the best held-out metric, and a resumed run still chooses among the evaluations
  # before the interruption (read back from metrics.jsonl).
  overrides = {'finetune.validation_fraction': 0.25, 'train.eval_every_steps': 10}
  run = functools.partial(
    finetune.finetune, from_workdir=str(pretrained_run[0]), steps_cache=steps_cache
  )
  whole = run(_config(marker_task, **overrides), str(tmp_path / 'whole'))
  assert whole['train_examples'] == 384 and whole['selected_on'] == 'validation'
  (result,) = whole['runs']
  evals = result['evals']
  assert [e['step'] for e in evals] == [10, 20, 30, 40]
  best = max(evals, key=lambda e: (e['validation']['accuracy'], -e['step']))
  assert result['selected_step'] == best['step']
  assert result['dev'] == {k: v for k, v in best.items() if k not in ('step', 'validation')}
  assert whole['dev_accuracy_mean'] == best['accuracy']
  assert 'held-out training examples pick the step' in task_metrics.results_table(whole)
  stopped = run(
    _config(marker_task, **overrides, **{'train.stop_after_steps': 25}), str(tmp_path / 'cut')
  )
  assert stopped is None
  resumed = run(_config(marker_task, **overrides), str(tmp_path / 'cut'))
  assert [e['step'] for e in resumed['runs'][0]['evals']] == [10, 20, 30, 40]
  assert resumed['runs'][0]['evals'] == evals and resumed['runs'][0]['dev'] == result['dev']


def test_hold_out_is_a_fixed_disjoint_part_of_the_training_examples():
  split = tasks.Split([f't{i}' for i in range(50)], [f'p{i}' for i in range(50)], np.arange(50))
  kept, held = tasks.hold_out(split, 0.2)
  again = tasks.hold_out(split, 0.2)[1]
  assert len(held) == 10 and len(kept) == 40 and held.texts == again.texts
  assert sorted(kept.texts + held.texts) == sorted(split.texts)
  assert [f't{y}' for y in held.labels] == held.texts and [
    f'p{y}' for y in held.labels
  ] == held.pairs
  assert held.texts != split.texts[:10]  # a permutation, not the file's head
  with pytest.raises(tasks.TaskError, match='validation_fraction=0.001 holds out 0 of 50'):
    tasks.hold_out(split, 0.001)


def test_metrics_match_scikit_learn_and_scipy():
  from pretrain import task_metrics  # pylint: disable=g-import-not-at-top

  sklearn_metrics = pytest.importorskip('sklearn.metrics')
  from scipy import stats  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  for k in (2, 3, 5):
    labels = rng.integers(0, k, 200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, k, 200))
    assert task_metrics.accuracy(predictions, labels) == pytest.approx(
      sklearn_metrics.accuracy_score(labels, predictions), abs=1e-12
    )
    average = 'binary' if k == 2 else 'macro'
    assert task_metrics.f1(predictions, labels, k) == pytest.approx(
      sklearn_metrics.f1_score(labels, predictions, average=average), abs=1e-12
    )
    assert task_metrics.matthews(predictions, labels) == pytest.approx(
      sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12
    )
  # Degenerate: one predicted class (MCC 0 in both), F1 with no positive prediction.
  labels = np.array([0, 1, 1, 0, 1])
  assert (
    task_metrics.matthews(np.zeros(5, int), labels)
    == sklearn_metrics.matthews_corrcoef(labels, np.zeros(5, int))
    == 0.0
  )
  assert task_metrics.f1(np.zeros(5, int), labels) == sklearn_metrics.f1_score(
    labels, np.zeros(5, int), zero_division=0
  )
  x = rng.normal(size=300)
  y = 0.5 * x + rng.normal(size=300)
  ties = np.round(x * 2) / 2  # many tied values: average ranks
  assert task_metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert task_metrics.spearman(ties, y) == pytest.approx(stats.spearmanr(ties, y)[0], abs=1e-12)
  assert task_metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
  task = tasks.Task('t', 'regression', (), 'pearson', None, None)
  scores = task_metrics.compute_metrics(task, x[:, None], y)
  assert scores == {
    'pearson': pytest.approx(stats.pearsonr(x, y)[0]),
    'spearman': pytest.approx(stats.spearmanr(x, y)[0]),
  }


# ----------------------------------------------------------------------------- data


def test_pairs_regression_and_jsonl_read_and_encode(tiny_data, tmp_path):
  _, _, tok = tiny_data
  (tmp_path / 'train.csv').write_text(
    'id,first,second,score\n1,"a cat, sat",on the mat,0.5\n2,dogs run,fast,4\n'
  )
  (tmp_path / 'dev.csv').write_text('id,first,second,score\n3,x,y,2.25\n')
  options = tasks.TaskOptions(
    train_file=str(tmp_path / 'train.csv'),
    dev_file=str(tmp_path / 'dev.csv'),
    header=True,
    label_column='score',
    text_column='first',
    text_pair_column='second',
    task_type='regression',
  )
  task = tasks.load(options)
  assert task.kind == 'regression' and task.metric == 'pearson' and task.num_outputs == 1
  assert task.train.texts == ['a cat, sat', 'dogs run'] and task.train.pairs[0] == 'on the mat'
  np.testing.assert_array_equal(task.train.labels, np.float32([0.5, 4]))
  encoded = tasks.encode(task.train, tok, max_seq_len=8)
  a, b = tok.encode('a cat, sat'), tok.encode('on the mat')
  row = encoded.ids[0]
  assert len(row) <= 8 and row[0] == tok.cls_id and row[-1] == tok.sep_id
  assert list(row).count(tok.sep_id) == 2
  batch = tasks.make_batch(encoded, [0, -1], 8, tok)
  start = encoded.type_starts[0]
  assert batch['token_types'][0, start - 1] == 0 and batch['token_types'][0, start] == 1
  assert batch['weights'].tolist() == [1.0, 0.0] and batch['segment_ids'][1].sum() == 1
  assert len(a) + len(b) + 3 > 8  # the example was cut, longest text first
  # JSONL with CLUE-style string labels: names sorted into ids, F1's positive class second.
  lines = [{'sentence': f'text {i}', 'label': ['neg', 'pos'][i % 2]} for i in range(6)]
  (tmp_path / 'train.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  (tmp_path / 'dev.jsonl').write_text(json.dumps({'sentence': 'z', 'label': 'pos'}) + '\n')
  task = tasks.load(
    tasks.TaskOptions(
      train_file=str(tmp_path / 'train.jsonl'), dev_file=str(tmp_path / 'dev.jsonl')
    )
  )
  assert task.label_names == ('neg', 'pos') and task.dev.labels.tolist() == [1]
  assert task.train.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_training_order_is_a_function_of_the_step():
  first = np.concatenate([tasks.train_indices(10, s, 4, seed=1) for s in range(5)])
  assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
  np.testing.assert_array_equal(tasks.train_indices(10, 3, 4, seed=1), first[12:16])
  assert not np.array_equal(tasks.train_indices(10, 0, 4, seed=2), first[:4])


def _write(path, text):
  path.write_text(text)
  return str(path)


BAD_INPUTS = {
  'label column missing': (
    dict(label_column='5'),
    '0\tgood\n1\tbad\n',
    (
      r'--config.finetune.label_column=5 does not exist in .*rows '
      r'have 2 column'
    ),
  ),
  'label name without header': (
    dict(label_column='label'),
    '0\tgood\n',
    '--config.finetune.label_column=label names a column but',
  ),
  'label name not in header': (
    dict(header=True, label_column='lbl'),
    'label\ttext\n0\tgood\n',
    '--config.finetune.label_column=lbl is not a column',
  ),
  'labels not integers': (dict(), '0.5\tgood\n1\tbad\n', 'must be integers or names'),
  'text in the label column': (
    dict(label_column='1', text_column='0'),
    ''.join(f'0\tsentence number {i}\n' for i in range(300)),
    'that is text, not class labels',
  ),
  'label and text in one column': (
    dict(label_column='0', text_column='0'),
    '0\tgood\n1\tbad\n',
    'label_column and --config.finetune.text_column both name column 0',
  ),
  'text and pair in one field': (
    dict(file_format='jsonl', text_column='sentence', text_pair_column='sentence'),
    '{"label": 0, "sentence": "good"}\n',
    'text_column and --config.finetune.text_pair_column both name column .sentence.',
  ),
  'empty file': (dict(), '', 'has no examples'),
  'only a header': (dict(header=True), 'label\ttext\n', 'has no examples'),
  'pair column missing': (
    dict(text_pair_column='2'),
    '0\tgood\n1\tbad\n',
    '--config.finetune.text_pair_column=2 does not exist',
  ),
  'short row': (dict(), '0\tgood\n1\n', 'line 2 of .* has 1 column'),
  'one label': (dict(), '1\tgood\n1\tbad\n', 'only the label'),
  'regression target not a number': (
    dict(task_type='regression'),
    'pos\tgood\n',
    'a regression task needs numbers',
  ),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_inputs_name_the_flag_and_the_fix(case, tmp_path):
  fields, text, message = BAD_INPUTS[case]
  options = tasks.TaskOptions(
    train_file=_write(tmp_path / 'train.tsv', text),
    dev_file=_write(tmp_path / 'dev.tsv', '0\tok\n'),
    **fields,
  )
  with pytest.raises(tasks.TaskError, match=message):
    tasks.load(options)


def test_bad_files_jsonl_and_dev_labels(tmp_path):
  good = _write(tmp_path / 'good.tsv', '0\ta\n1\tb\n')
  with pytest.raises(
    tasks.TaskError, match='--config.finetune.train_file=.*missing.tsv does not exist'
  ):
    tasks.load(tasks.TaskOptions(train_file=str(tmp_path / 'missing.tsv'), dev_file=good))
  with pytest.raises(tasks.TaskError, match="the label '7', which is not among"):
    tasks.load(tasks.TaskOptions(train_file=good, dev_file=_write(tmp_path / 'dev.tsv', '7\tc\n')))
  jsonl = _write(tmp_path / 'a.jsonl', json.dumps({'text': 'x', 'label': '1'}) + '\n')
  with pytest.raises(
    tasks.TaskError, match='--config.finetune.text_column=sentence is not a field'
  ):
    tasks.load(tasks.TaskOptions(train_file=jsonl, dev_file=jsonl))
  with pytest.raises(tasks.TaskError, match='line 1 of .* is not JSON'):
    tasks.load(
      tasks.TaskOptions(train_file=_write(tmp_path / 'b.jsonl', '{oops\n'), dev_file=jsonl)
    )
  with pytest.raises(tasks.TaskError, match='glue/<name> with name in cola, sst2'):
    tasks.load(tasks.TaskOptions(task='glue/nope'))


def test_glue_offline_fails_fast_with_the_way_out(tmp_path, monkeypatch):
  def unreachable(*args, **kwargs):
    raise OSError(-2, 'Name or service not known')

  monkeypatch.setattr(socket, 'create_connection', unreachable)
  with pytest.raises(tasks.TaskError, match='cannot reach .*--config.finetune.tfds_data_dir=DIR'):
    tasks.load(tasks.TaskOptions(task='glue/sst2', tfds_data_dir=str(tmp_path)))


@pytest.mark.parametrize('name', sorted(tasks.GLUE_TASKS))
def test_every_glue_task_reads_from_tfds(name, monkeypatch):
  """Offline: TFDS's mock data, generated from each GLUE builder's own feature spec, stands in
  for the prepared dataset; a text field, split or label kind that does not match TFDS's glue
  fails here."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  spec = tasks.GLUE_TASKS[name]
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    task = tasks.load(tasks.TaskOptions(task=f'glue/{name}'))
  assert (task.kind, task.metric) == (spec.kind, spec.metric)
  for split in (task.train, task.dev):
    assert len(split.texts) == len(split.labels) == 6
    assert all(isinstance(t, str) and t for t in split.texts)
    assert (split.pairs is not None) == (len(spec.text_keys) == 2)
  if spec.kind == 'classification':
    assert len(task.label_names) >= 2 and task.train.labels.dtype == np.int32
    assert set(task.train.labels) <= set(range(len(task.label_names)))
  else:
    assert task.label_names == () and task.train.labels.dtype == np.float32


def test_a_checkpoint_of_another_family_or_shape_is_refused(
  pretrained_run, tiny_data, text_corpus, cache_dir
):
  run_dir = str(pretrained_run[0])
  gau = make_tiny_config(text_corpus, cache_dir, preset='gau:tiny')
  with pytest.raises(
    finetune.InputError, match='holds a roformer checkpoint but --config is a gau config'
  ):
    finetune.resolve_start(run_dir, gau)
  wider = make_tiny_config_like(tiny_data[0])
  wider.model.hidden_size = 64
  with pytest.raises(finetune.InputError, match='hidden_size: checkpoint 32 vs --config 64'):
    finetune.resolve_start(run_dir, wider)
  with pytest.raises(finetune.InputError, match='has no checkpoints/ directory'):
    finetune.resolve_start(os.path.dirname(run_dir))


def _files(workdir) -> dict[str, bytes]:
  return {
    os.path.relpath(os.path.join(d, n), workdir): open(os.path.join(d, n), 'rb').read()
    for d, _, names in os.walk(workdir)
    for n in names
  }


def test_a_workdir_holding_a_run_of_the_other_kind_is_refused_untouched(
  pretrained_run, marker_task, tiny_data, tmp_path
):
  """Fine-tuning into a pretraining run's workdir (--workdir = --from_workdir, a slip) used to
  replace its config.json and metrics.jsonl; pretraining into a sweep's directory moved the
  sweep's metrics aside. Both are refused before anything is written."""
  run = tmp_path / 'pretraining_run'
  (run / 'checkpoints' / '7').mkdir(parents=True)
  (run / 'config.json').write_text('{"kind": "pretraining"}')
  (run / 'metrics.jsonl').write_text('{"step": 7, "split": "train", "loss": 9.0}\n')
  before = _files(run)
  with pytest.raises(
    finetune.InputError, match=r'holds a pretraining run .*a directory of its own'
  ):
    finetune.finetune(_config(marker_task), str(run), from_workdir=str(pretrained_run[0]))
  assert _files(run) == before

  sweep_dir = tmp_path / 'sweep'
  (sweep_dir / 'lr0.001_seed0').mkdir(parents=True)
  (sweep_dir / 'results.json').write_text('{}')
  (sweep_dir / 'metrics.jsonl').write_text('{"step": 40, "split": "eval", "accuracy": 0.9}\n')
  before = _files(sweep_dir)
  with pytest.raises(train.InputError, match=r'holds a fine-tuning run .*--workdir=.*_pretrain'):
    train.prepare(make_tiny_config_like(tiny_data[0]), str(sweep_dir))
  assert _files(sweep_dir) == before


@pytest.mark.parametrize('seeds', [(), (0, 0), (-1,), (0, -3)])
def test_seeds_must_be_distinct_and_not_negative(seeds, marker_task):
  """A negative seed used to pass validation and fail after training, when the run's
  data order was drawn (numpy takes no negative seed), leaving its directory behind."""
  with pytest.raises(ValueError, match=r'finetune.seeds=.*distinct integer seeds >= 0'):
    finetune.validate(_config(marker_task, **{'finetune.seeds': seeds}))


def test_a_row_longer_than_any_device_holds_is_refused_before_any_work(marker_task, tiny_data):
  """--config.data.seq_len=100000000 used to pass validation and exhaust host memory while
  the first batches were packed (12 minutes, then the kernel's OOM kill); a fine-tuning
  max_seq_len as large, while the task was padded."""
  config = make_tiny_config_like(tiny_data[0])
  config.data.seq_len = train.MAX_SEQ_LEN + 1
  with pytest.raises(ValueError, match=r'--config.data.seq_len=1,048,577 is beyond 1,048,576'):
    train.validate(config)
  config.data.seq_len = train.MAX_SEQ_LEN  # the limit itself passes this check
  train._validate_data(config.data, config.objective)
  with pytest.raises(ValueError, match=r'--config.finetune.max_seq_len=1,048,577 is beyond'):
    finetune.validate(_config(marker_task, **{'finetune.max_seq_len': train.MAX_SEQ_LEN + 1}))


def test_a_batch_larger_than_the_training_set_is_refused_before_training(
  pretrained_run, marker_task, tmp_path
):
  """--config.finetune.batch_size=100000 on a few hundred examples ended in the device
  allocator's out-of-memory traceback at the first step."""
  config = _config(marker_task, **{'finetune.batch_size': 100_000})
  with pytest.raises(finetune.InputError, match=r'batch_size=100,000 is more than the \d+ train'):
    finetune.finetune(config, str(tmp_path / 'ft'), from_workdir=str(pretrained_run[0]))
  assert not any((tmp_path / 'ft').glob('lr*'))


def test_the_fine_tuning_preset_validates_and_takes_its_encoder_from_a_run(
  pretrained_run, marker_task
):
  from launch.configs import finetune as presets  # pylint: disable=g-import-not-at-top

  config = presets.get_config('default')
  finetune.validate(config)
  with pytest.raises(finetune.InputError, match='a fine-tuning preset names no encoder'):
    finetune.resolve_start('', config)
  # With a run, the model is the run's (dtype included) and the rest is the preset's.
  start = finetune.resolve_start(str(pretrained_run[0]), _config(marker_task))
  assert start.config.model.family == 'roformer' and start.config.model.dtype == 'float32'
  assert start.config.train.log_every_steps == 20 and start.step == 7


# ----------------------------------------------------------------------------- launcher


def _launch(*flags, timeout=300):
  return run_launcher('launch.finetune', *flags, timeout=timeout)


def test_launcher_exits_2_on_a_label_column_that_does_not_exist(
  pretrained_run, marker_task, tmp_path
):
  result = _launch(
    f'--from_workdir={pretrained_run[0]}',
    f'--workdir={tmp_path / "ft"}',
    f'--config.finetune.train_file={marker_task / "train.tsv"}',
    f'--config.finetune.dev_file={marker_task / "dev.tsv"}',
    '--config.finetune.label_column=4',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'error: --config.finetune.label_column=4 does not exist in' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_launcher_sweeps_learning_rates_and_seeds(pretrained_run, marker_task, tmp_path):
  workdir = tmp_path / 'ft'
  result = _launch(
    f'--from_workdir={pretrained_run[0]}',
    f'--workdir={workdir}',
    f'--config.finetune.train_file={marker_task / "train.tsv"}',
    f'--config.finetune.dev_file={marker_task / "dev.tsv"}',
    '--config.finetune.max_seq_len=24',
    '--config.finetune.batch_size=16',
    '--config.finetune.num_steps=40',
    '--config.finetune.learning_rates=1e-3,3e-3',
    '--config.finetune.seeds=0,1',
    '--config.finetune.pooling=mean',
    '--config.train.progress=off',
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| learning rate | accuracy (mean ± std)' in result.stdout
  results = json.loads((workdir / 'results.json').read_text())
  assert [s['learning_rate'] for s in results['sweep']] == [1e-3, 3e-3]
  assert results['num_seeds'] == 2 and results['dev_accuracy_mean'] >= 0.9


@pytest.mark.parametrize('file_format', ['tsv', 'csv'])
def test_long_fields_load_and_are_truncated_at_tokenization(file_format, tiny_data, tmp_path):
  """A 200,000-character text field (a document) is above the csv module's default field limit
  (131,072): it loads whole, is cut to max_seq_len when encoded, and the limit is left as it
  was."""
  import csv  # pylint: disable=g-import-not-at-top

  _, _, tok = tiny_data
  document = ('the value of this list is in the name of that file ' * 4000)[:200_000]
  sep = '\t' if file_format == 'tsv' else ','
  train = _write(tmp_path / f'train.{file_format}', f'1{sep}{document}\n0{sep}short text\n')
  dev = _write(tmp_path / f'dev.{file_format}', f'0{sep}{document[:1000]}\n')
  limit = csv.field_size_limit()
  task = tasks.load(tasks.TaskOptions(train_file=train, dev_file=dev))
  assert csv.field_size_limit() == limit
  assert task.train.texts == [document, 'short text'] and task.train.labels.tolist() == [1, 0]
  encoded = tasks.encode(task.train, tok, max_seq_len=16)
  assert len(encoded.ids[0]) == 16 and encoded.ids[0][0] == tok.cls_id
  assert encoded.ids[0][-1] == tok.sep_id
  np.testing.assert_array_equal(encoded.ids[0][1:-1], tok.encode(document)[:14])


def test_task_metrics_of_degenerate_inputs_are_zero_without_warnings():
  """No examples, one class, constant scores (the first evaluations of a run): 0.0, not NaN,
  an exception or a warning from scikit-learn / scipy (warnings are errors here)."""
  import warnings  # pylint: disable=g-import-not-at-top

  from pretrain import task_metrics  # pylint: disable=g-import-not-at-top

  empty, zeros, ones = np.zeros(0, int), np.zeros(5, int), np.ones(5, int)
  classification = tasks.Task('t', 'classification', ('a', 'b', 'c'), 'accuracy', None, None)
  regression = tasks.Task('t', 'regression', (), 'pearson', None, None)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert task_metrics.accuracy(empty, empty) == task_metrics.accuracy(zeros, ones) == 0.0
    for predictions, labels in ((empty, empty), (zeros, zeros), (ones, ones), (zeros, ones)):
      assert task_metrics.matthews(predictions, labels) == 0.0
    assert task_metrics.f1(empty, empty) == task_metrics.f1(zeros, zeros) == 0.0
    assert task_metrics.f1(ones, ones) == 1.0 and task_metrics.f1(zeros, zeros, 3) == 1 / 3
    x = np.arange(5.0)
    for scores, targets in ((np.ones(5), x), (x, np.full(5, 0.1)), (x[:1], x[:1]), (x[:0], x[:0])):
      assert task_metrics.pearson(scores, targets) == 0.0
      assert task_metrics.spearman(scores, targets) == 0.0
    # Nearly constant scores: a value (scipy's NearConstantInputWarning silenced).
    assert np.isfinite(task_metrics.pearson(1e9 + np.array([0, 1e-7, 0, 1e-7]), x[:4]))
    assert task_metrics.compute_metrics(classification, np.zeros((4, 3)), zeros[:4]) == {
      'accuracy': 1.0,
      'f1': 1 / 3,
      'matthews': 0.0,
    }
    assert task_metrics.compute_metrics(regression, np.ones((4, 1)), x[:4]) == {
      'pearson': 0.0,
      'spearman': 0.0,
    }
  assert set(task_metrics.compute_metrics(classification, np.eye(3), [0, 1, 2])) == set(
    classification.metrics
  )
