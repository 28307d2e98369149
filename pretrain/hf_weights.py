"""The weights of a Hugging Face checkpoint directory, read and checked before any library
sees them (docs/huggingface.md): `model.safetensors` (or its sharded index), whose header is
parsed and checked against the file first; `flax_model.msgpack`; `pytorch_model.bin` only
through `torch.load(weights_only=True)`, never pickle. Every problem raises
`train.InputError` naming --from_hf and the fix.
"""

from __future__ import annotations

import json
import os

import numpy as np

from models import hf_import
from pretrain import train

WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
FLAX_WEIGHTS = 'flax_model.msgpack'
TORCH_WEIGHTS = 'pytorch_model.bin'


def reject(from_hf: str, message: str):
  """Raises train.InputError naming --from_hf=<from_hf> and `message` (what is wrong and the
  fix)."""
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
        reject(
          from_hf,
          f'{name} has {size} bytes, fewer than the 8-byte header length a '
          f'safetensors file starts with; {_REFETCH}.',
        )
      n = int.from_bytes(head, 'little')
      if n > size - 8:
        reject(
          from_hf,
          f'{name}: header length {n} (its first 8 bytes, little-endian) exceeds '
          f'the file size of {size} bytes; it is truncated or not a safetensors file: '
          f'{_REFETCH}.',
        )
      if n > SAFETENSORS_MAX_HEADER:
        reject(
          from_hf,
          f'{name}: header length {n} exceeds the safetensors limit of '
          f'{SAFETENSORS_MAX_HEADER} bytes; it is not a safetensors file: {_REFETCH}.',
        )
      raw = f.read(n)
  except OSError as e:
    reject(from_hf, f'{name} cannot be read ({e}).')
  try:
    header = json.loads(raw.decode('utf-8'))
  except ValueError as e:  # UnicodeDecodeError is a ValueError
    reject(from_hf, f'{name}: its {n}-byte header is not UTF-8 JSON ({e}); {_REFETCH}.')
  if not isinstance(header, dict):
    reject(
      from_hf,
      f'{name}: its header is not a JSON object {{tensor: {{dtype, shape, '
      f'data_offsets}}}}; {_REFETCH}.',
    )
  metadata = header.pop('__metadata__', None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    reject(from_hf, f'{name}: its __metadata__ does not map strings to strings; {_REFETCH}.')
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
      reject(
        from_hf,
        f'{name}: tensor {tensor!r} has the header entry {str(info)[:200]}, not '
        '{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]} with begin <= '
        f'end; {_REFETCH}.',
      )
    dtype, shape, (begin, end) = info['dtype'], tuple(info['shape']), info['data_offsets']
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
    if itemsize is not None and end - begin != itemsize * int(np.prod(shape, dtype=object)):
      reject(
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
    reject(
      from_hf,
      f'{name} is truncated: its data ends at byte {8 + n + last} but the file has '
      f'{size} bytes; {_REFETCH}.',
    )
  for begin, end, tensor in spans:
    if end > data_size:
      reject(
        from_hf,
        f'{name}: tensor {tensor!r} has data_offsets [{begin}, {end}], past the end '
        f'of the {data_size}-byte data section (the file has {size} bytes); the header is '
        f'corrupt: {_REFETCH}.',
      )
  if clash is not None:
    reject(
      from_hf,
      f'{name}: tensor {clash[0]!r} {clash[1]} in the data section; the header is '
      f'corrupt: {_REFETCH}.',
    )
  if last != data_size:
    reject(
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
    reject(from_hf, f'{WEIGHTS_INDEX} is not a readable JSON object ({e}).')
  if (
    not isinstance(weight_map, dict)
    or not weight_map
    or not all(isinstance(v, str) for v in weight_map.values())
  ):
    reject(from_hf, f'{WEIGHTS_INDEX} has no "weight_map" {{tensor: shard file}}; {_REFETCH}.')
  shards = sorted(set(weight_map.values()))
  absent = [s for s in shards if not os.path.isfile(os.path.join(from_hf, s))]
  if absent:
    reject(
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
          reject(from_hf, f'{shard} is not a readable safetensors file ({e}).')
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
        reject(from_hf, f'{FLAX_WEIGHTS} is not a Flax msgpack file ({e}).')
    if not isinstance(tree, dict):
      reject(
        from_hf,
        f'{FLAX_WEIGHTS} holds a value of type {type(tree).__name__}, not a '
        'parameter tree {name: array}.',
      )
    return FLAX_WEIGHTS, hf_import.torch_names_from_flax(tree)
  if os.path.isfile(path(TORCH_WEIGHTS)):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      reject(
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
      reject(from_hf, f'torch.load(weights_only=True) refused {TORCH_WEIGHTS} ({e}).')
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
      reject(
        from_hf,
        f'{TORCH_WEIGHTS} holds a value of type {type(state).__name__}, not a '
        'state dict {name: tensor} (a training checkpoint?); save model.state_dict() alone.',
      )
    return TORCH_WEIGHTS, {k: v.float().numpy() for k, v in state.items()}
  present = ', '.join(sorted(os.listdir(from_hf))) or 'nothing'
  reject(
    from_hf,
    f'no weights file ({WEIGHTS}, {FLAX_WEIGHTS} or {TORCH_WEIGHTS}); the '
    f'directory holds {present}.',
  )
