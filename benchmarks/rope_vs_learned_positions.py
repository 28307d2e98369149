"""Issue 12, claim 5: RoPE vs learned absolute position embeddings (RoFormer's claim).

  .venv/bin/python benchmarks/rope_vs_learned_positions.py [--steps 300] [--seeds 2]
      [--train_len 64] [--eval_lens 64,128,256,512] [--text_files GLOB --text_unit line]
      [--root /tmp/exp/length_extrapolation] [--plot PATH]

The same small RoFormer (standard softmax scale; RoFormer-v2 by default, --family=roformer for
v1) with model.position_embedding 'rope' (rotary q and k, docs/algorithms.md 7.1) and 'learned'
(a BERT-style [512, d] table added to the token embeddings, rotary off, docs/algorithms.md 7.6),
trained at n = --train_len: the training loss, and MLM accuracy and loss on held-out text at
every --eval_lens n. Rows of the learned table at positions >= train_len are never trained, so
it is expected to fail beyond the training length. The RoFormer paper (Su et al. 2021, arXiv
2104.09864) reports RoPE reaching a lower MLM loss than BERT's learned absolute positions in
pre-training (a loss curve; there is no accuracy table to print beside ours). Training,
restoring and evaluating are benchmarks/length_extrapolation.py's.
"""

from absl import app

import length_extrapolation

VARIANTS = {
  'rope': {'position_embedding': 'rope'},
  'learned': {'position_embedding': 'learned', 'max_position': 512},
}


def main(argv):
  del argv
  length_extrapolation.run_claim(
    'rope_vs_learned_positions',
    'RoPE vs learned absolute positions: MLM accuracy (%) at evaluation length n, trained '
    'at n = {train_len}',
    VARIANTS,
  )


if __name__ == '__main__':
  app.run(main)
