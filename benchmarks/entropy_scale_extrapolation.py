"""Issue 12, claim 1: the entropy-invariant attention scale extrapolates to longer inputs.

  .venv/bin/python benchmarks/entropy_scale_extrapolation.py [--steps 300] [--seeds 2]
      [--train_len 64] [--eval_lens 64,128,256,512] [--text_files GLOB --text_unit line]
      [--root /tmp/exp/length_extrapolation] [--plot PATH]

The same small RoFormer (RoPE; RoFormer-v2 by default, --family=roformer for v1) trained at
n = --train_len with model.attention_scale 'standard' (1/sqrt(d_h)) and 'entropy_invariant'
(log_512(n)/sqrt(d_h), n = keys the query sees, clamped at 16; docs/algorithms.md 7.4), then
evaluated (MLM accuracy and loss on held-out text) at every --eval_lens n. Su's RoFormer-small
MLM, trained at n = 64 (kexue 8823), is printed beside ours: accuracy at n = 64/128/256/512 of
43.27/36.53/23.02/15.12 (standard) and 43.11/41.17/34.04/20.15 (entropy-invariant). Training,
restoring and evaluating are benchmarks/length_extrapolation.py's (the library's trainer and
checkpoints).
"""

from absl import app

import length_extrapolation

VARIANTS = {
  'standard': {'attention_scale': 'standard'},
  'entropy_invariant': {'attention_scale': 'entropy_invariant'},
}
SU = {
  'standard': {64: 43.27, 128: 36.53, 256: 23.02, 512: 15.12},
  'entropy_invariant': {64: 43.11, 128: 41.17, 256: 34.04, 512: 20.15},
}


def main(argv):
  del argv
  length_extrapolation.run_claim(
    'entropy_scale_extrapolation',
    'Entropy-invariant attention scale: MLM accuracy (%) at evaluation length n, trained '
    'at n = {train_len}',
    VARIANTS,
    SU,
    'Su (RoFormer-small, Chinese, trained at n = 64)',
  )


if __name__ == '__main__':
  app.run(main)
