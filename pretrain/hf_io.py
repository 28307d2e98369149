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
hidden size) does so before any model is built (`safetensors_header`, `hf_import.check_shapes`).
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
from pretrain import mesh as mesh_lib
from pretrain import model_card
from pretrain import rundir
from pretrain import train

WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
FLAX_WEIGHTS = 'flax_model.msgpack'
TORCH_WEIGHTS = 'pytorch_model.bin'
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
    WEIGHTS: _safetensors_bytes(state_dict),
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


def _bad(from_hf: str, message: str):
  raise train.InputError(f'--from_hf={from_hf}: {message}')


# The safetensors library refuses longer headers (bytes).
SAFETENSORS_MAX_HEADER = 100_000_000
# Bytes per element of the safetensors dtypes that take whole bytes (others are not sized).
_SAFETENSORS_ITEMSIZE = {
  'BOOL': 1,
  'U8': 1,
  'I8': 1,
  'F8_E5M2': 1,
  'F8_E4M3': 1,
  'I16': 2,
  'U16': 2,
  'F16': 2,
  'BF16': 2,
  'I32': 4,
  'U32': 4,
  'F32': 4,
  'I64': 8,
  'U64': 8,
  'F64': 8,
}
_REFETCH = 'copy, download or export it again'


def _naturals(value, length: int | None = None) -> bool:
  """Whether `value` is a JSON list of integers >= 0 (of `length` items when given)."""
  return (
    isinstance(value, list)
    and (length is None or len(value) == length)
    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
  )


def safetensors_header(from_hf: str, name: str) -> tuple[dict, dict[str, tuple]]:
  """(metadata, {tensor: (dtype, shape)}) of the safetensors file `name`, read from its
  header alone and checked against the file, so that no malformed file reaches the library
  (whose errors do not say what is wrong) and nothing large is read.

  The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON {tensor:
  {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}, optional "__metadata__":
  {str: str}}, then the data section; offsets count bytes from its start, and the tensors tile
  it exactly (no gap, no overlap, nothing after the last).

  Args:
    from_hf: the model directory.
    name: the file inside it (model.safetensors or a shard).

  Returns:
    (metadata, {tensor name: (dtype string, shape tuple)}).

  Raises:
    train.InputError: naming the file and what is wrong: unreadable, shorter than 8 bytes, a
      header length beyond the file or the library's limit, a header that is not that JSON,
      a tensor whose byte count disagrees with its dtype and shape or that lies past the end
      of the file (truncated), tensors that overlap or leave gaps, bytes after the last one.
  """
  path = os.path.join(from_hf, name)
  try:
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        _bad(
          from_hf,
          f'{name} has {size} bytes, fewer than the 8-byte header length a '
          f'safetensors file starts with; {_REFETCH}.',
        )
      n = int.from_bytes(head, 'little')
      if n > size - 8:
        _bad(
          from_hf,
          f'{name}: header length {n} (its first 8 bytes, little-endian) exceeds '
          f'the file size of {size} bytes; it is truncated or not a safetensors file: '
          f'{_REFETCH}.',
        )
      if n > SAFETENSORS_MAX_HEADER:
        _bad(
          from_hf,
          f'{name}: header length {n} exceeds the safetensors limit of '
          f'{SAFETENSORS_MAX_HEADER} bytes; it is not a safetensors file: {_REFETCH}.',
        )
      raw = f.read(n)
  except OSError as e:
    _bad(from_hf, f'{name} cannot be read ({e}).')
  try:
    header = json.loads(raw.decode('utf-8'))
  except ValueError as e:  # UnicodeDecodeError is a ValueError
    _bad(from_hf, f'{name}: its {n}-byte header is not UTF-8 JSON ({e}); {_REFETCH}.')
  if not isinstance(header, dict):
    _bad(
      from_hf,
      f'{name}: its header is not a JSON object {{tensor: {{dtype, shape, '
      f'data_offsets}}}}; {_REFETCH}.',
    )
  metadata = header.pop('__metadata__', None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    _bad(from_hf, f'{name}: its __metadata__ does not map strings to strings; {_REFETCH}.')
  data_size = size - 8 - n
  tensors, spans = {}, []
  for tensor, info in header.items():
    if not (
      isinstance(info, dict)
      and isinstance(info.get('dtype'), str)
      and _naturals(info.get('shape'))
      and _naturals(info.get('data_offsets'), 2)
      and info['data_offsets'][0] <= info['data_offsets'][1]
    ):
      _bad(
        from_hf,
        f'{name}: tensor {tensor!r} has the header entry {str(info)[:200]}, not '
        '{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]} with begin <= '
        f'end; {_REFETCH}.',
      )
    dtype, shape, (begin, end) = info['dtype'], tuple(info['shape']), info['data_offsets']
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
    if itemsize is not None and end - begin != itemsize * int(np.prod(shape, dtype=object)):
      _bad(
        from_hf,
        f'{name}: tensor {tensor!r} has data_offsets [{begin}, {end}] '
        f'({end - begin} bytes) but dtype {dtype} and shape {list(shape)} take '
        f'{itemsize * int(np.prod(shape, dtype=object))} bytes; the header is corrupt: '
        f'{_REFETCH}.',
      )
    tensors[tensor] = (dtype, shape)
    spans.append((begin, end, tensor))
  spans.sort()
  tiled, clash = 0, None  # data bytes [0, tiled) are covered by the tensors in offset order
  for begin, end, tensor in spans:
    if begin != tiled:
      clash = (
        tensor,
        'overlaps the tensor before it'
        if begin < tiled
        else f'leaves the bytes [{tiled}, {begin}) unused',
      )
      break
    tiled = end
  last = max((end for _, end, _ in spans), default=0)
  if clash is None and last > data_size:  # intact layout, missing tail: a cut-off copy
    _bad(
      from_hf,
      f'{name} is truncated: its data ends at byte {8 + n + last} but the file has '
      f'{size} bytes; {_REFETCH}.',
    )
  for begin, end, tensor in spans:
    if end > data_size:
      _bad(
        from_hf,
        f'{name}: tensor {tensor!r} has data_offsets [{begin}, {end}], past the end '
        f'of the {data_size}-byte data section (the file has {size} bytes); the header is '
        f'corrupt: {_REFETCH}.',
      )
  if clash is not None:
    _bad(
      from_hf,
      f'{name}: tensor {clash[0]!r} {clash[1]} in the data section; the header is '
      f'corrupt: {_REFETCH}.',
    )
  if last != data_size:
    _bad(
      from_hf,
      f'{name} has {data_size - last} bytes after its last tensor (the header '
      f'accounts for {8 + n + last} of its {size} bytes); {_REFETCH}.',
    )
  return metadata, tensors


def _safetensors_files(from_hf: str) -> tuple[str, list[str]] | None:
  """(the file to name, [safetensors files to read]) of model.safetensors or its sharded
  index; None when the directory has neither."""
  if os.path.isfile(os.path.join(from_hf, WEIGHTS)):
    return WEIGHTS, [WEIGHTS]
  if not os.path.isfile(os.path.join(from_hf, WEIGHTS_INDEX)):
    return None
  try:
    with open(os.path.join(from_hf, WEIGHTS_INDEX), encoding='utf-8') as f:
      weight_map = json.load(f).get('weight_map')
  except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON but no object
    _bad(from_hf, f'{WEIGHTS_INDEX} is not a readable JSON object ({e}).')
  if (
    not isinstance(weight_map, dict)
    or not weight_map
    or not all(isinstance(v, str) for v in weight_map.values())
  ):
    _bad(from_hf, f'{WEIGHTS_INDEX} has no "weight_map" {{tensor: shard file}}; {_REFETCH}.')
  shards = sorted(set(weight_map.values()))
  absent = [s for s in shards if not os.path.isfile(os.path.join(from_hf, s))]
  if absent:
    _bad(
      from_hf,
      f'{WEIGHTS_INDEX} names the shard(s) {", ".join(absent[:4])}, which are not '
      'in the directory; download every shard.',
    )
  return WEIGHTS_INDEX, shards


def _torch_shapes(shapes: dict[str, tuple], fmt: str) -> dict[str, tuple]:
  """PyTorch names and shapes of a safetensors header's {name: shape}; a Flax-format file
  (transformers' Flax save) is renamed and transposed as `read_weights` does with the
  values, on zero-byte broadcast views."""
  if fmt != 'flax':
    return shapes
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  views = {
    tuple(k.split('.')): np.broadcast_to(np.zeros((), np.float32), shape)
    for k, shape in shapes.items()
  }
  named = hf_import.torch_names_from_flax(traverse_util.unflatten_dict(views))
  return {k: np.shape(v) for k, v in named.items()}


def weight_shapes(from_hf: str) -> tuple[str, dict[str, tuple]] | None:
  """(file name, {PyTorch name: shape}) of a directory's safetensors weights from the headers
  alone (each checked by `safetensors_header`); None when the weights are not safetensors.

  Raises:
    train.InputError: a malformed index or safetensors file (see safetensors_header).
  """
  found = _safetensors_files(from_hf)
  if found is None:
    return None
  name, shards = found
  shapes, fmt = {}, 'pt'
  for shard in shards:
    metadata, tensors = safetensors_header(from_hf, shard)
    fmt = metadata.get('format', 'pt')
    shapes.update({k: shape for k, (_, shape) in tensors.items()})
  return name, _torch_shapes(shapes, fmt)


def read_weights(from_hf: str) -> tuple[str, dict[str, np.ndarray]]:
  """(file name, {PyTorch name: ndarray}) of a Hugging Face model directory.

  Order: model.safetensors, its sharded index, flax_model.msgpack (msgpack, no pickle; Flax
  names are mapped to PyTorch names), pytorch_model.bin (only with torch installed, through
  torch.load(weights_only=True)).

  Raises:
    train.InputError: no weights file, a malformed safetensors file or index (checked by
      `safetensors_header` before the library reads it), a file that is not a parameter tree
      or state dict, or a pytorch_model.bin without torch (the message says how to turn it
      into model.safetensors).
  """
  path = lambda name: os.path.join(from_hf, name)  # noqa: E731
  found = _safetensors_files(from_hf)
  if found is not None:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top

    name, shards = found
    tensors, fmt = {}, 'pt'
    for shard in shards:
      safetensors_header(from_hf, shard)  # a malformed file gets a message, not the library's
      try:
        with safe_open(path(shard), framework='numpy') as f:
          fmt = (f.metadata() or {}).get('format', 'pt')
          for key in f.keys():
            tensors[key] = f.get_tensor(key)
      except (
        OSError,
        ValueError,
        TypeError,
        RuntimeError,
        SafetensorError,
      ) as e:  # bf16 has no NumPy dtype
        try:
          with safe_open(path(shard), framework='flax') as f:
            for key in f.keys():
              tensors[key] = np.asarray(f.get_tensor(key), np.float32)
        except Exception:  # pylint: disable=broad-except
          _bad(from_hf, f'{shard} is not a readable safetensors file ({e}).')
    if fmt == 'flax':  # saved by a transformers Flax model: Flax names, [in, out] kernels
      from flax import traverse_util  # pylint: disable=g-import-not-at-top

      tensors = hf_import.torch_names_from_flax(
        traverse_util.unflatten_dict({tuple(k.split('.')): v for k, v in tensors.items()})
      )
    return name, tensors
  if os.path.isfile(path(FLAX_WEIGHTS)):
    from flax import serialization  # pylint: disable=g-import-not-at-top

    with open(path(FLAX_WEIGHTS), 'rb') as f:
      try:
        tree = serialization.msgpack_restore(f.read())
      except Exception as e:  # pylint: disable=broad-except
        _bad(from_hf, f'{FLAX_WEIGHTS} is not a Flax msgpack file ({e}).')
    if not isinstance(tree, dict):
      _bad(
        from_hf,
        f'{FLAX_WEIGHTS} holds a value of type {type(tree).__name__}, not a '
        'parameter tree {name: array}.',
      )
    return FLAX_WEIGHTS, hf_import.torch_names_from_flax(tree)
  if os.path.isfile(path(TORCH_WEIGHTS)):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      _bad(
        from_hf,
        f'only {TORCH_WEIGHTS} is there, a pickle file that is read only through '
        'torch.load(weights_only=True), and torch is not installed. Install it '
        "(pip install -e '.[torch]'), or convert it once where torch is: python -c "
        '"import torch; from safetensors.torch import save_file; '
        f"sd = torch.load('{path(TORCH_WEIGHTS)}', weights_only=True); "
        'save_file({k: v.float().contiguous().clone() for k, v in sd.items()}, '
        f"'{path(WEIGHTS)}', metadata={{'format': 'pt'}})\"",
      )
    try:
      state = torch.load(path(TORCH_WEIGHTS), map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      _bad(from_hf, f'torch.load(weights_only=True) refused {TORCH_WEIGHTS} ({e}).')
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      _bad(
        from_hf,
        f'{TORCH_WEIGHTS} holds a value of type {type(state).__name__}, not a '
        'state dict {name: tensor} (a training checkpoint?); save model.state_dict() alone.',
      )
    return TORCH_WEIGHTS, {k: v.float().numpy() for k, v in state.items()}
  present = ', '.join(sorted(os.listdir(from_hf))) or 'nothing'
  _bad(
    from_hf,
    f'no weights file ({WEIGHTS}, {FLAX_WEIGHTS} or {TORCH_WEIGHTS}); the '
    f'directory holds {present}.',
  )


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
    _bad(from_hf, str(e))
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
    _bad(from_hf, str(e))
  if tok.vocab_size > config.model.vocab_size:
    _bad(
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
    from_hf: a directory with config.json, weights (see read_weights) and a vocab.txt or
      tokenizer.model.
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
    _bad(from_hf, f'config.json is not readable JSON ({e}).')
  if not isinstance(hf, dict):
    _bad(from_hf, 'config.json is not a JSON object.')
  if config is None:
    try:
      family, _ = hf_import.model_fields(hf_export.port_config(hf))
    except hf_import.FormatError as e:
      _bad(from_hf, str(e))
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
  header = weight_shapes(from_hf)
  if header is not None:
    _check_shapes(from_hf, config, explicit, *header)
  tok, tok_src = _tokenizer_for(from_hf, config, explicit)
  tok_dst = os.path.abspath(os.path.join(workdir, 'tokenizer', os.path.basename(tok_src)))
  config.data.tokenizer_model = tok_dst
  config.data.tokenizer_kind = tok.kind
  if tok.kind == 'wordpiece':
    config.data.tokenizer_lowercase = tok.lowercase
  weights_file, state_dict = read_weights(from_hf)
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
