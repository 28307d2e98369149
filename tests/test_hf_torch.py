"""The exports in PyTorch transformers >= 5, the documented path (docs/huggingface.md 6).

RoFormer v1 loads with AutoModelForMaskedLM / AutoModel; RoFormer-v2 and GAU-alpha (all three
GAU normalisations) with trust_remote_code=True, built from the code the export carries. Each
gives our logits on a batch with a padded row and AutoTokenizer gives our ids; without
trust_remote_code the v2 / GAU-alpha exports are refused; a PyTorch save_pretrained of the
loaded model imports back to our parameters bit for bit.

PyTorch runs in a separate interpreter: this one when it imports torch, else $TORCH_PYTHON (a
Python with torch and transformers >= 5, e.g. `python3.11 -m venv /tmp/pt && /tmp/pt/bin/pip
install torch transformers`; the test venv pins transformers < 5 for its Flax reference).
Without either the test skips; tests/test_hf_io.py keeps a reference that needs no torch.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import make_tiny_config
from models import hf_export
from models import hf_import
from pretrain import hf_io
from pretrain import hf_weights
from test_hf_io import _logits
from test_hf_io import _random_params
from test_hf_io import _same_tree
from test_hf_io import _write_run
from test_hf_io import SAMPLES

# (preset, model fields) of the exports checked: v1, v2 with another activation, GAU-alpha
# with each normalisation (and no token types, exported as one zero row).
CASES = {
  'v1': ('roformer:tiny', {}),
  'v2': ('roformer_v2:tiny', {'mlp_activation': 'gelu'}),
  'gau_softmax_plus': ('gau:tiny', {'attention_norm': 'softmax_plus'}),
  'gau_relu2': ('gau:tiny', {'attention_norm': 'relu2', 'type_vocab_size': 0}),
  'gau_softmax': ('gau:tiny', {'attention_norm': 'softmax', 'gau_activation': 'relu'}),
}

# Runs in the torch interpreter: argv[1] = a JSON list of export directories, each holding
# inputs.npz (ids, valid) and texts.json; writes torch_out.npz and torch_out.json there.
_TORCH_SCRIPT = r"""
import json, sys, warnings
import numpy as np
import torch
import transformers
warnings.simplefilter('ignore')
transformers.logging.set_verbosity_error()
for d in json.loads(sys.argv[1]):
  cfg = json.load(open(f'{d}/config.json'))
  remote = 'auto_map' in cfg
  report = {'transformers': transformers.__version__, 'refused_without_trust': None}
  if remote:
    try:
      transformers.AutoModelForMaskedLM.from_pretrained(d)
      report['refused_without_trust'] = False
    except ValueError as e:
      report['refused_without_trust'] = 'trust_remote_code' in str(e)
  inputs = np.load(f'{d}/inputs.npz')
  ids = torch.tensor(inputs['ids'], dtype=torch.long)
  mask = torch.tensor(inputs['valid'], dtype=torch.long)
  mlm = transformers.AutoModelForMaskedLM.from_pretrained(d, trust_remote_code=remote).eval()
  base = transformers.AutoModel.from_pretrained(d, trust_remote_code=remote).eval()
  with torch.no_grad():
    logits = mlm(ids, attention_mask=mask).logits.numpy()
    hidden = base(ids, attention_mask=mask).last_hidden_state.numpy()
  report['mlm_class'] = type(mlm).__name__
  report['base_class'] = type(base).__name__
  report['tied'] = mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
  tok = transformers.AutoTokenizer.from_pretrained(d)
  texts = json.load(open(f'{d}/texts.json'))
  report['ids'] = [tok(t, add_special_tokens=False)['input_ids'] for t in texts]
  mlm.save_pretrained(f'{d}/saved')
  np.savez(f'{d}/torch_out.npz', logits=logits, hidden=hidden)
  json.dump(report, open(f'{d}/torch_out.json', 'w'))
"""


def _torch_python():
  """An interpreter with torch and transformers >= 5, or None."""
  probe = 'import torch, transformers; print(transformers.__version__)'
  for python in (sys.executable, os.environ.get('TORCH_PYTHON')):
    if not python:
      continue
    try:
      out = subprocess.run(
        [python, '-c', probe], capture_output=True, text=True, timeout=300, check=True
      ).stdout
    except (OSError, subprocess.SubprocessError):
      continue
    if int(out.strip().split('.')[0]) >= 5:
      return python
  return None


@pytest.fixture(scope='module')
def torch_python():
  python = _torch_python()
  if python is None:
    pytest.skip(
      'needs torch and transformers >= 5 in this interpreter or in $TORCH_PYTHON '
      '(docs/huggingface.md 6)'
    )
  return python


def test_exports_load_in_pytorch_auto_classes_with_our_logits(
  torch_python, tiny_data, text_corpus, cache_dir, tmp_path
):
  _, source, tok = tiny_data
  runs = {}
  for name, (preset, fields) in CASES.items():
    config = make_tiny_config(text_corpus, cache_dir, preset=preset)
    config.model.update(fields)
    config.model.initializer_range = 0.2
    params = _random_params(config, seed=3)
    _write_run(config, params, tok, source, tmp_path / name / 'run')
    out = tmp_path / name / 'hf'
    hf_io.export_run(str(tmp_path / name / 'run'), str(out), max_position_embeddings=64)
    ids = np.stack([tok.encode(SAMPLES[0])[:24], tok.encode(SAMPLES[1])[:24]]).astype(np.int32)
    valid = np.ones_like(ids)
    valid[1, 11:] = 0  # a padded row, fewer keys than the 16 of softmax_plus
    np.savez(out / 'inputs.npz', ids=ids, valid=valid)
    (out / 'texts.json').write_text(json.dumps(SAMPLES))
    runs[name] = (config, params, ids, valid, out)
  env = {**os.environ, 'HF_MODULES_CACHE': str(tmp_path / 'hf_modules'), 'PYTHONPATH': ''}
  dirs = json.dumps([str(r[4]) for r in runs.values()])
  done = subprocess.run(
    [torch_python, '-c', _TORCH_SCRIPT, dirs], capture_output=True, text=True, env=env
  )
  assert done.returncode == 0, done.stderr[-3000:]
  for name, (config, params, ids, valid, out) in runs.items():
    report = json.loads((out / 'torch_out.json').read_text())
    got = np.load(out / 'torch_out.npz')
    hf = json.loads((out / 'config.json').read_text())
    family = config.model.family
    assert report['mlm_class'] == hf['architectures'][0], (name, report)
    assert report['base_class'] == hf['architectures'][0].replace('ForMaskedLM', 'Model')
    assert report['refused_without_trust'] is (None if family == 'roformer' else True), name
    assert report['tied'], name
    assert report['ids'] == [tok.encode(t).tolist() for t in SAMPLES], name
    ours = _logits(config, params, ids, valid)
    assert np.abs(ours).max() > 0.5
    keep = valid == 1
    np.testing.assert_allclose(got['logits'][keep], ours[keep], atol=1e-5, rtol=0, err_msg=name)
    if family != 'roformer':  # no MLM transform: logits = hidden states x embeddings^T
      embedding = np.asarray(params['embedder']['token']['embedding'])
      np.testing.assert_allclose(
        got['hidden'][keep] @ embedding.T, ours[keep], atol=1e-4, rtol=0, err_msg=name
      )
    # What PyTorch saves (tied decoder dropped) imports back to our parameters.
    _, state_dict = hf_weights.read_weights(str(out / 'saved'))
    back, _ = hf_import.from_torch(state_dict, config)
    assert _same_tree(back, params), name
    assert hf.get('auto_map') == hf_export.AUTO_MAP.get(family), name
