"""COCO OKS keypoint AP through pycocotools on the writer's prediction files."""

import pytest

from tdmi_jax.evaluation import coco_eval
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import writer


def _write(gt_dir, out_dir, shift=0.0, score=1.0):
  preds = writer.gt_as_predictions(str(gt_dir), score=score)
  for people in preds.values():
    for p in people:
      p['keypoints'][:, :2] += shift * (p['keypoints'][:, 2:] > 0)
  writer.write_predictions(preds, str(gt_dir), str(out_dir))


def test_coco_ap_of_gt_is_one_and_drops_with_error(pt18_real, tmp_path):
  gt_dir = pt18_real / 'annotations' / 'val'
  _write(gt_dir, tmp_path / 'exact')
  exact = coco_eval.coco_keypoint_ap(str(gt_dir), str(tmp_path / 'exact'))
  assert list(exact) == list(coco_eval.STAT_NAMES)
  assert exact['AP'] == pytest.approx(1.0)
  _write(gt_dir, tmp_path / 'off', shift=15.0)
  off = coco_eval.coco_keypoint_ap(str(gt_dir), str(tmp_path / 'off'))
  assert 0.0 <= off['AP'] < exact['AP']
  assert off['AP50'] >= off['AP75']


def test_coco_ap_missing_prediction_file(pt18_real, tmp_path):
  with pytest.raises(posetrack_map.EvalInputError, match='003418_mpii_test.json'):
    coco_eval.coco_keypoint_ap(str(pt18_real / 'annotations' / 'val'), str(tmp_path))
