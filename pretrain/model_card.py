"""The model card: the README.md that `hf_io.export_run` writes into an export
(docs/huggingface.md 1).

  text = model_card.model_card(config=config, meta=meta, step=step, num_params=n,
                               tokenizer=tok, from_workdir='runs/X', out_dir='hf/X',
                               max_position_embeddings=1536)

It states the family, size, tokenizer, training data, tokens seen, the final evaluation loss
(metrics.jsonl), fine-tuning results (results.json of launch.finetune) and how to load the
export; facts the run does not record are left out and no machine path is written.
"""

from __future__ import annotations

import json
import os
import re

from models import hf_export
from pretrain import sinks

LAYOUT_NAMES = {
  'roformer': "transformers' RoFormerForMaskedLM (model_type roformer)",
  'roformer_v2': 'RoFormerV2ForMaskedLM, the PyTorch code the export carries (model_type '
  "roformer_v2; the roformer package's RoFormer-v2 tensor names)",
  'gau': 'GAUAlphaForMaskedLM, the PyTorch code the export carries (model_type gau_alpha; the '
  "gau-alpha package's tensor names)",
}


def load_lines(family: str, path: str) -> list[str]:
  """The Python lines that load an export of `family` from `path` with transformers' Auto
  classes (PyTorch): families whose export carries its own code (hf_export.AUTO_MAP) need
  trust_remote_code=True and transformers >= 5."""
  remote = family in hf_export.AUTO_MAP
  return [
    'from transformers import AutoModelForMaskedLM, AutoTokenizer  # PyTorch'
    + (', transformers >= 5' if remote else ''),
    f'model = AutoModelForMaskedLM.from_pretrained({path!r}'
    + (', trust_remote_code=True)' if remote else ')'),
    f'tokenizer = AutoTokenizer.from_pretrained({path!r})',
  ]


FAMILY_NAMES = {
  'roformer': 'RoFormer (v1): post-LN Transformer encoder with rotary positions, LayerNorm and '
  'biases',
  'roformer_v2': 'RoFormer-v2: post-LN Transformer encoder with rotary positions, no biases, '
  'parameter-free RMS norm',
  'gau': 'GAU-alpha: gated attention units (one shared-key head per layer), rotary positions, '
  'parameter-free RMS norm',
}


def _run_name(workdir: str) -> str:
  """The run's directory name (no machine path): 'runs/roformer_tiny/' -> 'roformer_tiny'."""
  return os.path.basename(os.path.normpath(str(workdir).rstrip('/'))) or str(workdir)


# An absolute (or ~, or scheme://) path where a path can start: not the '/' inside 'a/b'.
_ABS_PATH = re.compile(r'(?<![^\s(,:=`])(?:[a-zA-Z][a-zA-Z0-9+.-]*://|~?/)[^\s,()\'"`]*')


def _no_paths(text: str) -> str:
  """`text` with every absolute path or URL-like path replaced by its last component."""
  return _ABS_PATH.sub(lambda m: _run_name(m.group(0)) or m.group(0), text)


def _data_description(meta: dict, config) -> str:
  """The run's training data, without this machine's paths: the source name recorded in the
  checkpoint, with file names (not directories) for local text files."""
  name = str(meta.get('data_source') or '')
  if name.startswith('local_text_files') and config.data.get('text_files'):
    patterns = [p.strip() for p in str(config.data.text_files).split(',') if p.strip()]
    detail = name[len('local_text_files') :].strip()  # e.g. '(21 files)'
    return (
      'local text files '
      + ', '.join(f'`{os.path.basename(p) or p}`' for p in patterns)
      + (f' {_no_paths(detail)}' if detail else '')
    )
  if name == 'stdlib_corpus':
    return 'the built-in corpus (Python standard-library source files)'
  return f'`{_no_paths(name)}`' if name else ''


def _final_eval(workdir: str, step: int) -> dict | None:
  """The last evaluation at or before `step` in the run's metrics.jsonl, or None."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  evals = [
    r
    for r in sinks.read_lines(epath.Path(workdir) / 'metrics.jsonl')
    if r.get('split') == 'eval'
    and isinstance(r.get('loss'), (int, float))
    and isinstance(r.get('step'), int)
    and r['step'] <= step
  ]
  return max(evals, key=lambda r: r['step']) if evals else None


def _finetune_results(workdir: str) -> list[tuple[str, dict]]:
  """(directory name, results.json) of the launch.finetune sweeps of this run: the run's own
  results.json and those of sibling directories whose `from_workdir` is this run."""
  if '://' in str(workdir):
    return []
  own = os.path.realpath(workdir)
  found = []
  candidates = [own]
  try:
    parent = os.path.dirname(own)
    candidates += sorted(
      os.path.join(parent, e) for e in os.listdir(parent) if os.path.join(parent, e) != own
    )
  except OSError:
    pass
  for directory in candidates:
    path = os.path.join(directory, 'results.json')
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        results = json.load(f)
    except (OSError, ValueError):
      continue
    if not isinstance(results, dict):
      continue
    source = results.get('from_workdir') or ''
    if directory == own or (source and os.path.realpath(source) == own):
      found.append((os.path.basename(directory), results))
  return found


def _finetune_row(name: str, r: dict) -> str | None:
  """One Markdown table row of a results.json (task_metrics.aggregate), or None."""
  metric = r.get('metric')
  mean, std = r.get(f'dev_{metric}_mean'), r.get(f'dev_{metric}_std')
  if not metric or not isinstance(mean, (int, float)):
    return None
  std = f' ± {std:.4f}' if isinstance(std, (int, float)) else ''
  lr = r.get('best_learning_rate')
  cells = [
    str(r.get('task', '')),
    str(r.get('init', '')),
    f'dev {metric}',
    f'{mean:.4f}{std}',
    str(r.get('num_seeds', '')),
    f'{lr:g}' if isinstance(lr, (int, float)) else '',
    str(r.get('from_step', '')) if r.get('from_step') is not None else '',
    str(r.get('num_steps', '')),
    f'`{name}/results.json`',
  ]
  return '| ' + ' | '.join(cells) + ' |'


def model_card(
  *,
  config,
  meta: dict,
  step: int,
  num_params: int,
  tokenizer,
  from_workdir: str,
  out_dir: str,
  max_position_embeddings: int,
) -> str:
  """The export's README.md: family, size, tokenizer, training data, tokens seen, the final
  evaluation loss (metrics.jsonl), fine-tuning results (results.json of launch.finetune) and
  how to load it. Facts the run does not record are left out; no machine path is written."""
  m, d = config.model, config.data
  family = m.family
  name = _run_name(from_workdir)
  here = _run_name(out_dir)
  rows = [('family', FAMILY_NAMES[family]), ('layout', LAYOUT_NAMES[family])]
  rows += [('hidden_size', f'{m.hidden_size}'), ('num_layers', f'{m.num_layers}')]
  if family == 'gau':
    rows += [
      ('num_heads', f'1 (GAU: shared key size {m.shared_dim})'),
      (
        'intermediate size',
        f'{m.expansion_factor * m.hidden_size} (expansion {m.expansion_factor})',
      ),
    ]
  else:
    rows += [('num_heads', f'{m.num_heads}'), ('intermediate size', f'{m.mlp_dim}')]
  rows.append(('parameters', f'{num_params:,}'))
  rows.append(('vocabulary', f'{m.vocab_size:,}'))
  if tokenizer.kind == 'wordpiece':
    case = 'lowercase' if getattr(tokenizer, 'lowercase', False) else 'cased'
    tok = f'WordPiece ({case}), `vocab.txt`'
  else:
    tok = 'SentencePiece, `tokenizer.model`'
  rows.append(
    (
      'tokenizer',
      f'{tok}, {tokenizer.vocab_size:,} tokens, sha256 {tokenizer.sha256[:16]}; '
      '`tokenizer.json` for AutoTokenizer',
    )
  )
  rows.append(
    (
      'positions',
      f'rotary (RoPE, base 10000); max_position_embeddings={max_position_embeddings} sizes '
      'the PyTorch tables only',
    )
  )
  train_rows = [('objective', 'masked LM' if config.objective == 'mlm' else config.objective)]
  data = _data_description(meta, config)
  if data:
    train_rows.append(('training data', data))
  train_rows.append(('step', f'{step:,}'))
  batch, seq_len = int(d.get('global_batch_size', 0) or 0), int(d.get('seq_len', 0) or 0)
  if batch and seq_len:
    train_rows.append(
      (
        'tokens seen',
        f'{step * batch * seq_len:,} (step x global_batch_size {batch} x seq_len {seq_len})',
      )
    )
  ev = _final_eval(from_workdir, step)
  if ev is not None:
    extra = ', '.join(
      f'{k} {ev[k]:.4f}' for k in ('accuracy', 'perplexity') if isinstance(ev.get(k), (int, float))
    )
    train_rows.append(
      (
        'final eval loss',
        f'{ev["loss"]:.4f} at step {ev["step"]:,}' + (f' ({extra})' if extra else ''),
      )
    )
  lineage = meta.get('lineage') or []
  if lineage:
    kinds = [
      'grown by launch.upscale'
      if 'upscale' in item
      else f'imported from a {item.get("model_type")} checkpoint'
      if 'imported_from' in item
      else 'derived'
      for item in lineage
      if isinstance(item, dict)
    ]
    if kinds:
      train_rows.append(('lineage', '; '.join(kinds)))

  def table(pairs):
    return ['| | |', '|---|---|'] + [f'| {k} | {v} |' for k, v in pairs]

  lines = [
    f'# {name}: {family} masked LM',
    '',
    f'Exported by encoder_pretrain (`python -m launch.export`) from the run `{name}`, '
    f'checkpoint step {step:,}.',
    '',
    '## Model',
    '',
    *table(rows),
    '',
    '## Pretraining',
    '',
    *table(train_rows),
    '',
  ]
  finetune = [
    row for row in (_finetune_row(n, r) for n, r in _finetune_results(from_workdir)) if row
  ]
  if finetune:
    lines += [
      '## Fine-tuning (launch.finetune)',
      '',
      '| task | init | metric | mean ± std over seeds | seeds | best learning rate | from '
      'step | steps | source |',
      '|---|---|---|---|---|---|---|---|---|',
      *finetune,
      '',
    ]
  lines += ['## How to load', '', '```python', *load_lines(family, here), '```', '']
  if family == 'roformer':
    lines.append(
      'transformers < 5 also loads it without torch: `FlaxRoFormerForMaskedLM.from_pretrained`.'
    )
  else:
    lines.append(
      'transformers has no class for this architecture (its RoFormer is v1: LayerNorms and '
      'biases, another function). config.json names a model_type it does not know and an '
      '`auto_map` into the two Python files beside it (`configuration_encoder_pretrain.py`, '
      '`modeling_encoder_pretrain.py`): with `trust_remote_code=True` the Auto classes '
      '(`AutoModelForMaskedLM`, `AutoModel`) build this model from them; without it they refuse '
      'the directory. Read those files before you trust them.'
    )
  lines += [
    '',
    'config.json["encoder_pretrain"] records the source run\'s model config; '
    f'`python -m launch.convert --from_hf={here} --workdir=NEW_RUN` imports it back.',
    '',
  ]
  return '\n'.join(lines)
