"""Hugging Face directories in and out: export a run, import a checkpoint as a new run
(docs/huggingface.md).

  result = hf_io.export_run('runs/X', 'hf/X')              # an ExportResult; read-only on runs/X
  print(hf_io.export_summary(result))
  result = hf_io.import_run('hf/X', 'runs/Y')              # an ImportResult; runs/Y step 0
  print(hf_io.import_summary(result, 'runs/Y'))

Export writes `config.json` (the family's PyTorch layout, `models.hf_export.hf_config`, plus
our own record under "encoder_pretrain"), `model.safetensors` (PyTorch names and [out, in]
weights, metadata format=pt, so transformers' Flax classes read it without torch), the
tokenizer files (`data_pipelines.hf_tokenizer.hf_files`) and a README.md
(`pretrain.model_card`). Import reads `model.safetensors` (or its sharded index),
`flax_model.msgpack`, or `pytorch_model.bin` (only through `torch.load(weights_only=True)`;
never pickle), and a `vocab.txt` or `tokenizer.model`, and writes the new run exactly as
`launch.upscale` writes a grown one (`pretrain.grow`: config.json, checkpoint 0 with the data
iterator and metadata), so that `launch.pretrain` continues it, fine-tuning starts from it and
`launch.upscale` grows it.

Every bad input raises `train.InputError` before anything is written, and a malformed
safetensors file or a config.json that disagrees with the weights' shapes (layers, vocabulary,
hidden size) does so before any model is built (`hf_weights.safetensors_header`,
`hf_import.check_shapes`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import hf_tokenizer
from data_pipelines import pipeline
from data_pipelines import text_datasets
from data_pipelines import tokenizer as tokenizer_lib
import models
from models import hf_export
from models import hf_import
from pretrain import checkpointing
from pretrain import hf_weights
from pretrain import mesh as mesh_lib
from pretrain import model_card
from pretrain import rundir
from pretrain import train

DEFAULT_MAX_POSITIONS = 1536  # transformers' RoFormerConfig default


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass
class ExportResult:
  """What `export_run` wrote.

  Attributes:
    out_dir: the directory; files: {name: size in bytes}; family: our model family;
    step: the checkpoint step; num_params: parameter count; hf_config: config.json's dict;
    tokenizer_kind: 'sentencepiece' or 'wordpiece'.
  """

  out_dir: str
  files: dict[str, int]
  family: str
  step: int
  num_params: int
  hf_config: dict
  tokenizer_kind: str


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top

  return save(tensors, metadata={'format': 'pt'})


def _restore_params(workdir: str, step: int | None):
  """(config, meta, step, params as NumPy, parameter count) of a run's checkpoint: `step`,
  or the newest that restores (`rundir.read_checkpoint`, as launch.pretrain picks), read on
  one device and verified against its checksums (`rundir.read_params`).

  Raises:
    train.InputError: the family or config cannot be exported; no checkpoint restores, or
      `step` does not.
  """

  def read(ckpt, read_step, meta):
    config = rundir.config_from_meta(meta['config'])
    try:
      hf_export.check_exportable(config)
    except hf_export.ExportError as e:
      raise train.InputError(f'{workdir} (family {config.model.family}): {e}') from None
    return config, *rundir.read_params(ckpt, read_step, meta)

  step, meta, (config, params, num_params) = rundir.read_checkpoint(workdir, read, step)
  return config, meta, step, jax.device_get(params), num_params


def export_run(
  from_workdir: str,
  out_dir: str,
  step: int | None = None,
  tokenizer_path: str | None = None,
  max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
) -> ExportResult:
  """Writes the checkpoint of `from_workdir` as a Hugging Face model directory `out_dir`.

  Reads only (the workdir is not modified). The state dict is re-imported and compared with
  the checkpoint bit for bit before anything is written.

  Args:
    from_workdir: a run written by launch.pretrain, launch.upscale or launch.convert.
    out_dir: a new or empty directory.
    step: the checkpoint step (default: the newest that restores; a newer damaged one is
      named in a warning).
    tokenizer_path: the run's tokenizer file when the recorded path is not on this machine.
    max_position_embeddings: length of the position tables in config.json (and the
      tokenizer's model_max_length); our model itself has no limit.

  Returns:
    An ExportResult.

  Raises:
    train.InputError: no checkpoint that restores (or a --step that does not), a non-empty
      --out, a family or config the layouts cannot express, a missing or different tokenizer.
  """
  if not os.path.isdir(os.path.join(from_workdir, 'checkpoints')):
    raise train.InputError(
      f'--from_workdir={from_workdir} has no checkpoints/ directory; give '
      'the workdir of a run written by launch.pretrain.'
    )
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise train.InputError(
      f'--out={out_dir} exists and is not an empty directory; choose a '
      'new --out (export never overwrites files).'
    )
  if max_position_embeddings < 1:
    raise train.InputError(f'--max_position_embeddings={max_position_embeddings} must be >= 1.')
  config, meta, step, params, num_params = _restore_params(from_workdir, step)
  try:
    tok = tokenizer_lib.load_run_tokenizer(meta, tokenizer_path)
  except tokenizer_lib.TokenizerError as e:
    raise train.InputError(str(e)) from None
  family = config.model.family
  state_dict = hf_export.to_torch(params, config, max_position_embeddings)
  back, _ = hf_import.from_torch(state_dict, config)
  same = jax.tree.map(
    lambda a, b: np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b), params, back
  )
  if not all(jax.tree.leaves(same)):  # a bug in the name table, never a user error
    raise RuntimeError('the exported state dict does not re-import bit-identically')
  hf_cfg = hf_export.hf_config(
    config, pad_token_id=tok.pad_id, max_position_embeddings=max_position_embeddings
  )
  hf_cfg['encoder_pretrain'] = {
    'family': family,
    'objective': config.objective,
    'model': config.model.to_dict(),
    'tokenizer': {
      'kind': tok.kind,
      'sha256': tok.sha256,
      'lowercase': getattr(tok, 'lowercase', None),
    },
    # the run's name; no machine path goes into config.json
    'run': model_card._run_name(from_workdir),
    'step': int(step),
    'code_version': meta.get('code_version', 'unknown'),
  }
  try:
    tokenizer_files = hf_tokenizer.hf_files(tok, max_position_embeddings)
  except tokenizer_lib.TokenizerError as e:
    raise train.InputError(f'the tokenizer {tok.path}: {e}') from None
  files = {
    'config.json': (json.dumps(hf_cfg, indent=2, sort_keys=True) + '\n').encode(),
    hf_weights.WEIGHTS: _safetensors_bytes(state_dict),
    **tokenizer_files,
    **(remote_code_files() if 'auto_map' in hf_cfg else {}),
    'README.md': model_card.model_card(
      config=config,
      meta=meta,
      step=int(step),
      num_params=num_params,
      tokenizer=tok,
      from_workdir=from_workdir,
      out_dir=out_dir,
      max_position_embeddings=max_position_embeddings,
    ).encode(),
  }
  os.makedirs(out_dir, exist_ok=True)
  for name, data in files.items():
    tmp = os.path.join(out_dir, f'.{name}.tmp{os.getpid()}')
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, os.path.join(out_dir, name))
  return ExportResult(
    out_dir=out_dir,
    files={k: len(v) for k, v in files.items()},
    family=family,
    step=int(step),
    num_params=num_params,
    hf_config=hf_cfg,
    tokenizer_kind=tok.kind,
  )


def remote_code_files() -> dict[str, bytes]:
  """{file name: bytes} of the PyTorch code a RoFormer-v2 / GAU-alpha export carries
  (models/hf_remote/, hf_export.REMOTE_CODE_FILES; config.json's auto_map names its classes)."""
  here = os.path.join(os.path.dirname(os.path.abspath(models.__file__)), 'hf_remote')
  out = {}
  for name in hf_export.REMOTE_CODE_FILES:
    with open(os.path.join(here, name), 'rb') as f:
      out[name] = f.read()
  return out


def export_summary(result: ExportResult) -> str:
  """The lines `launch.export` prints: what was written and how to load it."""
  files = ', '.join(
    f'{name} ({size / 1e6:.1f} MB)' if size > 1e5 else name for name, size in result.files.items()
  )
  return '\n'.join(
    [
      f'exported {result.family} step {result.step} ({result.num_params:,} parameters) as '
      f'{model_card.LAYOUT_NAMES[result.family]}',
      f'wrote {result.out_dir}: {files}',
      'check: the state dict re-imports bit-identically',
      'load it with:',
      *('  ' + line for line in model_card.load_lines(result.family, result.out_dir)),
    ]
  )


# ----------------------------------------------------------------------------- import


@dataclasses.dataclass
class ImportResult:
  """What `import_run` did.

  Attributes:
    config: the new run's ConfigDict; config_spec: the `file:preset` it started from;
    family: our family; weights_file: the file read; tokenizer: the tokenizer (its path in
    the new workdir); report: {'ignored': tensor names not used, 'filled': our head paths
    initialised fresh}; heldout: {'loss', 'accuracy', 'perplexity'} on one held-out batch;
    checkpoint: the written step-0 directory; num_params: parameter count.
  """

  config: Any
  config_spec: str
  family: str
  weights_file: str
  tokenizer: Any
  report: dict
  heldout: dict
  checkpoint: str
  num_params: int


# Model fields that change how the model runs, not what it computes: from --config.
RUNTIME_FIELDS = ('dtype', 'remat_policy', 'scan_layers', 'scan_unroll')


def _config_for(from_hf: str, hf: dict, config, explicit: frozenset):
  """The new run's config: `config` with the checkpoint's model fields (our own record in
  config.json["encoder_pretrain"] when config.json still describes it, RUNTIME_FIELDS
  excepted; else the fields `hf_import.model_fields` reads), except fields given on the
  command line."""
  try:
    family, fields = hf_import.model_fields(hf_export.port_config(hf))
  except hf_import.FormatError as e:
    hf_weights.reject(from_hf, str(e))
  if config.model.family != family:
    raise train.InputError(
      f'--from_hf={from_hf} holds a {family} checkpoint but --config is a '
      f'{config.model.family} config; pass --config=launch/configs/{family}.py:PRESET (or '
      'leave --config out).'
    )
  config = copy.deepcopy(config)
  own = hf.get('encoder_pretrain') or {}
  values = {f'model.{k}': v for k, v in fields.items()}
  if own.get('family') == family and isinstance(own.get('model'), dict):
    candidate = copy.deepcopy(config)
    candidate.model.update({k: v for k, v in own['model'].items() if k in candidate.model})
    try:
      described = hf_export.hf_config(
        candidate,
        pad_token_id=hf.get('pad_token_id', 0),
        max_position_embeddings=hf.get('max_position_embeddings', 1),
      )
    except (hf_export.ExportError, ValueError, TypeError):
      described = {}
    # In the ports' convention on both sides, so that an export written before v2 got its own
    # model_type (model_type 'roformer', norm_type 'rms_norm') still matches.
    described = hf_export.port_config(described)
    if all(described.get(k) == v for k, v in hf_export.port_config(hf).items() if k in described):
      values = {
        f'model.{k}': candidate.model[k]
        for k in own['model']
        if k in config.model and k not in RUNTIME_FIELDS
      }
  config.update_from_flattened_dict(
    {k: rundir.to_tuples(v) for k, v in values.items() if k not in explicit}
  )
  return config


def _check_shapes(
  from_hf: str, config, explicit: frozenset, weights_file: str, shapes: dict[str, tuple]
) -> None:
  """`hf_import.check_shapes` as a train.InputError naming the weights file."""
  try:
    hf_import.check_shapes(shapes, config, os.path.join(from_hf, weights_file), explicit)
  except hf_import.FormatError as e:
    raise train.InputError(str(e)) from None


def _tokenizer_for(from_hf: str, config, explicit: frozenset):
  """(tokenizer, source file, lowercase) of the import: --config.data.tokenizer_model if
  given, else the directory's tokenizer.model or vocab.txt."""
  try:
    if 'data.tokenizer_model' in explicit:
      src = config.data.tokenizer_model
      tok = tokenizer_lib.load(src, config.data.tokenizer_kind, config.data.tokenizer_lowercase)
    else:
      name, lowercase = hf_tokenizer.find_in_hf_dir(from_hf)
      src = os.path.join(from_hf, name)
      if config.data.tokenizer_lowercase is not None:
        lowercase = config.data.tokenizer_lowercase
      tok = tokenizer_lib.load(src, 'auto', lowercase)
  except tokenizer_lib.TokenizerError as e:
    hf_weights.reject(from_hf, str(e))
  if tok.vocab_size > config.model.vocab_size:
    hf_weights.reject(
      from_hf,
      f'the tokenizer {src} has {tok.vocab_size} tokens but config.json '
      f"vocab_size={config.model.vocab_size}; they must belong together (give the model's "
      'own vocabulary).',
    )
  return tok, src


def _initial_state(config, run_setup, params):
  """Step 0: `params`, a fresh optimizer state, on the run's shardings."""
  abstract = run_setup.abstract_state
  params = jax.tree.map(lambda a, x: np.asarray(x, a.dtype), abstract['params'], params)
  state = {
    'step': np.zeros((), np.int32),
    'params': params,
    'opt_state': jax.jit(run_setup.tx.init)(params),
  }
  return jax.tree.map(
    lambda a, x: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), abstract, state
  )


def import_run(
  from_hf: str,
  workdir: str,
  config=None,
  config_spec: str | None = None,
  explicit: frozenset = frozenset(),
) -> ImportResult:
  """Writes a Hugging Face checkpoint directory as step 0 of a new run `workdir`.

  Args:
    from_hf: a directory with config.json, weights (see `hf_weights.read_weights`) and a
      vocab.txt or tokenizer.model.
    workdir: the new run directory; must hold no checkpoint.
    config: the run's config (data, optimizer, schedule; its model fields are replaced by the
      checkpoint's); None: `launch/configs/<family>.py:tiny`.
    config_spec: the `file:preset` `config` came from (for the printed continue command).
    explicit: dotted config fields given on the command line (kept over the checkpoint's).

  Returns:
    An ImportResult.

  Raises:
    train.InputError: a missing, malformed or unsupported file, another model type, a family
      that does not match --config, a config.json whose sizes disagree with the weights'
      shapes (checked on the safetensors headers before any model is built); nothing has been
      written.
  """
  if not os.path.isfile(os.path.join(from_hf, 'config.json')):
    raise train.InputError(
      f'--from_hf={from_hf} has no config.json; give a Hugging Face model '
      'directory (config.json, model.safetensors, vocab.txt).'
    )
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and os.listdir(
    os.path.join(workdir, 'checkpoints')
  ):
    raise train.InputError(
      f'--workdir={workdir} already holds checkpoints; launch.convert '
      'writes a new run: choose an empty --workdir.'
    )
  if os.path.abspath(workdir) == os.path.abspath(from_hf):
    raise train.InputError('--workdir must differ from --from_hf.')
  try:
    with open(os.path.join(from_hf, 'config.json'), encoding='utf-8') as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    hf_weights.reject(from_hf, f'config.json is not readable JSON ({e}).')
  if not isinstance(hf, dict):
    hf_weights.reject(from_hf, 'config.json is not a JSON object.')
  if config is None:
    try:
      family, _ = hf_import.model_fields(hf_export.port_config(hf))
    except hf_import.FormatError as e:
      hf_weights.reject(from_hf, str(e))
    config_spec = f'launch/configs/{family}.py:tiny'
    config = rundir.load_preset(
      os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'launch',
        'configs',
        f'{family}.py',
      )
      + ':tiny'
    )
  config = _config_for(from_hf, hf, config, explicit)
  # config.json against the weights' shapes (safetensors: headers only) before anything is
  # built: an edited num_hidden_layers=1000000 would otherwise trace a million layers.
  try:
    models.validate(config)
  except ValueError as e:
    raise train.InputError(str(e)) from e
  header = hf_weights.weight_shapes(from_hf)
  if header is not None:
    _check_shapes(from_hf, config, explicit, *header)
  tok, tok_src = _tokenizer_for(from_hf, config, explicit)
  tok_dst = os.path.abspath(os.path.join(workdir, 'tokenizer', os.path.basename(tok_src)))
  config.data.tokenizer_model = tok_dst
  config.data.tokenizer_kind = tok.kind
  if tok.kind == 'wordpiece':
    config.data.tokenizer_lowercase = tok.lowercase
  weights_file, state_dict = hf_weights.read_weights(from_hf)
  if header is None:  # flax_model.msgpack or pytorch_model.bin: shapes of the loaded arrays
    _check_shapes(
      from_hf, config, explicit, weights_file, {k: np.shape(v) for k, v in state_dict.items()}
    )
  try:
    models.validate(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    train.validate(config, mesh)
  except ValueError as e:
    raise train.InputError(str(e)) from e
  run_setup = train.setup(config, mesh)
  head_names = [e.name for e in hf_export.layout(config) if e.path[0] == 'head']
  fill = None
  if any(name not in state_dict for name in head_names):
    fill = jax.device_get(train.init_state(config, run_setup)['params'])
  try:
    params, report = hf_import.from_torch(
      state_dict, config, fill=fill, source=os.path.join(from_hf, weights_file)
    )
  except hf_import.FormatError as e:
    raise train.InputError(str(e)) from None
  state = _initial_state(config, run_setup, params)
  try:
    source = text_datasets.load_text_source(config.data)
    heldout = pipeline.eval_batches(source.validation, tok, config, text_key=source.text_key)[0]
    train_iter = iter(
      pipeline.make_dataset(source.train, tok, config, text_key=source.text_key, train=True)
    )
  except ValueError as e:
    raise train.InputError(str(e)) from e
  sums = train.jit_eval_step(run_setup, config)(
    state['params'], mesh_lib.global_batch(heldout, mesh)
  )
  heldout_metrics = train.summarize(jax.device_get(sums))
  # Every check passed: write the tokenizer copy, then the run.
  os.makedirs(os.path.dirname(tok_dst), exist_ok=True)
  shutil.copyfile(tok_src, tok_dst)
  if tok.kind == 'wordpiece':
    with open(
      os.path.join(os.path.dirname(tok_dst), 'tokenizer_config.json'), 'w', encoding='utf-8'
    ) as f:
      json.dump({'tokenizer_class': 'BertTokenizer', 'do_lower_case': tok.lowercase}, f)
  tok.path = tok_dst
  lineage = [
    {
      'imported_from': os.path.abspath(from_hf),
      'weights': weights_file,
      'model_type': hf.get('model_type'),
      'layout': model_card.LAYOUT_NAMES[config.model.family],
      'ignored': report['ignored'],
      'filled': report['filled'],
      'heldout_loss': heldout_metrics['loss'],
    }
  ]
  meta = checkpointing.checkpoint_meta(config, tok, mesh, source, lineage)
  checkpoint = rundir.write_run(workdir, config, state, train_iter, meta)
  return ImportResult(
    config=config,
    config_spec=config_spec or '',
    family=config.model.family,
    weights_file=os.path.join(from_hf, weights_file),
    tokenizer=tok,
    report=report,
    heldout=heldout_metrics,
    checkpoint=checkpoint,
    num_params=run_setup.num_params,
  )


def import_summary(result: ImportResult, workdir: str) -> str:
  """The lines `launch.convert` prints: what was read, the held-out check, where the run
  went and the exact `launch.pretrain` command that continues it."""
  tok = result.tokenizer
  kind = (
    'WordPiece' + (', lowercase' if tok.lowercase else ', cased')
    if tok.kind == 'wordpiece'
    else 'SentencePiece'
  )
  lines = [
    f'imported {result.family} ({result.num_params:,} parameters) from '
    f'{result.weights_file} as {model_card.LAYOUT_NAMES[result.family]}',
    f'tokenizer: {tok.path} ({kind}, {tok.vocab_size} tokens)',
  ]
  if result.report['ignored']:
    lines.append(
      'ignored tensors (not part of the masked LM): ' + ', '.join(result.report['ignored'])
    )
  if result.report['filled']:
    lines.append(
      'no MLM head in the checkpoint: initialised fresh: ' + ', '.join(result.report['filled'])
    )
  h = result.heldout
  lines.append(
    f'held-out batch: {result.config.objective.upper()} loss {h["loss"]:.4f}, '
    f'accuracy {h["accuracy"]:.4f}'
  )
  lines.append(f'wrote {result.checkpoint}')
  spec = result.config_spec
  try:
    path, _, preset = spec.partition(':')
    if not os.path.isfile(path):  # a spec relative to the repository, run from elsewhere
      path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    extra = rundir.continue_flags(result.config, rundir.load_preset(f'{path}:{preset}'))
  except Exception:  # pylint: disable=broad-except
    extra = ['<the overrides in', os.path.join(workdir, 'config.json>')]
  lines.append(
    'continue training with:\n  python -m launch.pretrain '
    + ' '.join([f'--config={spec}', f'--workdir={workdir}'] + extra)
  )
  return '\n'.join(lines)
