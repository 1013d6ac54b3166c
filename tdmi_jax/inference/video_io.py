"""Frames, person boxes and tracks for running TDMI on a user's video.

Everything here is model-free so `tdmi_jax.infer` stays a short driver: reading a video or a
frame folder, reading box files in the two formats PoseTrack tools use, the offline fallback
detector, linking boxes into tracks, and the crop anchors that let the streaming feature
cache reuse backbone features across windows.
"""

import dataclasses
import json
import logging
import pathlib
import re

import numpy as np

from tdmi_jax.evaluation import tracker

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


# --- Frames ---------------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
  """A decoded clip: RGB uint8 frames [N, H, W, 3] and the names used to match boxes."""
  frames: np.ndarray
  names: list  # Per frame: the file name ('000003.jpg') or a synthetic one for videos.
  fps: float
  seq_name: str


def read_frames_dir(path):
  import cv2  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'--frames: {path} is not a directory')
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise ValueError(f'--frames: no image files ({", ".join(IMAGE_SUFFIXES)}) in {path}')
  frames = []
  for f in files:
    img = cv2.imread(str(f), cv2.IMREAD_COLOR)
    if img is None:
      raise ValueError(f'Cannot decode image {f} (corrupt or not an image)')
    if frames and img.shape != frames[0].shape:
      raise ValueError(f'{f} has size {img.shape[:2]}, other frames {frames[0].shape[:2]}')
    frames.append(img[..., ::-1])
  return Clip(np.stack(frames), [f.name for f in files], 25.0, path.name)


def read_video(path):
  import cv2  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'--video: {path} does not exist')
  cap = cv2.VideoCapture(str(path))
  if not cap.isOpened():
    raise ValueError(f'Cannot open video {path}')
  fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
  frames = []
  while True:
    ok, img = cap.read()
    if not ok:
      break
    frames.append(img[..., ::-1])
  cap.release()
  if not frames:
    raise ValueError(f'Video {path} has no decodable frames')
  names = [f'{i:06d}.jpg' for i in range(len(frames))]
  return Clip(np.stack(frames), names, float(fps), path.stem)


# --- Boxes ----------------------------------------------------------------------------


def posetrack_image_id(seq_name, frame_index):
  """PoseTrack18's id rule: '1' + the 6-digit video number + the 4-digit frame index."""
  m = re.match(r'(\d{6})', seq_name)
  if not m:
    return None
  return int(f'1{m.group(1)}{frame_index:04d}')


def load_boxes(path, clip, score_thresh=0.0):
  """Reads person boxes for `clip` -> list (per frame) of float arrays [n, 5] (x, y, w, h, s).

  Accepts COCO results (`image_id`, `bbox`, `score`) whose image ids are either frame
  indices or PoseTrack18 image ids, and the DCPose list format (`image_name`, `bbox`,
  `score`) whose names end with the frame file name.
  """
  path = pathlib.Path(path)
  try:
    entries = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f'--boxes: {path} does not exist') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'--boxes: {path} is not valid JSON ({e})') from None
  if isinstance(entries, dict) and 'annotations' in entries:
    entries = entries['annotations']
  if not isinstance(entries, list):
    raise ValueError(f'--boxes: {path} must hold a list of boxes')
  n = len(clip.names)
  by_id = {i: i for i in range(n)}
  for i in range(n):
    pid = posetrack_image_id(clip.seq_name, i)
    if pid is not None:
      by_id[pid] = i
  by_name = {name: i for i, name in enumerate(clip.names)}
  out = [[] for _ in range(n)]
  unknown = 0
  for k, e in enumerate(entries):
    if not isinstance(e, dict) or 'bbox' not in e:
      raise ValueError(f'--boxes: entry {k} of {path} has no "bbox"')
    if 'image_name' in e:
      frame = by_name.get(pathlib.PurePath(str(e['image_name'])).name)
    elif 'image_id' in e:
      frame = by_id.get(int(e['image_id']))
    else:
      raise ValueError(f'--boxes: entry {k} of {path} has neither "image_id" nor "image_name"')
    if frame is None:
      unknown += 1
      continue
    x, y, w, h = (float(v) for v in e['bbox'])
    score = float(e.get('score', 1.0))
    if w > 1 and h > 1 and score >= score_thresh:
      out[frame].append((x, y, w, h, score))
  if unknown == len(entries) and entries:
    raise ValueError(f'--boxes: no box in {path} names a frame of {clip.seq_name} '
                     f'(frame names {clip.names[0]}..., ids 0..{n - 1})')
  if unknown:
    logging.warning('%d boxes in %s name frames not in the clip; ignored', unknown, path)
  return [np.asarray(b, np.float32).reshape(-1, 5) for b in out]


def detect_people(clip, score_thresh=0.0):
  """Offline fallback: OpenCV's HOG people detector on every frame."""
  import cv2  # pylint: disable=g-import-not-at-top
  hog = cv2.HOGDescriptor()
  hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
  out = []
  for img in clip.frames:
    rects, weights = hog.detectMultiScale(np.ascontiguousarray(img[..., ::-1]), winStride=(8, 8))
    boxes = [(*map(float, r), float(np.clip(wt, 0, 3) / 3)) for r, wt in zip(rects, np.ravel(weights))]
    out.append(np.asarray([b for b in boxes if b[4] >= score_thresh], np.float32).reshape(-1, 5))
  return out


def whole_frame_boxes(clip):
  h, w = clip.frames.shape[1:3]
  return [np.asarray([[0, 0, w, h, 1.0]], np.float32) for _ in clip.names]


# --- Tracks and crop anchors ----------------------------------------------------------


def iou(a, b):
  """IoU of [n, 4] and [m, 4] xywh boxes -> [n, m]."""
  a = np.asarray(a, np.float64)[:, None, :4]
  b = np.asarray(b, np.float64)[None, :, :4]
  x1 = np.maximum(a[..., 0], b[..., 0])
  y1 = np.maximum(a[..., 1], b[..., 1])
  x2 = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
  y2 = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
  inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
  union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
  return inter / np.maximum(union, 1e-9)


def link_tracks(boxes, min_iou=0.3):
  """Track ids (per frame an int array) of consecutive frames' xywh boxes [n, 5]: the
  project's tracker on box IoU, a track ending when its box is missing from a frame."""
  corners = [np.concatenate([b[:, :2], b[:, :2] + b[:, 2:4]], axis=1)
             for b in (np.asarray(b, np.float64).reshape(len(b), -1) for b in boxes)]
  return tracker.link(corners, similarity='iou', min_similarity=min_iou, max_age=0)


def crop_anchors(boxes, track_ids, reanchor_iou=0.85):
  """Per frame and box, the box whose crop the window of that key frame uses.

  A window uses one affine transform for its 5 frames (as in training), taken from an
  anchor box. Holding a track's anchor while its box stays close (IoU >= reanchor_iou) makes
  consecutive windows share their crops, so the backbone features of a frame can be reused;
  the ×1.25 crop enlargement leaves room for the small drift this allows. Returns per frame
  an array [n, 4] of anchor boxes and an int array [n] of anchor ids (equal id = same crop).
  """
  current = {}  # track id -> (anchor id, box)
  anchors, anchor_ids, next_anchor = [], [], 0
  for cur, tids in zip(boxes, track_ids):
    a = np.zeros((len(cur), 4), np.float32)
    aid = np.zeros((len(cur),), int)
    for i, t in enumerate(tids):
      held = current.get(t)
      if held is None or iou(cur[i:i + 1], held[1][None])[0, 0] < reanchor_iou:
        held = (next_anchor, cur[i, :4].copy())
        next_anchor += 1
        current[t] = held
      aid[i], a[i] = held
    anchors.append(a)
    anchor_ids.append(aid)
  return anchors, anchor_ids


def window_indices(t, num_frames, offsets=(-2, -1, 1, 2)):
  """Frame indices t-2..t+2 with the key frame standing in for frames beyond the ends."""
  sup = [t + o if 0 <= t + o < num_frames else t for o in offsets]
  return sup[:2] + [t] + sup[2:]
