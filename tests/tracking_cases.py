"""PoseTrack tracking evaluation cases for the tests: hand-built and random, in both formats.

A case is a list of videos; a video is {'name', 'frames': [frame]}; a frame is
{'gt': [person] or None (frame without GT people), 'pred': [person], 'ignore': [polygon]}; a
person is {'track_id': int or None, 'joints': {poseval joint id: (x, y)}, 'head': (x1, y1,
x2, y2) (GT only), 'score': float (predictions)}. `write_case(case, root, gt_format,
pred_format)` writes root/gt/<video>.json and root/pred/<video>.json.

Run as a script it writes the golden cases of tests/testdata/tracking_golden/ (see the
README there for the official tool's command that produced each expected.json).
"""

import argparse
import json
import os

import numpy as np

# poseval joint id -> PoseTrack 2018 keypoint slot (configs.common.POSEVAL_FROM_POSETRACK).
POSEVAL_FROM_POSETRACK = (16, 14, 12, 11, 13, 15, 10, 8, 6, 5, 7, 9, 1, 0, 2)
JOINT_NAMES = (
    'nose', 'head_bottom', 'head_top', 'left_ear', 'right_ear', 'left_shoulder',
    'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist', 'left_hip',
    'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle')


def _file_name(video, f):
  return f'images/val/{video}/{f:06d}.jpg'


def _image_id(video, f):
  return int('1' + video[:6] + f'{f:04d}')


def video_2018(video, frames, side):
  images, annotations = [], []
  for f, fr in enumerate(frames):
    image_id = _image_id(video, f)
    im = {'id': image_id, 'file_name': _file_name(video, f), 'frame_id': image_id}
    if fr.get('ignore') and side == 'gt':
      im['ignore_regions_x'] = [[round(float(x), 2) for x, _ in p] for p in fr['ignore']]
      im['ignore_regions_y'] = [[round(float(y), 2) for _, y in p] for p in fr['ignore']]
    people = fr.get(side) or []
    im['is_labeled'] = bool(people) if side == 'gt' else True
    images.append(im)
    for person in people:
      kp = np.zeros((17, 3))
      scores = np.zeros(17)
      for j, (x, y) in person['joints'].items():
        kp[POSEVAL_FROM_POSETRACK[j]] = (round(x, 2), round(y, 2), 1)
        scores[POSEVAL_FROM_POSETRACK[j]] = person.get('score', 1.0)
      ann = {'image_id': image_id, 'id': len(annotations), 'category_id': 1,
             'keypoints': [v if v % 1 else int(v) for v in kp.ravel().tolist()]}
      if person.get('track_id') is not None:
        ann['track_id'] = person['track_id']
      if side == 'gt':
        x1, y1, x2, y2 = person['head']
        ann['bbox_head'] = [round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)]
      else:
        ann['scores'] = np.round(scores, 3).tolist()
        ann['score'] = round(person.get('score', 1.0), 3)
      annotations.append(ann)
  cat = [{'id': 1, 'name': 'person', 'supercategory': 'person',
          'keypoints': list(JOINT_NAMES)}]
  return {'images': images, 'annotations': annotations, 'categories': cat}


def video_2017(video, frames, side):
  annolist = []
  for f, fr in enumerate(frames):
    entry = {'image': [{'name': _file_name(video, f)}], 'imgnum': [f + 1]}
    if fr.get('ignore') and side == 'gt':
      entry['ignore_regions'] = [{'point': [{'x': [round(float(x), 2)], 'y': [round(float(y), 2)]}
                                            for x, y in p]} for p in fr['ignore']]
    rects = []
    for person in fr.get(side) or []:
      rect = {}
      if person.get('track_id') is not None:
        rect['track_id'] = [person['track_id']]
      if side == 'gt':
        rect.update({k: [round(float(v), 2)]
                     for k, v in zip(('x1', 'y1', 'x2', 'y2'), person['head'])})
      else:
        rect['score'] = [round(person.get('score', 1.0), 3)]
      if person.get('no_points'):
        rect['annopoints'] = []
      else:
        points = []
        for j, (x, y) in person['joints'].items():
          pt = {'id': [int(j)], 'x': [round(float(x), 2)], 'y': [round(float(y), 2)]}
          if side == 'gt':
            pt['is_visible'] = [1]
          else:
            pt['score'] = [round(person.get('score', 1.0), 3)]
          points.append(pt)
        rect['annopoints'] = [{'point': points}]
      rects.append(rect)
    entry['annorect'] = rects
    entry['is_labeled'] = [1 if (side != 'gt' or rects) else 0]
    annolist.append(entry)
  return {'annolist': annolist}


def write_case(case, root, gt_format='2018', pred_format='2018'):
  """Writes root/gt and root/pred; formats are '2017', '2018' or 'mixed' (per video)."""
  for side, fmt in (('gt', gt_format), ('pred', pred_format)):
    os.makedirs(os.path.join(root, side), exist_ok=True)
    for v, video in enumerate(case):
      f = fmt if fmt != 'mixed' else ('2017', '2018')[v % 2]
      data = (video_2017 if f == '2017' else video_2018)(video['name'], video['frames'], side)
      with open(os.path.join(root, side, video['name'] + '.json'), 'w') as out:
        json.dump(data, out)


# --- Building blocks ------------------------------------------------------------------


def person(track_id, centre, size=40.0, joints=range(15), score=1.0, head=True):
  """A person whose joints sit on a fixed pattern around `centre`; head box size x size."""
  cx, cy = centre
  js = {int(j): (float(cx + 10 * (j % 5) - 20), float(cy + 12 * (j // 5) - 12))
        for j in joints}
  p = {'track_id': track_id, 'joints': js, 'score': score}
  if head:
    p['head'] = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
  return p


def moved(p, dx=0.0, dy=0.0, track_id='same', score=None):
  q = {**p, 'joints': {j: (x + dx, y + dy) for j, (x, y) in p['joints'].items()}}
  if track_id != 'same':
    q['track_id'] = track_id
  if score is not None:
    q['score'] = score
  return q


def gt_as_pred(frames, id_map=None):
  """Predictions equal to the GT (track ids through id_map if given)."""
  for fr in frames:
    fr['pred'] = [dict(p, track_id=(id_map or {}).get(p['track_id'], p['track_id']))
                  for p in fr.get('gt') or []]
  return frames


def random_case(rng, num_videos=None, grid=False, missing_ids=0.0, max_tracks=5):
  """Random videos exercising every rule: tracks that leave and return, id switches and
  swaps, missed people, false positives, duplicates, unlabeled frames, empty prediction
  frames, ignore regions, joints near the threshold; `grid` snaps coordinates to a coarse
  grid so that equal distances (assignment ties) occur; `missing_ids` is the rate of people
  without a track id; up to `max_tracks` people per video."""
  case = []
  for v in range(num_videos or int(rng.integers(1, 4))):
    name = f'{v + 1:06d}_mpii_test'
    num_frames = int(rng.integers(2, 9))
    num_tracks = int(rng.integers(1, max_tracks + 1))
    centres = rng.uniform(100, 500, (num_tracks, 2))
    pred_id = {t: int(t) for t in range(num_tracks)}
    frames = []
    for f in range(num_frames):
      centres += rng.normal(0, 8, centres.shape)
      fr = {'gt': [], 'pred': [], 'ignore': []}
      labeled = f < 2 or rng.random() > 0.2
      for t in range(num_tracks):
        if not labeled or rng.random() < 0.15:
          continue  # Track absent in this frame (may come back later).
        joints = np.flatnonzero(rng.random(15) < 0.8)
        size = float(rng.uniform(20, 50))
        c = np.round(centres[t] / 10) * 10 if grid else centres[t]
        g = person(t, c, size, joints)
        if grid:
          g['joints'] = {j: (round(x / 10) * 10, round(y / 10) * 10)
                         for j, (x, y) in g['joints'].items()}
        fr['gt'].append(g)
        if rng.random() < 0.1:
          continue  # Missed person.
        if rng.random() < 0.1:
          pred_id[t] = int(rng.integers(0, 40))  # The tracker switches ids.
        scale = size * 0.6 * rng.choice([0.1, 0.4, 0.55])
        noise = rng.normal(0, scale, (15, 2))
        if grid:
          noise = np.round(noise / 10) * 10
        p = {'track_id': pred_id[t], 'score': float(rng.random()),
             'joints': {j: (x + noise[j, 0], y + noise[j, 1])
                        for j, (x, y) in g['joints'].items() if rng.random() < 0.9}}
        if p['joints']:
          fr['pred'].append(p)
        if rng.random() < 0.1:  # A duplicate prediction close by.
          fr['pred'].append(dict(moved(p, 3, -2), track_id=int(rng.integers(50, 60))))
      for _ in range(int(rng.poisson(0.4))):  # False positives.
        c = rng.uniform(100, 500, 2)
        fr['pred'].append(dict(person(int(rng.integers(60, 70)), c), score=0.3))
      if rng.random() < 0.15 and len(fr['gt']) > 1:  # Two tracks swap ids.
        a, b = rng.choice(len(fr['gt']), 2, replace=False)
        for q in fr['pred']:
          if q['track_id'] == pred_id.get(fr['gt'][a]['track_id']):
            q['track_id'] = -1
        for q in fr['pred']:
          if q['track_id'] == pred_id.get(fr['gt'][b]['track_id']):
            q['track_id'] = pred_id.get(fr['gt'][a]['track_id'])
        for q in fr['pred']:
          if q['track_id'] == -1:
            q['track_id'] = pred_id.get(fr['gt'][b]['track_id'])
      if rng.random() < 0.25:
        x0, y0 = rng.uniform(100, 450, 2)
        fr['ignore'].append([(x0, y0), (x0 + 120, y0), (x0 + 120, y0 + 90), (x0, y0 + 90)])
      if rng.random() < 0.1:
        fr['pred'] = []  # A frame without predictions.
      if rng.random() < 0.05 and fr['gt']:
        fr['gt'].append(dict(fr['gt'][0]))  # A repeated GT track id in one frame.
      rng.shuffle(fr['pred'])
      _unique_pred_ids(fr['pred'], rng)
      for side, rate in (('pred', missing_ids), ('gt', missing_ids / 2)):
        for i, q in enumerate(fr[side]):
          if rng.random() < rate:
            fr[side][i] = dict(q, track_id=None)
      if not fr['gt']:
        fr['gt'] = None
      frames.append(fr)
    case.append({'name': name, 'frames': frames})
  return case


def _unique_pred_ids(people, rng):
  seen = set()
  for p in people:
    while p['track_id'] in seen:
      p['track_id'] = int(rng.integers(100, 1000))
    seen.add(p['track_id'])


# --- Hand-built cases -------------------------------------------------------------------


def hand_cases():
  """{name: (case, gt_format, pred_format)} with known outcomes (see test_tracking.py)."""
  cases = {}
  a, b = person(1, (100, 100)), person(2, (300, 100))

  # GT as predictions: MOTA 100, MOTP 100.
  frames = [{'gt': [moved(a, 5 * f), moved(b, -5 * f)]} for f in range(4)]
  cases['perfect'] = ([{'name': '000001_mpii_test', 'frames': gt_as_pred(frames)}],
                      '2018', '2018')

  # One identity switch: person a's prediction changes id at frame 2 of 5.
  frames = gt_as_pred([{'gt': [moved(a, 5 * f), moved(b, -5 * f)]} for f in range(5)])
  for f in (2, 3, 4):
    frames[f]['pred'][0]['track_id'] = 7
  cases['one_switch'] = ([{'name': '000001_mpii_test', 'frames': frames}], '2018', '2018')

  # One missed person in one frame.
  frames = gt_as_pred([{'gt': [moved(a, 5 * f), moved(b, -5 * f)]} for f in range(5)])
  frames[1]['pred'] = frames[1]['pred'][1:]
  cases['one_miss'] = ([{'name': '000001_mpii_test', 'frames': frames}], '2017', '2017')

  # Track b leaves for two frames and returns: same id (no switch) in video 1, a new id
  # (a switch) in video 2; both formats mixed.
  def leave_and_return(new_id):
    frames = []
    for f in range(6):
      gt = [moved(a, 5 * f)] + ([] if f in (2, 3) else [moved(b, -5 * f)])
      frames.append({'gt': gt})
    gt_as_pred(frames)
    if new_id is not None:
      for f in (4, 5):
        frames[f]['pred'][1]['track_id'] = new_id
    return frames
  cases['leave_and_return'] = (
      [{'name': '000001_mpii_test', 'frames': leave_and_return(None)},
       {'name': '000002_mpii_test', 'frames': leave_and_return(9)}], 'mixed', 'mixed')

  # 2017 predictions without track ids: ids are handed out by position.
  frames = gt_as_pred([{'gt': [moved(a, 5 * f), moved(b, -5 * f)]} for f in range(4)])
  frames[1]['pred'][0] = dict(frames[1]['pred'][0], track_id=None)
  frames[1]['pred'][1] = dict(frames[1]['pred'][1], joints={})  # No joints, id 2 moves up.
  frames[2]['pred'][0] = dict(frames[2]['pred'][0], track_id=None)   # Takes b's id 2,
  frames[2]['pred'].append(dict(person(8, (0, 0)), joints={}))        # b takes this 8.
  cases['missing_ids'] = ([{'name': '000001_mpii_test', 'frames': frames}], '2017', '2017')

  # Empty frames, unlabeled frames, ignore regions, a GT person inside an ignore region.
  frames = gt_as_pred([{'gt': [moved(a, 5 * f), moved(b, -5 * f)]} for f in range(7)])
  frames[1]['pred'] = []                                  # Predictions missing.
  frames[2]['gt'] = None                                  # Unlabeled frame (dropped).
  frames[3]['ignore'] = [[(250, 50), (350, 50), (350, 150), (250, 150)]]  # Covers b.
  frames[4]['ignore'] = [[(0, 0), (400, 0), (400, 200), (0, 200)]]        # Covers both.
  frames[5]['pred'].append(dict(person(5, (200, 300)), score=0.5))        # False positive.
  cases['empty_and_ignore'] = ([{'name': '000001_mpii_test', 'frames': frames}],
                               '2018', '2018')
  return cases


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--random', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  for name, (case, gf, pf) in hand_cases().items():
    write_case(case, os.path.join(args.out, name), gf, pf)
  rng = np.random.default_rng(args.seed)
  for i in range(args.random):
    fmt = ('2018', '2017', 'mixed')[i % 3]
    write_case(random_case(rng, num_videos=3, grid=i % 2 == 1),
               os.path.join(args.out, f'random{i}'), fmt, fmt)


if __name__ == '__main__':
  main()
