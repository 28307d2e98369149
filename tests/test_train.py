"""Trainer properties: sharded == single device, resumed == uninterrupted, sharding specs."""

import copy

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import assert_trees_close
from helpers import make_tiny_config
from helpers import train_losses
from pretrain import train


@pytest.fixture
def data(tiny_data):
  _, source, tok = tiny_data
  return source, tok


def test_sharded_mesh_matches_single_device(text_corpus, cache_dir, data):
  # SGD with momentum: Adam's first steps are ~lr * sign(g), which turns reduction-order noise
  # in near-zero gradients into 1e-3 parameter differences, hiding what this test checks.
  config = make_tiny_config(
    text_corpus, cache_dir, **{'optim.name': 'sgdm', 'optim.learning_rate': 0.5}
  )
  single, single_state = train_losses(config, data, jax.devices()[:1])
  config.mesh.shape = (2, 2, 2)
  sharded, state = train_losses(config, data, jax.devices())
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  # After 4 steps the parameters and the momentum agree too (not only the losses).
  assert_trees_close(jax.device_get(state['params']), jax.device_get(single_state['params']))
  assert_trees_close(jax.device_get(state['opt_state']), jax.device_get(single_state['opt_state']))
  assert single[-1] < single[0]
  # Parameters really are sharded as the logical rules say (vocab->tensor, embed->fsdp,
  # mlp->tensor, heads->tensor).
  specs = jax.tree.map(lambda a: a.sharding.spec, state['params'])
  flat = {
    '/'.join(str(getattr(k, 'key', k)) for k in path): spec
    for path, spec in jax.tree_util.tree_flatten_with_path(specs)[0]
  }
  embedding = [s for k, s in flat.items() if k.endswith('embedding') and 'token' in k]
  assert embedding and embedding[0] == P('tensor', 'fsdp')
  mlp_in = [
    s
    for k, s in flat.items()
    if ('mlp' in k or 'ffn' in k or 'intermediate' in k) and k.endswith('kernel')
  ]
  assert mlp_in and any('tensor' in tuple(s) and 'fsdp' in tuple(s) for s in mlp_in), mlp_in
  shard_shapes = {
    a.sharding.shard_shape(a.shape) != a.shape
    for a in jax.tree.leaves(state['params'])
    if a.ndim >= 2
  }
  assert True in shard_shapes
  # Optimizer moments follow their parameters.
  mu = [a for a in jax.tree.leaves(state['opt_state']) if a.ndim >= 2]
  assert any(a.sharding.spec == P('tensor', 'fsdp') for a in mu)


def _final_state(workdir):
  mngr = ocp.CheckpointManager(str(workdir / 'checkpoints'))
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.device_get(restored['state'])


def test_resume_is_bit_identical_to_uninterrupted(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(text_corpus, cache_dir)
  config.model.dropout_rate = 0.1  # per-step randomness must also line up
  config.train.num_train_steps = 6
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  config.train.stop_after_steps = 4  # stops mid-way between checkpoint periods
  train.train_and_evaluate(config, str(tmp_path / 'split'))
  config.train.stop_after_steps = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert resumed == full
  step_a, a = _final_state(tmp_path / 'full')
  step_b, b = _final_state(tmp_path / 'split')
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, optimizer state and step


def test_workdir_with_other_model_shape_is_refused(text_corpus, cache_dir, tmp_path):
  config = make_tiny_config(text_corpus, cache_dir)
  config.train.num_train_steps = 2
  train.train_and_evaluate(config, str(tmp_path))
  config.model.hidden_size = 64
  with pytest.raises(train.InputError, match='hidden_size: checkpoint 32 vs config 64'):
    train.train_and_evaluate(config, str(tmp_path))
  config.model.hidden_size = 32
  # Fields that change the state tree or the model's function are named too (before any
  # restore: the old code gave an orbax tree diff or a TypeError).
  for field, value, message in (
    ('objective', 'clm', "objective: checkpoint 'mlm' vs config 'clm'"),
    ('model.norm_type', 'rmsnorm', "norm_type: checkpoint 'layernorm' vs config 'rmsnorm'"),
    ('model.use_bias', False, 'use_bias: checkpoint True vs config False'),
    (
      'model.position_embedding',
      'learned',
      "position_embedding: checkpoint 'rope' vs config 'learned'",
    ),
    ('optim.name', 'sgdm', "optim.name: checkpoint 'adamw' vs config 'sgdm'"),
  ):
    changed = copy.deepcopy(config)
    changed.update_from_flattened_dict({field: value})
    with pytest.raises(train.InputError, match=message):
      train.train_and_evaluate(changed, str(tmp_path))
  train.train_and_evaluate(config, str(tmp_path))  # the unchanged config still resumes


OPTIMIZERS = {
  'adafactor_optax': {
    'optim.name': 'adafactor',
    'optim.b1': 0.0,
    'optim.weight_decay': 0.0,
    'optim.learning_rate': 1e-2,
  },
  'adafactor_bert4keras_momentum_accumulation': {
    'optim.name': 'adafactor',
    'optim.adafactor_variant': 'bert4keras',
    'optim.learning_rate': 0.5,
    'optim.accumulation': 'momentum',
    'optim.accumulation_steps': 2,
    'optim.grad_clip_norm': 0.0,
  },
  'lamb_multisteps': {
    'optim.name': 'lamb',
    'optim.accumulation_steps': 2,
    'optim.learning_rate': 5e-2,
  },  # LAMB steps are relative
  'adamw_accumulation_in_momentum': {
    'optim.accumulation': 'momentum',
    'optim.accumulation_steps': 3,
    'optim.grad_clip_norm': 0.0,
  },
  'sgdm_eg': {'optim.name': 'sgdm', 'optim.learning_rate': 0.5, 'optim.eg.enabled': True},
  'adamw_eg': {'optim.eg.enabled': True},
  'adamw_every_k': {'optim.accumulation': 'every_k', 'optim.accumulation_steps': 2},
}
# In the default suite: one case per accumulation mode (momentum, multisteps, every_k) and EG.
FAST = ('adafactor_bert4keras_momentum_accumulation', 'lamb_multisteps', 'adamw_every_k', 'sgdm_eg')


@pytest.mark.parametrize(
  'name', [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in OPTIMIZERS]
)
def test_optimizer_trains_and_resumes_identically(name, text_corpus, cache_dir, tmp_path):
  """Each optimizer lowers the loss through the trainer, and a run stopped mid-way (inside an
  accumulation window where there is one) resumes to the same bits."""
  config = make_tiny_config(text_corpus, cache_dir, **OPTIMIZERS[name])
  config.train.num_train_steps, config.train.log_every_steps = 12, 1
  config.train.checkpoint_every_steps, config.train.eval_every_steps = 12, 12
  config.optim.warmup_steps = 0
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  config.train.stop_after_steps = 5
  train.train_and_evaluate(config, str(tmp_path / 'split'))
  config.train.stop_after_steps = 0
  assert train.train_and_evaluate(config, str(tmp_path / 'split')) == full
  _, a = _final_state(tmp_path / 'full')
  _, b = _final_state(tmp_path / 'split')
  jax.tree.map(np.testing.assert_array_equal, a, b)
  import json  # pylint: disable=g-import-not-at-top

  losses = [
    json.loads(l)['loss']
    for l in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()
    if json.loads(l)['split'] == 'train'
  ]
  assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('data.mask_rate', 0.0, r'data\.mask_rate=0\.0 must be in \(0, 1\)'),
    ('data.mask_rate', -0.1, r'data\.mask_rate=-0\.1'),
    ('data.mask_rate', 1.5, r'data\.mask_rate=1\.5'),
    ('data.mask_token_rate', 0.95, r'mask_token_rate=0\.95 and random_token_rate=0\.1'),
    ('data.global_batch_size', 0, r'data\.global_batch_size=0 must be >= 1'),
    ('data.seq_len', 1, r'data\.seq_len=1 must be >= 2'),
  ],
)
def test_bad_data_fields_are_refused_naming_the_field(
  field, value, message, text_corpus, cache_dir, tmp_path
):
  config = make_tiny_config(text_corpus, cache_dir, **{field: value})
  with pytest.raises(train.InputError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() or not list((tmp_path / 'checkpoints').iterdir())


def test_first_argmax_equals_argmax_with_ties():
  """The accuracy's argmax (two reductions, fast on CPU) is jnp.argmax, ties included: the
  first index of the maximum."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 6, 50)).astype(np.float32)
  logits[0, 0] = 0.0  # all equal: index 0
  logits[1, 2, [7, 30]] = 9.0  # a tie between two words: the first
  logits[2, 3, -1] = 9.0  # the last word
  logits = np.concatenate([logits, np.round(logits)], 0)  # many ties after rounding
  expected = np.argmax(logits, -1)
  assert expected[0, 0] == 0 and expected[1, 2] == 7 and expected[2, 3] == 49
  np.testing.assert_array_equal(jax.jit(train.first_argmax)(logits), expected)
  targets = expected.astype(np.int32)
  targets[0, :3] = (targets[0, :3] + 1) % 50  # three wrong
  _, sums = train.loss_and_metrics(logits, targets, np.ones(targets.shape, np.float32))
  assert float(sums['correct_sum']) == targets.size - 3
