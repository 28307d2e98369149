r"""Grows a trained model into a larger one, losslessly: step 0 of a new workdir.

  python -m launch.upscale --from_workdir=runs/roformer_tiny \
      --config=launch/configs/roformer.py:small --workdir=runs/roformer_small_grown
  python -m launch.pretrain --config=launch/configs/roformer.py:small \
      --workdir=runs/roformer_small_grown ...   # the exact command is printed: continues

Reads the latest (or --step) checkpoint of --from_workdir and its metadata (the config that
trained it), checks that --config is a valid growth of it (models/upscale.py: integer width
factors, same vocabulary and family, same or more layers; docs/algorithms.md 4), grows the
parameters (and
the optimizer state with --config.upscale.optimizer_state=map), and writes them as step 0 of
--workdir with the lineage in its metadata. The data source, vocabulary and tokenizer default
to the source run's (the tokenizer must be the same file); a fresh data iterator is saved.
Prints the max abs logit difference and both MLM losses on a held-out batch.

Growth options (`--config.upscale.<field>=value`; models.upscale.Options): width_method,
symmetry_breaking, noise_sigma, depth_method, depth_positions, optimizer_state, seed.

Exit codes: 0 written, 2 bad input (one paragraph on stderr, nothing written).
"""

import copy
import importlib.util
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch.cli import FLAG_ERRORS, fail

# Source-run data fields reused unless given on the command line (same corpus and tokenizer).
INHERITED_FIELDS = ('objective', 'model.vocab_size', 'model.type_vocab_size',
                    'data.text_files', 'data.text_unit', 'data.tfds_name', 'data.tfds_data_dir',
                    'data.tfds_text_key', 'data.train_split', 'data.eval_split',
                    'data.validation_fraction', 'data.cache_dir',
                    'data.tokenizer_sample_bytes')
UPSCALE_PREFIX = '--config.upscale.'


try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Target config file and preset, e.g. launch/configs/roformer.py:small.',
      lock_config=True)
except FLAG_ERRORS as _e:
  fail(f'bad flag: {_e}')
_FROM = flags.DEFINE_string('from_workdir', None, 'Workdir of the trained (small) model.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'New workdir for the grown model (empty).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of --from_workdir (default latest).')

_UPSCALE_ARGS: dict[str, str] = {}


class InputError(ValueError):
  """Bad input found before anything is written; printed as one paragraph, exit 2."""


# ----------------------------------------------------------------------------- configs

def _to_tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_to_tuples(v) for v in value)
  return value


def config_from_meta(saved: dict):
  """The source run's ConfigDict from meta['config'] (JSON), on top of the base schema."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from launch.configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_base_config()

  def merge(target, values):
    for key, value in values.items():
      if isinstance(value, dict):
        if key not in target:
          target[key] = ml_collections.ConfigDict()
        merge(target[key], value)
      elif key in target and isinstance(target[key], tuple):
        target[key] = _to_tuples(value)
      else:
        target[key] = value

  merge(config, saved)
  return config


def _get(config, dotted: str):
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


def _set(config, dotted: str, value):
  *parents, leaf = dotted.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value


def apply_upscale_args(config, args: dict[str, str]):
  """Sets config.upscale (created with the defaults when the schema lacks it) from
  `--config.upscale.<field>=value` strings, typed like models.upscale.Options."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from models import upscale  # pylint: disable=g-import-not-at-top
  defaults = {f.name: f.default for f in dataclasses.fields(upscale.Options)}
  with config.unlocked():
    if 'upscale' not in config:
      config.upscale = ml_collections.ConfigDict(defaults)
  for name, raw in args.items():
    if name not in defaults:
      raise InputError(f'--config.upscale.{name} is not an upscale field; choose one of '
                       f'{", ".join(defaults)} (models/upscale.py Options).')
    kind = type(defaults[name])
    try:
      config.upscale[name] = kind(raw)
    except (TypeError, ValueError):
      raise InputError(f'--config.upscale.{name}={raw!r} is not a {kind.__name__}.') from None
  return config


def load_preset(spec: str):
  """Re-reads `path[:preset]` (the target config without command-line overrides)."""
  path, _, preset = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_upscale_target_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def continue_flags(config, preset) -> list[str]:
  """`--config.x=v` for every field where `config` differs from the preset (upscale.* left
  out: launch.pretrain does not read them)."""
  want, have = _flat(config.to_dict()), _flat(preset.to_dict())
  out = []
  for key, value in want.items():
    if key.startswith('upscale.') or have.get(key, object()) == value:
      continue
    if isinstance(value, (list, tuple)):
      value = repr(_to_tuples(value))
    out.append(shlex.quote(f'--config.{key}={value!r}' if isinstance(value, float)
                           else f'--config.{key}={value}'))
  return out


# ----------------------------------------------------------------------------- the work

def run(from_workdir: str, config, workdir: str, step: int | None = None,
        explicit: frozenset = frozenset()) -> dict:
  """Grows the checkpoint of `from_workdir` into step 0 of `workdir` for target `config`.

  Args:
    from_workdir: a workdir written by launch.pretrain (or launch.upscale).
    config: the target ConfigDict (its config.upscale holds the growth options).
    workdir: the new run directory; must hold no checkpoint.
    step: the source step (default: latest).
    explicit: dotted config fields given on the command line (kept over the source's values).

  Returns:
    A summary dict: max_abs_logit_diff, small/grown held-out metrics, the growth report, the
    source step, the written checkpoint path, parameter counts and the grown config.

  Raises:
    InputError: bad input; nothing has been written.
  """
  # Check the inputs (nothing is written before all checks pass).
  ckpt_dir = os.path.join(from_workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise InputError(f'--from_workdir={from_workdir} has no checkpoints/ directory; give the '
                     'workdir of a run written by launch.pretrain.')
  out_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise InputError(f'--workdir={workdir} already holds checkpoints; launch.upscale writes a '
                     'new run: choose an empty --workdir.')
  if os.path.abspath(workdir) == os.path.abspath(from_workdir):
    raise InputError('--workdir must differ from --from_workdir.')
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  from data_pipelines import text_datasets  # pylint: disable=g-import-not-at-top
  from data_pipelines import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top
  from models import upscale  # pylint: disable=g-import-not-at-top
  from pretrain import checkpointing  # pylint: disable=g-import-not-at-top
  from pretrain import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top

  src_ckpt = checkpointing.Checkpointer(from_workdir, async_save=False)
  try:
    steps = src_ckpt.all_steps()
    if not steps:
      raise InputError(f'--from_workdir={from_workdir} has no complete checkpoint.')
    step = max(steps) if step is None else step
    if step not in steps:
      raise InputError(f'--step={step} is not a checkpoint of {from_workdir}; available: '
                       f'{", ".join(map(str, sorted(steps)))}.')
    meta = src_ckpt.read_meta(step)
    src_config = config_from_meta(meta['config'])
    config = copy.deepcopy(config)
    for field in INHERITED_FIELDS:
      if field not in explicit:
        _set(config, field, _get(src_config, field))
    tok_path = meta.get('tokenizer', {}).get('path', '')
    if 'data.tokenizer_model' not in explicit:
      if not tok_path or not os.path.isfile(tok_path):
        raise InputError(
            f'the tokenizer of {from_workdir} ({tok_path or "path not recorded"}) is not on this '
            'machine; pass the same SentencePiece file with --config.data.tokenizer_model=PATH.')
      config.data.tokenizer_model = tok_path
    options = upscale.options_from_config(config)
    try:
      models.validate(config)
      p = upscale.plan(src_config, config, options)
      config = upscale.grown_config(config, p)
      mesh = mesh_lib.make_mesh(config.mesh)
      train.validate(config, mesh)
    except ValueError as e:
      raise InputError(str(e)) from e

    # Load dataset and tokenizer (the source's tokenizer file).
    try:
      source = text_datasets.load_text_source(config.data)
      tokenizer = tokenizer_lib.load_or_train(config.data, config.model, source.train,
                                              source.text_key, source.fingerprint)
    except ValueError as e:
      raise InputError(str(e)) from e
    if tokenizer.sha256 != meta.get('tokenizer', {}).get('sha256', tokenizer.sha256):
      raise InputError(f'--config.data.tokenizer_model={config.data.tokenizer_model} is not the '
                       f'tokenizer {from_workdir} was trained with (sha256 differs); pass '
                       f'{tok_path or "that file"}.')
    heldout = pipeline.eval_batches(source.validation, tokenizer, config,
                                    text_key=source.text_key)[0]
    train_iter = iter(pipeline.make_dataset(source.train, tokenizer, config,
                                            text_key=source.text_key, train=True))

    # Restore the source, grow.
    s_src = train.setup(src_config, mesh)
    state = src_ckpt.restore(step, s_src.abstract_state)
  finally:
    src_ckpt.close()
  src_params = jax.device_get(state['params'])
  params = upscale.grow_params(src_params, p)
  s_dst = train.setup(config, mesh)
  abstract = s_dst.abstract_state
  params = jax.tree.map(lambda a, x: np.asarray(x, a.dtype), abstract['params'], params)
  if options.optimizer_state == 'map':
    fresh = jax.device_get(jax.jit(s_dst.tx.init)(params))
    try:
      opt_state = upscale.grow_opt_state(jax.device_get(state['opt_state']), p, fresh,
                                         src_params)
    except upscale.GrowthError as e:
      raise InputError(str(e)) from e
  else:
    opt_state = jax.jit(s_dst.tx.init)(params)
  new_state = {'step': np.zeros((), np.int32), 'params': params, 'opt_state': opt_state}
  new_state = jax.tree.map(lambda a, x: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                           abstract, new_state)

  # Check on a held-out batch.
  def heldout_metrics(s, cfg, prm):
    batch = mesh_lib.global_batch(heldout, mesh)
    sums = train.jit_eval_step(s, cfg)(prm, batch)

    def logits_fn(prm):
      model = nnx.merge(s.graphdef, prm)
      return model(batch['inputs'], batch['segment_ids'], batch['positions'],
                   prediction_positions=batch.get('mlm_positions'))

    return train.summarize(jax.device_get(sums)), np.asarray(jax.jit(logits_fn)(prm))

  small, small_logits = heldout_metrics(s_src, src_config, state['params'])
  large, large_logits = heldout_metrics(s_dst, config, new_state['params'])
  weights = np.asarray(heldout.get('mlm_weights', heldout.get('weights')))
  diff = float(np.max(np.abs(small_logits - large_logits)[weights > 0]))

  # Write step 0 of the new run.
  lineage = list(meta.get('lineage', [])) + [{
      'grown_from': os.path.abspath(from_workdir), 'step': int(step),
      'family': meta.get('family'), 'model_shape': meta.get('model_shape'),
      'max_abs_logit_diff': diff, 'heldout_loss_small': small['loss'],
      'heldout_loss_grown': large['loss'], 'upscale': p.report()}]
  new_meta = train.checkpoint_meta(config, tokenizer, mesh, source.name, lineage)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  out = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                   async_save=False)
  try:
    out.save(0, new_state, train_iter, new_meta)
  finally:
    out.close()
  return {'max_abs_logit_diff': diff, 'small': small, 'grown': large, 'report': p.report(),
          'step': int(step), 'checkpoint': os.path.join(out.directory, '0'),
          'num_params': (s_src.num_params, s_dst.num_params), 'config': config}


# ----------------------------------------------------------------------------- entry point

def parse_flags(argv):
  """absl parsing; `--config.upscale.*` are taken out first (applied in main), so they work
  whether or not the config schema defines config.upscale."""
  rest = []
  for arg in argv:
    if arg.startswith(UPSCALE_PREFIX) and '=' in arg:
      name, value = arg[len(UPSCALE_PREFIX):].split('=', 1)
      _UPSCALE_ARGS[name] = value
    else:
      rest.append(arg)
  # config_flags also scans sys.argv for --config.* overrides: hide the upscale ones there too.
  sys.argv[:] = [a for a in sys.argv if not (a.startswith(UPSCALE_PREFIX) and '=' in a)]
  try:
    return flags.FLAGS(rest)
  except FLAG_ERRORS as e:
    message = ' '.join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    fail(f'bad flag: {message} -- config fields are in launch/configs/base.py; growth options '
         'are --config.upscale.<field> (models/upscale.py Options).')


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --from_workdir, --config, --workdir, '
         '--step and --config.x.y=v.')
  for name, flag in (('from_workdir', _FROM), ('workdir', _WORKDIR), ('config', _CONFIG)):
    if flag.value is None:
      fail(f'--{name} is required: python -m launch.upscale --from_workdir=SMALL_RUN '
           '--config=launch/configs/<family>.py:<preset> --workdir=NEW_RUN')
  logging.set_verbosity(logging.WARNING)
  config_flag = flags.FLAGS['config']
  explicit = frozenset(config_flags.get_override_values(config_flag))
  try:
    config = apply_upscale_args(copy.deepcopy(_CONFIG.value), _UPSCALE_ARGS)
    result = run(_FROM.value, config, _WORKDIR.value, _STEP.value, explicit)
  except InputError as e:
    fail(str(e))
  r = result['report']
  src, dst = r['from'], r['to']
  shape = lambda s: (f"d {s['hidden_size']}, L {s['num_layers']}, " + (
      f"e {s['expansion'] * s['hidden_size']}, s {s['shared_dim']}" if s['family'] == 'gau'
      else f"h {s['num_heads']} x {s['head_dim']}, F {s['mlp_dim']}"))
  print(f"grew {src['family']} ({shape(src)}; {result['num_params'][0]:,} params) -> "
        f"({shape(dst)}; {result['num_params'][1]:,} params) from step {result['step']}")
  print(f"scheme: width {r['width_method']} (stream {r['stream_expansion']}, scale "
        f"{r['stream_scale']:.4g}), symmetry breaking {r['options']['symmetry_breaking']}, "
        f"depth {r['depth_method']} {r['new_layers'] or ''}, optimizer state "
        f"{r['options']['optimizer_state']}; exact: {r['exactness']}")
  for note in r['notes']:
    print(f'  note: {note}')
  if r['config_overrides']:
    print('config values set by growth: ' + ', '.join(
        f'{k}={v!r}' for k, v in r['config_overrides'].items()))
  small, grown = result['small'], result['grown']
  print(f"held-out batch: max |logit difference| {result['max_abs_logit_diff']:.3g}; "
        f"{result['config'].objective.upper()} loss "
        f"small {small['loss']:.6f} vs grown {grown['loss']:.6f}; accuracy "
        f"{small['accuracy']:.4f} vs {grown['accuracy']:.4f}")
  print(f"wrote {result['checkpoint']}")
  spec = config_flags.get_config_filename(config_flag)
  try:
    extra = continue_flags(result['config'], load_preset(spec))
  except Exception:  # pylint: disable=broad-except
    extra = ['<the overrides in', os.path.join(_WORKDIR.value, 'config.json>')]
  print('continue training with:\n  python -m launch.pretrain '
        + ' '.join([f'--config={spec}', f'--workdir={_WORKDIR.value}'] + extra))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
