r"""Imports a Hugging Face checkpoint as a new run (step 0) that training continues.

  python -m launch.convert --from_hf=hf/roformer_chinese_base --workdir=runs/imported \
      [--config=launch/configs/roformer.py:base] [--config.data.text_files=...]

Reads config.json, the weights (model.safetensors, flax_model.msgpack, or pytorch_model.bin
through torch.load(weights_only=True) when torch is installed; never pickle) and the
vocabulary (vocab.txt -> WordPiece, tokenizer.model -> SentencePiece) of a RoFormer v1
(transformers), RoFormer-v2 (`roformer` package) or GAU-alpha (`gau-alpha` package)
checkpoint, and writes --workdir as `launch.upscale` writes a grown run
(`pretrain.hf_io.import_run`, docs/huggingface.md): `launch.pretrain` continues it (the
printed command), fine-tuning starts from it and `launch.upscale` grows it. --config (default
`launch/configs/<family>.py:tiny`) gives the data, optimizer and schedule; its model fields are
replaced by the checkpoint's unless given on the command line.

Exit codes: 0 written, 2 bad input (one paragraph on stderr, nothing written): among them a
malformed model.safetensors (its header is checked against the file first) and a config.json
whose sizes disagree with the weights' shapes, both found before any model is built.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch.cli import FLAG_ERRORS, fail, flag_error_message, parse_flags, require

try:
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file and preset for data, optimizer and schedule (default '
    'launch/configs/<family>.py:tiny); model fields come from the checkpoint.',
    lock_config=True,
  )
except FLAG_ERRORS as _e:
  fail(flag_error_message(_e))
_FROM = flags.DEFINE_string('from_hf', None, 'Hugging Face model directory.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'New workdir (empty).')


def main(argv):
  if len(argv) > 1:
    fail(
      f'unexpected arguments {argv[1:]}; flags are --from_hf, --workdir, --config and '
      '--config.x.y=v.'
    )
  require(
    'python -m launch.convert --from_hf=DIR --workdir=NEW_RUN',
    from_hf=_FROM.value,
    workdir=_WORKDIR.value,
  )
  from pretrain import guards  # pylint: disable=g-import-not-at-top
  from pretrain import hf_io  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  try:
    guards.check_dir_can_be_written(_WORKDIR.value)  # before the weights are read
  except ValueError as e:
    fail(str(e))
  config_flag = flags.FLAGS['config']
  spec, explicit = None, frozenset()
  if _CONFIG.value is not None:
    spec = config_flags.get_config_filename(config_flag)
    explicit = frozenset(config_flags.get_override_values(config_flag))
  try:
    result = hf_io.import_run(_FROM.value, _WORKDIR.value, _CONFIG.value, spec, explicit)
  except train.InputError as e:
    fail(str(e))
  print(hf_io.import_summary(result, _WORKDIR.value))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
