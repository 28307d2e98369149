"""Analytic training FLOPs per input token (for MFU).

Conventions: a matmul [m, k] x [k, n] costs 2 m k n; training = 3 x forward (backward is two
matmuls per forward matmul); attention is counted in full (bidirectional, not halved, also for
causal LM); element-wise work (norms, softmax, activations, RoPE) and embedding lookups (token,
token type, the learned position table of model.position_embedding='learned') are ignored. The
MLM head runs only at predicted positions, so it is scaled by num_predictions_per_row / seq_len;
the causal LM head runs at every position.
"""

from __future__ import annotations


def _layer_forward_flops(m, n: int) -> float:
  """Forward matmul FLOPs per token of one block."""
  d = m.hidden_size
  if m.family == 'gau':
    e, s = m.expansion_factor * d, m.shared_dim
    dense = 2 * d * (2 * e + s) + 2 * e * d
    c = m.chunk_size
    if c > 0:
      c = min(c, n)
      # local: Q K^T within the chunk and A V; global: K^T V accumulation and Q (K^T V).
      mixing = 2 * c * s + 2 * c * e + 2 * s * e + 2 * s * e
    else:
      mixing = 2 * n * s + 2 * n * e
    return float(dense + mixing)
  head_dim = m.head_dim or d // m.num_heads
  inner = m.num_heads * head_dim
  projections = 2 * d * inner * 4
  mixing = 2 * n * inner * 2
  ffn = 2 * d * m.mlp_dim * 2
  return float(projections + mixing + ffn)


def flops_per_token(config, num_predictions_per_row: int) -> float:
  """Training FLOPs per input token: 3 x (L blocks + LM head share) forward matmul FLOPs.

  Args:
    config: the full ConfigDict (reads config.model, config.data.seq_len, config.objective).
    num_predictions_per_row: P, MLM predictions per row (ignored for objective 'clm').
  """
  m = config.model
  n = config.data.seq_len
  d = m.hidden_size
  forward = m.num_layers * _layer_forward_flops(m, n)
  head = 2 * d * m.vocab_size
  if m.family == 'roformer':
    head += 2 * d * d  # transform dense
  if config.objective == 'clm':
    forward += head
  else:
    forward += head * num_predictions_per_row / n
  return 3.0 * forward
