"""Import Hugging Face FlaxRoFormerForMaskedLM parameters into our RoFormer v1 param tree.

HF's Flax RoFormer applies RoPE in the *interleaved* layout (it builds
sin_pos = [s0, s0, s1, s1, ...] and rotate_half = [-x1, x0, -x3, x2, ...] per head, with
theta_i = 10000^(-2i/d_h) over the head size), which is exactly models/rope.py, so query/key
kernels need no column permutation. (A LLaMA-style "rotate_half" checkpoint would need
`rope.rotate_half_to_interleaved` applied to the head-dim columns of W_q, W_k and their biases;
see `permute_qk_rotate_half`.) HF's rotary base is fixed at 10000: set model.rotary_base=10000.

Usage:
  params = roformer_from_hf(hf_model.params, config)
  state = nnx.state(model, nnx.Param); nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
"""

from __future__ import annotations

import numpy as np

from models import rope


def _np(x):
  return np.asarray(x)


def _layer(hf_layer: dict, h: int, d_h: int) -> dict:
  att = hf_layer['attention']
  d = _np(att['self']['query']['kernel']).shape[0]

  def qkv(name):
    p = att['self'][name]
    return {'kernel': _np(p['kernel']).reshape(d, h, d_h), 'bias': _np(p['bias']).reshape(h, d_h)}

  out = att['output']
  ffn_in, ffn_out = hf_layer['intermediate']['dense'], hf_layer['output']['dense']
  return {
      'attention': {
          'query': qkv('query'), 'key': qkv('key'), 'value': qkv('value'),
          'out': {'kernel': _np(out['dense']['kernel']).reshape(h, d_h, d),
                  'bias': _np(out['dense']['bias'])},
      },
      'attention_norm': {'scale': _np(out['LayerNorm']['scale']),
                         'bias': _np(out['LayerNorm']['bias'])},
      'mlp': {'wi': {'kernel': _np(ffn_in['kernel']), 'bias': _np(ffn_in['bias'])},
              'wo': {'kernel': _np(ffn_out['kernel']), 'bias': _np(ffn_out['bias'])}},
      'mlp_norm': {'scale': _np(hf_layer['output']['LayerNorm']['scale']),
                   'bias': _np(hf_layer['output']['LayerNorm']['bias'])},
  }


def roformer_from_hf(hf_params: dict, config) -> dict:
  """HF FlaxRoFormerForMaskedLM params -> our pure param dict (numpy arrays).

  The layout (stacked [L, ...] vs {0: ..., 1: ...}) follows config.model.scan_layers.
  Requires tied word embeddings (HF's default) and embedding_size == hidden_size.

  Raises:
    ValueError: shapes that do not match config.model, or an untied decoder.
  """
  m = config.model
  h = m.num_heads
  d_h = m.head_dim or m.hidden_size // h
  if h * d_h != m.hidden_size:
    raise ValueError(f'HF RoFormer needs num_heads * head_dim == hidden_size, got {h} * {d_h} '
                     f'!= {m.hidden_size}; set model.head_dim=0')
  if m.rotary_base != 10000.0:
    raise ValueError(f'HF RoFormer uses RoPE base 10000 but model.rotary_base={m.rotary_base}; '
                     'set model.rotary_base=10000')
  rf = hf_params['roformer']
  emb = rf['embeddings']
  word = _np(emb['word_embeddings']['embedding'])
  if word.shape != (m.vocab_size, m.hidden_size):
    raise ValueError(f'HF word embeddings have shape {word.shape} but model.vocab_size, '
                     f'model.hidden_size = {(m.vocab_size, m.hidden_size)}; match the config')
  pred = hf_params['cls']['predictions']
  if 'decoder' in pred:
    raise ValueError('the HF checkpoint has an untied decoder; only tied embeddings are supported')
  embedder = {'token': {'embedding': word},
              'norm': {'scale': _np(emb['LayerNorm']['scale']),
                       'bias': _np(emb['LayerNorm']['bias'])}}
  if m.type_vocab_size > 0:
    tt = _np(emb['token_type_embeddings']['embedding'])
    if tt.shape[0] != m.type_vocab_size:
      raise ValueError(f'HF type vocab size is {tt.shape[0]} but model.type_vocab_size='
                       f'{m.type_vocab_size}; set model.type_vocab_size={tt.shape[0]}')
    embedder['token_type'] = {'embedding': tt}
  hf_layers = rf['encoder']['layer']
  if len(hf_layers) != m.num_layers:
    raise ValueError(f'HF checkpoint has {len(hf_layers)} layers but model.num_layers='
                     f'{m.num_layers}; set model.num_layers={len(hf_layers)}')
  per_layer = [_layer(hf_layers[str(i)], h, d_h) for i in range(m.num_layers)]
  if m.scan_layers:
    import jax  # pylint: disable=g-import-not-at-top
    layers_tree = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  else:
    layers_tree = dict(enumerate(per_layer))
  tr = pred['transform']
  head = {'transform': {'kernel': _np(tr['dense']['kernel']), 'bias': _np(tr['dense']['bias'])},
          'norm': {'scale': _np(tr['LayerNorm']['scale']), 'bias': _np(tr['LayerNorm']['bias'])},
          'bias': _np(pred['bias'])}
  return {'embedder': embedder, 'layers': layers_tree, 'head': head}


def permute_qk_rotate_half(params_qk: dict, to_interleaved: bool = True) -> dict:
  """Permutes the head-dim axis (last) of a query/key {'kernel', 'bias'} between layouts."""
  d_h = params_qk['kernel'].shape[-1]
  perm = (rope.rotate_half_to_interleaved(d_h) if to_interleaved
          else rope.interleaved_to_rotate_half(d_h))
  return {k: v[..., perm] for k, v in params_qk.items()}
