"""The linear probe during pretraining (pretrain/probe.py, docs/finetuning.md 8): it reads
the frozen encoder (training with a probe equals training without one, parameter for
parameter), it separates a task whose label is a word's presence, and its dev accuracy lands
in metrics.jsonl as split 'probe' at its cadence; bad probe files fail before training."""

import json

import jax
import numpy as np
import pytest

from helpers import make_tiny_config
from pretrain import checkpointing
from pretrain import mesh as mesh_lib
from pretrain import train

WORDS = 'the a of to and in is it for on with as by this that from value list name file'.split()


@pytest.fixture(scope='module')
def marker_files(tmp_path_factory):
  """train.tsv / dev.tsv: label 1 iff the word 'zebra' occurs."""
  root = tmp_path_factory.mktemp('probe')
  rng = np.random.default_rng(0)
  for name, n in (('train.tsv', 200), ('dev.tsv', 100)):
    rows = []
    for _ in range(n):
      words = list(rng.choice(WORDS, rng.integers(4, 10)))
      label = int(rng.random() < 0.5)
      if label:
        words.insert(int(rng.integers(0, len(words) + 1)), 'zebra')
      rows.append(f'{label}\t{" ".join(words)}\n')
    (root / name).write_text(''.join(rows))
  return root


def _train(config, workdir):
  """Trains through `train.train_and_evaluate`; returns the final checkpoint's state."""
  train.train_and_evaluate(config, str(workdir))
  run_setup = train.setup(config, mesh_lib.make_mesh(config.mesh))
  ckpt = checkpointing.Checkpointer(str(workdir))
  try:
    return jax.device_get(ckpt.restore(config.train.num_train_steps, run_setup.abstract_state))
  finally:
    ckpt.close()


def test_the_probe_reads_a_frozen_encoder_and_logs_its_accuracy(
  text_corpus, cache_dir, marker_files, tmp_path
):
  base = make_tiny_config(text_corpus, cache_dir, **{'train.progress': 'off'})
  with_probe = make_tiny_config(
    text_corpus,
    cache_dir,
    **{
      'train.progress': 'off',
      'probe.train_file': str(marker_files / 'train.tsv'),
      'probe.dev_file': str(marker_files / 'dev.tsv'),
      'probe.every_steps': 2,
      'probe.max_seq_len': 16,
    },
  )
  plain = _train(base, tmp_path / 'plain')
  probed = _train(with_probe, tmp_path / 'probed')
  # The probe never changes training: the same parameters and optimizer state, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, plain, probed)
  lines = [json.loads(l) for l in (tmp_path / 'probed' / 'metrics.jsonl').read_text().splitlines()]
  probes = [l for l in lines if l['split'] == 'probe']
  assert [l['step'] for l in probes] == [2, 4, 6]
  # Whether a word occurs is linearly readable from mean-pooled features of any encoder that
  # embeds tokens: far above chance (0.5) on held-out examples.
  assert all(l['accuracy'] >= 0.8 for l in probes), probes
  assert all(0 < l['time_fraction'] for l in probes)
  assert '"split": "probe"' not in (tmp_path / 'plain' / 'metrics.jsonl').read_text()


def test_probe_files_must_come_in_pairs(text_corpus, cache_dir, marker_files, tmp_path):
  config = make_tiny_config(
    text_corpus, cache_dir, **{'probe.train_file': str(marker_files / 'train.tsv')}
  )
  with pytest.raises(train.InputError, match='probe.train_file and --config.probe.dev_file'):
    train.prepare(config, str(tmp_path / 'run'))
  config.probe.dev_file = str(marker_files / 'missing.tsv')
  with pytest.raises(train.InputError, match='missing.tsv'):
    train.prepare(config, str(tmp_path / 'run2'))
