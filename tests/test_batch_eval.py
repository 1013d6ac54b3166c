"""Batch evaluation: one short runlocal training (checkpoints at 2 and 4), then its tables.

The training and the real evaluation run in this process (one compile); the CLI is run as
a subprocess only where it stops before building a model (errors, --reuse).
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import synthetic
from tdmi_jax import keypoints
from tdmi_jax import train
from tdmi_jax.evaluation import batch_eval
from tdmi_jax.evaluation import tracking

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FLAG = '--config=configs/synthetic.py:runlocal'


def _config():
  config = synthetic.get_config('runlocal')
  config.num_train_steps = 4
  config.checkpoint.every_steps = 2
  config.eval.num_overlays = 0
  config.eval.track = True  # The tables' tracking columns too.
  return config


def _cli(workdir, *flags):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'tdmi_jax.batch_eval', CONFIG_FLAG, f'--workdir={workdir}',
         *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _read_csv(workdir):
  with open(os.path.join(workdir, 'batch_eval', 'map_per_step.csv')) as f:
    return list(csv.DictReader(f))


def _results(workdir, step):
  with open(os.path.join(workdir, f'eval_results_{step}.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 training steps (checkpoints 2 and 4), the final eval at 4, then batch eval of all."""
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(_config(), workdir, mode='train_and_eval')
  assert batch_eval.available_steps(workdir) == [2, 4]
  # The driver's own final evaluation of the in-memory state at step 4.
  during_training = _results(workdir, 4)
  during_training['predictions'] = _predictions(workdir, 4)
  os.remove(os.path.join(workdir, 'eval_results_4.json'))
  # What a training run still saving here looks like: batch eval must neither list nor
  # clean it up.
  os.makedirs(os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1', 'state'))
  rows = batch_eval.map_per_step(_config(), workdir, steps='all')
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1'))
  return workdir, during_training, rows


def _predictions(workdir, step):
  """{file: [(image_id, keypoints)]} of predictions/<step>/."""
  pred_dir = os.path.join(workdir, 'predictions', str(step))
  out = {}
  for name in sorted(os.listdir(pred_dir)):
    with open(os.path.join(pred_dir, name)) as f:
      data = json.load(f)
    out[name] = [(a['image_id'], a['keypoints']) for a in data['annotations']]
  assert out and any(out.values())
  return out


def test_all_steps_write_csv_md_png_matching_eval_results(trained):
  workdir, during_training, rows = trained
  assert [r['step'] for r in rows] == [2, 4]
  table = _read_csv(workdir)
  assert list(table[0]) == list(batch_eval.COLUMNS + batch_eval.MOT_COLUMNS)
  assert len(batch_eval.COLUMNS) == 1 + 15 + 8 and len(batch_eval.MOT_COLUMNS) == 8 + 3
  assert [int(r['step']) for r in table] == [2, 4]
  for r in table:
    result = _results(workdir, int(r['step']))
    assert result['step'] == int(r['step'])
    assert float(r['Total']) == result['summary']['Total']
    for name in keypoints.POSEVAL_JOINT_NAMES:
      want = result['per_joint'][name]
      got = float(r[name])
      assert (np.isnan(got) if want is None else got == want), name
    mot = tracking.columns(result['tracking'])
    assert list(mot) == list(batch_eval.MOT_COLUMNS)
    for name, want in mot.items():
      assert float(r[name]) == pytest.approx(want, abs=1e-12, nan_ok=True), name
    assert os.path.isdir(os.path.join(workdir, 'predictions', r['step']))
  # The restored step-4 checkpoint scores exactly what the training process measured.
  assert rows[1]['Total'] == during_training['summary']['Total']
  assert _results(workdir, 4)['summary'] == during_training['summary']
  assert _results(workdir, 4)['tracking'] == during_training['tracking']
  # mAP is 0 after 4 steps, so also compare the predicted keypoints themselves.
  restored = _predictions(workdir, 4)
  assert restored.keys() == during_training['predictions'].keys()
  for name, people in restored.items():
    want = during_training['predictions'][name]
    assert [i for i, _ in people] == [i for i, _ in want]
    np.testing.assert_allclose([k for _, k in people], [k for _, k in want], rtol=1e-6)
  md = open(os.path.join(workdir, 'batch_eval', 'map_per_step.md')).read().splitlines()
  assert md[0].startswith('| step | right_ankle |') and md[0].endswith('| Rec Total |')
  assert len(md) == 4 and md[2].startswith('| 2 |') and md[3].startswith('| 4 |')
  cells = dict(zip(md[0].split(' | '), md[3].split(' | ')))
  assert cells['Total'] == f"{during_training['summary']['Total']:.1f}"
  assert cells['MOTA Total'] == f"{during_training['tracking']['total']['MOTA']:.1f}"
  png = open(os.path.join(workdir, 'batch_eval', 'map_over_steps.png'), 'rb').read()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


def test_steps_last_gives_one_row_and_reuse_skips_evaluation(trained):
  workdir, _, _ = trained
  # --reuse: eval_results_4.json exists, so no model is built; the CLI reads it.
  proc = _cli(workdir, '--steps=last', '--reuse')
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = _read_csv(workdir)
  assert [int(r['step']) for r in table] == [4]
  assert float(table[0]['Total']) == _results(workdir, 4)['summary']['Total']
  assert float(table[0]['MOTA Total']) == _results(workdir, 4)['tracking']['total']['MOTA']
  assert '| 4 |' in proc.stdout


def test_reuse_reads_existing_results_instead_of_evaluating(tmp_path):
  # Checkpoint folders that cannot be restored: only --reuse can succeed here.
  for step in (10, 20):
    os.makedirs(tmp_path / 'checkpoints' / str(step) / 'state')
    summary = {c: float(step) for c in batch_eval.SUMMARY_COLUMNS}
    summary['Total'] = 50.0 + step
    per_joint = {n: float(i) for i, n in enumerate(keypoints.POSEVAL_JOINT_NAMES)}
    per_joint['neck'] = None  # NaN in the JSON
    (tmp_path / f'eval_results_{step}.json').write_text(json.dumps(
        {'summary': summary, 'per_joint': per_joint, 'num_frames': 3, 'step': step}))
  rows = batch_eval.map_per_step(_config(), str(tmp_path), steps='20,10', reuse=True)
  assert [r['step'] for r in rows] == [10, 20]
  table = _read_csv(tmp_path)
  assert list(table[0]) == list(batch_eval.COLUMNS)  # No tracking results: no MOT columns.
  assert [float(r['Total']) for r in table] == [60.0, 70.0]
  assert np.isnan(float(table[0]['neck'])) and float(table[0]['nose']) == 13.0
  assert '| - |' in (tmp_path / 'batch_eval' / 'map_per_step.md').read_text()


def test_unknown_step_fails_listing_available_steps(trained):
  workdir, _, _ = trained
  proc = _cli(workdir, '--steps=2,3')
  assert proc.returncode != 0
  assert 'no checkpoint for step(s) [3]' in proc.stderr
  assert 'available steps: [2, 4]' in proc.stderr
  with pytest.raises(batch_eval.BatchEvalError, match="--steps='latest': expected 'all'"):
    batch_eval.select_steps('latest', [2, 4])
  assert batch_eval.select_steps('4, 2,4', [2, 4]) == [2, 4]


def test_workdir_without_checkpoints_fails_clearly(tmp_path):
  proc = _cli(tmp_path / 'empty')
  assert proc.returncode != 0
  assert 'No checkpoints under' in proc.stderr and str(tmp_path / 'empty') in proc.stderr
  assert not (tmp_path / 'empty').exists()  # nothing created on bad input


def test_unrestorable_checkpoint_names_it(trained, tmp_path):
  workdir, _, _ = trained
  os.makedirs(tmp_path / 'checkpoints' / '2' / 'state')
  config = _config()
  config.data.manual_dir = os.path.join(workdir, 'data', 'synthetic')  # no new dataset
  config.data.data_dir = os.path.join(workdir, 'data', 'tfds')
  with pytest.raises(batch_eval.BatchEvalError, match='Cannot restore .*checkpoints/2'):
    batch_eval.map_per_step(config, str(tmp_path), steps='2')
  assert not (tmp_path / 'batch_eval').exists()
