"""The project's pose tracker: links the people of a video's frames into tracks.

The prediction writer runs it on videos whose people have no track id (training eval,
`--mode=eval`, batch evaluation), with the thresholds of `config.eval.tracker`; `infer` runs
it online (`Tracker`, one frame at a time as the video streams) on the person boxes
(video_io.TrackLinker), which give its crops and its written ids.

Frame by frame, the people of a frame are matched to the live tracks, each represented by
its last pose (or box), by the assignment of maximum total similarity (Hungarian, scipy's
linear_sum_assignment); pairs below `min_similarity` stay apart and an unmatched person
starts a new track. A track stays live while it has missed at most `max_age` of the linked
frames. Frames without people are not linked frames: evaluation predicts labeled frames only,
which need not be consecutive.

Similarities:
* 'oks': COCO's object keypoint similarity (decode.OKS_SIGMAS) over the joints whose score is
  at least `min_joint_score` in both poses, with the mean of the two poses' keypoint-box
  areas as the scale; poses without a common joint have similarity 0.
* 'iou': intersection over union of boxes [x1, y1, x2, y2, ...].
"""

import numpy as np
from scipy import optimize

from tdmi_jax.evaluation import decode

SIMILARITIES = ('oks', 'iou')

# Defaults of config.eval.tracker (configs/posetrack18.py holds the same values).
DEFAULTS = {'similarity': 'oks', 'min_similarity': 0.3, 'max_age': 2,
            'min_joint_score': 0.2}


def oks_matrix(a, b, min_joint_score=0.0, sigmas=decode.OKS_SIGMAS):
  """OKS [len(a), len(b)] between poses a [N, K, 3] and b [M, K, 3] (x, y, score)."""
  a = np.asarray(a, np.float64).reshape(-1, len(sigmas), 3)
  b = np.asarray(b, np.float64).reshape(-1, len(sigmas), 3)
  both = (a[:, None, :, 2] >= min_joint_score) & (b[None, :, :, 2] >= min_joint_score)
  area = 0.5 * (_keypoint_area(a, min_joint_score)[:, None]
                + _keypoint_area(b, min_joint_score)[None, :])
  d2 = ((a[:, None, :, :2] - b[None, :, :, :2]) ** 2).sum(-1)
  e = d2 / (2 * sigmas) ** 2 / (area[..., None] + np.spacing(1)) / 2
  n = both.sum(-1)
  return np.where(n > 0, (np.exp(-e) * both).sum(-1) / np.maximum(n, 1), 0.0)


def _keypoint_area(poses, min_joint_score):
  box = pose_boxes(poses, min_joint_score)
  return np.prod(box[:, 2:] - box[:, :2], axis=-1)


def pose_boxes(poses, min_joint_score=0.0):
  """[n, 4] boxes (x1, y1, x2, y2) around each pose's confident joints (all if none is)."""
  poses = np.asarray(poses, np.float64).reshape(len(poses), -1, 3)
  ok = poses[..., 2] >= min_joint_score
  ok = np.where(ok.any(-1, keepdims=True), ok, True)
  lo = np.where(ok[..., None], poses[..., :2], np.inf).min(1)
  hi = np.where(ok[..., None], poses[..., :2], -np.inf).max(1)
  return np.concatenate([lo, hi], axis=-1).reshape(len(poses), 4)


def iou_matrix(a, b):
  """IoU [len(a), len(b)] of boxes [x1, y1, x2, y2, ...]."""
  a = np.asarray(a, np.float64).reshape(len(a), -1)[:, :4]
  b = np.asarray(b, np.float64).reshape(len(b), -1)[:, :4]
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class Tracker:
  """The tracker run online: call it with each frame's people in video order.

  Args: similarity, min_similarity, max_age, min_joint_score: see the module docstring.
  Holds one pose (or box) per track, never the frames themselves.
  """

  def __init__(self, similarity='oks', min_similarity=0.3, max_age=2, min_joint_score=0.2):
    if similarity not in SIMILARITIES:
      raise ValueError(f'tracker similarity must be one of {SIMILARITIES}, got {similarity!r}')
    if max_age < 0:
      raise ValueError(f'tracker max_age must be >= 0, got {max_age}')
    self.min_similarity = min_similarity
    self.max_age = max_age
    self.score = ((lambda a, b: oks_matrix(a, b, min_joint_score)) if similarity == 'oks'
                  else iou_matrix)
    self.last, self.seen = [], []  # Per track: last pose (or box), linked frame last seen.
    self.step = 0

  def __call__(self, people):
    """People of the next frame (poses [n, K, 3] or boxes [n, >=4]) -> int array [n] of
    track ids (0, 1, ... in order of appearance)."""
    people = np.asarray(people, np.float64)
    ids = np.full(len(people), -1, np.int64)
    if not len(people):
      return ids
    last, seen, step = self.last, self.seen, self.step
    live = [t for t in range(len(last)) if step - seen[t] - 1 <= self.max_age]
    if live:
      sim = self.score(people, np.stack([last[t] for t in live]))
      # A large cost for pairs below the threshold: the assignment first takes as many
      # allowed pairs as it can, then the most similar ones.
      cost = np.where(sim >= self.min_similarity, -sim, 1e6)
      rows, cols = optimize.linear_sum_assignment(cost)
      for r, c in zip(rows, cols):
        if sim[r, c] >= self.min_similarity:
          ids[r] = live[c]
    for r in np.flatnonzero(ids < 0):
      ids[r] = len(last)
      last.append(None)
      seen.append(step)
    for r, t in enumerate(ids):
      last[t] = people[r]
      seen[t] = step
    self.step += 1
    return ids


def link(frames, similarity='oks', min_similarity=0.3, max_age=2, min_joint_score=0.2):
  """Track ids for the people of consecutive frames.

  Args:
    frames: per frame in video order, an array of its people: poses [n, K, 3] for 'oks',
      boxes [n, >=4] for 'iou'.
    similarity, min_similarity, max_age, min_joint_score: see the module docstring.

  Returns:
    Per frame an int array [n] of track ids (0, 1, ... in order of appearance).
  """
  track = Tracker(similarity, min_similarity, max_age, min_joint_score)
  return [track(people) for people in frames]
