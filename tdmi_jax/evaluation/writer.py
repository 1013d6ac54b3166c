"""Prediction files for poseval: one 2018-format JSON per GT video (SPEC §8).

`write_predictions(predictions, gt_dir, out_dir)` mirrors `gt_dir`: for every GT file it
writes `out_dir/<same name>` whose `images` are the GT's frames in the GT's order (poseval
pairs frames by position) and whose `annotations` are the predictions of those frames:
`keypoints` [51] (x, y, 1), `scores` [17], `score`, `track_id`. A frame without any
prediction gets one dummy person whose only point is the right ankle at (0, 0) with score
-100, which sinks to the bottom of the ranking and so leaves the AP unchanged.

A predicted joint given as exactly (0, 0, 0) is written as an unannotated landmark (0, 0, 0),
which poseval reads as "no prediction for this joint".

`predictions` is CONTRACTS.md's `{image_id: [{'keypoints': [17, 3] (x, y, score), 'score':
float, 'track_id': int or None}, ...]}`. A video in which no person has a track id (the
decoder gives none) is linked across its frames by the project's tracker
(tdmi_jax.evaluation.tracker, thresholds from `tracker_cfg` = config.eval.tracker), so that
its ids are worth a tracking evaluation; in a video with given ids, a missing or repeated
id is renumbered to be unique within its frame. Image ids are the GT's `images[].id` (2018
files) or, for 2017 annolist files, PoseTrack18's id rule on the image name
(`parsers.posetrack_image_id`).
"""

import os

from absl import logging
import numpy as np

from tdmi_jax import fileio
from tdmi_jax import keypoints
from tdmi_jax import paths
from tdmi_jax.data import parsers
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import tracker

DUMMY_SCORE = -100.0


def _category():
  return [{'supercategory': 'person', 'id': 1, 'name': 'person',
           'keypoints': list(keypoints.JOINT_NAMES),
           'skeleton': [[a + 1, b + 1] for a, b in keypoints.SKELETON]}]


def gt_frames(data, path):
  """The GT file's frames in order, as image dicts {'id', 'file_name', ...}."""
  if isinstance(data, dict) and 'annolist' in data:
    frames = []
    for f, entry in enumerate(data['annolist'] or []):
      try:
        name = posetrack_map.first_value(entry['image'])['name']
        seq = os.path.basename(os.path.dirname(name))
        image_id = parsers.posetrack_image_id(seq, parsers.frame_index_of(name))
      except (KeyError, TypeError, ValueError, IndexError) as e:
        raise posetrack_map.EvalInputError(
            f'{path}: annolist[{f}] has no usable image name ({e!r})') from None
      frames.append({'id': image_id, 'file_name': name})
    return frames
  images = data.get('images') if isinstance(data, dict) else None
  if not isinstance(images, list) or not all(isinstance(i, dict) and 'id' in i
                                             for i in images):
    raise posetrack_map.EvalInputError(
        f'{path}: expected a 2018-format file with "images" (each with an "id") or a 2017 '
        '"annolist"')
  keep = ('id', 'file_name', 'frame_id', 'vid_id', 'nframes', 'is_labeled')
  return [{k: im[k] for k in keep if k in im} for im in images]


def _dummy(image_id):
  kp = np.zeros((keypoints.NUM_JOINTS, 3))
  scores = np.zeros(keypoints.NUM_JOINTS)
  ankle = keypoints.JOINT_NAMES.index('right_ankle')
  kp[ankle, 2] = 1
  scores[ankle] = DUMMY_SCORE
  return {'image_id': image_id, 'category_id': 1, 'keypoints': kp.ravel().tolist(),
          'scores': scores.tolist(), 'score': 0.0, 'track_id': 0}


def _annotation(image_id, person, track_id):
  kp = np.asarray(person['keypoints'], np.float64).reshape(keypoints.NUM_JOINTS, 3)
  if not np.isfinite(kp).all():
    raise ValueError(f'image {image_id}: non-finite keypoints in a prediction')
  absent = (kp == 0).all(axis=1)
  out = np.concatenate([kp[:, :2], (~absent)[:, None].astype(np.float64)], axis=1)
  return {'image_id': image_id, 'category_id': 1, 'keypoints': out.ravel().tolist(),
          'scores': kp[:, 2].tolist(), 'score': float(person.get('score', 0.0)),
          'track_id': int(track_id)}


def _track_ids(people):
  """Track ids as given, made unique within the frame (poseval rejects duplicates)."""
  ids = [p.get('track_id') for p in people]
  used = {int(t) for t in ids if t is not None}
  seen, out, nxt = set(), [], 0
  for t in ids:
    if t is None or int(t) in seen:
      while nxt in used or nxt in seen:
        nxt += 1
      t = nxt
    seen.add(int(t))
    out.append(int(t))
  return out


def link_video(frames, predictions, tracker_cfg=None):
  """The people of `frames` (image dicts with 'id', in video order) with track ids from the
  tracker if none of them has one; else `predictions` as they are. Returns (predictions,
  linked: bool)."""
  people = [predictions.get(int(im['id'])) or [] for im in frames]
  if not any(people) or any(p.get('track_id') is not None for ps in people for p in ps):
    return predictions, False
  cfg = dict(tracker.DEFAULTS)
  cfg.update(tracker_cfg or {})
  poses = [np.stack([np.asarray(p['keypoints'], np.float64).reshape(keypoints.NUM_JOINTS, 3)
                     for p in ps]) if ps else np.zeros((0, keypoints.NUM_JOINTS, 3))
           for ps in people]
  if cfg['similarity'] == 'iou':
    poses = [tracker.pose_boxes(p, cfg['min_joint_score']) for p in poses]
  ids = tracker.link(poses, **cfg)
  out = dict(predictions)
  for im, ps, tids in zip(frames, people, ids):
    if ps:
      out[int(im['id'])] = [dict(p, track_id=int(t)) for p, t in zip(ps, tids)]
  return out, True


def write_video(path, frames, predictions, tracker_cfg=None):
  """Writes one 2018-format prediction file covering `frames` (image dicts with 'id') in order.

  People without track ids are linked first (`link_video`). Frames without people get the
  AP-neutral dummy. The file appears atomically. Returns {'dummy_frames', 'renumbered',
  'linked'} counts.
  """
  annotations = []
  predictions, linked = link_video(frames, predictions, tracker_cfg)
  counts = {'dummy_frames': 0, 'renumbered': 0, 'linked': int(linked)}
  for im in frames:
    image_id = int(im['id'])
    people = predictions.get(image_id) or []
    if not people:
      annotations.append(_dummy(image_id))
      counts['dummy_frames'] += 1
      continue
    tracks = _track_ids(people)
    counts['renumbered'] += sum(t != p.get('track_id') for t, p in zip(tracks, people))
    annotations.extend(_annotation(image_id, p, t) for p, t in zip(people, tracks))
  out = {'images': frames, 'annotations': annotations, 'categories': _category()}
  # The writer has checked its numbers; skipping the NaN scan keeps large files fast.
  fileio.write_json(path, out, indent=None, nan_as_null=False)
  return counts


def write_predictions(predictions, gt_dir, out_dir, tracker_cfg=None):
  """Writes one prediction JSON per GT video of gt_dir into out_dir.

  Returns {'videos', 'frames', 'dummy_frames', 'linked_videos', 'unused_images'} counts;
  predictions for image ids that no GT frame has are not written (and counted in
  'unused_images'). `tracker_cfg`: tracker thresholds for videos without track ids.
  """
  files = posetrack_map.gt_files(gt_dir)
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  predictions = {int(k): v for k, v in predictions.items()}
  seen = set()
  stats = {'videos': 0, 'frames': 0, 'dummy_frames': 0, 'linked_videos': 0}
  renumbered = 0
  for path in files:
    frames = gt_frames(fileio.load_json(path, posetrack_map.EvalInputError), path)
    seen.update(int(im['id']) for im in frames)
    counts = write_video(out_dir / path.name, frames, predictions, tracker_cfg)
    stats['dummy_frames'] += counts['dummy_frames']
    stats['linked_videos'] += counts['linked']
    renumbered += counts['renumbered']
    stats['videos'] += 1
    stats['frames'] += len(frames)
  if renumbered:
    logging.warning('write_predictions: %d missing or repeated track ids were renumbered '
                    'to be unique within their frame', renumbered)
  stats['unused_images'] = len(set(predictions) - seen)
  if predictions and stats['unused_images'] == len(predictions):
    raise posetrack_map.EvalInputError(
        f'{gt_dir}: none of the {len(predictions)} predicted image ids is a frame of these '
        'GT files (image ids must be the GT images[].id)')
  if stats['unused_images']:
    logging.warning('write_predictions: predictions for %d image ids that no GT file in %s '
                    'lists were not written', stats['unused_images'], gt_dir)
  return stats


def gt_as_predictions(gt_dir, score=1.0):
  """The GT people of gt_dir in the writer's input form (annotated joints at `score`)."""
  preds = {}
  for path in posetrack_map.gt_files(gt_dir):
    data = fileio.load_json(path, posetrack_map.EvalInputError)
    if 'annolist' in data:
      raise posetrack_map.EvalInputError(f'{path}: gt_as_predictions reads 2018 files only')
    for ann in data.get('annotations') or []:
      kp = np.asarray(ann['keypoints'], np.float64).reshape(keypoints.NUM_JOINTS, 3)
      annotated = ~((kp[:, 0] == 0) & (kp[:, 1] == 0) & (kp[:, 2] == 0))
      kp[:, 2] = np.where(annotated, score, 0.0)
      preds.setdefault(int(ann['image_id']), []).append(
          {'keypoints': kp, 'score': score, 'track_id': ann.get('track_id')})
  return preds
