"""poseval-exact PoseTrack AP: golden cases from the official tool, then hand-derived ones."""

import json

import numpy as np
import pytest

from configs import common
from tdmi_jax.evaluation import posetrack_map

CASES = ('case1', 'case2', 'case3', 'case4')


# --- Golden cases (numbers printed by the official poseval) ------------------------------


@pytest.mark.parametrize('case', CASES)
def test_golden_case_matches_official_poseval(poseval_golden, case):
  expected = json.loads((poseval_golden / case / 'expected.json').read_text())
  got = posetrack_map.evaluate_dirs(str(poseval_golden / case / 'gt'),
                                    str(poseval_golden / case / 'pred'))
  assert set(got) == {'summary', 'per_joint', 'num_frames'}
  assert list(got['per_joint']) == list(common.POSEVAL_JOINT_NAMES)
  assert list(got['summary']) == ['Head', 'Shou', 'Elb', 'Wri', 'Hip', 'Knee', 'Ankl',
                                  'Total']
  for name, value in expected['per_joint'].items():
    assert got['per_joint'][name] == pytest.approx(value, abs=1e-6), name
  for name, value in expected['summary'].items():
    assert got['summary'][name] == pytest.approx(value, abs=1e-6), name
  frames = int(expected['frames_lines'][0].split(':')[1])
  assert got['num_frames'] == frames


# --- Helpers for hand-made cases ---------------------------------------------------------

NAMES17 = list(common.JOINT_NAMES)
# poseval joint j lives in 2018 slot POSEVAL_FROM_POSETRACK[j].
SLOT = common.POSEVAL_FROM_POSETRACK


def _category():
  return [{'id': 1, 'name': 'person', 'supercategory': 'person', 'keypoints': NAMES17}]


def _image(vid, f, **extra):
  return dict(id=int(f'1{vid:06d}{f:04d}'),
              file_name=f'images/val/{vid:06d}_mpii_test/{f:06d}.jpg', **extra)


def _person(image_id, joints, track_id=0, head=(0, 0, 10, 0), scores=None):
  """joints: {poseval joint id: (x, y)}; head box [x, y, w, h] (default: size 6)."""
  kp = np.zeros((17, 3))
  sc = np.zeros(17)
  for j, (x, y) in joints.items():
    kp[SLOT[j]] = (x, y, 1)
    if scores is not None:
      sc[SLOT[j]] = scores[j] if isinstance(scores, dict) else scores
  ann = dict(image_id=image_id, category_id=1, track_id=track_id,
             keypoints=kp.ravel().tolist(), bbox_head=list(head))
  ann['scores'] = sc.tolist() if scores is not None else []
  return ann


def _video(images, annotations):
  return dict(images=images, annotations=annotations, categories=_category())


ALL = range(15)


def _grid(dx=0.0):
  return {j: (100.0 + 10 * j + dx, 50.0) for j in ALL}


def _ap(gt, pred):
  return posetrack_map.evaluate_videos([('v.json', gt, pred)])
