"""Predicted skeletons drawn on frames: for video inference and for eval overlays."""

import json
import os

import numpy as np
from PIL import Image

from tdmi_jax import keypoints
from tdmi_jax import paths


def draw(image, people, score_thresh=0.2):
  """Skeleton and joints on an RGB frame; colour runs red (low) to green (high confidence)."""
  import cv2  # pylint: disable=g-import-not-at-top
  canvas = np.ascontiguousarray(image[..., ::-1]).copy()
  thick = max(2, int(round(max(image.shape[:2]) / 400)))
  colour = lambda s: (0, int(255 * min(max(s, 0), 1)), int(255 * (1 - min(max(s, 0), 1))))
  for p in people:
    kp = p['keypoints']
    conf = kp[:, 2] / max(p.get('box_score', 1.0), 1e-6)
    for a, b in keypoints.SKELETON:
      if min(conf[a], conf[b]) >= score_thresh:
        cv2.line(canvas, tuple(int(v) for v in kp[a, :2]), tuple(int(v) for v in kp[b, :2]),
                 colour(min(conf[a], conf[b])), thick, cv2.LINE_AA)
    for k in range(len(kp)):
      if conf[k] >= score_thresh and k not in (3, 4):  # Ears are never annotated.
        cv2.circle(canvas, (int(kp[k, 0]), int(kp[k, 1])), thick + 2, colour(conf[k]), -1,
                   cv2.LINE_AA)
  return canvas[..., ::-1]


def write_eval_overlays(predictions, gt_files, image_root, out_dir, count):
  """PNG overlays of `count` labeled val frames, half of them degraded ones where marked.

  `gt_files` are the GT JSON paths; frame images are read from `image_root/file_name`.
  Returns the written paths.
  """
  frames = []
  for path in gt_files:
    with paths.path(path).open('r') as f:
      data = json.load(f)
    labeled = {a['image_id'] for a in data.get('annotations', [])}
    frames += [im for im in data.get('images', []) if im['id'] in labeled]
  degraded = [im for im in frames if im.get('degradation', 'none') != 'none']
  clean = [im for im in frames if im.get('degradation', 'none') == 'none']
  pick = lambda xs, n: [xs[i] for i in np.linspace(0, len(xs) - 1, n).astype(int)] if xs and n else []
  chosen = pick(degraded, min(len(degraded), count // 2))
  chosen += pick(clean, min(len(clean), count - len(chosen)))
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  image_root = paths.path(image_root)
  written = []
  for im in chosen:
    with (image_root / im['file_name']).open('rb') as f:
      image = np.asarray(Image.open(f).convert('RGB'))
    people = [dict(p, box_score=1.0) for p in predictions.get(int(im['id']), [])]
    tag = im.get('degradation', 'none')
    name = f"{os.path.splitext(im['file_name'].replace('/', '_'))[0]}_{tag}.png"
    # Every predicted joint, coloured by confidence: weak models stay visible.
    with (out_dir / name).open('wb') as f:
      Image.fromarray(draw(image, people, score_thresh=0.0)).save(f, format='PNG')
    written.append(out_dir / name)
  return written
