"""COCO-style OKS keypoint AP (pycocotools) of the same prediction files (a secondary metric).

GT: the 2018-format per-video files of gt_dir; only frames with GT people are evaluated,
every annotated joint counts as visible (v = 2), the area is the GT box's (bbox or, when
absent, the keypoint extent enlarged as PoseTrack's boxes are). Ignore regions have no COCO
counterpart and are not applied. Predictions: the writer's files (its dummy people are
skipped); the person `score` ranks detections, COCO's 17 OKS sigmas are used.
"""

import contextlib
import io
import os

import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from tdmi_jax import fileio
from tdmi_jax import keypoints
from tdmi_jax.data import parsers
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import writer

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75', 'ARm', 'ARl')


def _keypoints(ann, path):
  try:
    return np.asarray(ann['keypoints'], np.float64).reshape(keypoints.NUM_JOINTS, 3)
  except (KeyError, TypeError, ValueError):
    raise posetrack_map.EvalInputError(
        f'{path}: an annotation lacks {3 * keypoints.NUM_JOINTS} keypoint values') from None


def _read(path):
  data = fileio.load_json(path, posetrack_map.EvalInputError)
  if not isinstance(data, dict) or 'images' not in data:
    raise posetrack_map.EvalInputError(
        f'{path}: COCO keypoint AP reads 2018-format files only')
  return data


def coco_keypoint_ap(gt_dir, pred_dir):
  """{'AP', 'AP50', ..., 'ARl'} (fractions in [0, 1]) of pred_dir against gt_dir."""
  gt_images, gt_anns, dets = [], [], []
  for path in posetrack_map.gt_files(gt_dir):
    name = os.path.basename(path)
    pred_path = os.path.join(pred_dir, name)
    if not os.path.isfile(pred_path):
      raise posetrack_map.EvalInputError(f'{pred_path}: prediction file does not exist')
    gt = _read(path)
    labeled = set()
    for ann in gt.get('annotations') or []:
      kp = _keypoints(ann, path)
      annotated = ~((kp[:, 0] == 0) & (kp[:, 1] == 0) & (kp[:, 2] == 0))
      if not annotated.any():
        continue
      kp[:, 2] = np.where(annotated, 2, 0)
      kp[~annotated, :2] = 0
      bbox = ann.get('bbox')
      if bbox is None or len(bbox) != 4:
        bbox = parsers.box_from_keypoints(np.where(annotated[:, None], kp, 0)).tolist()
      labeled.add(ann['image_id'])
      gt_anns.append({'id': len(gt_anns) + 1, 'image_id': ann['image_id'], 'category_id': 1,
                      'keypoints': kp.ravel().tolist(), 'bbox': [float(v) for v in bbox],
                      'area': float(bbox[2] * bbox[3]), 'iscrowd': 0,
                      'num_keypoints': int(annotated.sum())})
    gt_images.extend({'id': i['id']} for i in gt['images'] if i['id'] in labeled)
    for ann in _read(pred_path).get('annotations') or []:
      if ann.get('image_id') not in labeled or writer.DUMMY_SCORE in (ann.get('scores')
                                                                       or []):
        continue
      kp = _keypoints(ann, pred_path)
      dets.append({'image_id': ann['image_id'], 'category_id': 1,
                   'keypoints': kp.ravel().tolist(), 'score': float(ann.get('score', 0))})
  if not gt_anns:
    raise posetrack_map.EvalInputError(f'{gt_dir}: no annotated GT person to evaluate')
  if not dets:
    return {k: 0.0 for k in STAT_NAMES}
  with contextlib.redirect_stdout(io.StringIO()):
    gt_coco = coco_api.COCO()
    gt_coco.dataset = {'images': gt_images, 'annotations': gt_anns,
                       'categories': [{'id': 1, 'name': 'person'}]}
    gt_coco.createIndex()
    dt_coco = gt_coco.loadRes(dets)
    ev = cocoeval.COCOeval(gt_coco, dt_coco, 'keypoints')
    ev.params.imgIds = sorted(i['id'] for i in gt_images)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
