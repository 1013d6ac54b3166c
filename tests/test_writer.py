"""Prediction writer: one 2018 JSON per GT video, every frame in order, dummies; GT -> 100."""

import json

import numpy as np
import pytest

from tdmi_jax import keypoints
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import writer


def test_gt_written_as_predictions_scores_100_on_real_fixtures(pt18_real, tmp_path):
  gt_dir = pt18_real / 'annotations' / 'val'
  stats = writer.write_predictions(writer.gt_as_predictions(str(gt_dir)), str(gt_dir),
                                   str(tmp_path))
  assert stats['videos'] == 3 and stats['unused_images'] == 0
  out = posetrack_map.evaluate_dirs(str(gt_dir), str(tmp_path))
  assert out['num_frames'] == 3
  assert out['summary']['Total'] == 100.0
  assert all(v == 100.0 or np.isnan(v) for v in out['per_joint'].values())


def test_files_mirror_gt_frames_with_dummies(pt18_real, tmp_path):
  gt_dir = pt18_real / 'annotations' / 'val'
  name = '009473_mpii_test.json'
  gt = json.loads((gt_dir / name).read_text())
  image_id = gt['images'][0]['id']
  kp = np.zeros((17, 3))
  kp[:, 0], kp[:, 1], kp[:, 2] = 100 + np.arange(17), 50, 0.5
  kp[3] = 0                                   # exactly (0, 0, 0): no prediction
  preds = {image_id: [{'keypoints': kp, 'score': 0.7, 'track_id': 4},
                      {'keypoints': kp + [1, 0, 0], 'score': 0.6, 'track_id': 4},
                      {'keypoints': kp, 'score': 0.5, 'track_id': None}],
           123: [{'keypoints': kp, 'score': 0.1, 'track_id': 0}]}
  stats = writer.write_predictions(preds, str(gt_dir), str(tmp_path))
  assert stats == {'videos': 3, 'frames': 3, 'dummy_frames': 2, 'linked_videos': 0,
                   'unused_images': 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      p.name for p in gt_dir.iterdir())
  out = json.loads((tmp_path / name).read_text())
  assert [i['id'] for i in out['images']] == [i['id'] for i in gt['images']]
  assert out['categories'][0]['keypoints'] == list(keypoints.JOINT_NAMES)
  anns = out['annotations']
  assert [a['track_id'] for a in anns] == [4, 0, 1]   # unique within the frame
  first = np.array(anns[0]['keypoints']).reshape(17, 3)
  np.testing.assert_array_equal(first[3], 0)
  np.testing.assert_array_equal(first[[0, 5], 2], 1)
  assert anns[0]['scores'][0] == 0.5 and anns[0]['score'] == 0.7
  # The other videos get the AP-neutral dummy person.
  other = json.loads((tmp_path / '003418_mpii_test.json').read_text())
  (dummy,) = other['annotations']
  assert dummy['scores'][16] == writer.DUMMY_SCORE
  assert np.count_nonzero(np.array(dummy['keypoints']).reshape(17, 3)[:, 2]) == 1


def test_dummy_people_do_not_change_the_ap(poseval_golden, tmp_path):
  # Re-write golden case 3's predictions through the writer (dummies on the frames that
  # have none): the official numbers come back.
  case = poseval_golden / 'case3'
  preds = {}
  for path in sorted((case / 'pred').iterdir()):
    for ann in json.loads(path.read_text())['annotations']:
      kp = np.array(ann['keypoints'], np.float64).reshape(17, 3)
      absent = (kp == 0).all(axis=1)
      kp[:, 2] = np.where(absent, 0.0, ann['scores'])
      preds.setdefault(ann['image_id'], []).append(
          {'keypoints': kp, 'score': ann['score'], 'track_id': ann['track_id']})
  stats = writer.write_predictions(preds, str(case / 'gt'), str(tmp_path))
  assert stats['dummy_frames'] == 3
  expected = json.loads((case / 'expected.json').read_text())
  got = posetrack_map.evaluate_dirs(str(case / 'gt'), str(tmp_path))
  for k, v in expected['per_joint'].items():
    assert got['per_joint'][k] == pytest.approx(v, abs=1e-6)


def test_annolist_gt_and_id_errors(tmp_path):
  gt_dir = tmp_path / 'gt'
  gt_dir.mkdir()
  frames = [{'image': [{'name': f'images/val/000342_mpii_test/{i:06d}.jpg'}],
             'annorect': []} for i in range(3)]
  (gt_dir / '000342_mpii_test.json').write_text(json.dumps({'annolist': frames}))
  kp = np.ones((17, 3))
  stats = writer.write_predictions({10003420001: [{'keypoints': kp, 'score': 1.0,
                                                   'track_id': 0}]},
                                   str(gt_dir), str(tmp_path / 'pred'))
  assert stats['dummy_frames'] == 2
  out = json.loads((tmp_path / 'pred' / '000342_mpii_test.json').read_text())
  assert [i['id'] for i in out['images']] == [10003420000, 10003420001, 10003420002]
  with pytest.raises(posetrack_map.EvalInputError, match='none of the 1 predicted'):
    writer.write_predictions({5: [{'keypoints': kp, 'score': 1.0, 'track_id': 0}]},
                             str(gt_dir), str(tmp_path / 'pred2'))
