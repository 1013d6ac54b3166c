r"""A synthetic PoseTrack18-layout dataset: moving articulated figures with hard frames.

  python -m tdmi_jax.data.synthesize --out /tmp/synth              # default size
  python -m tdmi_jax.data.synthesize --out /tmp/tiny --preset tiny
  python -m tdmi_jax.data.synthesize --out DIR --videos 8 --frames 20 --seed 3

Writes (CONTRACTS.md, "Synthetic dataset on disk"):
  DIR/images/{train,val}/<NNNNNN>_synth/%06d.jpg        every frame, 0-indexed
  DIR/annotations/{train,val}/<NNNNNN>_synth.json       PoseTrack18 COCO-like, per video
  DIR/detections/val_boxes_coco.json                    COCO results (image_id, bbox, score)
  DIR/detections/val_boxes_dcpose.json                  DCPose list (image_name, bbox, score)

Each video holds 2-4 figures (all 15 PoseTrack joints inside the image, ears unannotated)
that walk, wave or turn over a panning textured background, sometimes with a small
unannotated figure covered by an ignore region. Some frames are degraded (motion blur,
an occluder over part of one person, defocus) and marked in `images[i]["degradation"]`;
a degraded frame's window t-2..t+2 is otherwise clean. Train labels every frame; val
labels every second frame and every degraded one. Output is byte-identical per arguments.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw

from tdmi_jax import keypoints
from tdmi_jax.data import parsers
from tdmi_jax.data import render

PRESETS = {
    'tiny': dict(videos=2, frames=8, image_size=(96, 128)),
    'default': dict(videos=22, frames=36, image_size=(240, 320)),
}
WINDOW = 5              # t-2..t+2: the fewest frames a video may have.
VAL_LABEL_STRIDE = 2    # Val labels frames 0, 2, 4, ... plus every degraded frame.
# Degraded frames per split, as a fraction of the frames that may be degraded.
DEGRADED_FRACTION = {'train': 0.12, 'val': 0.35}
DEGRADATION_KINDS = render.DEGRADATIONS[1:]
JPEG_QUALITY = 90
OUTPUT_DIRS = ('images', 'annotations', 'detections')
# The skeleton of the official PoseTrack18 category (1-based joint numbers).
CATEGORY_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13],
                     [6, 7], [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3],
                     [2, 4], [3, 5], [4, 6], [5, 7]]
ANNOTATED = np.array([k not in (3, 4) for k in range(keypoints.NUM_JOINTS)])


# --- Planning: what each video contains ----------------------------------------------


@dataclasses.dataclass
class Figure:
  joints: np.ndarray    # [F, 17, 2] image coordinates.
  h: float
  yaw: np.ndarray       # [F]
  style: render.Style


@dataclasses.dataclass
class VideoPlan:
  split: str
  number: int
  frames: int
  people: list          # Annotated figures, back to front.
  distractor: Figure | None
  background: np.ndarray
  pan: np.ndarray       # [F, 2] integer supersampled crop offsets (x, y).
  blobs: list           # (colour, [F, 2] centre, (rx, ry)) drifting background shapes.
  labeled: np.ndarray   # [F] bool
  degradation: list     # [F] str
  degrade_args: dict    # frame -> parameters of its degradation.

  @property
  def name(self):
    return f'{self.number:06d}_synth'


def _pose_sequence(rng, action, frames, h, d):
  """Hip-relative PoseParams for `frames` frames of one action; d = walking direction."""
  out = []
  yaw0 = rng.uniform(-0.5, 0.5)
  phi = rng.uniform(0, 2 * math.pi)
  omega = 2 * math.pi / rng.uniform(10, 16)
  wave_side = rng.choice([-1, 1])
  omega_yaw = 2 * math.pi / rng.uniform(18, 30)
  for t in range(frames):
    ph = omega * t + phi
    s = math.sin(ph)
    if action == 'walk':
      bend_l = 0.3 * (1 + math.sin(ph - 0.6))
      bend_r = 0.3 * (1 + math.sin(ph + math.pi - 0.6))
      # Small swing about a wide stance: the legs rarely cross, so left stays left.
      thigh_l, thigh_r = 0.1 + d * 0.25 * s, -0.1 - d * 0.25 * s
      arm_l, arm_r = 0.12 - d * 0.35 * s, -0.12 + d * 0.35 * s
      p = render.PoseParams(
          0.0, 0.0, h, yaw=yaw0 + 0.15 * math.sin(0.5 * ph), lean=0.06 * d,
          tilt=0.05 * math.sin(ph), arm_l=arm_l, arm_r=arm_r,
          fore_l=arm_l + d * (0.35 + 0.15 * s), fore_r=arm_r + d * (0.35 - 0.15 * s),
          thigh_l=thigh_l, thigh_r=thigh_r,
          shin_l=thigh_l - d * bend_l, shin_r=thigh_r - d * bend_r)
      p.cy = -0.012 * h * math.cos(2 * ph)  # Bob.
    elif action == 'wave':
      w = wave_side
      raised = w * (2.25 + 0.15 * s)
      hang = -w * (0.18 + 0.08 * math.sin(0.5 * ph))
      sway = 0.04 * math.sin(0.5 * ph)
      arms = dict(arm_l=raised, fore_l=w * (2.6 + 0.55 * math.sin(ph + 0.8)),
                  arm_r=hang, fore_r=hang - w * 0.12)
      if w < 0:
        arms = dict(arm_r=arms['arm_l'], fore_r=arms['fore_l'],
                    arm_l=arms['arm_r'], fore_l=arms['fore_r'])
      p = render.PoseParams(
          0.0, 0.0, h, yaw=yaw0 + 0.25 * math.sin(0.3 * ph), tilt=0.12 * s,
          thigh_l=0.1 + sway, thigh_r=-0.1 + sway, shin_l=0.07 + sway,
          shin_r=-0.07 + sway, **arms)
    else:  # turn
      yaw = 1.05 * math.sin(omega_yaw * t + phi)
      arm_l = 0.3 + 0.25 * s
      arm_r = -(0.3 + 0.25 * math.sin(ph + 1.3))
      sway = 0.05 * math.sin(0.5 * ph)
      p = render.PoseParams(
          0.0, 0.0, h, yaw=yaw, lean=0.05 * math.sin(omega_yaw * t),
          arm_l=arm_l, arm_r=arm_r, fore_l=arm_l + 0.4, fore_r=arm_r - 0.4,
          thigh_l=0.12 + sway, thigh_r=-0.12 + sway, shin_l=0.08 + sway,
          shin_r=-0.08 + sway)
    out.append(p)
  return out


def _place(rng, rel, move, lo, hi, near=None):
  """Start offset x0 so that x0 + move[t] + rel[t] stays in [lo, hi] for every t.

  rel: [F, N] coordinates relative to the hip centre; returns None if impossible.
  """
  low = np.max(lo - move - rel.min(1))
  high = np.min(hi - move - rel.max(1))
  if low > high:
    return None
  if near is not None:
    return float(np.clip(near, low, high))
  return float(rng.uniform(low, high))


def _make_figure(rng, frames, size, h_range, action=None, near_x=None):
  """A figure whose every joint (plus a stroke margin) stays inside the image."""
  height, width = size
  action = action or rng.choice(['walk', 'wave', 'turn'])
  h = rng.uniform(*h_range) * height
  d = float(rng.choice([-1, 1]))
  speed = rng.uniform(0.5, 1.6) * width / 320
  drift = (rng.uniform(0, 0.04) * width, 2 * math.pi / rng.uniform(20, 40),
           rng.uniform(0, 2 * math.pi))
  style = render.random_style(rng)
  for _ in range(40):
    params = _pose_sequence(rng, action, frames, h, d)
    rel = np.stack([render.joints(p) for p in params])          # [F, 17, 2]
    t = np.arange(frames)
    if action == 'walk':
      move_x = d * speed * t
    else:
      move_x = drift[0] * np.sin(drift[1] * t + drift[2])
    move_y = np.array([p.cy for p in params])
    m = render.MARGIN * h + 2
    x0 = _place(rng, rel[..., 0], move_x, m, width - 1 - m,
                None if near_x is None else near_x + rng.uniform(-0.6, 0.6) * h)
    y0 = _place(rng, rel[..., 1], move_y, m, height - 1 - m)
    if x0 is not None and y0 is not None:
      offset = np.stack([x0 + move_x, y0 + move_y], -1)[:, None]
      return Figure(rel + offset, h, np.array([p.yaw for p in params]), style)
    if action == 'walk' and speed > 0.1:
      speed *= 0.7  # Walk less far before shrinking the figure.
    else:
      h *= 0.92
  raise AssertionError(f'no placement for a figure in a {width}x{height} image')


def _pick_degraded(rng, candidates, count):
  """Up to `count` of `candidates`, pairwise >= 3 apart so each one's t-2..t+2 is clean."""
  chosen = []
  for c in rng.permutation(candidates):
    if len(chosen) == count:
      break
    if all(abs(int(c) - k) >= 3 for k in chosen):
      chosen.append(int(c))
  return sorted(chosen)


def _plan_video(rng, split, number, frames, size, kind_offset, force_distractor):
  height, width = size
  n_people = int(rng.integers(2, 5 if width >= 200 else 4))
  people = []
  for k in range(n_people):
    near = None
    if people and rng.uniform() < 0.6:  # Stand near someone else so that they overlap.
      near = float(people[int(rng.integers(len(people)))].joints[0, 11:13, 0].mean())
    people.append(_make_figure(rng, frames, size, (0.42, 0.68), near_x=near))
  people.sort(key=lambda f: f.h)  # Small (far) first, drawn behind.
  distractor = None
  if force_distractor or rng.uniform() < 0.4:
    distractor = _make_figure(rng, frames, size, (0.22, 0.32), action='walk')

  # Background: a texture larger than the frame, panned by the camera.
  vel = np.array([rng.uniform(-1.2, 1.2), rng.uniform(-0.4, 0.4)]) * width / 320 * render.SS
  travel = np.ceil(np.abs(vel) * (frames - 1)).astype(int) + 1
  tex = render.background_texture(rng, height * render.SS + travel[1],
                                   width * render.SS + travel[0])
  start = np.where(vel >= 0, 0, travel - 1)
  pan = np.round(start + vel * np.arange(frames)[:, None]).astype(int)
  pan = np.clip(pan, 0, travel - 1)
  blobs = []
  for _ in range(int(rng.integers(1, 3))):
    c0 = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    v = rng.uniform(-2, 2, size=2) * width / 320
    blobs.append((render.random_colour(rng), c0 + v * np.arange(frames)[:, None],
                  (rng.uniform(0.04, 0.1) * width, rng.uniform(0.04, 0.1) * width)))

  # Labels and degradations.
  if split == 'train':
    labeled = np.ones(frames, bool)
  else:
    labeled = np.arange(frames) % VAL_LABEL_STRIDE == 0
  # Degraded frames need a full window inside the video (t-2 >= 0, t+2 < frames).
  candidates = np.arange(2, frames - 2)
  if split == 'val':
    candidates = candidates[labeled[candidates]]
  count = max(1, int(round(DEGRADED_FRACTION[split] * len(candidates))))
  degraded = _pick_degraded(rng, candidates, count)
  degradation = ['none'] * frames
  degrade_args = {}
  for i, t in enumerate(degraded):
    kind = DEGRADATION_KINDS[(kind_offset + i) % len(DEGRADATION_KINDS)]
    degradation[t] = kind
    labeled[t] = True
    if kind == 'motion_blur':
      degrade_args[t] = dict(length=rng.uniform(0.035, 0.06) * width,
                             angle=rng.uniform(0, math.pi))
    elif kind == 'defocus':
      degrade_args[t] = dict(radius=rng.uniform(0.007, 0.011) * width)
    else:
      fig = people[int(rng.integers(len(people)))]
      groups = ((0, 1, 2, 5, 6, 7, 8, 9, 10), (11, 12, 13, 14, 15, 16),
                (5, 7, 9, 11, 13, 15), (6, 8, 10, 12, 14, 16), (5, 6, 7, 8, 11, 12))
      pts = fig.joints[t, list(groups[int(rng.integers(len(groups)))])]
      pad = 0.07 * fig.h
      box = np.concatenate([pts.min(0) - pad, pts.max(0) + pad])
      degrade_args[t] = dict(box=box, seed=int(rng.integers(2**31)))
  return VideoPlan(split, number, frames, people, distractor, tex, pan, blobs, labeled,
                   degradation, degrade_args)


# --- Rendering and annotation ----------------------------------------------------------


def _render_frame(plan, t, size, markers):
  height, width = size
  ox, oy = plan.pan[t]
  canvas = Image.fromarray(plan.background[oy:oy + height * render.SS,
                                           ox:ox + width * render.SS])
  draw = ImageDraw.Draw(canvas)
  for colour, centre, (rx, ry) in plan.blobs:
    x, y = centre[t] * render.SS
    draw.ellipse([x - rx * render.SS, y - ry * render.SS, x + rx * render.SS,
                  y + ry * render.SS], fill=colour)
  if plan.distractor is not None:
    f = plan.distractor
    render.draw_figure(draw, f.joints[t], f.h, f.yaw[t], f.style, brightness=0.85)
  for f in plan.people:
    render.draw_figure(draw, f.joints[t], f.h, f.yaw[t], f.style)
  kind = plan.degradation[t]
  if kind == 'occlusion':
    args = plan.degrade_args[t]
    render.draw_occluder(draw, np.random.default_rng(args['seed']), args['box'])
  for joint, colour in (markers or {}).items():
    for f in plan.people:
      render.draw_marker(draw, f.joints[t, joint], colour)
  img = canvas.resize((width, height), Image.BOX)
  if kind == 'motion_blur':
    img = render.motion_blur(img, **plan.degrade_args[t])
  elif kind == 'defocus':
    img = render.defocus(img, **plan.degrade_args[t])
  return img


def _ignore_region(fig, t, size):
  """An octagon around the distractor (rounded outward), clipped to the image."""
  height, width = size
  pad = render.MARGIN * fig.h + 2
  x0, y0 = fig.joints[t].min(0) - pad
  x1, y1 = fig.joints[t].max(0) + pad
  cx, cy = 0.25 * (x1 - x0), 0.2 * (y1 - y0)
  xs = [x0 + cx, x1 - cx, x1, x1, x1 - cx, x0 + cx, x0, x0]
  ys = [y0, y0, y0 + cy, y1 - cy, y1, y1, y1 - cy, y0 + cy]
  xs = [int(np.clip(round(x), 0, width - 1)) for x in xs]
  ys = [int(np.clip(round(y), 0, height - 1)) for y in ys]
  return xs, ys


def _tight_box(fig, t):
  pad = 0.5 * render.LEG_THICK * fig.h
  pts = np.concatenate([fig.joints[t], render.head_polygon(fig.joints[t], fig.h, 16)])
  (x0, y0), (x1, y1) = pts.min(0) - pad, pts.max(0) + pad
  return np.array([x0, y0, x1 - x0, y1 - y0])


def _annotation(fig, t, img_id, index):
  kps = np.zeros((keypoints.NUM_JOINTS, 3))
  kps[ANNOTATED, :2] = np.round(fig.joints[t, ANNOTATED], 2)
  kps[ANNOTATED, 2] = 1
  lo, hi = kps[ANNOTATED, :2].min(0), kps[ANNOTATED, :2].max(0)
  # PoseTrack18 GT boxes are the keypoints' extent enlarged by 15% on each side.
  c, ext = 0.5 * (lo + hi), 1.3 * (hi - lo)
  bbox = [round(float(v), 2) for v in (c[0] - ext[0] / 2, c[1] - ext[1] / 2, ext[0], ext[1])]
  flat = [int(v) if k % 3 == 2 or v == 0 else float(v) for k, v in enumerate(kps.reshape(-1))]
  return {
      'bbox_head': render.head_box(fig.joints[t], fig.h),
      'keypoints': flat,
      'track_id': index,
      'image_id': img_id,
      'bbox': bbox,
      'scores': [],
      'category_id': 1,
      'id': img_id * 100 + index,
      'iscrowd': False,
      'num_keypoints': int(ANNOTATED.sum()),
  }


def _detections(rng, plan, t, size):
  """Noisy person boxes (lower scores on degraded frames) and low-score false positives."""
  height, width = size
  hard = plan.degradation[t] != 'none'
  out = []
  figs = [(f, False) for f in plan.people]
  if plan.distractor is not None and rng.uniform() < 0.7:
    figs.append((plan.distractor, True))
  for f, is_distractor in figs:
    x, y, w, h = _tight_box(f, t)
    noise = 0.08 if hard else 0.04
    cx = x + w / 2 + rng.normal(0, noise) * w
    cy = y + h / 2 + rng.normal(0, noise) * h
    w, h = w * math.exp(rng.normal(0, 1.5 * noise)), h * math.exp(rng.normal(0, 1.5 * noise))
    if is_distractor:
      score = rng.uniform(0.3, 0.7)
    else:
      score = rng.uniform(0.45, 0.85) if hard else rng.uniform(0.8, 0.99)
    out.append(((cx - w / 2, cy - h / 2, w, h), score))
  for _ in range(int(rng.poisson(0.5))):
    h = rng.uniform(0.15, 0.45) * height
    w = min(h * rng.uniform(0.35, 0.7), 0.9 * width)
    out.append(((rng.uniform(0, width - w), rng.uniform(0, height - h), w, h),
                rng.uniform(0.02, 0.3)))
  boxes = []
  for (x, y, w, h), score in out:
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(width - 1.0, x + w), min(height - 1.0, y + h)
    if x1 - x0 >= 2 and y1 - y0 >= 2:
      boxes.append(([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    round(float(score), 4)))
  return boxes


def _write_video(plan, root, size, markers, det_rng):
  height, width = size
  seq_dir = root / 'images' / plan.split / plan.name
  seq_dir.mkdir(parents=True)
  images, annotations, coco, dcpose = [], [], [], []
  for t in range(plan.frames):
    file_name = f'images/{plan.split}/{plan.name}/{t:06d}.jpg'
    _render_frame(plan, t, size, markers).save(root / file_name, quality=JPEG_QUALITY)
    img_id = parsers.posetrack_image_id(plan.name, t)
    regions = ([], [])
    if plan.labeled[t] and plan.distractor is not None:
      xs, ys = _ignore_region(plan.distractor, t, size)
      regions = ([xs], [ys])
    images.append({
        'has_no_densepose': True,
        'is_labeled': bool(plan.labeled[t]),
        'file_name': file_name,
        'nframes': plan.frames,
        'frame_id': img_id,
        'vid_id': f'{plan.number:06d}',
        'ignore_regions_y': regions[1],
        'ignore_regions_x': regions[0],
        'id': img_id,
        'width': width,
        'height': height,
        'degradation': plan.degradation[t],
    })
    if not plan.labeled[t]:
      continue
    annotations += [_annotation(f, t, img_id, k) for k, f in enumerate(plan.people)]
    if plan.split == 'val':
      for bbox, score in _detections(det_rng, plan, t, size):
        coco.append({'image_id': img_id, 'category_id': 1, 'bbox': bbox, 'score': score})
        dcpose.append({'image_name': file_name, 'bbox': bbox, 'score': score})
  gt = {
      'categories': [{'supercategory': 'person', 'id': 1, 'name': 'person',
                      'keypoints': list(keypoints.JOINT_NAMES),
                      'skeleton': CATEGORY_SKELETON}],
      'images': images,
      'annotations': annotations,
  }
  ann_dir = root / 'annotations' / plan.split
  ann_dir.mkdir(parents=True, exist_ok=True)
  (ann_dir / f'{plan.name}.json').write_text(json.dumps(gt))
  return coco, dcpose


def _overlapping_frames(plan):
  """Labeled frames where some two annotated people's tight boxes intersect."""
  n = 0
  for t in np.flatnonzero(plan.labeled):
    boxes = [_tight_box(f, t) for f in plan.people]
    n += any(min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0])
             and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])
             for i, a in enumerate(boxes) for b in boxes[i + 1:])
  return n


def _check_args(out_dir, videos, frames, seed, val_videos, image_size, overwrite):
  if frames < WINDOW:
    raise ValueError(f'frames={frames}: every video needs at least {WINDOW} frames '
                     '(the t-2..t+2 window)')
  if frames > 10000:
    raise ValueError(f'frames={frames}: the PoseTrack18 image id holds 4 frame digits')
  if val_videos < 1 or videos - val_videos < 1:
    raise ValueError(f'videos={videos}, val_videos={val_videos}: need at least one '
                     'train and one val video')
  if videos > 999999:
    raise ValueError(f'videos={videos}: the PoseTrack18 image id holds 6 video digits')
  if seed < 0:
    raise ValueError(f'seed={seed}: must be >= 0')
  if len(image_size) != 2 or min(image_size) < 48:
    raise ValueError(f'image_size={tuple(image_size)}: need (height, width), both >= 48')
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f'{out_dir} exists and is not a directory')
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise ValueError(f'{out_dir} exists and is not empty; pass overwrite=True '
                     '(--overwrite) to replace its images/, annotations/, detections/')


def generate(out_dir, *, videos=PRESETS['default']['videos'],
             frames=PRESETS['default']['frames'], seed=0, val_videos=None,
             image_size=PRESETS['default']['image_size'], overwrite=False, markers=None):
  """Writes the dataset to `out_dir` and returns a summary dict.

  Args:
    out_dir: destination; must be missing or empty unless `overwrite`.
    videos: total number of videos; val gets `val_videos` (default a quarter, at
      least one) and train the rest. Train videos are numbered first.
    frames: frames per video (>= 5).
    seed: the output is a pure function of all arguments.
    image_size: (height, width) of the frames.
    overwrite: replace `images/`, `annotations/` and `detections/` of an existing
      `out_dir` (other files there are kept).
    markers: test aid, {joint slot: (r, g, b)}: draws a small disc of that colour at
      that joint of every annotated person (before any blur).
  """
  start = time.perf_counter()
  out_dir = pathlib.Path(out_dir)
  if val_videos is None:
    val_videos = max(1, int(videos * 0.25 + 0.5))
  image_size = tuple(int(v) for v in image_size)
  _check_args(out_dir, videos, frames, seed, val_videos, image_size, overwrite)
  splits = ['train'] * (videos - val_videos) + ['val'] * val_videos
  seeds = np.random.SeedSequence(seed).spawn(videos)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the destination and move in at the end: an interrupted run never
  # leaves a half-written dataset at out_dir, nor loses the one that was there.
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
  summary = {split: dict(videos=0, frames=0, labeled_frames=0, annotations=0,
                         frames_with_overlap=0, frames_with_ignore_regions=0,
                         degraded={k: 0 for k in DEGRADATION_KINDS})
             for split in ('train', 'val')}
  try:
    coco, dcpose = [], []
    kind_offset = {'train': 0, 'val': 0}
    first_val = True
    for i, split in enumerate(splits):
      rng = np.random.default_rng(seeds[i])
      plan = _plan_video(rng, split, i + 1, frames, image_size, kind_offset[split],
                         force_distractor=split == 'val' and first_val)
      first_val = first_val and split != 'val'
      kind_offset[split] += sum(d != 'none' for d in plan.degradation)
      c, d = _write_video(plan, tmp, image_size, markers, rng)
      coco += c
      dcpose += d
      s = summary[split]
      s['videos'] += 1
      s['frames'] += frames
      s['labeled_frames'] += int(plan.labeled.sum())
      s['annotations'] += int(plan.labeled.sum()) * len(plan.people)
      s['frames_with_overlap'] += _overlapping_frames(plan)
      if plan.distractor is not None:
        s['frames_with_ignore_regions'] += int(plan.labeled.sum())
      for k in plan.degradation:
        if k != 'none':
          s['degraded'][k] += 1
    (tmp / 'detections').mkdir()
    (tmp / 'detections' / 'val_boxes_coco.json').write_text(json.dumps(coco))
    (tmp / 'detections' / 'val_boxes_dcpose.json').write_text(json.dumps(dcpose))
    if out_dir.exists():
      for sub in OUTPUT_DIRS:
        if (out_dir / sub).exists():
          shutil.rmtree(out_dir / sub)
        os.replace(tmp / sub, out_dir / sub)
      tmp.rmdir()
    else:
      os.replace(tmp, out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  nbytes = sum(p.stat().st_size for sub in OUTPUT_DIRS for p in (out_dir / sub).rglob('*')
               if p.is_file())
  summary.update(out_dir=str(out_dir), image_size=list(image_size), frames_per_video=frames,
                 seed=seed, detections=len(coco), bytes=nbytes,
                 seconds=round(time.perf_counter() - start, 2))
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m tdmi_jax.data.synthesize',
      description='Write a synthetic PoseTrack18-layout dataset.')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--preset', choices=sorted(PRESETS), default='default',
                      help='size preset; --videos/--frames/--height/--width override it')
  parser.add_argument('--videos', type=int, help='total videos (train + val)')
  parser.add_argument('--val_videos', type=int, help='val videos (default: a quarter)')
  parser.add_argument('--frames', type=int, help=f'frames per video (>= {WINDOW})')
  parser.add_argument('--height', type=int)
  parser.add_argument('--width', type=int)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--overwrite', action='store_true',
                      help='replace images/, annotations/, detections/ in a non-empty --out')
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  pick = lambda value, default: default if value is None else value
  size = (pick(args.height, preset['image_size'][0]), pick(args.width, preset['image_size'][1]))
  try:
    summary = generate(args.out, videos=pick(args.videos, preset['videos']),
                       frames=pick(args.frames, preset['frames']),
                       seed=args.seed, val_videos=args.val_videos, image_size=size,
                       overwrite=args.overwrite)
  except ValueError as e:
    parser.error(str(e))
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
