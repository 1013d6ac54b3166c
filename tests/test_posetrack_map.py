"""poseval-exact PoseTrack AP: golden cases from the official tool, then hand-derived ones."""

import json

import numpy as np
import pytest

from tdmi_jax import keypoints
from tdmi_jax.evaluation import posetrack_map

# case3/case4 are synthetic (tests/testdata); case1/case2 are built on real PoseTrack18 files.
CASES = (('case1', 'poseval_golden_real'), ('case2', 'poseval_golden_real'),
         ('case3', 'poseval_golden'), ('case4', 'poseval_golden'))


# --- Golden cases (numbers printed by the official poseval) ------------------------------


@pytest.mark.parametrize('case, where', CASES)
def test_golden_case_matches_official_poseval(case, where, request):
  poseval_golden = request.getfixturevalue(where)
  expected = json.loads((poseval_golden / case / 'expected.json').read_text())
  got = posetrack_map.evaluate_dirs(str(poseval_golden / case / 'gt'),
                                    str(poseval_golden / case / 'pred'))
  assert set(got) == {'summary', 'per_joint', 'num_frames'}
  assert list(got['per_joint']) == list(keypoints.POSEVAL_JOINT_NAMES)
  assert list(got['summary']) == ['Head', 'Shou', 'Elb', 'Wri', 'Hip', 'Knee', 'Ankl',
                                  'Total']
  for name, value in expected['per_joint'].items():
    assert got['per_joint'][name] == pytest.approx(value, abs=1e-6), name
  for name, value in expected['summary'].items():
    assert got['summary'][name] == pytest.approx(value, abs=1e-6), name
  frames = int(expected['frames_lines'][0].split(':')[1])
  assert got['num_frames'] == frames


# --- Helpers for hand-made cases ---------------------------------------------------------

NAMES17 = list(keypoints.JOINT_NAMES)
# poseval joint j lives in 2018 slot POSEVAL_FROM_POSETRACK[j].
SLOT = keypoints.POSEVAL_FROM_POSETRACK


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


def _one_frame(gt_people, pred_people, **image_extra):
  img = _image(1, 0, **image_extra)
  gt = _video([img], [_person(img['id'], j, track_id=t, **kw)
                      for t, (j, kw) in enumerate(gt_people)])
  pred = _video([_image(1, 0)], [_person(img['id'], j, track_id=t, scores=s)
                                 for t, (j, s) in enumerate(pred_people)])
  return gt, pred


# --- Hand-derived cases --------------------------------------------------------------------


def test_perfect_predictions_give_100():
  gt, pred = _one_frame([(_grid(), {})], [(_grid(), 0.7)])
  out = _ap(gt, pred)
  assert out['num_frames'] == 1
  assert all(v == 100.0 for v in out['per_joint'].values())
  assert out['summary']['Total'] == 100.0


def test_threshold_is_inclusive_at_half_a_head_size():
  # Head box 10 x 0 -> head size 6; threshold 3 px. Joint 0 exactly 3 px off: match.
  # Joint 1 just over: its prediction is a false positive and the GT joint is missed.
  joints = _grid()
  joints[0] = (joints[0][0] + 3.0, joints[0][1])
  joints[1] = (joints[1][0], joints[1][1] + 3.0001)
  gt, pred = _one_frame([(_grid(), {})], [(joints, 0.7)])
  out = _ap(gt, pred)['per_joint']
  assert out['right_ankle'] == 100.0
  assert out['right_knee'] == 0.0


def test_duplicate_with_lower_score_that_matches_better_wins():
  # A (score 0.9) has 7 correct joints, B (score 0.5) all 15: the GT takes B (PCKh 1 > 7/15)
  # regardless of scores, so every joint of A is a false positive ranked first.
  a = {j: (x + (0 if j < 7 else 50), y) for j, (x, y) in _grid().items()}
  gt, pred = _one_frame([(_grid(), {})], [(a, 0.9), (_grid(), 0.5)])
  out = _ap(gt, pred)
  # Ranked FP then TP: precision (0, 1/2), recall (0, 1) -> AP 50.
  assert all(v == pytest.approx(50.0) for v in out['per_joint'].values())
  assert out['summary']['Total'] == pytest.approx(50.0)


def test_joint_of_matched_prediction_without_gt_joint_is_false_positive():
  gt1 = {j: xy for j, xy in _grid().items() if j != 0}     # right ankle not annotated
  gt2 = _grid(dx=1000)
  gt, pred = _one_frame([(gt1, {}), (gt2, {})], [(_grid(), 0.9), (gt2, 0.5)])
  out = _ap(gt, pred)['per_joint']
  assert out['right_ankle'] == pytest.approx(50.0)   # FP 0.9 then TP 0.5 of one GT joint
  assert all(v == 100.0 for k, v in out.items() if k != 'right_ankle')
  total = _ap(gt, pred)['summary']['Total']
  assert total == pytest.approx((50 + 14 * 100) / 15)


def test_joint_never_annotated_is_nan_and_left_out_of_total():
  no_nose = {j: xy for j, xy in _grid().items() if j != 13}
  gt, pred = _one_frame([(no_nose, {})], [(_grid(), 0.9)])
  out = _ap(gt, pred)
  assert np.isnan(out['per_joint']['nose'])
  assert np.isnan(out['summary']['Head'])
  assert out['summary']['Total'] == 100.0      # mean of the 14 others


def test_joint_never_predicted_scores_zero():
  no_wrist = {j: xy for j, xy in _grid().items() if j != 6}
  gt, pred = _one_frame([(_grid(), {})], [(no_wrist, 0.9)])
  out = _ap(gt, pred)
  assert out['per_joint']['right_wrist'] == 0.0
  assert out['summary']['Wri'] == 50.0
  assert out['summary']['Total'] == pytest.approx(14 * 100 / 15)


def test_empty_gt_frames_are_not_evaluated_and_unpredicted_frames_cost_recall():
  imgs = [_image(1, f) for f in range(3)]
  gt = _video(imgs, [_person(imgs[0]['id'], _grid()), _person(imgs[2]['id'], _grid())])
  # Frame 1 has no GT person: its (wrong) predictions do not count. Frame 2 has none.
  pred = _video([_image(1, f) for f in range(3)],
                [_person(imgs[0]['id'], _grid(), scores=0.9),
                 _person(imgs[1]['id'], _grid(dx=500), scores=0.99)])
  out = _ap(gt, pred)
  assert out['num_frames'] == 2
  # One TP out of two GT joints, no FP: precision 1 up to recall 1/2 -> AP 50.
  assert all(v == pytest.approx(50.0) for v in out['per_joint'].values())


def test_predictions_on_a_frame_whose_gt_person_has_no_points_are_false_positives():
  imgs = [_image(1, f) for f in range(2)]
  gt = _video(imgs, [_person(imgs[0]['id'], _grid()), _person(imgs[1]['id'], {})])
  pred = _video([_image(1, f) for f in range(2)],
                [_person(imgs[0]['id'], _grid(), scores=0.5),
                 _person(imgs[1]['id'], _grid(), scores=0.9)])
  out = _ap(gt, pred)
  assert out['num_frames'] == 2        # the person-without-points keeps the frame
  assert all(v == pytest.approx(50.0) for v in out['per_joint'].values())


def test_ignore_regions_remove_points_on_both_sides():
  # Polygon around x in [0, 90]: holds the second GT person and a spurious prediction.
  region = dict(ignore_regions_x=[[0, 90, 90, 0]], ignore_regions_y=[[0, 0, 400, 400]])
  hidden = {j: (10.0 + j, 60.0 + 5 * j) for j in ALL}
  gt, pred = _one_frame([(_grid(), {}), (hidden, {})],
                        [(_grid(), 0.5), ({j: (20.0, 20.0 + j) for j in ALL}, 0.9)],
                        **region)
  out = _ap(gt, pred)
  assert all(v == 100.0 for v in out['per_joint'].values())
  # Without the region: the hidden person is missed and the spurious one is an FP first.
  gt['images'][0].pop('ignore_regions_x')
  out = _ap(gt, pred)
  assert all(v == pytest.approx(25.0) for v in out['per_joint'].values())


def test_ignore_region_boundary_points_are_kept():
  # GT joint 0 lies exactly on the polygon's edge: shapely's `contains` says no.
  region = dict(ignore_regions_x=[[0, 100, 100, 0]], ignore_regions_y=[[0, 0, 49, 49]])
  joints = _grid()
  joints[0] = (50.0, 49.0)
  gt, pred = _one_frame([(joints, {})], [({0: (500.0, 500.0)}, 0.9)], **region)
  out = _ap(gt, pred)['per_joint']
  assert out['right_ankle'] == 0.0          # the GT joint still counts (missed)


def test_points_in_polygon_even_odd_and_boundary():
  square = [[0, 0], [10, 0], [10, 10], [0, 10]]
  pts = [[5, 5], [15, 5], [10, 5], [0, 0], [5, 10], [-1, -1], [9.999, 0.001]]
  np.testing.assert_array_equal(posetrack_map.points_in_polygon(pts, square),
                                [True, False, False, False, False, False, True])
  # Self-intersecting ring (square then its left half again): the doubly covered part
  # is outside by the even-odd rule.
  ring = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0], [5, 0], [5, 10], [0, 10]]
  np.testing.assert_array_equal(posetrack_map.points_in_polygon([[2, 5], [7, 5]], ring),
                                [False, True])
  bowtie = [[0, 0], [10, 10], [10, 0], [0, 10]]
  np.testing.assert_array_equal(
      posetrack_map.points_in_polygon([[5, 2], [2, 5], [8, 5], [5, 8]], bowtie),
      [False, True, True, False])


def test_tied_scores_follow_numpy_argsort_order():
  # One GT; two predictions with the same score, the first exact, the second wrong.
  gt, pred = _one_frame([(_grid(), {})], [(_grid(), 0.5), (_grid(dx=100), 0.5)])
  out = _ap(gt, pred)
  # poseval ranks by np.argsort(scores)[::-1] over [TP, FP]: whichever it puts first.
  first_is_tp = np.argsort(np.array([0.5, 0.5]))[::-1][0] == 0
  expected = 100.0 if first_is_tp else 50.0
  assert all(v == pytest.approx(expected) for v in out['per_joint'].values())


def test_tied_scores_with_equal_labels_are_order_free():
  gt, pred = _one_frame([(_grid(), {}), (_grid(dx=1000), {})],
                        [(_grid(), 0.5), (_grid(dx=1000), 0.5), (_grid(dx=500), 0.2)])
  out = _ap(gt, pred)
  assert all(v == 100.0 for v in out['per_joint'].values())


def test_missing_scores_fall_back_to_minus_9999():
  gt, pred = _one_frame([(_grid(), {}), (_grid(dx=1000), {})],
                        [(_grid(dx=500), 0.5), (_grid(), None)])
  # The TP has no scores list -> -9999, ranked after the FP: AP = 1/2 * 1/2.
  out = _ap(gt, pred)
  assert all(v == pytest.approx(25.0) for v in out['per_joint'].values())


def test_visibility_flag_is_ignored_except_for_zero_points():
  gt, pred = _one_frame([(_grid(), {})], [(_grid(), 0.5)])
  for ann in gt['annotations']:
    kp = np.array(ann['keypoints']).reshape(17, 3)
    kp[:, 2] = 0                       # invisible but located: still annotated
    ann['keypoints'] = kp.ravel().tolist()
  for ann in pred['annotations']:
    kp = np.array(ann['keypoints']).reshape(17, 3)
    kp[SLOT[0]] = 0                    # (0, 0, 0): no prediction for joint 0
    ann['keypoints'] = kp.ravel().tolist()
  out = _ap(gt, pred)['per_joint']
  assert out['right_ankle'] == 0.0
  assert all(v == 100.0 for k, v in out.items() if k != 'right_ankle')


def _to_2017(video, with_head=True):
  """Writes a 2018 video (made by the helpers above) in the 2017 annolist format."""
  frames = []
  for img in video['images']:
    rects = []
    for ann in video['annotations']:
      if ann['image_id'] != img['id']:
        continue
      kp = np.array(ann['keypoints']).reshape(17, 3)
      pts = []
      for j in ALL:
        x, y, v = kp[SLOT[j]]
        if x == 0 and y == 0 and v == 0:
          continue
        p = {'id': [j], 'x': [float(x)], 'y': [float(y)]}
        if ann['scores']:
          p['score'] = [ann['scores'][SLOT[j]]]
        pts.append(p)
      hx, hy, hw, hh = ann['bbox_head']
      rect = {'track_id': [ann['track_id']], 'annopoints': [{'point': pts}]}
      if with_head:
        rect.update(x1=[hx], y1=[hy], x2=[hx + hw], y2=[hy + hh])
      rects.append(rect)
    frame = {'image': [{'name': img['file_name']}], 'annorect': rects}
    if 'ignore_regions_x' in img:
      frame['ignore_regions'] = [
          {'point': [{'x': [x], 'y': [y]} for x, y in zip(xs, ys)]}
          for xs, ys in zip(img['ignore_regions_x'], img['ignore_regions_y'])]
    frames.append(frame)
  return {'annolist': frames}


def test_2017_annolist_reads_like_2018(poseval_golden):
  for video in ('000101_mpii_test', '000102_mpii_test'):
    gt = json.loads((poseval_golden / 'case3' / 'gt' / f'{video}.json').read_text())
    pred = json.loads((poseval_golden / 'case3' / 'pred' / f'{video}.json').read_text())
    if not any('ignore_regions_x' in i for i in gt['images']):
      continue
    for ann in gt['annotations'] + pred['annotations']:
      ann.setdefault('bbox_head', [0, 0, 0, 0])
    new = _ap(gt, pred)
    for a, b in ((_to_2017(gt), pred), (gt, _to_2017(pred)),
                 (_to_2017(gt), _to_2017(pred))):
      old = _ap(a, b)
      assert old['num_frames'] == new['num_frames']
      np.testing.assert_allclose(list(old['per_joint'].values()),
                                 list(new['per_joint'].values()), rtol=0, atol=1e-9)


def test_2017_first_point_per_id_and_rects_without_points():
  gt = {'annolist': [{'image': [{'name': 'a/000000.jpg'}], 'annorect': [
      {'x1': [0], 'y1': [0], 'x2': [10], 'y2': [0], 'track_id': [0],
       'annopoints': [{'point': [{'id': [j], 'x': [x], 'y': [y]}
                                 for j, (x, y) in _grid().items()]}]},
      {'x1': [0], 'y1': [0], 'x2': [10], 'y2': [0], 'track_id': [1]}]}]}
  pts = [{'id': [j], 'x': [x], 'y': [y], 'score': [0.5]} for j, (x, y) in _grid().items()]
  # A second, wrong point with id 0 after the right one: ignored.
  pts.append({'id': [0], 'x': [999.0], 'y': [999.0], 'score': [0.9]})
  pred = {'annolist': [{'image': [{'name': 'a/000000.jpg'}],
                        'annorect': [{'annopoints': [{'point': pts}]}, {'score': [1]}]}]}
  out = _ap(gt, pred)
  assert all(v == 100.0 for v in out['per_joint'].values())


# --- Errors --------------------------------------------------------------------------------


def _write_case(tmp_path, gt, pred, name='000001_mpii_test.json'):
  (tmp_path / 'gt').mkdir(exist_ok=True)
  (tmp_path / 'pred').mkdir(exist_ok=True)
  (tmp_path / 'gt' / name).write_text(json.dumps(gt))
  if pred is not None:
    (tmp_path / 'pred' / name).write_text(pred if isinstance(pred, str)
                                          else json.dumps(pred))
  return str(tmp_path / 'gt'), str(tmp_path / 'pred')


def test_missing_prediction_file_names_the_videos(tmp_path):
  gt, _ = _one_frame([(_grid(), {})], [])
  gdir, pdir = _write_case(tmp_path, gt, None, 'vid_a.json')
  _write_case(tmp_path, gt, None, 'vid_b.json')
  with pytest.raises(posetrack_map.EvalInputError, match='vid_a.json, vid_b.json'):
    posetrack_map.evaluate_dirs(gdir, pdir)


def test_frame_count_mismatch_is_an_error(tmp_path):
  gt, pred = _one_frame([(_grid(), {})], [(_grid(), 0.5)])
  pred['images'].append(_image(1, 1))
  gdir, pdir = _write_case(tmp_path, gt, pred)
  with pytest.raises(posetrack_map.EvalInputError, match=r'000001_mpii_test.json.*2 pred'):
    posetrack_map.evaluate_dirs(gdir, pdir)


@pytest.mark.parametrize('bad, message', [
    ('{"images": [', 'malformed JSON'),
    ('{"images": [], "annotations": []}', 'categories'),
    ('[1, 2]', 'JSON object'),
])
def test_malformed_prediction_file_is_an_error_naming_it(tmp_path, bad, message):
  gt, _ = _one_frame([(_grid(), {})], [])
  gdir, pdir = _write_case(tmp_path, gt, bad)
  with pytest.raises(posetrack_map.EvalInputError, match=message) as err:
    posetrack_map.evaluate_dirs(gdir, pdir)
  assert '000001_mpii_test.json' in str(err.value)


def test_bad_keypoint_count_and_duplicate_track_ids_are_errors():
  gt, pred = _one_frame([(_grid(), {})], [(_grid(), 0.5), (_grid(), 0.4)])
  pred['annotations'][1]['track_id'] = 0
  with pytest.raises(posetrack_map.EvalInputError, match='track_id 0 twice'):
    _ap(gt, pred)
  pred['annotations'][1]['track_id'] = 1
  pred['annotations'][1]['keypoints'] = [1, 2, 3]
  with pytest.raises(posetrack_map.EvalInputError, match=r'keypoints must hold 51'):
    _ap(gt, pred)


# --- Randomised comparison with a direct, loop-by-loop reading of the rules ------------------


def _reference(frames):
  """frames: list of (gt people, pred people, polygons); a person is a dict with 'xy' [15,2],
  'has' [15] (and 'head' for GT, 'score' [15] for predictions). Straight loops."""
  scores = [[] for _ in ALL]
  labels = [[] for _ in ALL]
  n_gt = np.zeros(15)
  n_frames = 0
  for gts, prs, polys in frames:
    if not gts:
      continue
    n_frames += 1
    def strip(people):
      out = []
      for p in people:
        has = p['has'].copy()
        if polys:
          for j in ALL:
            if has[j] and any(posetrack_map.points_in_polygon([p['xy'][j]], q)[0]
                              for q in polys):
              has[j] = False
          if not has.any():
            continue
        out.append(dict(p, has=has))
      return out
    gts, prs = strip(gts), strip(prs)
    for g in gts:
      n_gt += g['has']
    matched = {}
    if gts and prs:
      pck = np.zeros((len(prs), len(gts)))
      ok = np.zeros((len(prs), len(gts), 15), bool)
      for i, p in enumerate(prs):
        for k, g in enumerate(gts):
          for j in ALL:
            if p['has'][j] and g['has'][j]:
              d = np.linalg.norm(np.subtract(g['xy'][j], p['xy'][j])) / g['head']
              ok[i, k, j] = d <= 0.5
          pck[i, k] = ok[i, k].sum() / max(g['has'].sum(), 1)
      for i in range(len(prs)):
        best = int(np.argmax(pck[i]))
        pck[i, [k for k in range(len(gts)) if k != best]] = 0
      for k in range(len(gts)):
        if pck[:, k].max() > 0:
          matched[int(np.argmax(pck[:, k]))] = k
    for i, p in enumerate(prs):
      for j in ALL:
        if p['has'][j]:
          scores[j].append(p['score'][j])
          labels[j].append(bool(i in matched and ok[i, matched[i], j]))
  aps = [posetrack_map.voc_ap(scores[j], labels[j], n_gt[j]) for j in ALL]
  return posetrack_map.summarize(aps), n_frames


def _random_frames(rng, num_frames):
  frames = []
  for _ in range(num_frames):
    n_gt, n_pr = rng.integers(0, 4), rng.integers(0, 5)
    gts, prs = [], []
    for _ in range(n_gt):
      c = rng.uniform(0, 200, 2)
      gts.append(dict(xy=np.round(c + rng.normal(0, 20, (15, 2)), 2),
                      has=rng.random(15) < 0.8, head=float(rng.uniform(5, 40))))
    for _ in range(n_pr):
      if gts and rng.random() < 0.7:
        g = gts[rng.integers(len(gts))]
        xy = g['xy'] + rng.normal(0, g['head'] * 0.2, (15, 2))
      else:
        xy = rng.uniform(0, 250, (15, 2))
      prs.append(dict(xy=np.round(xy, 2), has=rng.random(15) < 0.9,
                      score=np.round(rng.random(15), 6)))
    polys = []
    if rng.random() < 0.3:
      x0, y0 = rng.uniform(0, 150, 2)
      polys.append([[x0, y0], [x0 + 60, y0], [x0 + 60, y0 + 60], [x0, y0 + 60]])
    frames.append((gts, prs, polys))
  return frames


def _frames_to_2018(frames, vid):
  images, gt_anns, pr_anns = [], [], []
  for f, (gts, prs, polys) in enumerate(frames):
    img = _image(vid, f)
    if polys:
      img.update(ignore_regions_x=[[p[0] for p in q] for q in polys],
                 ignore_regions_y=[[p[1] for p in q] for q in polys])
    images.append(img)
    for t, g in enumerate(gts):
      joints = {j: tuple(g['xy'][j]) for j in ALL if g['has'][j]}
      gt_anns.append(_person(img['id'], joints, t, head=(0, 0, g['head'] / 0.6, 0)))
      g['head'] = 0.6 * np.linalg.norm([g['head'] / 0.6, 0.0])
    for t, p in enumerate(prs):
      joints = {j: tuple(p['xy'][j]) for j in ALL if p['has'][j]}
      pr_anns.append(_person(img['id'], joints, t, scores=dict(enumerate(p['score']))))
  return (_video(images, gt_anns),
          _video([_image(vid, f) for f in range(len(frames))], pr_anns))


@pytest.mark.parametrize('seed', range(4))
def test_vectorised_evaluator_equals_loop_reference(seed, monkeypatch):
  rng = np.random.default_rng(seed)
  videos = [_random_frames(rng, int(rng.integers(1, 30))) for _ in range(3)]
  pairs = []
  for v, frames in enumerate(videos):
    gt, pred = _frames_to_2018(frames, v + 1)
    pairs.append((f'{v}.json', gt, pred))
  # Small chunks so that frames are split over several padded blocks.
  monkeypatch.setattr(posetrack_map, 'CHUNK_ELEMENTS', 15 * 4 * 3 * 2)
  got = posetrack_map.evaluate_videos(pairs)
  want, n = _reference([f for frames in videos for f in frames])
  assert got['num_frames'] == n
  np.testing.assert_allclose(list(got['per_joint'].values()),
                             list(want['per_joint'].values()), rtol=0, atol=1e-9)
  assert got['summary']['Total'] == pytest.approx(want['summary']['Total'], abs=1e-9)
