"""Growth planning: which map every axis of a trained encoder takes, and whether the grown
model is exact (docs/algorithms.md 4; kexue 8444). Pure functions on configs; no files.

  p = growth.plan(small_config, large_config, growth.Options(...))   # GrowthError if refused
  params = growth.grow_params(small_params, p)                        # models/growth/apply.py
  config = growth.grown_config(large_config, p)   # large_config + the values growth needs
  p.report()                                       # JSON-able summary (exactness, notes)

What grows (every factor an integer >= 1, for roformer (v1), roformer_v2, DeepNet = any family
with residual='deepnorm', gau (GAU / GAU-alpha / FLASH)):
  width  hidden_size d -> k d; num_heads h -> k_h h; head_dim d_h -> k_dh d_h (zero-slot RoPE);
         mlp_dim F -> k_F F; GAU e = expansion_factor * d -> k_e e; GAU shared_dim s -> k_s s;
  depth  num_layers L -> L' >= L: zero-branch blocks inserted at `Options.depth_positions`.
A learned absolute position table (model.position_embedding='learned', docs/algorithms.md 7.6)
grows like the token table (same stream map, rows unchanged); without RoPE the zero-slot map of
d_h is a plain zero padding of q and k and stays exact.

The scale-tracking calculus (docs/algorithms.md 4.1): every activation site carries c * E(x), E an
expansion
of its feature axis: Rep_k (interleaved copies; the stream, F, e, v dims), Tile_k (heads),
Pad (old units kept, new units appended: `zero_out` symmetry breaking) or zero-slot (RoPE
dims: old pair p -> new pair k p, so the standard frequency table still matches; q and k
scaled by k^(1/4) each). A weight from site (c_in, E_in) to site (c_out, E_out) becomes
c_out / (copies_in c_in) * E_out(E_in^T(W)); biases c_out E_out(b); norm gains c_out E(g).
Stream scale c_s:
  'su'   c_s = 1/sqrt(k) (Su's table, corrected: FFN b2 -> Rep(b2)/sqrt(k), not b2/2), norm
         eps -> eps/k; needs norms with parameters (LayerNorm / RMSNorm with gain).
  'unit' c_s = 1, eps unchanged on the stream; the only choice for parameter-free RMS norms
         (RoFormer v2, GAU-alpha), where the tied embedding then carries 1/k and the embedding
         norm would need eps/k^2 (one shared eps: growth sets eps/k^2, stream norms deviate by
         O(eps), docs/algorithms.md 4.3).
  v1's MLM head LayerNorm sees GELU output (c = 1), so under 'su' it would keep eps while the
  stream norms need eps/k: with one shared eps the head deviates by O(eps (1 - 1/k) / var)
  (1e-12 at BERT's eps = 1e-12); 'unit' is exact for v1 with eps unchanged.
Depth (docs/algorithms.md 4.6): a new block has its last projections (attention out, FFN wo, GAU out
and
their biases) zero and random incoming weights. Post-norm with a parameter-free norm: Norm(x +
0) = x up to eps. With gains/offsets (v1's LayerNorm) zero-branch insertion alone is not
exact; 'norm_transfer' moves the preceding norm's gain and offset into the new block's last
norm (the preceding norm becomes c_s * identity), which is exact up to O(eps). DeepNet keeps
the trained alpha (grown_config sets model.deepnorm_alpha/beta to the source's values).
Symmetry breaking (docs/algorithms.md 4.7): 'none' (copies; exact), 'noise' (N(0, (sigma RMS(W))^2)
on every
grown kernel; not exact), 'zero_out' (new F / head / v-dim / e units get random incoming and
zero outgoing weights, and parameter-free-RMS models pad the stream with zeros instead of
copying it: exact).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from models import encoder

WIDTH_METHODS = ('auto', 'su', 'unit')
SYMMETRY_BREAKING = ('none', 'noise', 'zero_out')
DEPTH_METHODS = ('auto', 'zero_branch', 'norm_transfer')
OPTIMIZER_STATE = ('reset', 'map')

# Leaves that end a residual branch: zero in an inserted block (docs/algorithms.md 4.6).
_BRANCH_END = {('attention', 'out'), ('mlp', 'wo'), ('out',)}


class GrowthError(ValueError):
  """The requested growth is invalid or cannot be exact; the message names the alternatives."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How to grow (the fields of config.upscale; see options_from_config).

  Attributes:
    width_method: 'auto' ('su' for norms with parameters, 'unit' for parameter-free norms),
      'su' (stream scale 1/sqrt(k), eps/k) or 'unit' (stream scale 1).
    symmetry_breaking: 'none', 'noise' or 'zero_out' (module docstring).
    noise_sigma: relative std of the 'noise' perturbation (times each leaf's RMS).
    depth_method: 'auto', 'zero_branch' (parameter-free norms only) or 'norm_transfer'.
    depth_positions: 'interleave' (spread evenly), 'append' (at the end) or a comma-separated
      list of the new blocks' indices in the grown stack (0-based), e.g. '1,3'.
    optimizer_state: 'reset' (fresh optimizer state) or 'map' (moments mapped the way the
      gradients map; second moments with the squared factors; new units zero).
    seed: seed of the random values given to new units.
  """

  width_method: str = 'auto'
  symmetry_breaking: str = 'none'
  noise_sigma: float = 1e-3
  depth_method: str = 'auto'
  depth_positions: str = 'interleave'
  optimizer_state: str = 'reset'
  seed: int = 0


def options_from_config(config) -> Options:
  """Options from the `config.upscale` section of the schema (pretrain/config.py)."""
  u = config.upscale
  return Options(
    width_method=str(u.width_method),
    symmetry_breaking=str(u.symmetry_breaking),
    noise_sigma=float(u.noise_sigma),
    depth_method=str(u.depth_method),
    depth_positions=str(u.depth_positions),
    optimizer_state=str(u.optimizer_state),
    seed=int(u.seed),
  )


# ----------------------------------------------------------------------------- axis maps


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """How one feature axis (one activation site) grows from `old` to `new` entries.

  Attributes:
    old, new: sizes.
    kind: 'same' (no change), 'rep' (interleaved copies: new i*k + r <- old i), 'tile'
      (new r*old + i <- old i), 'pad' (old first, new units after), 'slots' (zero-slot for
      RoPE pairs: old pair p -> new pair k p, the other pairs are new), 'concat' (parts) or
      'pair_rep' (Su's PairRep [x1,x2,x1,x2,x3,x4,...]; not exact with the standard RoPE
      table, docs/algorithms.md 4.4: kept for the negative-control tests only).
    scale: c, the site carries c * E(x).
    new_produce: what producers (weights writing this site) put in new entries: 'zero' (the
      new entries must stay 0) or 'free' (new units: random).
    new_consume: what consumers (weights reading this site) put in rows of new entries:
      'zero' (the new units are live, so their outgoing weights must be 0) or 'free'.
    parts: sub-maps of a 'concat' axis (GAU's fused [U, V, Z] projection).
  """

  old: int
  new: int
  kind: str = 'same'
  scale: float = 1.0
  new_produce: str = 'free'
  new_consume: str = 'free'
  parts: tuple = ()

  def layout(self, role: str, mode: str):
    """(index into old [new] (-1 = new entry), factor [new], is_new [new], must_zero [new]).

    role: 'produce' (this is an output axis of the leaf) or 'consume' (an input axis).
    mode: 'param' (parameter map) or 'grad' (gradient map, docs/algorithms.md 4.7: producers
      1/(copies c), consumers c).
    """
    if self.kind == 'concat':
      outs = [p.layout(role, mode) for p in self.parts]
      offsets = np.cumsum([0] + [p.old for p in self.parts[:-1]])
      idx = np.concatenate([np.where(o[0] >= 0, o[0] + off, -1) for o, off in zip(outs, offsets)])
      return (idx,) + tuple(np.concatenate([o[i] for o in outs]) for i in (1, 2, 3))
    n, m = self.old, self.new
    copies = 1
    if self.kind == 'same':
      idx = np.arange(n)
    elif self.kind == 'rep':
      copies = m // n
      idx = np.repeat(np.arange(n), copies)
    elif self.kind == 'tile':
      copies = m // n
      idx = np.tile(np.arange(n), copies)
    elif self.kind == 'pad':
      idx = np.concatenate([np.arange(n), -np.ones(m - n, np.int64)])
    elif self.kind == 'pair_rep':  # Su's PairRep of RoPE pairs: NOT exact (algorithms 4.4); tests
      copies = m // n
      pairs = np.arange(n).reshape(-1, 2)
      idx = np.concatenate([np.tile(pair, copies) for pair in pairs])
    elif self.kind == 'slots':
      k = m // n
      idx = -np.ones(m, np.int64)
      pairs = np.arange(n // 2)
      idx[2 * k * pairs] = 2 * pairs
      idx[2 * k * pairs + 1] = 2 * pairs + 1
    else:
      raise ValueError(f'unknown axis map kind {self.kind!r}')
    c = self.scale
    if mode == 'param':
      fac = c if role == 'produce' else 1.0 / (copies * c)
    else:
      fac = 1.0 / (copies * c) if role == 'produce' else c
    is_new = idx < 0
    rule = self.new_produce if role == 'produce' else self.new_consume
    factor = np.where(is_new, 0.0, fac)
    return idx, factor, is_new, is_new & (rule == 'zero')


def _same(n: int, scale: float = 1.0) -> AxisMap:
  return AxisMap(n, n, 'same', scale)


def _copies(n: int, k: int, kind: str, zero_out: bool, scale: float = 1.0) -> AxisMap:
  """An inner axis of live units: copies ('rep'/'tile') or, for zero_out, new live units with
  random incoming and zero outgoing weights."""
  if k == 1:
    return _same(n, scale)
  if zero_out:
    return AxisMap(n, k * n, 'pad', scale, new_produce='free', new_consume='zero')
  return AxisMap(n, k * n, kind, scale)


def _slots(n: int, k: int, scale: float, new_produce: str) -> AxisMap:
  """Zero-slot RoPE dims (docs/algorithms.md 4.4 R2)."""
  if k == 1:
    return _same(n, scale)
  return AxisMap(n, k * n, 'slots', scale, new_produce=new_produce, new_consume='zero')


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
  """A validated growth from one architecture to another (build with `plan`)."""

  src: encoder.ArchSpec
  dst: encoder.ArchSpec
  options: Options
  factors: dict[str, int]
  width_method: str
  stream_kind: str
  c_stream: float
  c_embed: float
  c_head: float
  eps_factor: float
  depth_method: str
  new_layers: tuple[int, ...]
  maps: dict[str, Any]
  exactness: str
  notes: list[str]
  config_overrides: dict[str, Any]

  def report(self) -> dict[str, Any]:
    """A JSON-able summary (stored in the lineage of the grown checkpoint)."""
    shape = lambda s: {
      'family': s.family,
      'hidden_size': s.hidden_size,
      'num_layers': s.num_layers,
      'num_heads': s.num_heads,
      'head_dim': s.head_dim,
      'mlp_dim': s.mlp_dim,
      'expansion': s.expansion_factor,
      'shared_dim': s.shared_dim,
    }
    return {
      'from': shape(self.src),
      'to': shape(self.dst),
      'factors': dict(self.factors),
      'options': dataclasses.asdict(self.options),
      'width_method': self.width_method,
      'stream_expansion': self.stream_kind,
      'stream_scale': self.c_stream,
      'embedding_scale': self.c_embed,
      'depth_method': self.depth_method,
      'new_layers': list(self.new_layers),
      'exactness': self.exactness,
      'notes': list(self.notes),
      'config_overrides': dict(self.config_overrides),
    }


def _ratio(name: str, old: int, new: int, flag: str, what: str = '') -> int:
  if new < old or new % old:
    multiples = ', '.join(str(old * i) for i in (1, 2, 3, 4))
    raise GrowthError(
      f'{name} {old} -> {new} is not a growth by an integer factor; choose --config.{flag} '
      f'so that {what or flag.split(".")[-1]} is a multiple of {old} ({multiples}, ...).'
    )
  return new // old


def _require_equal(src, dst, fields: Sequence[tuple[str, str]]):
  for attr, flag in fields:
    a, b = getattr(src, attr), getattr(dst, attr)
    if a != b:
      raise GrowthError(
        f'{flag} differs ({a!r} in the source, {b!r} in the target); growth keeps it: set '
        f'--config.{flag}={a!r}.'
      )


def _has_norm_params(spec) -> bool:
  return spec.norm_type in ('layernorm', 'rmsnorm')


def _depth_positions(option: str, old: int, new: int) -> tuple[int, ...]:
  """Indices (in the grown stack) of the inserted blocks."""
  extra = new - old
  if extra == 0:
    return ()
  if option == 'append':
    return tuple(range(old, new))
  if option == 'interleave':
    # New block j goes after original block round((j+1) * old / extra) - 1.
    after = [max(0, round((j + 1) * old / extra) - 1) for j in range(extra)]
    return tuple(a + 1 + j for j, a in enumerate(sorted(after)))
  try:
    positions = tuple(sorted(int(p) for p in option.replace(' ', '').split(',') if p != ''))
  except ValueError:
    positions = None
  if (
    positions is None
    or len(positions) != extra
    or len(set(positions)) != extra
    or min(positions) < 0
    or max(positions) >= new
  ):
    raise GrowthError(
      f'upscale.depth_positions={option!r} must be "interleave", "append" or {extra} distinct '
      f'comma-separated indices in [0, {new}) naming the new blocks in the grown stack '
      f'(num_layers {old} -> {new}).'
    )
  return positions


def _stream_scales(src, k: int, method: str, zero_out: bool):
  """(width method, stream dict): the residual stream's expansion and the scales of its sites
  (docs/algorithms.md 4.1/4.2), and the eps factor. Squares are exact fractions, so eps * factor is
  exact
  (1e-12 / 2 = 5e-13).

  c_s: the stream (every block norm's output); c_e: the (tied) embedding; c_h: the input of
  the tied logits when a head transform + norm sits in between (v1: k c_h c_e = 1).
  """
  param_free = src.norm_type == 'rmsnorm_noparam'
  if method == 'auto':
    method = 'unit' if param_free else 'su'
  if param_free and method == 'su':
    raise GrowthError(
      "upscale.width_method='su' needs norms with a gain (its stream scale 1/sqrt(k) "
      'must be undone by the norm), but model.norm_type=rmsnorm_noparam outputs scale 1 '
      "(docs/algorithms.md 4.5); use width_method='unit' (or 'auto'), which is exact for this "
      'model.'
    )
  kind = 'pad' if (zero_out and param_free and k > 1) else 'rep'
  c_norm = math.sqrt(k) if kind == 'pad' else 1.0  # Norm(E(x)) = c_norm E(Norm(x))
  mult = k if kind == 'rep' else 1  # <E(a), E(b)> = mult <a, b>
  if param_free:
    cs2 = Fraction(k) if kind == 'pad' else Fraction(1)
  else:
    cs2 = Fraction(1, k) if method == 'su' else Fraction(1)
  ce2 = cs2 if src.head_transform else 1 / (mult * mult * cs2)
  c_e = math.sqrt(ce2)
  c_h = 1.0 / (mult * c_e) if src.head_transform else math.sqrt(cs2)
  # A norm fed by c E(x) needs eps c^2 (/ k for pad). One shared eps: the embedding norm's
  # factor is used (its input has the smallest mean square).
  dilution = k if kind == 'pad' else 1
  want = {'embedding norm': ce2 / dilution, 'block norms': cs2 / dilution}
  if src.head_transform:
    want['MLM head norm'] = Fraction(1)
  eps_fraction = want['embedding norm']
  notes = []
  for name, f in want.items():
    if f != eps_fraction and src.norm_eps > 0:
      notes.append(
        f'{name} needs eps*{float(f):.6g} but the model has one eps (set to eps*'
        f'{float(eps_fraction):.6g}): relative deviation '
        f'~{abs(float(f - eps_fraction)) * src.norm_eps:.2g} / mean square of its input'
      )
  return method, {
    'kind': kind,
    'c_s': math.sqrt(cs2),
    'c_e': c_e,
    'c_h': c_h,
    'c_norm': c_norm,
    'eps_fraction': eps_fraction,
    'eps_notes': notes,
  }


def _axis_maps(src, dst, factors: dict, stream: dict, zero_out: bool, notes: list) -> dict:
  """The AxisMap of every activation site (docs/algorithms.md 4.1), keyed by site name."""
  k, c_s = factors['hidden'], stream['c_s']
  kind = 'same' if k == 1 else stream['kind']
  stream_map = AxisMap(
    src.hidden_size, dst.hidden_size, kind, c_s, new_produce='zero', new_consume='free'
  )
  maps: dict[str, Any] = {
    'stream': stream_map,
    'embed': dataclasses.replace(stream_map, scale=stream['c_e']),
    'norm_scale': dataclasses.replace(stream_map, scale=c_s / stream['c_norm']),
    'norm_bias': stream_map,
    'head_hidden': _copies(src.hidden_size, k, 'rep', False),
    'head_norm': AxisMap(
      src.hidden_size, dst.hidden_size, 'same' if k == 1 else 'rep', stream['c_h']
    ),
  }
  if src.family == 'gau':
    ke, ks = factors['expansion'], factors['shared_dim']
    e_map = _copies(src.expansion_factor * src.hidden_size, ke, 'rep', zero_out)
    z_map = _slots(src.shared_dim, ks, 1.0, 'free')
    maps['e'] = e_map
    maps['uvz'] = AxisMap(
      2 * e_map.old + z_map.old, 2 * e_map.new + z_map.new, 'concat', parts=(e_map, e_map, z_map)
    )
    a_quad = ks**0.25
    rows = [(a_quad, 'zero'), (a_quad, 'free')]  # q rows: new slots 0; k rows: random
    if src.chunk_size > 0:
      rows += [(1.0, 'zero'), (1.0, 'free')]  # FLASH's linear part has no 1/sqrt(s)
    maps['qk_rows'] = tuple(_slots(src.shared_dim, ks, a, rule) for a, rule in rows)
  else:
    kh, kdh, kf = factors['heads'], factors['head_dim'], factors['mlp']
    a = kdh**0.25
    maps.update(
      {
        'heads': _copies(src.num_heads, kh, 'tile', zero_out),
        'dh_q': _slots(src.head_dim, kdh, a, 'zero'),
        'dh_k': _slots(src.head_dim, kdh, a, 'free'),
        'dh_v': _copies(src.head_dim, kdh, 'rep', zero_out),
        'mlp': _copies(src.mlp_dim, kf, 'rep', zero_out),
      }
    )
    if kdh > 1:
      notes.append(
        f'head_dim {src.head_dim} -> {dst.head_dim} by zero-slot RoPE '
        f'(docs/algorithms.md 4.4 R2): '
        'old pair p sits at pair k*p (same frequency), q and k scaled by k^(1/4)'
      )
  return maps


def _check_options(options: Options):
  """GrowthError for an option outside its choices."""
  for name, value, choices in (
    ('width_method', options.width_method, WIDTH_METHODS),
    ('symmetry_breaking', options.symmetry_breaking, SYMMETRY_BREAKING),
    ('depth_method', options.depth_method, DEPTH_METHODS),
    ('optimizer_state', options.optimizer_state, OPTIMIZER_STATE),
  ):
    if value not in choices:
      raise GrowthError(
        f'upscale.{name}={value!r} is not supported; choose one of {", ".join(map(repr, choices))}.'
      )
  if options.symmetry_breaking == 'noise' and not options.noise_sigma > 0:
    raise GrowthError(
      f'upscale.noise_sigma={options.noise_sigma} must be > 0 with '
      "symmetry_breaking='noise' (typical 1e-3..1e-2)."
    )


def _factors(src, dst) -> dict[str, int]:
  """The integer growth factor of every axis, and the number of blocks added."""
  k = _ratio('hidden_size', src.hidden_size, dst.hidden_size, 'model.hidden_size')
  factors = {'hidden': k}
  if src.family == 'gau':
    e_src = src.expansion_factor * src.hidden_size
    e_dst = dst.expansion_factor * dst.hidden_size
    factors['expansion'] = _ratio(
      'GAU e = expansion_factor * hidden_size',
      e_src,
      e_dst,
      'model.expansion_factor',
      'expansion_factor * hidden_size',
    )
    factors['shared_dim'] = _ratio('shared_dim', src.shared_dim, dst.shared_dim, 'model.shared_dim')
  else:
    factors['heads'] = _ratio('num_heads', src.num_heads, dst.num_heads, 'model.num_heads')
    factors['head_dim'] = _ratio('head_dim', src.head_dim, dst.head_dim, 'model.head_dim')
    factors['mlp'] = _ratio('mlp_dim', src.mlp_dim, dst.mlp_dim, 'model.mlp_dim')
  if dst.num_layers < src.num_layers:
    raise GrowthError(
      f'num_layers {src.num_layers} -> {dst.num_layers} would remove blocks; '
      f'set --config.model.num_layers >= {src.num_layers}.'
    )
  factors['layers_added'] = dst.num_layers - src.num_layers
  return factors


def _config_overrides(src, dst, eps_fraction, notes: list) -> dict[str, Any]:
  """The config values the grown model needs: eps scaled with the stream, DeepNorm's trained
  alpha and beta (notes gets a line when the formula would differ)."""
  overrides: dict[str, Any] = {}
  new_eps = src.norm_eps * eps_fraction.numerator / eps_fraction.denominator
  if new_eps != dst.norm_eps:
    overrides['model.norm_eps'] = new_eps
  if src.residual == 'deepnorm':
    if dst.residual_alpha != src.residual_alpha:
      notes.append(
        f'DeepNet: alpha kept at the trained {src.residual_alpha:.6g}; the formula '
        f'(2N)^(1/4) for N = {dst.num_layers} would give '
        f'{(2.0 * dst.num_layers) ** 0.25:.6g} (docs/algorithms.md 4.6)'
      )
    overrides['model.deepnorm_alpha'] = src.residual_alpha
    overrides['model.deepnorm_beta'] = src.kernel_init.deepnorm_beta
  return overrides


def plan(src_config, dst_config, options: Options | None = None) -> Plan:
  """Validates the growth src -> dst (full ConfigDicts) and fixes every map and scale.

  Raises:
    GrowthError: not a growth (non-integer factor, shrinking, a changed non-shape field), or
      a growth that cannot be exact with the chosen options; the message names what would be.
  """
  options = options or options_from_config(dst_config)
  _check_options(options)
  if src_config.objective != dst_config.objective:
    raise GrowthError(
      f'objective differs ({src_config.objective!r} vs '
      f'{dst_config.objective!r}); set --config.objective={src_config.objective}.'
    )
  src, dst = encoder.resolve(src_config), encoder.resolve(dst_config)
  _require_equal(
    src,
    dst,
    [
      ('family', 'model.family'),
      ('vocab_size', 'model.vocab_size'),
      ('type_vocab_size', 'model.type_vocab_size'),
      ('norm_type', 'model.norm_type'),
      ('use_bias', 'model.use_bias'),
      ('residual', 'model.residual'),
      ('rotary_base', 'model.rotary_base'),
      ('attention_scale', 'model.attention_scale'),
      ('mlp_activation', 'model.mlp_activation'),
      ('position_embedding', 'model.position_embedding'),
    ],
  )
  if src.position_embedding == 'learned':
    # The [P, d] table is an embedding on the stream (same map as the token table); its row
    # count is not a width and does not grow.
    _require_equal(src, dst, [('max_position', 'model.max_position')])
  if src.family == 'gau':
    _require_equal(
      src,
      dst,
      [
        ('attention_norm', 'model.attention_norm'),
        ('chunk_size', 'model.chunk_size'),
        ('gau_activation', 'model.gau_activation'),
      ],
    )
  notes: list[str] = []
  factors = _factors(src, dst)
  k = factors['hidden']

  zero_out = options.symmetry_breaking == 'zero_out'
  method, stream = _stream_scales(src, k, options.width_method, zero_out)
  exact = 'yes' if not stream['eps_notes'] else 'up to O(eps)'
  notes.extend(stream['eps_notes'])
  maps = _axis_maps(src, dst, factors, stream, zero_out, notes)

  # Depth.
  depth_method = options.depth_method
  new_layers = _depth_positions(options.depth_positions, src.num_layers, dst.num_layers)
  if depth_method == 'auto':
    depth_method = 'norm_transfer' if _has_norm_params(src) else 'zero_branch'
  if new_layers:
    if depth_method == 'zero_branch' and _has_norm_params(src):
      raise GrowthError(
        f"upscale.depth_method='zero_branch' is not exact for post-norm with "
        f'model.norm_type={src.norm_type} (LN(g*n + b) != g*n + b, docs/algorithms.md 4.6); use '
        "depth_method='norm_transfer' (exact up to O(eps): the preceding norm's gain and "
        "offset move into the new block), or 'auto'."
      )
    if src.norm_eps > 0:
      exact = 'up to O(eps)' if exact == 'yes' else exact
      notes.append(
        f'inserted blocks re-normalise a normalised stream: relative deviation '
        f'~{src.norm_eps:.2g} (eps)'
      )
  if options.symmetry_breaking == 'noise':
    exact = 'no'
    notes.append(
      f'noise symmetry breaking (sigma {options.noise_sigma:g} x RMS per leaf) '
      'changes the function by O(sigma)'
    )
  if zero_out and stream['kind'] == 'rep' and k > 1:
    notes.append(
      'zero_out: the stream is copied (Rep; zero-padding the stream is exact only '
      'for parameter-free RMS norms); copies are separated through the new inner '
      'units after the first updates'
    )

  overrides = _config_overrides(src, dst, stream['eps_fraction'], notes)
  return Plan(
    src=src,
    dst=dst,
    options=options,
    factors=factors,
    width_method=method,
    stream_kind=maps['stream'].kind,
    c_stream=stream['c_s'],
    c_embed=stream['c_e'],
    c_head=stream['c_h'],
    eps_factor=float(stream['eps_fraction']),
    depth_method=depth_method,
    new_layers=new_layers,
    maps=maps,
    exactness=exact,
    notes=notes,
    config_overrides=overrides,
  )


def grown_config(dst_config, growth_plan: Plan):
  """A copy of dst_config with the values the grown parameters need (Plan.config_overrides)."""
  config = copy.deepcopy(dst_config)
  config.update_from_flattened_dict(dict(growth_plan.config_overrides))
  return config
