r"""Exports a run to a Hugging Face model directory.

  python -m launch.export --from_workdir=runs/roformer_tiny --out=hf/roformer_tiny \
      [--step=N|best] [--tokenizer=PATH] [--max_position_embeddings=1536]

Writes config.json, model.safetensors (PyTorch names and layout) and the tokenizer
(tokenizer.json for AutoTokenizer, plus the original tokenizer.model or vocab.txt) of the
newest checkpoint that restores (a newer damaged one is named in a one-line warning), --step=N,
or --step=best: the checkpoint with the lowest eval loss recorded at its save, the next best
when it does not restore (docs/operations.md 1.1; `pretrain.hf_io.export_run`,
docs/huggingface.md), and a README.md model card (size, tokenizer, data, tokens, final eval
loss, fine-tuning results.json of the run). RoFormer v1
loads with transformers' PyTorch AutoModelForMaskedLM / AutoModel (model_type roformer);
RoFormer-v2 and GAU-alpha are written in the layouts of their PyTorch ports (the `roformer`
and `gau-alpha` packages) with model types transformers does not know (roformer_v2,
gau_alpha), so its Auto classes refuse them instead of building a wrong model. DeepNet and
other configs without a layout are refused (exit 2). No machine path goes into config.json.
The workdir is only read.

Exit codes: 0 written, 2 bad input (one paragraph on stderr, nothing written; a --step that
does not restore is bad input).
"""

from absl import app
from absl import flags
from absl import logging

from launch.cli import fail, parse_flags, require

_FROM = flags.DEFINE_string('from_workdir', None, 'Workdir of the run to export.')
_OUT = flags.DEFINE_string('out', None, 'New (or empty) output directory.')
_STEP = flags.DEFINE_string(
  'step',
  None,
  "Checkpoint step, or 'best' (the lowest recorded eval loss); default: the newest that restores.",
)
_TOKENIZER = flags.DEFINE_string(
  'tokenizer', None, "The run's tokenizer file, when the recorded path is not on this machine."
)
_MAX_POSITIONS = flags.DEFINE_integer(
  'max_position_embeddings',
  1536,
  'max_position_embeddings in config.json (position tables of the PyTorch code).',
)


def main(argv):
  if len(argv) > 1:
    fail(
      f'unexpected arguments {argv[1:]}; flags are --from_workdir, --out, --step, '
      '--tokenizer and --max_position_embeddings.'
    )
  require(
    'python -m launch.export --from_workdir=RUN --out=DIR', from_workdir=_FROM.value, out=_OUT.value
  )
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import hf_io  # pylint: disable=g-import-not-at-top
  from pretrain import rundir  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  try:
    guards.check_dir_can_be_written(_OUT.value, '--out')  # before the checkpoint is read
  except ValueError as e:
    fail(str(e))
  try:
    step = rundir.parse_step(_STEP.value)
    result = hf_io.export_run(_FROM.value, _OUT.value, step, _TOKENIZER.value, _MAX_POSITIONS.value)
  except train.InputError as e:
    fail(str(e))
  print(hf_io.export_summary(result))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
