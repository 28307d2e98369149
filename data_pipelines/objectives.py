"""Training objectives on packed NumPy batches: BERT masking (MLM) and next-token targets (CLM).

Both take a packed batch {'tokens', 'segment_ids', 'positions'} (int32 [b, n]; segment id 0 is
padding) and add the inputs the model and loss need. Pure NumPy: the randomness comes from the
`np.random.Generator` grain hands to a random map, seeded by (seed, batch index), so the same
seed and step give the same mask (and resume reproduces it).
"""

from __future__ import annotations

import math

import numpy as np

from data_pipelines import tokenizer as tokenizer_lib


def max_predictions(seq_len: int, mask_rate: float) -> int:
  """P, the number of MLM prediction slots per row: ceil(mask_rate * seq_len)."""
  return max(1, math.ceil(mask_rate * seq_len))


def mask_tokens(
  batch: dict[str, np.ndarray],
  rng: np.random.Generator,
  *,
  vocab_size: int,
  mask_rate: float = 0.15,
  mask_token_rate: float = 0.8,
  random_token_rate: float = 0.1,
  mask_id: int = tokenizer_lib.MASK_ID,
  num_special: int = tokenizer_lib.NUM_SPECIAL,
) -> dict[str, np.ndarray]:
  """BERT masking (Devlin et al. 2019, 3.1): selects 15 % of the maskable tokens of each row.

  A token is maskable if it is not special (id >= num_special) and not padding. Each row gets
  round(mask_rate * maskable) predictions (at most P = max_predictions(n, mask_rate)) at
  uniformly random positions; each selected token becomes [MASK] with probability
  mask_token_rate, a random non-special token with probability random_token_rate, and stays
  unchanged otherwise.

  Args:
    batch: 'tokens', 'segment_ids', 'positions' int32 [b, n].
    rng: source of randomness.
    vocab_size: tokenizer vocabulary size (random replacements are in [num_special, vocab_size)).

  Returns:
    `batch` plus 'inputs' (int32 [b, n], tokens after replacement), 'mlm_positions' (int32
    [b, P]), 'mlm_targets' (int32 [b, P], original ids), 'mlm_weights' (float32 [b, P], 1 for
    real predictions, 0 for padding slots).
  """
  tokens = batch['tokens']
  b, n = tokens.shape
  p = max_predictions(n, mask_rate)
  maskable = (tokens >= num_special) & (batch['segment_ids'] > 0)
  counts = np.minimum(np.rint(mask_rate * maskable.sum(axis=1)).astype(np.int64), p)
  # Random order of maskable positions: non-maskable ones sort last.
  scores = np.where(maskable, rng.random((b, n)), 2.0)
  order = np.argsort(scores, axis=1, kind='stable')[:, :p]
  slot = np.arange(p)[None, :]
  weights = (slot < counts[:, None]).astype(np.float32)
  positions = np.where(weights > 0, order, 0).astype(np.int32)
  targets = np.where(weights > 0, np.take_along_axis(tokens, positions, axis=1), 0)

  action = rng.random((b, p))
  random_ids = rng.integers(num_special, vocab_size, size=(b, p))
  replacement = np.where(
    action < mask_token_rate,
    mask_id,
    np.where(action < mask_token_rate + random_token_rate, random_ids, targets),
  )
  inputs = tokens.copy()
  rows = np.broadcast_to(np.arange(b)[:, None], (b, p))
  real = weights > 0
  inputs[rows[real], positions[real]] = replacement[real]
  return {
    **batch,
    'inputs': inputs.astype(np.int32),
    'mlm_positions': positions,
    'mlm_targets': targets.astype(np.int32),
    'mlm_weights': weights,
  }


def next_token_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Causal LM targets: position i predicts token i+1 of the same segment.

  Returns:
    `batch` plus 'inputs' (= tokens), 'targets' (int32 [b, n]) and 'weights' (float32 [b, n]; 0
    at the last token of each segment, whose successor is another document, and at padding).
  """
  tokens, seg = batch['tokens'], batch['segment_ids']
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  weights = np.zeros(tokens.shape, np.float32)
  weights[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  return {**batch, 'inputs': tokens, 'targets': targets.astype(np.int32), 'weights': weights}
