"""Frames, person boxes and tracks for running TDMI on a user's video, one frame at a time.

Everything here is model-free so `tdmi_jax.inference.infer` stays a short driver: frame
sources that decode a video or a frame folder lazily (nothing holds the whole clip), box
files in the two formats PoseTrack tools use, the offline fallback detector, online track
linking (the project's tracker on box IoU), and the crop anchors that let the streaming
feature cache reuse backbone features across windows.
"""

import dataclasses
import logging
import pathlib
import re
from typing import Callable, Iterator

import numpy as np

from tdmi_jax.data import parsers
from tdmi_jax.evaluation import tracker

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


# --- Frames ---------------------------------------------------------------------------


@dataclasses.dataclass
class FrameSource:
  """A clip whose frames are decoded one at a time, in order, by iterating it.

  Iterating yields RGB uint8 frames [H, W, 3]; only the frame being yielded is held here.
  `frame_count` is exact for a folder and the container's estimate for a video (some
  containers misreport it; the frames actually decoded are what counts).
  """
  seq_name: str
  fps: float
  frame_count: int
  names: list | None  # A folder's file names; None for a video (names are '%06d.jpg').
  _frames: Callable[[], Iterator[np.ndarray]]

  def __iter__(self):
    return self._frames()

  def name(self, t):
    return self.names[t] if self.names is not None else f'{t:06d}.jpg'


def open_frames_dir(path):
  """The image files of a folder, sorted by name, as a FrameSource."""
  import cv2  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'--frames: {path} is not a directory')
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise ValueError(f'--frames: no image files ({", ".join(IMAGE_SUFFIXES)}) in {path}')

  def frames():
    shape = None
    for f in files:
      img = cv2.imread(str(f), cv2.IMREAD_COLOR)
      if img is None:
        raise ValueError(f'Cannot decode image {f} (corrupt or not an image)')
      if shape is not None and img.shape != shape:
        raise ValueError(f'{f} has size {img.shape[:2]}, the first frame {shape[:2]}')
      shape = img.shape
      yield np.ascontiguousarray(img[..., ::-1])

  return FrameSource(path.name, 25.0, len(files), [f.name for f in files], frames)


def open_video(path):
  """A video file as a FrameSource (decoded by OpenCV as it is read)."""
  import cv2  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'--video: {path} does not exist')
  cap = cv2.VideoCapture(str(path))
  if not cap.isOpened():
    raise ValueError(f'Cannot open video {path}')
  fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
  count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
  cap.release()

  def frames():
    cap = cv2.VideoCapture(str(path))
    try:
      n = 0
      while True:
        ok, img = cap.read()
        if not ok:
          break
        n += 1
        yield np.ascontiguousarray(img[..., ::-1])
      if not n:
        raise ValueError(f'Video {path} has no decodable frames')
    finally:
      cap.release()

  return FrameSource(path.stem, float(fps), count, None, frames)


# --- Boxes ----------------------------------------------------------------------------


class BoxFile:
  """Person boxes of a clip from a box file, looked up per frame as frames arrive.

  Accepts COCO results (`image_id`, `bbox`, `score`) whose image ids are either frame
  indices or PoseTrack18 image ids of this clip, and the DCPose list format (`image_name`,
  `bbox`, `score`) whose names end with the frame's file name. Boxes below `score_thresh`
  or of at most one pixel are dropped.
  """

  def __init__(self, path, seq_name, names=None, score_thresh=0.0):
    self.path = path
    self.names = names
    by_name = None if names is None else {n: i for i, n in enumerate(names)}
    number = parsers.video_number(seq_name)
    first_id = None if number is None else parsers.posetrack_image_id(seq_name, 0)
    self.per_frame = {}
    self.num_entries = 0
    for (kind, value), box in parsers.read_box_entries(path):
      self.num_entries += 1
      if kind == 'name':
        base = pathlib.PurePath(value.replace('\\', '/')).name
        if by_name is not None:
          frame = by_name.get(base, -1)
        else:  # A video's frames are named %06d.jpg.
          frame = int(base[:6]) if re.fullmatch(r'\d{6}\.jpg', base) else -1
      elif first_id is not None and 0 <= value - first_id < 10000:
        frame = value - first_id
      else:
        frame = value
      x, y, w, h, score = box
      keep = w > 1 and h > 1 and score >= score_thresh
      self.per_frame.setdefault(frame, []).append(box if keep else None)

  def check(self, num_frames, seq_name, final=False):
    """Raises when no box names any of the clip's frames; logs how many name none."""
    known = sum(len(v) for f, v in self.per_frame.items() if 0 <= f < num_frames)
    if self.num_entries and not known:
      raise ValueError(f'--boxes: no box in {self.path} names a frame of {seq_name} '
                       f'(frame names {self.names[0] if self.names else "000000.jpg"}..., '
                       f'ids 0..{num_frames - 1})')
    if final and known < self.num_entries:
      logging.warning('%d boxes in %s name frames not in the clip; ignored',
                      self.num_entries - known, self.path)

  def __call__(self, t):
    """float32 [n, 5] (x, y, w, h, score) of frame t."""
    boxes = [b for b in self.per_frame.get(t, ()) if b is not None]
    return np.asarray(boxes, np.float32).reshape(-1, 5)


def load_boxes(path, source, score_thresh=0.0):
  """All boxes of `source` (a FrameSource), per frame: a list of float arrays [n, 5]."""
  boxes = BoxFile(path, source.seq_name, source.names, score_thresh)
  boxes.check(source.frame_count, source.seq_name, final=True)
  return [boxes(t) for t in range(source.frame_count)]


class HogDetector:
  """Offline fallback: OpenCV's HOG people detector, one frame at a time."""

  def __init__(self, score_thresh=0.0):
    import cv2  # pylint: disable=g-import-not-at-top
    self.hog = cv2.HOGDescriptor()
    self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    self.score_thresh = score_thresh

  def __call__(self, img):
    rects, weights = self.hog.detectMultiScale(np.ascontiguousarray(img[..., ::-1]),
                                               winStride=(8, 8))
    boxes = [(*map(float, r), float(np.clip(wt, 0, 3) / 3))
             for r, wt in zip(rects, np.ravel(weights))]
    return np.asarray([b for b in boxes if b[4] >= self.score_thresh],
                      np.float32).reshape(-1, 5)


def whole_frame_box(img):
  """The whole frame as one person box [1, 5]."""
  h, w = img.shape[:2]
  return np.asarray([[0, 0, w, h, 1.0]], np.float32)


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


class TrackLinker:
  """Track ids of consecutive frames' xywh boxes [n, 5], one frame at a time: the project's
  tracker (`tracker.Tracker`) on box IoU, a track ending when its box is missing from a
  frame with boxes."""

  def __init__(self, min_iou=0.3):
    self.min_iou = min_iou
    self.tracker = tracker.Tracker(similarity='iou', min_similarity=min_iou, max_age=0)

  def __call__(self, cur):
    """Boxes [n, 5] of the next frame -> their track ids, int [n]."""
    cur = np.asarray(cur, np.float64)
    xy, wh = cur[..., :2].reshape(-1, 2), cur[..., 2:4].reshape(-1, 2)  # Also for no boxes.
    return self.tracker(np.concatenate([xy, xy + wh], axis=1))


def link_tracks(boxes, min_iou=0.3):
  """Per frame int array of track ids for a list of per-frame boxes."""
  linker = TrackLinker(min_iou)
  return [linker(cur) for cur in boxes]


class CropAnchors:
  """Per frame and box, the box whose crop the window of that key frame uses.

  A window uses one affine transform for its 5 frames (as in training), taken from an
  anchor box. Holding a track's anchor while its box stays close (IoU >= reanchor_iou) makes
  consecutive windows share their crops, so the backbone features of a frame can be reused;
  the ×1.25 crop enlargement leaves room for the small drift this allows.
  """

  def __init__(self, reanchor_iou=0.85):
    self.reanchor_iou = reanchor_iou
    self.current = {}  # track id -> (anchor id, box)
    self.next_anchor = 0

  def __call__(self, cur, tids):
    """Boxes [n, 5] and track ids [n] of the next frame -> (anchor boxes [n, 4] float32,
    anchor ids [n] int; equal id = same crop)."""
    a = np.zeros((len(cur), 4), np.float32)
    aid = np.zeros((len(cur),), int)
    for i, t in enumerate(tids):
      held = self.current.get(t)
      if held is None or iou(cur[i:i + 1], held[1][None])[0, 0] < self.reanchor_iou:
        held = (self.next_anchor, cur[i, :4].copy())
        self.next_anchor += 1
        self.current[t] = held
      aid[i], a[i] = held
    # Tracks absent from this frame lose their anchor (a returning track is re-anchored).
    self.current = {t: self.current[t] for t in tids}
    return a, aid


def crop_anchors(boxes, track_ids, reanchor_iou=0.85):
  """Per frame an array [n, 4] of anchor boxes and an int array [n] of anchor ids."""
  anchors = CropAnchors(reanchor_iou)
  out = [anchors(cur, tids) for cur, tids in zip(boxes, track_ids)]
  return [a for a, _ in out], [i for _, i in out]


def window_indices(t, num_frames, offsets=(-2, -1, 1, 2)):
  """Frame indices t-2..t+2 with the key frame standing in for frames beyond the ends."""
  sup = [t + o if 0 <= t + o < num_frames else t for o in offsets]
  return sup[:2] + [t] + sup[2:]
