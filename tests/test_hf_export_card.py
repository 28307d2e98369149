"""The export's config.json keys and README.md model card (docs/huggingface.md 1), checked
against a tiny run trained here: family, size, tokenizer, data, step, tokens seen, final eval
loss (metrics.jsonl), this run's fine-tuning results.json (not another run's), no machine
paths, `dtype` rather than `torch_dtype`."""

import json

import pytest

from helpers import make_tiny_config
from pretrain import hf_io
from pretrain import train


def _strings(tree):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield str(k)
      yield from _strings(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _strings(v)
  elif isinstance(tree, str):
    yield tree


def _results(from_workdir, task, mean, std):
  """A results.json as launch.finetune writes it (task_metrics.aggregate's keys)."""
  return {
    'task': task,
    'kind': 'classification',
    'metric': 'accuracy',
    'init': 'pretrained',
    'from_workdir': str(from_workdir),
    'from_step': 6,
    'family': 'roformer',
    'num_steps': 40,
    'best_learning_rate': 3e-4,
    'num_seeds': 3,
    'dev_accuracy_mean': mean,
    'dev_accuracy_std': std,
  }


@pytest.fixture(scope='module')
def trained(text_corpus, cache_dir, tmp_path_factory):
  """(root, run dir, ExportResult) of a 6-step roformer:tiny run (evals at steps 3 and 6),
  a fine-tuning sweep of it beside it, another run's sweep, and the export of step 6."""
  root = tmp_path_factory.mktemp('card') / 'runs'
  run = root / 'tiny_run'
  config = make_tiny_config(text_corpus, cache_dir)
  train.train_and_evaluate(config, str(run))
  (root / 'tiny_run_mr').mkdir()
  (root / 'tiny_run_mr' / 'results.json').write_text(json.dumps(_results(run, 'mr', 0.75, 0.01)))
  (root / 'other_mr').mkdir()
  (root / 'other_mr' / 'results.json').write_text(
    json.dumps(_results(root / 'other', 'cola', 0.5, 0.02))
  )
  result = hf_io.export_run(str(run), str(root.parent / 'hf'), max_position_embeddings=64)
  return root, run, result


def test_config_json_has_dtype_and_no_machine_paths(trained):
  root, _, result = trained
  hf = json.loads((root.parent / 'hf' / 'config.json').read_text())
  assert hf == result.hf_config
  assert hf['dtype'] == 'float32' and 'torch_dtype' not in hf
  own = hf['encoder_pretrain']
  assert own['run'] == 'tiny_run' and own['step'] == 6 and 'from_workdir' not in own
  leaked = [s for s in _strings(hf) if str(root.parent) in s or s.startswith(('/', '~'))]
  assert not leaked, leaked


def test_model_card_states_the_runs_facts(trained):
  root, run, result = trained
  card = (root.parent / 'hf' / 'README.md').read_text()
  evals = [
    json.loads(line)
    for line in (run / 'metrics.jsonl').read_text().splitlines()
    if json.loads(line)['split'] == 'eval'
  ]
  last = max(evals, key=lambda r: r['step'])
  assert last['step'] == 6
  expected = [
    '# tiny_run: roformer masked LM',
    'checkpoint step 6.',
    '| family | RoFormer (v1)',
    '| hidden_size | 32 |',
    '| num_layers | 2 |',
    '| num_heads | 2 |',
    '| intermediate size | 64 |',
    f'| parameters | {result.num_params:,} |',
    '| vocabulary | 512 |',
    '| tokenizer | SentencePiece, `tokenizer.model`',
    '| objective | masked LM |',
    '| training data | local text files `*.txt`',
    '| step | 6 |',
    '| tokens seen | 1,536 (step x global_batch_size 8 x seq_len 32) |',
    f'| final eval loss | {last["loss"]:.4f} at step 6 (accuracy {last["accuracy"]:.4f}',
    '| mr | pretrained | dev accuracy | 0.7500 ± 0.0100 | 3 | 0.0003 | 6 | 40 | '
    '`tiny_run_mr/results.json` |',
    'from transformers import AutoModelForMaskedLM, AutoTokenizer',
    "model = AutoModelForMaskedLM.from_pretrained('hf')",
  ]
  missing = [line for line in expected if line not in card]
  assert not missing, (missing, card)
  assert 'cola' not in card  # another run's sweep is not this model's result
  assert str(root.parent) not in card and 'FlaxRoFormerForMaskedLM.from_pretrained' in card


def test_model_card_of_an_earlier_step_omits_what_is_unknown(trained, tmp_path):
  """--step=3: that step's evaluation and tokens; a run without metrics.jsonl or sweeps gets
  no eval or fine-tuning lines (nothing invented)."""
  root, run, _ = trained
  hf_io.export_run(str(run), str(tmp_path / 'hf3'), step=3, max_position_embeddings=64)
  card = (tmp_path / 'hf3' / 'README.md').read_text()
  evals = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  at3 = [r for r in evals if r['split'] == 'eval' and r['step'] == 3][-1]
  assert f'| final eval loss | {at3["loss"]:.4f} at step 3' in card
  assert '| tokens seen | 768 ' in card and '| step | 3 |' in card

  import shutil  # pylint: disable=g-import-not-at-top

  bare = tmp_path / 'alone' / 'bare_run'
  shutil.copytree(run, bare, ignore=shutil.ignore_patterns('metrics.jsonl'))
  hf_io.export_run(str(bare), str(tmp_path / 'hf_bare'), max_position_embeddings=64)
  card = (tmp_path / 'hf_bare' / 'README.md').read_text()
  assert 'final eval loss' not in card and 'Fine-tuning' not in card
  assert '| step | 6 |' in card and '# bare_run: roformer masked LM' in card
