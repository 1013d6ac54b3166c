"""`python -m tdmi_jax.evaluate`: table, --json_out schema, clear errors."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from tdmi_jax import fileio
from tdmi_jax import keypoints
from tdmi_jax.evaluation import evaluate
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import writer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cli_prints_table_and_writes_json(poseval_golden, tmp_path):
  case = poseval_golden / 'case3'
  out = tmp_path / 'eval_results.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'tdmi_jax.evaluate', '--gt_dir', str(case / 'gt'),
       '--pred_dir', str(case / 'pred'), '--json_out', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  expected = json.loads((case / 'expected.json').read_text())
  lines = proc.stdout.splitlines()
  header = next(i for i, l in enumerate(lines) if 'Head' in l)
  assert lines[header].split('&')[1:] == [
      ' Head ', ' Shou ', ' Elb  ', ' Wri  ', ' Hip  ', ' Knee ', ' Ankl ', ' Total\\\\']
  row = [float(c.strip(' \\')) for c in lines[header + 1].split('&')[1:]]
  assert row == [round(expected['summary'][c], 1) for c in keypoints.SUMMARY_COLUMNS]
  assert '# evaluated frames: 27' in proc.stdout

  written = json.loads(out.read_text())
  assert list(written) == ['summary', 'per_joint', 'num_frames']
  assert list(written['summary']) == list(keypoints.SUMMARY_COLUMNS)
  assert list(written['per_joint']) == list(keypoints.POSEVAL_JOINT_NAMES)
  assert written['num_frames'] == 27
  for k, v in expected['per_joint'].items():
    assert written['per_joint'][k] == pytest.approx(v, abs=1e-6)
  # The library API returns the same dict.
  api = posetrack_map.evaluate_dirs(str(case / 'gt'), str(case / 'pred'))
  assert api == written


def test_cli_missing_prediction_names_videos(poseval_golden, tmp_path, capsys):
  pred = tmp_path / 'pred'
  shutil.copytree(poseval_golden / 'case3' / 'pred', pred)
  (pred / '000102_mpii_test.json').unlink()
  (pred / '000103_mpiinew_test.json').unlink()
  out = tmp_path / 'r.json'
  rc = evaluate.main(['--gt_dir', str(poseval_golden / 'case3' / 'gt'),
                      '--pred_dir', str(pred), '--json_out', str(out)])
  assert rc != 0
  err = capsys.readouterr().err
  assert '000102_mpii_test.json' in err and '000103_mpiinew_test.json' in err
  assert not out.exists()


def test_cli_malformed_and_frame_mismatch(poseval_golden, tmp_path, capsys):
  pred = tmp_path / 'pred'
  shutil.copytree(poseval_golden / 'case3' / 'pred', pred)
  bad = pred / '000101_mpii_test.json'
  bad.write_text('{"images": [}')
  gt = str(poseval_golden / 'case3' / 'gt')
  assert evaluate.main(['--gt_dir', gt, '--pred_dir', str(pred)]) != 0
  assert f'{bad}: malformed JSON' in capsys.readouterr().err

  data = json.loads((poseval_golden / 'case3' / 'pred' / bad.name).read_text())
  data['images'] = data['images'][:-1]
  bad.write_text(json.dumps(data))
  assert evaluate.main(['--gt_dir', gt, '--pred_dir', str(pred)]) != 0
  err = capsys.readouterr().err
  assert str(bad) in err and '19 prediction frames' in err and '20' in err


def test_nan_joint_written_as_null(tmp_path):
  result = posetrack_map.summarize([float('nan')] + [50.0] * 14)
  result['num_frames'] = 1
  fileio.write_json(tmp_path / 'r.json', result)
  written = json.loads((tmp_path / 'r.json').read_text())
  assert written['per_joint']['right_ankle'] is None
  assert written['summary']['Ankl'] is None
  assert written['summary']['Total'] == 50.0


def test_written_gt_predictions_score_100_through_the_cli(pt18_real, tmp_path, capsys):
  gt_dir = str(pt18_real / 'annotations' / 'val')
  writer.write_predictions(writer.gt_as_predictions(gt_dir), gt_dir, str(tmp_path / 'pred'))
  assert len(list((tmp_path / 'pred').iterdir())) == 3
  assert evaluate.main(['--gt_dir', gt_dir, '--pred_dir', str(tmp_path / 'pred'),
                        '--json_out', str(tmp_path / 'eval_results.json')]) == 0
  out = json.loads((tmp_path / 'eval_results.json').read_text())
  assert out['summary']['Total'] == 100.0 and out['num_frames'] == 3


def test_cli_track_prints_mot_table_after_ap_and_writes_tracking_json(tmp_path):
  case = ROOT / 'tests' / 'testdata' / 'tracking_golden' / 'random1'  # 2017 format
  expected = json.loads((case / 'expected.json').read_text())
  out = tmp_path / 'r.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'tdmi_jax.evaluate', '--gt_dir', str(case / 'gt'),
       '--pred_dir', str(case / 'pred'), '--track', '--json_out', str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  ap_row = next(i for i, l in enumerate(lines) if 'Head' in l) + 1
  mot = lines.index('Multiple Object Tracking (MOT) metrics:')
  assert mot > ap_row
  # The official tool's three printed lines, character for character.
  assert lines[mot + 1:mot + 4] == expected['table']
  written = json.loads(out.read_text())
  assert list(written) == ['summary', 'per_joint', 'num_frames', 'tracking']
  assert list(written['tracking']) == ['per_joint', 'total']
  assert list(written['tracking']['per_joint']) == list(keypoints.POSEVAL_JOINT_NAMES)
  for joint, values in written['tracking']['per_joint'].items():
    assert list(values) == ['MOTA', 'MOTP', 'Prec', 'Rec']
    for k, v in values.items():
      assert v == pytest.approx(expected['per_joint'][joint][k], abs=1e-6)
  assert written['tracking']['total'] == pytest.approx(expected['total'], abs=1e-6)
  # Without --track the AP output stays as it was.
  assert evaluate.main(['--gt_dir', str(case / 'gt'), '--pred_dir', str(case / 'pred'),
                        '--json_out', str(out)]) == 0
  assert list(json.loads(out.read_text())) == ['summary', 'per_joint', 'num_frames']


def test_cli_track_error_names_the_file(tmp_path, capsys):
  case = ROOT / 'tests' / 'testdata' / 'tracking_golden' / 'perfect'  # 2018 format
  pred = tmp_path / 'pred'
  shutil.copytree(case / 'pred', pred)
  name = next(pred.iterdir())
  data = json.loads(name.read_text())
  del data['annotations'][0]['track_id']
  name.write_text(json.dumps(data))
  args = ['--gt_dir', str(case / 'gt'), '--pred_dir', str(pred)]
  assert evaluate.main(args) == 0  # AP needs no track ids.
  assert evaluate.main(args + ['--track']) == 1
  assert f'{name}: a person in frame 0 has no track_id' in capsys.readouterr().err
