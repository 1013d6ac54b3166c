r"""Speed of the poseval-exact PoseTrack AP and tracking metrics on synthetic data.

  python benchmarks/eval_bench.py [--frames 5000] [--people 8] [--videos 50]

Writes GT and prediction files (2018 format; ~20% of frames with an ignore polygon; noisy
predictions, one person in eight duplicated, per-joint scores, track ids) to a temporary
folder, then times `posetrack_map.evaluate_dirs` (AP) and `tracking.evaluate_dirs` (MOTA,
MOTP, Prec, Rec) end to end (reading the JSON included), AP and MOTA on one reading as
`python -m tdmi_jax.evaluate --track` does, and the parts. Wall and CPU seconds: on a shared
box the CPU time is the steadier figure.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from tdmi_jax import fileio  # noqa: E402
from tdmi_jax import keypoints  # noqa: E402
from tdmi_jax.evaluation import posetrack_map  # noqa: E402
from tdmi_jax.evaluation import tracking  # noqa: E402


def make_video(rng, vid, num_frames, people):
  names = list(keypoints.JOINT_NAMES)
  cat = [{'id': 1, 'name': 'person', 'supercategory': 'person', 'keypoints': names}]
  images, gt, pred = [], [], []
  for f in range(num_frames):
    image_id = int(f'1{vid:06d}{f:04d}')
    img = {'id': image_id, 'file_name': f'images/val/{vid:06d}_mpii_test/{f:06d}.jpg',
           'is_labeled': True}
    if rng.random() < 0.2:
      x0, y0 = rng.uniform(0, 1600), rng.uniform(0, 800)
      img['ignore_regions_x'] = [[x0, x0 + 200, x0 + 250, x0 - 30]]
      img['ignore_regions_y'] = [[y0, y0 + 10, y0 + 250, y0 + 200]]
    images.append(img)
    centres = rng.uniform([100, 100], [1800, 900], (people, 2))
    for t, c in enumerate(centres):
      kp = np.zeros((17, 3))
      kp[:, :2] = c + rng.normal(0, 60, (17, 2))
      kp[:, 2] = 1
      kp[[3, 4]] = 0                                    # ears are never annotated
      kp[rng.random(17) < 0.1] = 0
      gt.append({'image_id': image_id, 'category_id': 1, 'track_id': t, 'id': len(gt),
                 'keypoints': kp.ravel().tolist(), 'bbox_head': [c[0], c[1], 40, 50],
                 'bbox': [c[0] - 150, c[1] - 150, 300, 300]})
      copies = 2 if t == 0 else 1
      for d in range(copies):
        p = np.ones((17, 3))
        p[:, :2] = kp[:, :2] + rng.normal(0, 12 * (1 + d), (17, 2))
        pred.append({'image_id': image_id, 'category_id': 1, 'track_id': t + d * people,
                     'keypoints': np.round(p, 2).ravel().tolist(),
                     'scores': np.round(rng.random(17), 4).tolist(),
                     'score': float(rng.random())})
  return ({'images': images, 'annotations': gt, 'categories': cat},
          {'images': [{'id': i['id'], 'file_name': i['file_name']} for i in images],
           'annotations': pred, 'categories': cat})


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--frames', type=int, default=5000)
  parser.add_argument('--people', type=int, default=8)
  parser.add_argument('--videos', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    gt_dir, pred_dir = os.path.join(tmp, 'gt'), os.path.join(tmp, 'pred')
    os.makedirs(gt_dir)
    os.makedirs(pred_dir)
    per_video = args.frames // args.videos
    for v in range(args.videos):
      gt, pred = make_video(rng, v + 1, per_video, args.people)
      name = f'{v + 1:06d}_mpii_test.json'
      with open(os.path.join(gt_dir, name), 'w') as f:
        json.dump(gt, f)
      with open(os.path.join(pred_dir, name), 'w') as f:
        json.dump(pred, f)

    def timed(fn):
      """(result, [(wall, cpu) seconds per run])."""
      runs = []
      for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
      return out, runs

    def both():
      pairs = list(posetrack_map.read_pairs(gt_dir, pred_dir))
      return posetrack_map.evaluate_videos(pairs), tracking.evaluate_videos(pairs)

    tracking.evaluate_dirs(gt_dir, pred_dir)  # Warm-up: motmetrics' import (pandas).
    result, times = timed(lambda: posetrack_map.evaluate_dirs(gt_dir, pred_dir))
    mot, mot_times = timed(lambda: tracking.evaluate_dirs(gt_dir, pred_dir))
    _, both_times = timed(both)

    # Parts: reading + parsing, then matching + AP on the parsed videos.
    t0 = time.perf_counter()
    files = posetrack_map.gt_files(gt_dir)
    load = lambda path: fileio.load_json(path, posetrack_map.EvalInputError)
    parsed = [(os.path.basename(p), posetrack_map.read_video(load(p), p),
               posetrack_map.read_video(load(os.path.join(pred_dir, os.path.basename(p))), p))
              for p in files]
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    posetrack_map.evaluate_videos(parsed)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracking.evaluate_videos(parsed)
    t_mot = time.perf_counter() - t0

  def show(label, runs):
    wall, cpu = sorted(w for w, _ in runs), sorted(c for _, c in runs)
    print(f'{label}: wall best {wall[0]:.2f} s, median {wall[len(wall) // 2]:.2f} s; '
          f'CPU best {cpu[0]:.2f} s, median {cpu[len(cpu) // 2]:.2f} s '
          f'({args.repeats} runs)')

  print(f'frames evaluated: {result["num_frames"]}, GT people/frame: {args.people}, '
        f'predictions/frame: {args.people + 1}')
  print(f'Total AP: {result["summary"]["Total"]:.2f}; MOTA Total: {mot["total"]["MOTA"]:.2f}, '
        f'MOTP {mot["total"]["MOTP"]:.2f}, Prec {mot["total"]["Prec"]:.2f}, '
        f'Rec {mot["total"]["Rec"]:.2f}')
  show('AP   posetrack_map.evaluate_dirs end to end', times)
  show('MOTA tracking.evaluate_dirs end to end', mot_times)
  show('AP + MOTA on one reading (evaluate --track)', both_times)
  print(f'  parts: read + parse JSON {t_read:.2f} s, match + AP {t_eval:.2f} s, '
        f'tracking on the parsed videos {t_mot:.2f} s (wall)')


if __name__ == '__main__':
  main()
