"""GAU / FLASH / GAU-alpha tests (docs/algorithms.md 6.5 GAU-1..7, causal LM, entropy-invariant
softmax)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public equivalent

import models
from pretrain import config as config_schema
from models import attention
from models import encoder
from models import gau
from models import rope

import helpers

V, D, S, L = 24, 16, 8, 2
E = 2 * D


def gau_config(**overrides):
  config = config_schema.get_base_config()
  m = config.model
  m.family, m.vocab_size, m.hidden_size, m.shared_dim, m.num_layers = 'gau', V, D, S, L
  m.expansion_factor, m.norm_eps, m.initializer_range = 2, 1e-7, 0.2
  m.use_bias, m.norm_type = False, 'rmsnorm_noparam'  # GAU-alpha, as launch/configs/gau.py
  for k, v in overrides.items():
    if k == 'objective':
      config.objective = v
    else:
      setattr(m, k, v)
  return config


def make_block(config, seed=0):
  return gau.GAUBlock(models.resolve(config), rngs=nnx.Rngs(params=seed))


def block_mix(block, config, x, seg, pos):
  """The GAU branch O of one layer under jit."""
  spec = models.resolve(config)
  graphdef, state = nnx.split(block)

  @jax.jit
  def f(state, x, seg, pos):
    return nnx.merge(graphdef, state).mix(x, encoder.make_context(spec, seg, pos))

  return f(state, x, seg, pos)


def forward(model, *args):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))(state, *args)


def rand(shape, seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def ones_row(n, b=1):
  return jnp.ones((b, n), jnp.int32), jnp.broadcast_to(jnp.arange(n), (b, n))


def test_gau1_shapes_and_split_order():
  config = gau_config()
  block = make_block(config)
  x = rand((2, 6, D))
  u, v, z = block.projections(x)
  assert u.shape == (2, 6, E) and v.shape == (2, 6, E) and z.shape == (2, 6, S)
  kernel = block.uvz.kernel[...]
  assert kernel.shape == (D, 2 * E + S)
  h = jax.nn.silu(x @ kernel)
  np.testing.assert_allclose(u, h[..., :E], atol=1e-6)
  np.testing.assert_allclose(v, h[..., E : 2 * E], atol=1e-6)
  np.testing.assert_allclose(z, h[..., 2 * E :], atol=1e-6)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens = jnp.zeros((2, 6), jnp.int32)
  logits = forward(model, tokens, *ones_row(6, 2))
  assert logits.shape == (2, 6, V) and logits.dtype == jnp.float32
  # GAU-alpha skeleton: no biases / offsets, parameter-free norms, tied head without bias.
  names = {
    str(p[-1].key)
    for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[
      0
    ]
  }
  assert names == {'kernel', 'scale', 'embedding'}


def test_gau2_identity_attention_is_glu_ffn():
  """A = I (every token its own segment, softmax) gives O = (U * V) W_o."""
  config = gau_config(attention_norm='softmax')
  block = make_block(config)
  x = rand((1, 6, D))
  seg = jnp.arange(1, 7)[None]
  out = block_mix(block, config, x, seg, jnp.zeros((1, 6), jnp.int32))
  u, v, _ = block.projections(x)
  np.testing.assert_allclose(out, (u * v) @ block.out.kernel[...], atol=1e-5)


def test_gau2_unit_gate_is_single_head_attention():
  q, k, v = rand((2, 7, S), 1), rand((2, 7, S), 2), rand((2, 7, E), 3)
  seg = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
  mask = attention.attention_mask(seg, causal=False)
  ours = gau.gau_attention(q, k, v, mask, norm='softmax')
  ref = attention.dot_product_attention(
    q[:, :, None], k[:, :, None], v[:, :, None], mask, 1 / math.sqrt(S)
  )[:, :, 0]
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_entropy_invariant_softmax_equals_softmax_plus():
  qk = rand((2, 30, 30), 4) * 3
  seg = jnp.array([[1] * 30, [1] * 20 + [0] * 10])
  mask = attention.attention_mask(seg, causal=False)
  a = gau.attention_weights(qk, mask, 'softmax', S, 'entropy_invariant')
  b = gau.attention_weights(qk, mask, 'softmax_plus', S)
  np.testing.assert_allclose(a, b, atol=1e-7)
  c = gau.attention_weights(qk, mask, 'softmax', S)
  assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize('norm,chunk', [('relu2', 0), ('softmax_plus', 0), ('relu2', 4)])
def test_gau3_padding_invariance(norm, chunk):
  config = gau_config(attention_norm=norm, chunk_size=chunk)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, V)
  n = 10
  alone = forward(model, tokens[:, :n], *ones_row(n))
  seg = (jnp.arange(16) < n).astype(jnp.int32)[None]
  padded = forward(model, tokens, seg, jnp.arange(16)[None] * seg)
  np.testing.assert_allclose(padded[:, :n], alone, atol=2e-5)


@pytest.mark.parametrize('chunk', [0, 4])
def test_gau4_rope_shift_invariance(chunk):
  config = gau_config(chunk_size=chunk)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, V)
  seg, pos = ones_row(12)
  np.testing.assert_allclose(
    forward(model, tokens, seg, pos + 7), forward(model, tokens, seg, pos), atol=1e-4
  )


def causal_jacobian(model, x, seg, pos):
  """|d out_i / d x_j| summed over features, [n_out, n_in], from row-wise gradients."""
  graphdef, state = nnx.split(model)
  r = jax.random.normal(jax.random.key(9), x.shape[-1:])

  @jax.jit
  def row(state, x, i):
    fn = lambda x: jnp.dot(nnx.merge(graphdef, state).run_layers(x, seg, pos)[0, i], r)
    return jnp.abs(jax.grad(fn)(x)[0]).sum(-1)

  return np.stack([row(state, x, i) for i in range(x.shape[1])])


@pytest.mark.parametrize('norm,chunk', [('relu2', 0), ('softmax_plus', 0), ('relu2', 4)])
def test_gau5_causal_jacobian(norm, chunk):
  config = gau_config(objective='clm', attention_norm=norm, chunk_size=chunk)
  model = models.build(config, rngs=nnx.Rngs(params=0))
  n = 10
  x = rand((1, n, D), 5)
  jac = causal_jacobian(model, x, *ones_row(n))
  upper = np.triu(np.ones((n, n), bool), k=1)
  assert jac[upper].max() == 0.0
  assert np.diag(jac).min() > 0.0 and jac[~upper].sum() > 0.0
  if norm != 'relu2':  # relu^2 can zero a pair exactly; softmax cannot
    assert jac[~upper].min() > 0.0


def test_gau6_flash_global_part_is_linear_attention():
  b, n, c = 2, 12, 4
  q_lin, k_lin, v = rand((b, n, S), 1), rand((b, n, S), 2), rand((b, n, E), 3)
  zeros = jnp.zeros((b, n, S))
  seg = jnp.array([[1] * n, [1] * 9 + [0] * 3])
  out = gau.mixed_chunk_attention(
    zeros, zeros, q_lin, k_lin, v, seg, chunk_size=c, causal=False, norm='relu2'
  )  # relu2(0) = 0: local part off
  valid = (seg != 0).astype(jnp.float32)[..., None]
  kv = jnp.einsum('bjs,bje->bse', k_lin * valid, v)
  ref = jnp.einsum('bis,bse->bie', q_lin, kv) / valid.sum(1, keepdims=True)
  keep = np.asarray(seg) != 0  # outputs at padding are unused (and zero)
  np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(ref)[keep], atol=1e-5)


@pytest.mark.parametrize('norm', ['relu2', 'softmax_plus'])
def test_gau6_one_chunk_without_linear_part_equals_gau(norm):
  n = 8
  gau_cfg = gau_config(attention_norm=norm)
  flash_cfg = gau_config(attention_norm=norm, chunk_size=n)
  block = make_block(gau_cfg)
  flash = make_block(flash_cfg, seed=1)
  flash.uvz.kernel[...] = block.uvz.kernel[...]
  flash.out.kernel[...] = block.out.kernel[...]
  scale = block.qk.scale[...]
  flash.qk.scale[...] = jnp.concatenate([scale, jnp.zeros_like(scale)])  # Q_lin = 0
  x = rand((2, n, D), 6)
  seg = jnp.array([[1] * n, [1] * 5 + [2] * 3])
  pos = jnp.array([list(range(n)), list(range(5)) + list(range(3))])
  np.testing.assert_allclose(
    block_mix(flash, flash_cfg, x, seg, pos), block_mix(block, gau_cfg, x, seg, pos), atol=1e-5
  )


def naive_flash(qq, kq, ql, kl, v, seg, c, causal, causal_normalizer='visible'):
  """Per-position loop over the definition. Local: same chunk, same document (j <= i if
  causal), relu2 / l. Global: keys of the query's document, causal: those in earlier chunks
  divided by their count; non-causal: all of them divided by the document's length."""
  qq, kq, ql, kl, v, seg = map(np.asarray, (qq, kq, ql, kl, v, seg))
  b, n, s = qq.shape
  out = np.zeros(v.shape, np.float64)
  for bi in range(b):
    for i in range(n):
      if seg[bi, i] == 0:
        continue
      doc = [j for j in range(n) if seg[bi, j] == seg[bi, i]]
      g0 = (i // c) * c
      keys = [j for j in doc if g0 <= j < g0 + c and (j <= i or not causal)]
      a = np.array([max(qq[bi, i] @ kq[bi, j] / math.sqrt(s), 0.0) ** 2 for j in keys])
      l = len([j for j in doc if g0 <= j < g0 + c]) if causal_normalizer == 'n' else len(keys)
      out[bi, i] += (a[:, None] * v[bi, keys]).sum(0) / l
      glob = [j for j in doc if j < g0] if causal else doc
      if glob:
        out[bi, i] += sum((ql[bi, i] @ kl[bi, j]) * v[bi, j] for j in glob) / len(glob)
  return out


PACKINGS = [
  [1] * 10,
  [1, 1, 1, 2, 2, 2, 2, 2, 0, 0],  # a document starting mid-chunk; padding
  [1, 2, 2, 2, 2, 2, 2, 2, 2, 3],  # one document spanning three chunks
  [1, 1, 2, 3, 3, 3, 3, 4, 4, 0],  # several documents inside one chunk
]


@pytest.mark.parametrize('causal', [True, False])
def test_gau6_flash_equals_naive_loop(causal):
  b, n, c = len(PACKINGS), 10, 4  # padded to 12 inside
  t = [rand((b, n, S), i) for i in range(4)]
  v = rand((b, n, 6), 5)
  seg = jnp.array(PACKINGS)
  out = gau.mixed_chunk_attention(*t, v, seg, chunk_size=c, causal=causal, norm='relu2')
  ref = naive_flash(*t, v, seg, c, causal)
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-4, rtol=1e-5)


ONE_DOCUMENT_ROWS = [
  [1] * 10,
  [3] * 7 + [0] * 3,  # padding
  [0] + [2] * 9,  # a leading pad
  [5] * 9 + [0],
]


def _global_parts(causal):
  """(mixed_chunk_attention's global part, the general per-document path) as functions of
  (q_lin, k_lin, v), with the local part switched off."""
  c = 4

  def chunked(x):
    return gau._pad_to(x, 12).reshape((x.shape[0], 3, c) + x.shape[2:])

  def general(ql, kl, v, seg):
    seg = gau._pad_to(seg, 12)
    out = gau._global_per_document(*map(chunked, (ql, kl, v)), seg, seg != 0, c, causal)
    return out.reshape(v.shape[0], 12, -1)[:, :10]

  def mixed(ql, kl, v, seg):
    zero = jnp.zeros_like(ql)
    return gau.mixed_chunk_attention(
      zero, zero, ql, kl, v, seg, chunk_size=c, causal=causal, norm='relu2'
    )

  return mixed, general


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('one_document', [True, False])
def test_flash_one_document_fast_path_equals_general_path(causal, one_document):
  """With at most one document per row FLASH's global part skips the per-document boundary
  corrections (decided on device by `one_document_per_row`); its output and gradients equal
  the general path's to float32 rounding, and a batch whose rows hold several documents takes
  the general path."""
  seg = jnp.array(ONE_DOCUMENT_ROWS if one_document else PACKINGS)
  assert bool(gau.one_document_per_row(seg)) == one_document
  b, n = seg.shape
  ql, kl, v = rand((b, n, S), 1), rand((b, n, S), 2), rand((b, n, 6), 3)
  mixed, general = _global_parts(causal)
  valid = np.asarray(seg != 0)[..., None]
  w = rand((b, n, 6), 4) * valid  # a loss on the document tokens
  loss = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a, seg) * w), (0, 1, 2)))
  (l_fast, g_fast), (l_gen, g_gen) = loss(mixed)(ql, kl, v), loss(general)(ql, kl, v)
  np.testing.assert_allclose(l_fast, l_gen, rtol=1e-5)
  for a, r in zip(g_fast, g_gen):
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
  out = jax.jit(mixed)(ql, kl, v, seg)
  np.testing.assert_allclose(out * valid, jax.jit(general)(ql, kl, v, seg) * valid, atol=1e-5)
  zero = jnp.zeros_like(ql)
  ref = naive_flash(zero, zero, ql, kl, v, seg, 4, causal)
  np.testing.assert_allclose(np.asarray(out * valid), ref * valid, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('causal', [True, False])
def test_flash_gradient_keeps_no_residuals_of_the_global_branches(causal):
  """The forward cond of FLASH's global part returns the output and one [b, s, e] key-value
  sum; JAX's own derivative of a cond returned the residuals of both branches too (26 outputs
  here, zeros for the branch not taken, about 10 ms a layer of a FLASH step at n = 4096 on
  CPU, docs/performance.md 6). The backward pass's non-causal one-document branch takes that
  sum as its residual: four matmuls (the gradients of the read and of the sum), not a fifth
  that contracts over the tokens again to recompute it. The gradients themselves are checked
  by test_flash_one_document_fast_path_equals_general_path."""
  seg = jnp.array(PACKINGS)
  b, n = seg.shape
  ql, kl, v = rand((b, n, S), 1), rand((b, n, S), 2), rand((b, n, 6), 3)
  mixed, _ = _global_parts(causal)
  grad = jax.grad(lambda *a: jnp.sum(mixed(*a, seg)), (0, 1, 2))
  jaxpr = jax.make_jaxpr(grad)(ql, kl, v).jaxpr
  forward, backward = [e for e in helpers.jaxpr_equations(jaxpr) if e.primitive.name == 'cond']
  assert [o.aval.shape for o in forward.outvars] == [(b, 3, 4, 6), (b, S, 6)]
  assert len(backward.outvars) == 3  # the gradients of q_lin, k_lin, v
  # What XLA would run: the equations whose results are used (JAX's own dead-code pass).
  jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  backward = [e for e in helpers.jaxpr_equations(jaxpr) if e.primitive.name == 'cond'][-1]
  one_document = backward.params['branches'][1].jaxpr  # branches = (false, true)
  matmuls = [e for e in helpers.jaxpr_equations(one_document) if e.primitive.name == 'dot_general']
  assert len(matmuls) == (5 if causal else 4)


@pytest.mark.parametrize('use_bias', [False, True])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_scale_offset_with_rope_equals_rope_of_each_scale_offset(use_bias, dtype):
  """ScaleOffset given RoPE's sin/cos takes Z in rotate-half order and rotates each output in
  that order (rope.rotate_halves): the interleaved RoPE of each scale-offset (rope.apply_sin_cos)
  with the dimensions permuted alike (rope.pairs_first), so outputs, their dot products and
  the gradients of Z, scale and bias are equal to float32 rounding, in float32 and
  bfloat16."""
  n = 6
  module = gau.ScaleOffset(4, S, use_bias=use_bias, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  module.scale[...] = rand((4, S), 1)
  if use_bias:
    module.bias[...] = rand((4, S), 2)
  graphdef, params = nnx.split(module)
  z = rand((2, n, S), 3).astype(dtype)
  sin, cos = rope.sin_cos(jnp.broadcast_to(jnp.arange(n), (2, n)), S)
  w = [rand((2, n, S), 10 + i) for i in range(4)]

  def loss(params, z, fused):
    m = nnx.merge(graphdef, params)
    if fused:
      outs = m(rope.pairs_first(z), sin, cos)
    else:
      outs = [rope.pairs_first(rope.apply_sin_cos(t, sin, cos, head_axis=False)) for t in m(z)]
    return sum(jnp.sum(o.astype(jnp.float32) * wi) for o, wi in zip(outs, w))

  value_and_grad = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)
  # No interior pad in the gradient (test_rope.py::test_rope_gradient_has_no_pad).
  jaxpr = jax.make_jaxpr(value_and_grad, static_argnums=2)(params, z, True).jaxpr
  assert not helpers.interior_pads(jaxpr)
  (got, g_got), (want, g_want) = value_and_grad(params, z, True), value_and_grad(params, z, False)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(got, want, rtol=tol)
  for a, r in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol
    )
  if dtype == jnp.float32:  # q . k is what the attention uses: unchanged by the order
    m = nnx.merge(graphdef, params)
    q, k = m(rope.pairs_first(z), sin, cos)[:2]
    q_ref, k_ref = [rope.apply_sin_cos(t, sin, cos, head_axis=False) for t in m(z)[:2]]
    np.testing.assert_allclose(
      jnp.einsum('bis,bjs->bij', q, k),
      jnp.einsum('bis,bjs->bij', q_ref, k_ref),
      rtol=1e-5,
      atol=1e-5,
    )


@pytest.mark.parametrize('chunk', [0, 4])
def test_causal_normalizer_n_divides_by_all_keys_of_the_document(chunk):
  """'visible' (default) divides relu2 weights by the keys j <= i; 'n' by all keys of the
  document (in the chunk, for FLASH), so the two differ by that ratio at every position."""
  b, n = len(PACKINGS), 10
  t = [rand((b, n, S), i) for i in range(4)]
  v = rand((b, n, 6), 5)
  seg = jnp.array(PACKINGS)
  valid = np.asarray(seg) != 0
  if chunk:
    ql_off = [t[0], t[1], jnp.zeros_like(t[2]), t[3]]  # local part only
    out = {
      cn: gau.mixed_chunk_attention(
        *ql_off, v, seg, chunk_size=chunk, causal=True, norm='relu2', causal_normalizer=cn
      )
      for cn in ('visible', 'n')
    }
    ref = naive_flash(*ql_off, v, seg, chunk, True, 'n')
  else:
    mask = attention.attention_mask(seg, causal=True)
    full = attention.attention_mask(seg, causal=False).sum(-1, keepdims=True)
    out = {
      'visible': gau.gau_attention(t[0], t[1], v, mask, norm='relu2'),
      'n': gau.gau_attention(t[0], t[1], v, mask, norm='relu2', relu2_divisor=full),
    }
    ref = naive_flash(t[0], t[1], jnp.zeros_like(t[2]), t[3], v, seg, n, True, 'n')
  np.testing.assert_allclose(np.asarray(out['n'])[valid], ref[valid], atol=1e-4, rtol=1e-5)
  assert not np.allclose(np.asarray(out['n'])[valid], np.asarray(out['visible'])[valid])


def test_gau7_homogeneity_relu_gau():
  config = gau_config(gau_activation='relu', attention_norm='relu2')
  block = make_block(config)
  x = rand((1, 8, D), 7)
  seg, pos = ones_row(8)
  out = block_mix(block, config, x, seg, pos)
  lam = 0.5
  block.uvz.kernel[...] = block.uvz.kernel[...] * lam
  block.out.kernel[...] = block.out.kernel[...] * lam
  np.testing.assert_allclose(
    block_mix(block, config, x, seg, pos), lam**7 * out, rtol=1e-4, atol=1e-7
  )


def test_clm_runs_for_gau_and_flash():
  for chunk in (0, 4):
    model = models.build(gau_config(objective='clm', chunk_size=chunk), rngs=nnx.Rngs(params=0))
    logits = forward(model, jnp.zeros((2, 9), jnp.int32), *ones_row(9, 2))
    assert logits.shape == (2, 9, V) and bool(jnp.isfinite(logits).all())


def test_gau_alpha_init_statistics():
  """5.3: truncated normal, std 1.13684723/sqrt(fan) * L^(-1/3) (fan rule of bert4keras)."""
  config = gau_config(init='gau_alpha', num_layers=8, hidden_size=64, shared_dim=32)
  params = nnx.to_pure_dict(nnx.state(models.build(config, rngs=nnx.Rngs(params=0)), nnx.Param))
  uvz = np.asarray(params['layers']['uvz']['kernel'])
  # empirical std of N(0, sigma^2) truncated at +-2 sigma is 0.87962566 sigma
  np.testing.assert_allclose(uvz.std(), 8 ** (-1 / 3) / math.sqrt(64), rtol=0.03)
  sigma = 1.13684723 / math.sqrt(64) * 8 ** (-1 / 3)
  assert np.abs(uvz).max() <= 2 * sigma + 1e-7
  out = np.asarray(params['layers']['out']['kernel'])
  np.testing.assert_allclose(out.std(), 8 ** (-1 / 3) / math.sqrt(128), rtol=0.03)


def test_flops_gau_and_flash():
  config = gau_config()
  config.data.seq_len = 64
  dense = 2 * D * (2 * E + S) + 2 * E * D
  head = 2 * D * V
  assert models.flops_per_token(config, 8) == pytest.approx(
    3 * (L * (dense + 2 * 64 * S + 2 * 64 * E) + head * 8 / 64)
  )
  config.model.chunk_size = 16
  assert models.flops_per_token(config, 8) == pytest.approx(
    3 * (L * (dense + 2 * 16 * S + 2 * 16 * E + 4 * S * E) + head * 8 / 64)
  )


@pytest.mark.parametrize('preset', ['tiny', 'small', 'base', 'large', 'flash_tiny', 'flash_base'])
def test_presets_validate_and_build_abstractly(preset):
  from launch.configs import gau as gau_presets

  config = gau_presets.get_config(preset)
  models.validate(config)
  model = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params['layers']['uvz']['kernel'].shape[0] == config.model.num_layers
  assert 'bias' not in params['layers']['uvz']


def preset_branch_rms(preset: str, n: int = 256) -> float:
  """RMS of one GAU layer's branch O at the preset's init on a unit-RMS stream X ~ N(0, 1)
  (one document of n tokens)."""
  from launch.configs import gau as gau_presets  # pylint: disable=g-import-not-at-top

  config = gau_presets.get_config(preset)
  block = make_block(config)
  x = rand((1, n, config.model.hidden_size), seed=1)
  out = block_mix(block, config, x, *ones_row(n))
  return float(jnp.sqrt(jnp.mean(jnp.square(out))))


def test_flash_presets_keep_the_papers_init_scale_at_every_width():
  """The FLASH paper's N(0, 0.02^2) init is 0.55/sqrt(d) at d = 768; flash_tiny (d = 128)
  keeps that relative scale (0.049). The absolute 0.02 there (0.23/sqrt(d)) started every
  relu^2 branch ~100x smaller than flash_base's (O is homogeneous of degree ~7 in the
  weights), and flash_tiny learned visibly slower (launch/configs/gau.py)."""
  from launch.configs import gau as gau_presets  # pylint: disable=g-import-not-at-top

  for preset in ('flash_tiny', 'flash_base'):
    m = gau_presets.get_config(preset).model
    assert m.init == 'normal'
    assert m.initializer_range * math.sqrt(m.hidden_size) == pytest.approx(0.02 * math.sqrt(768))
  tiny, base_rms = preset_branch_rms('flash_tiny'), preset_branch_rms('flash_base')
  assert tiny > 0.5 * base_rms, (tiny, base_rms)


@pytest.mark.parametrize('preset', ['small', 'base', 'large'])
def test_gau_alpha_presets_use_the_released_schedule(preset):
  """LAMB at 1.76e-3, no warmup, multipliers {0: 1, 160k: 0.5, 640k: 0.1, 1.28M: 0.01} of a
  1.28M-step run, scaled to the preset's length (docs/algorithms.md 6.3)."""
  import optim  # pylint: disable=g-import-not-at-top
  from launch.configs import gau as gau_presets  # pylint: disable=g-import-not-at-top

  config = gau_presets.get_config(preset)
  o, n = config.optim, config.train.num_train_steps
  assert (o.name, o.learning_rate, o.warmup_steps) == ('lamb', 1.76e-3, 0)
  lr = optim.learning_rate_schedule(config)
  for step, multiplier in ((0, 1.0), (n // 16, 0.75), (n // 8, 0.5), (n // 2, 0.1), (n, 0.01)):
    assert float(lr(step)) == pytest.approx(1.76e-3 * multiplier, rel=1e-4), step
  assert gau_presets.get_config('flash_base').optim.schedule == 'linear'
