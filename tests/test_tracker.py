"""The pose tracker (tdmi_jax.evaluation.tracker), alone and end to end: synthetic val
people predicted from their GT heatmaps, linked by the writer, scored by poseval's MOTA."""

import json
import pathlib

import numpy as np
import pytest

from configs import common
from configs import synthetic as synthetic_config
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import map_eval
from tdmi_jax.evaluation import tracker
from tdmi_jax.evaluation import writer


def _pose(centre, score=0.9, spread=30.0):
  rng = np.random.default_rng(int(centre[0] * 7 + centre[1]))
  kp = np.zeros((17, 3))
  kp[:, :2] = np.asarray(centre) + rng.uniform(-spread, spread, (17, 2))
  kp[:, 2] = score
  return kp


def _walk(t, start, step):
  return np.asarray(start, float) + t * np.asarray(step, float)


def test_link_follows_people_listed_in_any_order():
  # Three people walking; each frame lists them in a different order.
  rng = np.random.default_rng(0)
  starts, steps = [(100, 100), (300, 120), (500, 90)], [(4, 0), (-3, 2), (0, 5)]
  frames, order = [], []
  for t in range(10):
    perm = rng.permutation(3)
    order.append(perm)
    frames.append(np.stack([_pose((0, 0)) + np.r_[_walk(t, starts[i], steps[i]), 0]
                            for i in perm]))
  ids = tracker.link(frames)
  per_person = [list(ids[t][np.argsort(order[t])]) for t in range(10)]
  assert sorted(per_person[0]) == [0, 1, 2]
  assert all(p == per_person[0] for p in per_person)


def test_track_survives_missed_frames_up_to_max_age_then_restarts():
  a = lambda t: _pose((0, 0)) + np.r_[_walk(t, (100, 100), (3, 0)), 0]
  b = lambda t: _pose((0, 0)) + np.r_[_walk(t, (400, 100), (-3, 0)), 0]
  # b is missed in frames 2 and 3 (two linked frames), then in frames 6, 7 and 8.
  present = [[a, b], [a, b], [a], [a], [a, b], [a, b], [a], [a], [a], [a, b]]
  frames = [np.stack([p(t) for p in ps]) for t, ps in enumerate(present)]
  ids = tracker.link(frames, max_age=2)
  assert [list(i) for i in ids[:6]] == [[0, 1], [0, 1], [0], [0], [0, 1], [0, 1]]
  assert list(ids[9]) == [0, 2]  # Missed three linked frames: a new track.
  # Frames without people are not linked frames: they do not age a track.
  gaps = frames[:2] + [np.zeros((0, 17, 3))] * 5 + frames[4:6]
  assert [list(i) for i in tracker.link(gaps, max_age=0)] == [[0, 1], [0, 1]] + [[]] * 5 + [
      [0, 1], [0, 1]]


def test_dissimilar_people_start_new_tracks_and_low_scores_are_ignored():
  near, far = _pose((100, 100)), _pose((100, 100)) + np.r_[200, 0, 0]
  assert [list(i) for i in tracker.link([near[None], far[None]])] == [[0], [1]]
  # Joints below min_joint_score take no part: a pose whose confident joints agree links.
  noisy = near.copy()
  noisy[:8, :2] += 300
  noisy[:8, 2] = 0.05
  assert [list(i) for i in tracker.link([near[None], noisy[None]])] == [[0], [0]]
  assert tracker.oks_matrix(near[None], noisy[None], 0.2)[0, 0] == pytest.approx(1.0)
  assert tracker.oks_matrix(near[None], noisy[None], 0.0)[0, 0] < 0.6


def test_iou_similarity_and_bad_arguments():
  boxes = lambda t: np.array([[10 + t, 10, 50 + t, 90], [200 - t, 10, 240 - t, 90]], float)
  frames = [boxes(t)[::(1 if t % 2 else -1)] for t in range(6)]
  ids = tracker.link(frames, similarity='iou', min_similarity=0.5)
  for t in range(6):
    assert list(ids[t]) == ([0, 1] if t % 2 == 0 else [1, 0])  # Ids follow the boxes.
  np.testing.assert_allclose(tracker.iou_matrix(boxes(0)[:1], boxes(0)), [[1.0, 0.0]])
  with pytest.raises(ValueError, match='similarity'):
    tracker.link(frames, similarity='distance')
  with pytest.raises(ValueError, match='max_age'):
    tracker.link(frames, max_age=-1)


def test_writer_links_people_without_ids_and_keeps_given_ids(tmp_path):
  frames = [{'id': 100 + t, 'file_name': f'images/val/000001_a/{t:06d}.jpg'}
            for t in range(4)]
  pose = lambda t, x: {'keypoints': _pose((0, 0)) + np.r_[x + 2 * t, 100, 0], 'score': 1.0,
                       'track_id': None}
  preds = {100 + t: [pose(t, 300), pose(t, 50)][::(-1) ** t] for t in range(4)}
  linked, was_linked = writer.link_video(frames, preds)
  assert was_linked
  by_x = [{int(p['keypoints'][:, 0].mean() > 200): p['track_id'] for p in linked[100 + t]}
          for t in range(4)]
  assert all(m == by_x[0] for m in by_x) and set(by_x[0].values()) == {0, 1}
  given = {k: [dict(p, track_id=7 + i) for i, p in enumerate(v)] for k, v in preds.items()}
  kept, was_linked = writer.link_video(frames, given)
  assert kept is given and not was_linked
  counts = writer.write_video(str(tmp_path / 'v.json'), frames, preds, {'max_age': 0})
  assert counts['linked'] == 1
  written = json.loads((tmp_path / 'v.json').read_text())['annotations']
  assert sorted({a['track_id'] for a in written}) == [0, 1]


def test_config_fields_are_the_tracker_defaults():
  assert synthetic_config.get_config('').eval.tracker.to_dict() == tracker.DEFAULTS
  assert synthetic_config.get_config('').eval.track is False


def test_tracker_recovers_synthetic_track_ids_end_to_end(synthetic, tmp_path):
  """GT heatmaps of the synthetic val people -> decode -> writer (tracker) -> MOTA."""
  cfg = common.data_config('synthetic')
  cfg.manual_dir = str(synthetic)
  cfg.data_dir = str(tmp_path / 'tfds')
  cfg.image_size, cfg.heatmap_size, cfg.sigma = (128, 96), (64, 48), 1.0
  cfg.use_gt_boxes_for_val = True
  data = input_pipeline.EvalData(cfg, 4, process_index=0, process_count=1, device_count=1)
  gt_dir = input_pipeline.val_gt_dir(cfg)
  predictions = map_eval.predict(lambda b: b['target'], data, progress=False)
  assert all(p['track_id'] is None for ps in predictions.values() for p in ps)
  results = map_eval.finalize(predictions, gt_dir, str(tmp_path / 'w'), 3, track=True)
  mot = results['all']['tracking']
  assert mot['total']['MOTA'] > 95.0, mot['total']
  saved = json.loads((tmp_path / 'w' / 'eval_results.json').read_text())
  assert set(saved['tracking']) == {'per_joint', 'total'}
  assert map_eval.flat_metrics(results)['mota/Total'] == mot['total']['MOTA']

  # The ids themselves: every GT track is one predicted track and vice versa.
  pairs = set()
  for gt_file in sorted(pathlib.Path(gt_dir).glob('*.json')):
    gt = json.loads(gt_file.read_text())
    pred = json.loads((tmp_path / 'w' / 'predictions' / '3' / gt_file.name).read_text())
    for im in gt['images']:
      g = [a for a in gt['annotations'] if a['image_id'] == im['id']]
      p = [a for a in pred['annotations'] if a['image_id'] == im['id']]
      if not g:
        continue
      gk = np.array([a['keypoints'] for a in g]).reshape(len(g), 17, 3)[..., :2]
      pk = np.array([a['keypoints'] for a in p]).reshape(len(p), 17, 3)[..., :2]
      dist = np.abs(gk[:, None] - pk[None]).mean((2, 3))
      for i, j in enumerate(dist.argmin(1)):
        pairs.add((gt_file.name, g[i]['track_id'], p[j]['track_id']))
  gt_tracks = {(v, g) for v, g, _ in pairs}
  pred_tracks = {(v, p) for v, _, p in pairs}
  assert len(pairs) == len(gt_tracks) == len(pred_tracks) > 2

