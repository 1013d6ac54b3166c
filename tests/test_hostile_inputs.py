"""Hostile inputs that used to end in a bare traceback or be accepted silently.

launch.py: a --workdir that is a file or cannot be created, a batch size of 0. The evaluate
CLI: coordinates too large for a float, NaN/Inf coordinates or scores, a GT folder holding
a *.json that is not JSON. Each must be one clear error naming the flag, file or
annotation, with a non-zero exit.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tdmi_jax.evaluation import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = '--config=configs/synthetic.py:runlocal'


def _launch(env, *args):
  proc = subprocess.run([sys.executable, 'launch.py', RUNLOCAL, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('ERROR:')]
  return proc, errors


def _assert_one_error_line(proc, errors, *names):
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert len(errors) == 1, proc.stderr[-3000:]
  for name in names:
    assert name in errors[0], errors[0]


def test_launch_workdir_that_is_a_file(env, tmp_path):
  path = tmp_path / 'not_a_dir'
  path.write_text('keep me')
  proc, errors = _launch(env, f'--workdir={path}')
  _assert_one_error_line(proc, errors, '--workdir', str(path), 'not a directory')
  assert path.read_text() == 'keep me'


def test_launch_workdir_that_cannot_be_created(env, tmp_path):
  if os.geteuid() == 0:
    # Permission bits do not stop root; sysfs refuses new directories even to root.
    path = pathlib.Path('/sys/tdmi_unwritable/run')
  else:
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    path = locked / 'run'
  proc, errors = _launch(env, f'--workdir={path}')
  _assert_one_error_line(proc, errors, '--workdir', str(path))
  assert not path.exists()


def test_launch_batch_size_zero_fails_before_any_work(env, tmp_path):
  workdir = tmp_path / 'run'
  proc, errors = _launch(env, f'--workdir={workdir}', '--config.batch_size=0')
  _assert_one_error_line(proc, errors, 'config.batch_size=0')
  # Checked before the synthetic dataset is generated or anything is written.
  assert not (workdir / 'data').exists() and not (workdir / 'config.json').exists()


# --- The evaluate CLI ----------------------------------------------------------------


@pytest.fixture()
def case(poseval_golden, tmp_path):
  """A writable copy of golden case3 (2018 format) and the first annotated prediction."""
  root = tmp_path / 'case3'
  shutil.copytree(poseval_golden / 'case3', root)
  pred = sorted((root / 'pred').glob('*.json'))[0]
  data = json.loads(pred.read_text())
  index = next(i for i, a in enumerate(data['annotations']) if a.get('scores'))
  return root, pred, data, index


def _evaluate(root, capsys):
  rc = evaluate.main(['--gt_dir', str(root / 'gt'), '--pred_dir', str(root / 'pred')])
  return rc, capsys.readouterr().err


@pytest.mark.parametrize('field, position, value, text', [
    ('keypoints', 0, '1' + '0' * 400, 'keypoints'),   # 10**400: too large for a float
    ('keypoints', 1, 'NaN', 'non-finite'),
    ('keypoints', 0, '-Infinity', 'non-finite'),
    ('scores', 0, 'NaN', 'non-finite'),
    ('scores', 3, 'Infinity', 'non-finite'),
])
def test_evaluate_rejects_values_no_float_can_rank(case, capsys, field, position, value, text):
  root, pred, data, index = case
  marker = 123456.5
  data['annotations'][index][field][position] = marker
  pred.write_text(json.dumps(data).replace(str(marker), value, 1))
  rc, err = _evaluate(root, capsys)
  assert rc == 1
  assert pred.name in err and f'annotations[{index}].{field}' in err and text in err, err
  assert 'Traceback' not in err


def test_evaluate_rejects_a_nan_head_box_in_the_ground_truth(case, capsys):
  root, pred, _, _ = case
  gt = root / 'gt' / pred.name
  data = json.loads(gt.read_text())
  index = next(i for i, a in enumerate(data['annotations']) if a.get('bbox_head'))
  data['annotations'][index]['bbox_head'][2] = float('nan')
  gt.write_text(json.dumps(data))
  rc, err = _evaluate(root, capsys)
  assert rc == 1 and gt.name in err and f'annotations[{index}].bbox_head' in err, err


def test_evaluate_rejects_non_finite_points_in_2017_files(poseval_golden, tmp_path, capsys):
  root = tmp_path / 'case4'
  shutil.copytree(poseval_golden / 'case4', root)
  pred = sorted((root / 'pred').glob('*.json'))[0]
  data = json.loads(pred.read_text())
  frame = next(f for f, fr in enumerate(data['annolist']) if fr.get('annorect'))
  point = data['annolist'][frame]['annorect'][0]['annopoints'][0]['point'][0]
  point['x'] = [float('inf')]
  pred.write_text(json.dumps(data))
  rc, err = _evaluate(root, capsys)
  assert rc == 1 and pred.name in err and f'annolist[{frame}]' in err, err
  assert 'non-finite' in err


def test_negative_scores_stay_legal(case, capsys):
  # poseval's own missing-score value is -9999 and the writer's AP-neutral dummy person
  # scores -100: a score only ranks, so a negative one is not an error.
  root, pred, data, index = case
  data['annotations'][index]['scores'] = [-5.0] * len(data['annotations'][index]['scores'])
  pred.write_text(json.dumps(data))
  rc, err = _evaluate(root, capsys)
  assert rc == 0, err


def test_non_json_file_in_the_gt_folder_is_named_as_unreadable(case, capsys):
  root, _, _, _ = case
  (root / 'gt' / 'notes.json').write_text('these are my notes, not JSON')
  rc, err = _evaluate(root, capsys)
  assert rc == 1
  assert 'notes.json' in err and 'malformed JSON' in err and 'gt' in err, err
  assert 'missing prediction' not in err
