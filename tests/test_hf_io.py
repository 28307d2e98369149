"""Hugging Face export and import (docs/huggingface.md): transformers' Flax RoFormer reads the
export with our logits, AutoTokenizer gives our ids, ours -> export -> import is bit-identical
and continues training, the v2 / GAU-alpha layouts compute our function in a NumPy transcription
of their PyTorch ports, WordPiece equals BertTokenizer, and bad inputs exit with code 2."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import hf_tokenizer
from data_pipelines import pipeline
from data_pipelines import tokenizer as tokenizer_lib
from helpers import run_launcher
from helpers import cpu_env
from helpers import make_tiny_config
from helpers import ROOT
import models
from models import hf_export
from models import hf_import
from pretrain import checkpointing
from pretrain import hf_io
from pretrain import hf_weights
from pretrain import mesh as mesh_lib
from pretrain import rundir
from pretrain import train

SAMPLES = (
  'def split(s, comments=False, posix=True):\n    """Split *s* like a shell."""',
  '  leading spaces, tabs\tand 1234 digits',
  '床前明月光，疑是地上霜。',
  'Café naïve ÉCOLE -- mixed: 3.14159!',
)


def _random_params(config, seed=0):
  """Random parameters of `config`'s tree (NumPy, no compile): N(0, 0.2) everywhere, norm
  gains 1 + N(0, 0.1), so every mapping is exercised and logits are O(1)."""
  abstract = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
    lambda p, x: (
      (p[-1].key == 'scale') + (0.1 if p[-1].key == 'scale' else 0.2) * rng.standard_normal(x.shape)
    ).astype(x.dtype),
    shapes,
  )


def _logits(config, params, ids, valid=None):
  """Our logits [b, n, V] for ids [b, n] (valid: 1 = token, 0 = padding), one jit."""
  abstract = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(params=0)))
  graphdef, _ = nnx.split(abstract, nnx.Param)
  valid = np.ones_like(ids) if valid is None else valid
  pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape) * valid
  apply = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  return np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(pos)))


def _write_run(config, params, tok, source, workdir):
  """A run directory as launch.pretrain leaves it, holding `params` at step 0."""
  mesh = mesh_lib.make_mesh(config.mesh)
  run_setup = train.setup(config, mesh)
  state = hf_io._initial_state(config, run_setup, params)  # pylint: disable=protected-access
  train_iter = iter(pipeline.make_dataset(source.train, tok, config, text_key=source.text_key))
  meta = checkpointing.checkpoint_meta(config, tok, mesh, source)
  rundir.write_run(str(workdir), config, state, train_iter, meta)


def _same_tree(a, b):
  flat = jax.tree.leaves(
    jax.tree.map(
      lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), a, b
    )
  )
  return len(flat) > 0 and all(flat)


@pytest.fixture(scope='module')
def v1_export(tiny_data, tmp_path_factory):
  """(config, params, tokenizer, source, workdir, export dir) of a tiny RoFormer v1 run."""
  config, source, tok = tiny_data
  config = config.copy_and_resolve_references()
  config.model.initializer_range = 0.2
  params = _random_params(config)
  root = tmp_path_factory.mktemp('hf_v1')
  _write_run(config, params, tok, source, root / 'run')
  hf_io.export_run(str(root / 'run'), str(root / 'hf'), max_position_embeddings=64)
  return config, params, tok, source, root


def test_export_loads_in_transformers_flax_with_our_logits_and_ids(v1_export, tmp_path):
  config, params, tok, _, root = v1_export
  out = str(root / 'hf')
  assert sorted(os.listdir(out)) == sorted(
    [
      'README.md',
      'config.json',
      'model.safetensors',
      'special_tokens_map.json',
      'tokenizer.json',
      'tokenizer.model',
      'tokenizer_config.json',
    ]
  )
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from transformers import AutoTokenizer, FlaxRoFormerForMaskedLM  # pylint: disable=g-import-not-at-top

    hf_model = FlaxRoFormerForMaskedLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
  for text in SAMPLES:
    assert hf_tok(text, add_special_tokens=False)['input_ids'] == tok.encode(text).tolist()
  ids = hf_tok(SAMPLES[0])['input_ids']
  assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
  n = 24
  batch = np.stack([ids[:n], ids[1 : n + 1]]).astype(np.int32)
  valid = np.ones_like(batch)
  valid[1, 17:] = 0  # a padded row
  ours = _logits(config, params, batch, valid)
  ref = np.asarray(
    hf_model(batch, attention_mask=valid, token_type_ids=np.zeros_like(batch)).logits
  )
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(ours[valid == 1], ref[valid == 1], atol=1e-5, rtol=0)
  # transformers' own Flax save (flax_model.msgpack) imports back to the same parameters.
  hf_model.save_pretrained(str(tmp_path), safe_serialization=False)
  name, state_dict = hf_weights.read_weights(str(tmp_path))
  assert name == 'flax_model.msgpack'
  assert _same_tree(hf_import.from_torch(state_dict, config)[0], params)


def test_round_trip_is_bit_identical_and_training_continues(v1_export, tmp_path):
  config, params, tok, _, root = v1_export
  explicit = frozenset({'data.text_files', 'data.cache_dir'})
  result = hf_io.import_run(
    str(root / 'hf'), str(tmp_path / 'run'), config, 'launch/configs/roformer.py:tiny', explicit
  )
  summary = hf_io.import_summary(result, str(tmp_path / 'run'))
  assert 'continue training with:\n  python -m launch.pretrain' in summary, summary
  meta = json.loads((tmp_path / 'run' / 'checkpoints' / '0' / 'meta' / 'metadata').read_text())
  assert meta['lineage'][0]['imported_from'] == str(root / 'hf')
  assert meta['tokenizer']['sha256'] == tok.sha256
  assert meta['model_shape'] == checkpointing.model_shape(config.model)
  imported = tokenizer_lib.load_run_tokenizer(meta)
  assert all(imported.encode(t).tolist() == tok.encode(t).tolist() for t in SAMPLES)
  restored = hf_io._restore_params(str(tmp_path / 'run'), 0)[3]  # pylint: disable=protected-access
  assert _same_tree(restored, params)
  hf_io.export_run(str(tmp_path / 'run'), str(tmp_path / 'hf2'), max_position_embeddings=64)
  for name in ('model.safetensors', 'tokenizer.json', 'tokenizer.model'):
    assert (tmp_path / 'hf2' / name).read_bytes() == (root / 'hf' / name).read_bytes(), name

  # launch.pretrain's set-up resumes the imported step 0 (config, tokenizer and data checks,
  # restore onto the mesh), and a train step runs on it.
  cont = result.config.copy_and_resolve_references()
  run = train.prepare(cont, str(tmp_path / 'run'))
  try:
    assert run.start_step == 0 and _same_tree(jax.device_get(run.state['params']), params)
    batch = mesh_lib.global_batch(next(run.train_iter), run.run_setup.mesh)
    state, metrics = run.train_step(run.state, batch, jax.random.key(0))
    assert int(state['step']) == 1 and np.isfinite(float(metrics['loss_sum']))
  finally:
    run.close()


def _port_norm(x, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _port_rope(x, sin, cos, concat):
  """The ports' RoPE on interleaved pairs; GAU-alpha's concatenates the two halves."""
  x1, x2 = x[..., 0::2], x[..., 1::2]
  a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
  return np.concatenate([a, b], -1) if concat else np.stack([a, b], -1).reshape(x.shape)


def _port_forward(sd, hf, ids):
  """NumPy (float64) transcription of the forward pass of the `roformer` package's
  RoFormerForMaskedLM with norm_type='rms_norm' and of the `gau-alpha` package's
  GAUAlphaForMaskedLM (JunnYu/RoFormer_pytorch, JunnYu/GAU-alpha-pytorch), eval mode, no
  padding, reading the exported tensors by name."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  act = {'relu': lambda v: np.maximum(v, 0), 'swish': lambda v: v / (1 + np.exp(-v))}[
    hf['hidden_act']
  ]
  gau = hf['model_type'] == 'gau_alpha'
  p = 'gau_alpha' if gau else 'roformer'
  eps, n = hf['layer_norm_eps'], ids.shape[1]
  x = sd[f'{p}.embeddings.word_embeddings.weight'][ids]
  x = _port_norm(x + sd[f'{p}.embeddings.token_type_embeddings.weight'][0], eps)
  dim = hf['attention_key_size'] if gau else hf['hidden_size'] // hf['num_attention_heads']
  angle = np.arange(n)[:, None] * 10000.0 ** (-np.arange(0, dim, 2) / dim)[None]
  sin, cos = np.sin(angle), np.cos(angle)
  for i in range(hf['num_hidden_layers']):
    if gau:
      w = lambda name, i=i: sd[f'{p}.encoder.layer.{i}.gau.{name}']  # noqa: E731
      e, s = hf['intermediate_size'], hf['attention_key_size']
      h = act(x @ w('i_dense.weight').T)
      u, v, qk = h[..., :e], h[..., e : 2 * e], h[..., 2 * e :]
      q = _port_rope(qk * w('q_scaleoffset.weight'), sin, cos, True)
      k = _port_rope(qk * w('k_scaleoffset.weight'), sin, cos, True)
      a = np.einsum('bmd,bnd->bmn', q, k) / s**0.5 * np.log(n) / np.log(512)
      a = np.exp(a - a.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      x = _port_norm(x + (u * (a @ v)) @ w('o_dense.weight').T, eps)
      continue
    w = lambda name, i=i: sd[f'{p}.encoder.layer.{i}.{name}.weight']  # noqa: E731
    heads = hf['num_attention_heads']
    split = lambda t: t.reshape(t.shape[0], n, heads, dim).transpose(0, 2, 1, 3)  # noqa: E731
    q = _port_rope(split(x @ w('attention.self.query').T), sin, cos, False)
    k = _port_rope(split(x @ w('attention.self.key').T), sin, cos, False)
    v = split(x @ w('attention.self.value').T)
    a = q @ k.transpose(0, 1, 3, 2) / dim**0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = _port_norm(x + ctx @ w('attention.output.dense').T, eps)
    x = _port_norm(x + act(x @ w('intermediate.dense').T) @ w('output.dense').T, eps)
  return x @ sd['cls.predictions.decoder.weight'].T


@pytest.mark.parametrize('preset', ['roformer_v2:tiny', 'gau:tiny'])
def test_v2_and_gau_alpha_layouts_compute_our_function(preset):
  config = make_tiny_config(ROOT, ROOT, preset=preset)
  config.model.vocab_size, config.model.init = 97, 'normal'
  config.model.initializer_range = 0.2
  if preset.startswith('gau'):
    config.model.type_vocab_size = 0  # exported as one zero row, dropped again on import
  params = _random_params(config, seed=1)
  hf = hf_export.hf_config(config, pad_token_id=0, max_position_embeddings=64)
  sd = hf_export.to_torch(params, config)
  ids = np.random.default_rng(0).integers(5, 97, (2, 20)).astype(np.int32)  # n >= 16: see docs
  ref = _port_forward(sd, hf, ids)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(_logits(config, params, ids), ref, atol=1e-5, rtol=0)
  assert hf['dtype'] == 'float32' and 'torch_dtype' not in hf
  assert hf['model_type'] == {'roformer_v2': 'roformer_v2', 'gau': 'gau_alpha'}[config.model.family]
  port = hf_export.port_config(hf)  # the ports' convention: v2 is model_type roformer + rms_norm
  assert port['model_type'] != 'roformer' or port['norm_type'] == 'rms_norm'
  family, fields = hf_import.model_fields(port)
  expected = dict(config.model, type_vocab_size=max(1, config.model.type_vocab_size))
  assert family == config.model.family and all(
    expected[k] == v for k, v in fields.items() if k not in ('dropout_rate', 'initializer_range')
  )
  for scan in (True, False):
    config.model.scan_layers = scan
    back, report = hf_import.from_torch(sd, config)
    assert report == {'ignored': [], 'filled': []}
    assert _same_tree(back, params if scan else models.unstack_layers(params))


def test_v1_config_json_loads_as_roformer_in_auto_config(v1_export):
  """The documented path: AutoConfig (and so AutoModel*) reads the v1 export as RoFormer, with
  `dtype` (not the deprecated `torch_dtype`) and no machine path in config.json."""
  root = v1_export[4]
  hf = json.loads((root / 'hf' / 'config.json').read_text())
  assert hf['model_type'] == 'roformer' and hf['architectures'] == ['RoFormerForMaskedLM']
  assert hf['dtype'] == 'float32' and 'torch_dtype' not in hf
  assert hf['encoder_pretrain']['run'] == 'run' and 'from_workdir' not in hf['encoder_pretrain']
  assert str(root) not in json.dumps(hf)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from transformers import AutoConfig  # pylint: disable=g-import-not-at-top

    assert AutoConfig.from_pretrained(str(root / 'hf')).model_type == 'roformer'


@pytest.mark.parametrize('preset', ['roformer_v2:tiny', 'gau:tiny'])
def test_v2_and_gau_exports_carry_their_code_and_import_back(
  preset, tiny_data, text_corpus, cache_dir, tmp_path
):
  """A RoFormer-v2 or GAU-alpha export names a model_type transformers does not know and an
  auto_map into the code it carries: AutoConfig refuses it without trust_remote_code (never
  transformers' RoFormer v1, another function) and builds our config class with it (the
  PyTorch models themselves: tests/test_hf_torch.py); launch.convert imports it bit for bit."""
  _, source, tok = tiny_data
  config = make_tiny_config(text_corpus, cache_dir, preset=preset)
  config.model.initializer_range = 0.2
  params = _random_params(config, seed=2)
  _write_run(config, params, tok, source, tmp_path / 'run')
  out = tmp_path / 'hf'
  result = hf_io.export_run(str(tmp_path / 'run'), str(out), max_position_embeddings=64)
  hf = json.loads((out / 'config.json').read_text())
  model_type = {'roformer_v2': 'roformer_v2', 'gau': 'gau_alpha'}[config.model.family]
  assert hf['model_type'] == model_type and result.hf_config['model_type'] == model_type
  assert hf['auto_map'] == hf_export.AUTO_MAP[config.model.family]
  for name in hf_export.REMOTE_CODE_FILES:
    assert (out / name).read_bytes() == (ROOT / 'models' / 'hf_remote' / name).read_bytes()
  for text in (hf_io.export_summary(result), (out / 'README.md').read_text()):
    assert 'trust_remote_code=True' in text and 'AutoModelForMaskedLM' in text, text
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    import transformers  # pylint: disable=g-import-not-at-top

    with pytest.raises(ValueError, match='trust_remote_code'):
      transformers.AutoConfig.from_pretrained(str(out))
    loaded = transformers.AutoConfig.from_pretrained(str(out), trust_remote_code=True)
  assert (
    type(loaded).__name__ == hf_export.AUTO_MAP[config.model.family]['AutoConfig'].split('.')[1]
  )
  assert loaded.model_type == model_type
  assert all(getattr(loaded, k) == v for k, v in hf.items() if k not in ('auto_map', 'dtype'))
  explicit = frozenset({'data.text_files', 'data.cache_dir'})
  back = hf_io.import_run(str(out), str(tmp_path / 'back'), config, preset, explicit)
  assert back.family == config.model.family
  restored = hf_io._restore_params(str(tmp_path / 'back'), 0)[3]  # pylint: disable=protected-access
  assert _same_tree(restored, params)


def test_deepnet_export_is_refused_naming_what_is_supported():
  config = make_tiny_config(ROOT, ROOT, preset='deepnet:tiny')
  with pytest.raises(
    hf_export.ExportError, match="residual='deepnorm'.*export supports RoFormer v1"
  ):
    hf_export.check_exportable(config)


def test_wordpiece_matches_bert_tokenizer_and_exports(text_corpus, tmp_path):
  lines = [
    line
    for f in sorted(text_corpus.glob('*.txt'))
    for line in f.read_text(encoding='utf-8').splitlines()
    if line.strip()
  ]
  vocab_path = tmp_path / 'vocab.txt'
  vocab_path.write_bytes(tokenizer_lib.train_wordpiece(lines, 300))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from transformers import AutoTokenizer, BertTokenizer, BertTokenizerFast  # pylint: disable=g-import-not-at-top
  for lowercase in (True, False):
    tok = tokenizer_lib.load(str(vocab_path), lowercase=lowercase)
    assert tok.kind == 'wordpiece' and (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 2, 3)
    fast = BertTokenizerFast(str(vocab_path), do_lower_case=lowercase)
    slow = BertTokenizer(str(vocab_path), do_lower_case=lowercase)
    for text in SAMPLES + (lines[0],):
      ids = tok.encode(text).tolist()
      assert (
        ids
        == fast(text, add_special_tokens=False)['input_ids']
        == slow(text, add_special_tokens=False)['input_ids']
      ), text
    assert (
      pickle.loads(pickle.dumps(tok)).encode(SAMPLES[0]).tolist() == tok.encode(SAMPLES[0]).tolist()
    )
    out = tmp_path / f'hf{lowercase}'
    out.mkdir()
    for name, data in hf_tokenizer.hf_files(tok, 128).items():
      (out / name).write_bytes(data)
    auto = AutoTokenizer.from_pretrained(str(out))
    assert all(
      auto(t, add_special_tokens=False)['input_ids'] == tok.encode(t).tolist() for t in SAMPLES
    )
    assert hf_tokenizer.find_in_hf_dir(str(out)) == ('vocab.txt', lowercase)
    assert tokenizer_lib.load(str(out / 'vocab.txt')).sha256 == tok.sha256  # do_lower_case read
  # The pipeline ends documents with this vocabulary's [SEP] and never masks its specials.
  config = make_tiny_config(text_corpus, tmp_path)
  records = [{'text': line.encode()} for line in lines[:200]]
  batch = next(iter(pipeline.make_dataset(records, tok, config, train=False)))
  assert tok.sep_id in batch['tokens'] and np.all(
    batch['mlm_targets'][batch['mlm_weights'] > 0] >= tok.num_special
  )


def test_base_model_checkpoint_gets_a_fresh_head_and_extras_are_listed(v1_export):
  config, params, _, _, _ = v1_export
  state_dict = {
    k.removeprefix('roformer.'): v
    for k, v in hf_export.to_torch(params, config).items()
    if not k.startswith('cls.')
  }  # a RoFormerModel checkpoint: no prefix, no head
  state_dict['pooler.dense.weight'] = np.zeros((32, 32), np.float32)
  with pytest.raises(hf_import.FormatError, match='lacks cls.predictions.transform.dense.weight'):
    hf_import.from_torch(state_dict, config)
  fresh = jax.tree.map(np.zeros_like, params)
  back, report = hf_import.from_torch(state_dict, config, fill=fresh)
  assert report['ignored'] == ['pooler.dense.weight']
  assert sorted(report['filled']) == [
    'head/bias',
    'head/norm/bias',
    'head/norm/scale',
    'head/transform/bias',
    'head/transform/kernel',
  ]
  assert _same_tree(back['layers'], params['layers']) and not back['head']['bias'].any()


def test_bad_inputs_name_the_file_and_the_fix(v1_export, tiny_data, tmp_path):
  config, params, tok, source, root = v1_export
  hf_dir = root / 'hf'

  def import_error(directory, **kwargs):
    with pytest.raises(train.InputError) as e:
      hf_io.import_run(
        str(directory),
        str(tmp_path / 'never'),
        kwargs.pop('config', config),
        'launch/configs/roformer.py:tiny',
        frozenset(),
        **kwargs,
      )
    assert not (tmp_path / 'never').exists()
    return str(e.value)

  def copy_with(name, edit=None, drop=()):
    target = tmp_path / name
    shutil.copytree(hf_dir, target)
    for f in drop:
      (target / f).unlink()
    if edit:
      hf = json.loads((target / 'config.json').read_text())
      edit(hf)
      (target / 'config.json').write_text(json.dumps(hf))
    return target

  assert 'has no config.json' in import_error(tmp_path)
  msg = import_error(copy_with('bert', lambda hf: hf.update(model_type='bert')))
  assert "model_type='bert'" in msg and "'gau_alpha'" in msg
  msg = import_error(
    copy_with('wide', lambda hf: (hf.pop('encoder_pretrain'), hf.update(intermediate_size=96)))
  )
  assert 'intermediate.dense.weight has shape (64, 32) but config.json implies (96, 32)' in msg
  assert 'do not match their config.json' in msg
  msg = import_error(
    copy_with('family', lambda hf: hf.pop('encoder_pretrain')),
    config=make_tiny_config(ROOT, ROOT, preset='gau:tiny'),
  )
  assert 'holds a roformer checkpoint but --config is a gau config' in msg
  assert 'no vocab.txt (WordPiece) or tokenizer.model' in import_error(
    copy_with('notok', drop=('tokenizer.model',))
  )
  pt = copy_with('pt', drop=('model.safetensors',))
  (pt / 'pytorch_model.bin').write_bytes(b'not unpickled')
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    msg = import_error(pt)
    assert 'torch.load(weights_only=True), and torch is not installed' in msg
    assert 'save_file(' in msg
  with pytest.raises(train.InputError, match='is not an empty directory'):
    hf_io.export_run(str(root / 'run'), str(hf_dir))
  with pytest.raises(train.InputError, match='has no checkpoints/ directory'):
    hf_io.export_run(str(tmp_path), str(tmp_path / 'out'))
  # A DeepNet run (roformer family, DeepNorm residual) has no Hugging Face counterpart.
  deep = config.copy_and_resolve_references()
  deep.model.residual = 'deepnorm'
  _write_run(deep, params, tok, source, tmp_path / 'deep')
  with pytest.raises(train.InputError, match=r"model.residual='deepnorm' .*cannot be exported"):
    hf_io.export_run(str(tmp_path / 'deep'), str(tmp_path / 'deep_hf'))
  assert not (tmp_path / 'deep_hf').exists()


def test_convert_exits_2_with_one_paragraph(tmp_path):
  env = cpu_env()
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.convert',
      f'--from_hf={tmp_path}',
      f'--workdir={tmp_path / "w"}',
      '--config=launch/configs/roformer.py:tiny',
      '--config.train.num_train_steps=3',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert f'error: --from_hf={tmp_path} has no config.json' in result.stderr
  assert 'Traceback' not in result.stderr and os.listdir(tmp_path) == []


def _edited_export(root, target, config_edit=None, weights=None):
  """A copy of the fixture's export dir with config.json edited in place by `config_edit` and
  model.safetensors replaced by `weights(old bytes) -> new bytes`."""
  shutil.copytree(root / 'hf', target)
  if config_edit:
    hf = json.loads((target / 'config.json').read_text())
    config_edit(hf)
    (target / 'config.json').write_text(json.dumps(hf))
  if weights:
    (target / hf_weights.WEIGHTS).write_bytes(
      weights((root / 'hf' / hf_weights.WEIGHTS).read_bytes())
    )
  return target


def _moved_past_the_end(data: bytes) -> bytes:
  """The same file with the last tensor's data_offsets moved 1e6 bytes past the end."""
  n = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8 : 8 + n])
  last = max((k for k in header if k != '__metadata__'), key=lambda k: header[k]['data_offsets'][1])
  header[last]['data_offsets'] = [x + 10**6 for x in header[last]['data_offsets']]
  raw = json.dumps(header).encode()
  return len(raw).to_bytes(8, 'little') + raw + data[8 + n :]


def _import_error(directory, workdir, config) -> str:
  """The InputError message of importing `directory`; asserts nothing was written."""
  with pytest.raises(train.InputError) as e:
    hf_io.import_run(
      str(directory), str(workdir), config, 'launch/configs/roformer.py:tiny', frozenset()
    )
  assert not workdir.exists()
  return str(e.value)


def test_malformed_safetensors_is_named_before_the_library_reads_it(v1_export, tmp_path):
  config, root = v1_export[0], v1_export[4]
  size = (root / 'hf' / hf_weights.WEIGHTS).stat().st_size
  cases = {
    'offsets': (
      _moved_past_the_end,
      (
        "model.safetensors: tensor 'roformer.encoder.layer.1."
        "output.dense.weight' has data_offsets [",
        '], past the end of the ',
      ),
    ),
    'header': (
      lambda d: (2**60).to_bytes(8, 'little') + d[8:],
      (f'model.safetensors: header length {2**60} ', f'exceeds the file size of {size} bytes'),
    ),
    'truncated': (
      lambda d: d[:-1000],
      (
        f'model.safetensors is truncated: its data ends at '
        f'byte {size} but the file has {size - 1000} bytes',
      ),
    ),
  }
  for name, (corrupt, parts) in cases.items():
    directory = _edited_export(root, tmp_path / name, weights=corrupt)
    msg = _import_error(directory, tmp_path / 'never', config)
    assert msg.startswith(f'--from_hf={directory}: model.safetensors') and all(
      part in msg for part in parts
    ), msg


def test_config_json_is_checked_against_the_weight_shapes_first(v1_export, tmp_path):
  config, root = v1_export[0], v1_export[4]
  cases = {
    'num_hidden_layers': (3, 'but {} holds 2 layers'),
    'vocab_size': (
      100_000,
      'but {} holds roformer.embeddings.word_embeddings.weight of '
      'shape (512, 32); set vocab_size=512',
    ),
    'num_attention_heads': (0, 'must be an integer >= 1'),
  }
  for key, (value, message) in cases.items():
    directory = _edited_export(
      root,
      tmp_path / key,
      lambda hf, k=key, v=value: (hf.pop('encoder_pretrain'), hf.update({k: v})),
    )
    msg = _import_error(directory, tmp_path / 'never', config)
    assert f'config.json: {key}={value} ' in msg or f'config.json {key}={value} ' in msg, msg
    assert message.format(directory / hf_weights.WEIGHTS) in msg, msg


def test_convert_refuses_a_million_layers_at_once(v1_export, tmp_path):
  directory = _edited_export(
    v1_export[4], tmp_path / 'hf', lambda hf: hf.update(num_hidden_layers=1_000_000)
  )
  result = run_launcher(
    'launch.convert',
    f'--from_hf={directory}',
    f'--workdir={tmp_path / "w"}',
    '--config=launch/configs/roformer.py:tiny',
    timeout=60,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  weights_file = directory / hf_weights.WEIGHTS
  assert (
    f'error: config.json: num_hidden_layers=1000000 but {weights_file} holds 2 layers'
  ) in result.stderr
  assert 'Traceback' not in result.stderr and not (tmp_path / 'w').exists()
