"""Tiny hand-made PoseTrack datasets for tests (official 2018 layout and 2017 annolist).

Each frame is a flat colour that encodes its frame index (value 40 * (index + 1) mod 256 in
the red channel), so a test can tell from the pixels which frame a window slot came from.
"""

import json
import os

import numpy as np
from PIL import Image

from tdmi_jax import keypoints


def frame_colour(index):
  return (40 * (index + 1)) % 256, 128, 64


def _write_jpeg(path, size_wh, index):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', size_wh, frame_colour(index)).save(path, quality=95)


def person_keypoints(rng, cx, cy, height=40.0):
  """[17, 3] plausible standing person around (cx, cy); ears unannotated."""
  # (dx, dy) in units of height, PoseTrack slots.
  layout = [(0, -.42), (0, -.32), (0, -.5), (-.03, -.42), (.03, -.42), (-.12, -.28),
            (.12, -.28), (-.16, -.1), (.16, -.1), (-.18, .05), (.18, .05), (-.08, .05),
            (.08, .05), (-.08, .28), (.08, .28), (-.08, .5), (.08, .5)]
  kp = np.array([[cx + dx * height, cy + dy * height, 1.0] for dx, dy in layout])
  kp[:, :2] += rng.normal(0, 0.5, (17, 2))
  kp[3:5, 2] = 0
  kp[3:5, :2] = 0
  return kp


def write_posetrack18(root, split='val', videos=(('000001_mpii_test', 6, (0, 2, 5)),),
                      size_wh=(96, 72), persons=2, seed=0, box_file=True):
  """Writes images/<split>/<seq>/%06d.jpg and annotations/<split>/<seq>.json.

  videos: (seq name, nframes, labeled frame indices). Returns {image_id: [persons' kp]}.
  With box_file, also writes detections/val_boxes_coco.json (GT boxes, score 0.9, plus one
  0.1-score box per frame) for the val split.
  """
  rng = np.random.default_rng(seed)
  truth = {}
  dets = []
  for seq, nframes, labeled in videos:
    images, anns = [], []
    vnum = int(seq[:6])
    for i in range(nframes):
      file_name = f'images/{split}/{seq}/{i:06d}.jpg'
      _write_jpeg(os.path.join(root, file_name), size_wh, i)
      image_id = int(f'1{vnum:06d}{i:04d}')
      images.append({'id': image_id, 'file_name': file_name, 'frame_id': image_id,
                     'vid_id': seq[:6], 'nframes': nframes, 'is_labeled': i in labeled,
                     'ignore_regions_x': [[1, 10, 10]] if i in labeled else [],
                     'ignore_regions_y': [[1, 1, 10]] if i in labeled else []})
      if i not in labeled:
        continue
      truth[image_id] = []
      for p in range(persons):
        kp = person_keypoints(rng, size_wh[0] * (p + 1) / (persons + 1), size_wh[1] / 2)
        vis = kp[:, 2] > 0
        lo, hi = kp[vis, :2].min(0), kp[vis, :2].max(0)
        bbox = [float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])]
        anns.append({'id': image_id * 100 + p, 'image_id': image_id, 'track_id': p,
                     'category_id': 1, 'keypoints': kp.reshape(-1).tolist(), 'bbox': bbox,
                     'bbox_head': [float(kp[2, 0] - 4), float(kp[2, 1]), 8.0, 8.0]})
        truth[image_id].append(kp)
        dets.append({'image_id': image_id, 'bbox': bbox, 'score': 0.9, 'category_id': 1})
      dets.append({'image_id': image_id, 'bbox': [0, 0, 10, 10], 'score': 0.1,
                   'category_id': 1})
    os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
    with open(os.path.join(root, 'annotations', split, f'{seq}.json'), 'w') as f:
      json.dump({'images': images, 'annotations': anns,
                 'categories': [{'id': 1, 'name': 'person',
                                 'keypoints': list(keypoints.JOINT_NAMES)}]}, f)
  if box_file and split == 'val':
    os.makedirs(os.path.join(root, 'detections'), exist_ok=True)
    with open(os.path.join(root, 'detections', 'val_boxes_coco.json'), 'w') as f:
      json.dump(dets, f)
  return truth


def write_posetrack17_annolist(root, split='val', seq='015860_mpii_test', nframes=5,
                               labeled=(0, 4), size_wh=(96, 72)):
  """A PoseTrack17 annolist video with 1-indexed %08d.jpg frames. Returns the JSON dict."""
  annolist = []
  for i in range(nframes):
    name = f'images/bonn_mpii_test_5sec/{seq}/{i + 1:08d}.jpg'
    _write_jpeg(os.path.join(root, name), size_wh, i)
    entry = {'image': [{'name': name}], 'imgnum': [i + 1], 'is_labeled': [int(i in labeled)]}
    if i in labeled:
      # poseval ids: 13 nose, 12 neck (head_bottom), 14 head_top, 9 l_shoulder, 0 r_ankle.
      pts = [(13, 40, 20), (12, 40, 26), (14, 40, 12), (9, 46, 30), (0, 36, 60)]
      entry['annorect'] = [{
          'x1': [34], 'y1': [10], 'x2': [46], 'y2': [24], 'track_id': [7],
          'annopoints': [{'point': [{'id': [pid], 'x': [x + i], 'y': [y], 'is_visible': [1]}
                                    for pid, x, y in pts]}]}]
      entry['ignore_regions'] = [{'point': [{'id': [0], 'x': [1], 'y': [2]},
                                            {'id': [1], 'x': [5], 'y': [2]},
                                            {'id': [2], 'x': [5], 'y': [9]}]}]
    annolist.append(entry)
  d = {'annolist': annolist}
  os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
  with open(os.path.join(root, 'annotations', split, f'{seq}.json'), 'w') as f:
    json.dump(d, f)
  return d
