"""PoseTrack per-joint AP computed by the rules of the official poseval tool.

A clean-room, vectorised re-implementation (SPEC §8). The rules it follows, in order:

Reading (per video file, GT and predictions alike; 2017 "annolist" or 2018 COCO-like):
* 2018 files are read the way poseval converts them to its internal 2017 form: only the
  images of the first video (by the image file's folder name) count; a landmark is kept
  unless x == y == visibility == 0 (visibility plays no other part); the landmark score
  is `scores[k]` when the `scores` list is non-empty, else the fallback -9999; the head
  box is `bbox_head` [x, y, w, h] -> (x, y, x + w, y + h); ears are not evaluated.
* 2017 files are used as they are: a person is kept only if it has `annopoints[0].point`;
  for each joint id the first point carrying it is used.
* GT and prediction frames are paired by position; the counts must agree.

Evaluation:
* Frames whose GT lists no person at all are dropped (a GT person with no points still
  keeps its frame in the evaluation).
* Ignore regions (GT frame polygons): points strictly inside any polygon (even-odd rule,
  boundary excluded) are removed from GT and predictions; a person left with no point is
  removed, in frames that have ignore regions only.
* Head size = 0.6 x head-box diagonal; a predicted joint matches a GT joint within 0.5
  head sizes. PCKh of a (prediction, GT) pair = matched joints / annotated GT joints.
  Each prediction keeps only its best GT (first on ties); each GT then takes the
  prediction with the highest remaining PCKh (first on ties) if that PCKh is > 0.
  Scores play no part in matching.
* Every predicted joint is scored: a joint of a matched prediction is a true positive iff
  it is within the threshold of its GT's joint (an unannotated GT joint makes it a false
  positive); all joints of an unmatched prediction are false positives.
* Per joint, the labelled scores of all frames are pooled (frame order, then prediction
  order), sorted by `np.argsort(scores)[::-1]` as poseval does (this fixes the order of
  tied scores), and scored with VOC all-points AP against the number of annotated GT
  joints. A joint with no prediction at all gets AP 0. Total = mean of the 15 per-joint
  APs that are not NaN; the column summaries are means over their joints.

Distances use the same floating-point operations as poseval (vector norms through a
dot product), so matches exactly at the 0.5 threshold agree bit for bit.
"""

import dataclasses
import numbers
import os

import numpy as np

from tdmi_jax import fileio
from tdmi_jax import keypoints
from tdmi_jax import paths

MIN_SCORE = -9999.0   # poseval's score for a predicted joint without a score.
MAX_TRACK_ID = 10000  # poseval rejects track ids at or above this.
DIST_THRESH = 0.5     # In head sizes.
CHUNK_ELEMENTS = 1 << 21  # Padded (frame, pred, GT, joint) entries matched at once.
NUM_POSEVAL_JOINTS = len(keypoints.POSEVAL_JOINT_NAMES)

# 2018 landmark name -> poseval joint id (neck is called head_bottom in the files).
_NAME_TO_POSEVAL = {keypoints.JOINT_NAMES[slot]: j
                    for j, slot in enumerate(keypoints.POSEVAL_FROM_POSETRACK)}


class EvalInputError(ValueError):
  """Bad evaluation input; the message names the file."""


# --- Reading ---------------------------------------------------------------------------


@dataclasses.dataclass
class VideoPeople:
  """All people of one video file, flat, in file order (frame, then person).

  Attributes:
    name: the file path (for messages).
    num_frames: frames of the video.
    rects_per_frame: int [F], persons listed per frame (before any filtering).
    frame: int [N], frame of each person.
    point_id: float [N, M] poseval joint id of each point, NaN for padding.
    point_xy: float [N, M, 2].
    point_score: float [N, M].
    head: float [N, 4] head box (x1, y1, x2, y2), NaN if none.
    has_points: bool [N], the person carries a point list at all.
    track_id: list of N track ids (None if absent).
    ignore: list of F lists of polygons (float [V, 2]).
    format: '2017' (annolist) or '2018' (COCO-like), the file's format.
  """
  name: str
  num_frames: int
  rects_per_frame: np.ndarray
  frame: np.ndarray
  point_id: np.ndarray
  point_xy: np.ndarray
  point_score: np.ndarray
  head: np.ndarray
  has_points: np.ndarray
  track_id: list
  ignore: list
  format: str = '2018'


def first_value(value):
  """Unwraps the one-element lists of the 2017 format (and accepts bare values)."""
  if isinstance(value, (list, tuple)):
    return value[0] if value else None
  return value


def _number(value, what, name):
  value = first_value(value)
  try:
    number = float(value)
  except (TypeError, ValueError, OverflowError):
    raise EvalInputError(f'{name}: {what} is not a number a float can hold: '
                         f'{str(value)[:40]!r}') from None
  if not np.isfinite(number):
    raise EvalInputError(f'{name}: {what} is non-finite ({value!r}): NaN or Infinity '
                         'cannot be ranked or matched')
  return number


def _check_finite(values, rows, what, name):
  """values [n, ...]: the first row holding NaN or Infinity is an error naming it."""
  bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
  if bad.size:
    raise EvalInputError(f'{name}: {what.format(rows[bad[0]])} holds a non-finite value '
                         '(NaN or Infinity), which cannot be ranked or matched')


def _polygons_2018(info, name):
  if 'ignore_regions_x' not in info or 'ignore_regions_y' not in info:
    return []
  polys = []
  try:
    for xs, ys in zip(info['ignore_regions_x'], info['ignore_regions_y']):
      n = min(len(xs), len(ys))
      polys.append(np.asarray([xs[:n], ys[:n]], dtype=np.float64).T.reshape(n, 2))
  except (TypeError, ValueError, OverflowError) as e:
    raise EvalInputError(f'{name}: malformed ignore regions in image '
                         f'{info.get("id")!r} ({e})') from None
  if polys and not all(np.isfinite(p).all() for p in polys):
    raise EvalInputError(f'{name}: the ignore regions of image {info.get("id")!r} hold a '
                         'non-finite value (NaN or Infinity)')
  return polys


def _video_key(file_name):
  return os.path.basename(os.path.dirname(str(file_name))).split('_')[0]


def _read_2018(data, name):
  try:
    images = data['images']
    annotations = data.get('annotations') or []
    categories = data['categories']
  except (KeyError, TypeError):
    raise EvalInputError(
        f'{name}: a 2018-format file needs "images" and "categories" (or "annolist" '
        'for the 2017 format)') from None
  if (not isinstance(categories, list) or len(categories) != 1
      or categories[0].get('name') != 'person'):
    raise EvalInputError(f'{name}: "categories" must hold exactly one "person" entry')
  names = categories[0].get('keypoints') or []
  if len(names) not in (15, 17):
    raise EvalInputError(f'{name}: categories[0].keypoints must list 15 or 17 names, '
                         f'got {len(names)}')
  missing = sorted(set(_NAME_TO_POSEVAL) - set(names))
  if missing:
    raise EvalInputError(f'{name}: categories[0].keypoints lacks {missing}')
  num_kp = len(names)
  slots = [k for k, n in enumerate(names) if n in _NAME_TO_POSEVAL]
  ids = np.array([_NAME_TO_POSEVAL[names[k]] for k in slots], dtype=np.float64)

  if not isinstance(images, list) or not all(isinstance(i, dict) and 'id' in i
                                             for i in images):
    raise EvalInputError(f'{name}: "images" must be a list of objects with an "id"')
  first_info = {}
  for info in images:
    first_info.setdefault(info['id'], info)
  # Only the first video of a file counts (poseval converts a file video by video).
  keys = [_video_key(first_info[i['id']].get('file_name', '')) for i in images]
  frame_ids = [i['id'] for i, k in zip(images, keys) if k == keys[0]]

  by_image = {}
  for a, ann in enumerate(annotations):
    if not isinstance(ann, dict) or 'image_id' not in ann:
      raise EvalInputError(f'{name}: annotations[{a}] has no "image_id"')
    by_image.setdefault(ann['image_id'], []).append(a)

  order = [a for fid in frame_ids for a in by_image.get(fid, [])]
  frame = np.array([f for f, fid in enumerate(frame_ids)
                    for _ in by_image.get(fid, [])], dtype=np.int64)
  rects = np.array([len(by_image.get(fid, [])) for fid in frame_ids], dtype=np.int64)
  n = len(order)
  kps = np.zeros((n, num_kp, 3))
  scores = np.full((n, len(slots)), MIN_SCORE)
  head = np.full((n, 4), np.nan)
  track = []
  # Fast path: one array conversion for the whole file when every list is well formed.
  try:
    kps[:] = np.array([annotations[a]['keypoints'] for a in order],
                      dtype=np.float64).reshape(n, num_kp, 3)
    kp_done = True
  except (KeyError, TypeError, ValueError, OverflowError):
    kp_done = False
  sc_lists = [annotations[a].get('scores') for a in order]
  try:
    full = [r for r, sc in enumerate(sc_lists) if sc and len(sc) == num_kp]
    if full:
      values = np.array([sc_lists[r] for r in full], dtype=np.float64)
      _check_finite(values, [order[r] for r in full], 'annotations[{}].scores', name)
      scores[full] = values[:, slots]
    sc_done = set(full)
  except (TypeError, ValueError, OverflowError) as e:
    if isinstance(e, EvalInputError):
      raise
    sc_done = set()
  for row, a in enumerate(order):
    ann = annotations[a]
    if not kp_done:
      try:
        kps[row] = np.asarray(ann.get('keypoints'), dtype=np.float64).reshape(num_kp, 3)
      except (TypeError, ValueError, OverflowError):
        raise EvalInputError(
            f'{name}: annotations[{a}].keypoints must hold {3 * num_kp} numbers a float can '
            'hold') from None
    sc = sc_lists[row]
    if sc and row not in sc_done:
      if len(sc) < num_kp:
        raise EvalInputError(f'{name}: annotations[{a}].scores has {len(sc)} values, '
                             f'needs {num_kp}')
      try:
        values = np.asarray(sc, dtype=np.float64)
      except (TypeError, ValueError, OverflowError):
        raise EvalInputError(f'{name}: annotations[{a}].scores are not numbers a float can '
                             'hold') from None
      _check_finite(values[None, :num_kp], [a], 'annotations[{}].scores', name)
      scores[row] = values[slots]
    hb = ann.get('bbox_head')
    if hb is not None:
      try:
        x, y, w, h = (float(v) for v in hb)
      except (TypeError, ValueError, OverflowError):
        raise EvalInputError(f'{name}: annotations[{a}].bbox_head must be [x, y, w, h]'
                             ) from None
      head[row] = (x, y, x + w, y + h)
      _check_finite(head[row:row + 1], [a], 'annotations[{}].bbox_head', name)
    track.append(ann.get('track_id'))

  _check_finite(kps, order, 'annotations[{}].keypoints', name)
  kp = kps[:, slots]
  # An unannotated landmark is stored as (0, 0, 0) and is dropped; nothing else is.
  present = ~((kp[..., 0] == 0) & (kp[..., 1] == 0) & (kp[..., 2] == 0))
  point_id = np.where(present, ids[None], np.nan)
  return VideoPeople(
      name=name, num_frames=len(frame_ids), rects_per_frame=rects, frame=frame,
      point_id=point_id, point_xy=kp[..., :2].copy(), point_score=scores, head=head,
      has_points=np.ones(n, bool), track_id=track,
      ignore=[_polygons_2018(first_info[fid], name) for fid in frame_ids])


def _read_2017(data, name):
  annolist = data['annolist']
  if not isinstance(annolist, list):
    raise EvalInputError(f'{name}: "annolist" must be a list of frames')
  frame, heads, has_points, track, point_lists, rects, ignore = [], [], [], [], [], [], []
  for f, fr in enumerate(annolist):
    if not isinstance(fr, dict):
      raise EvalInputError(f'{name}: annolist[{f}] is not an object')
    annorect = fr.get('annorect') or []
    rects.append(len(annorect))
    polys = []
    for region in fr.get('ignore_regions') or []:
      pts = (region.get('point') or []) if isinstance(region, dict) else []
      polys.append(np.array(
          [[_number(p.get('x'), f'annolist[{f}] ignore point x', name),
            _number(p.get('y'), f'annolist[{f}] ignore point y', name)] for p in pts],
          dtype=np.float64).reshape(-1, 2))
    ignore.append(polys)
    for rect in annorect:
      if not isinstance(rect, dict):
        raise EvalInputError(f'{name}: annolist[{f}].annorect holds a non-object')
      ap = rect.get('annopoints')
      if isinstance(ap, dict):
        ap = [ap]
      ok = bool(ap) and isinstance(ap[0], dict) and 'point' in ap[0]
      pts = (ap[0]['point'] or []) if ok else []
      points = []
      for p in pts:
        pid = first_value(p.get('id'))
        try:
          pid = float(pid)
        except (TypeError, ValueError, OverflowError):
          pid = np.nan
        score = first_value(p['score']) if 'score' in p else MIN_SCORE
        points.append((pid, _number(p.get('x'), f'annolist[{f}] point x', name),
                       _number(p.get('y'), f'annolist[{f}] point y', name),
                       _number(score, f'annolist[{f}] point score', name)))
      if all(k in rect for k in ('x1', 'y1', 'x2', 'y2')):
        heads.append([_number(rect[k], f'annolist[{f}] head box {k}', name)
                      for k in ('x1', 'y1', 'x2', 'y2')])
      else:
        heads.append([np.nan] * 4)
      frame.append(f)
      has_points.append(ok)
      track.append(first_value(rect.get('track_id')))
      point_lists.append(points)
  n = len(frame)
  m = max([len(p) for p in point_lists] + [1])
  pts = np.full((n, m, 4), np.nan)
  for i, p in enumerate(point_lists):
    if p:
      pts[i, :len(p)] = p
  # A point with a missing id is still a point (it keeps its person alive) but is no joint.
  point_id = np.where(np.isnan(pts[..., 0]) & ~np.isnan(pts[..., 1]), -1.0, pts[..., 0])
  return VideoPeople(
      name=name, num_frames=len(annolist), rects_per_frame=np.array(rects, np.int64),
      frame=np.array(frame, np.int64), point_id=point_id, point_xy=pts[..., 1:3],
      point_score=pts[..., 3], head=np.array(heads, np.float64).reshape(n, 4),
      has_points=np.array(has_points, bool), track_id=track, ignore=ignore, format='2017')


def read_video(data, name='<memory>'):
  """Parses one per-video JSON object (2017 or 2018 format) into VideoPeople."""
  if not isinstance(data, dict):
    raise EvalInputError(f'{name}: top level must be a JSON object')
  try:
    if 'annolist' in data:
      return _read_2017(data, name)
    return _read_2018(data, name)
  except EvalInputError:
    raise
  except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
    raise EvalInputError(f'{name}: malformed PoseTrack file ({type(e).__name__}: {e})'
                         ) from None


def _check_track_ids(video, is_pred):
  for t in video.track_id:
    if t is not None and not (isinstance(t, numbers.Real) and t < MAX_TRACK_ID):
      raise EvalInputError(f'{video.name}: track_id {t!r} must be a number below '
                           f'{MAX_TRACK_ID} (poseval rejects it)')
  if is_pred:
    seen = set()
    for f, t in zip(video.frame.tolist(), video.track_id):
      if t is not None:
        if (f, t) in seen:
          raise EvalInputError(f'{video.name}: frame {f} has track_id {t} twice '
                               '(poseval rejects non-unique track ids in a frame)')
        seen.add((f, t))


# --- Geometry --------------------------------------------------------------------------


def norm2(v):
  """Euclidean norm over the last axis (size 2), bit-identical to np.linalg.norm on a
  single vector: that goes through a BLAS dot product, which a stacked matmul of
  vectors also uses (a plain x*x + y*y can differ in the last bit)."""
  return np.sqrt(np.matmul(v[..., None, :], v[..., :, None])[..., 0, 0])


def points_in_polygon(points, polygon):
  """bool [N]: points strictly inside the polygon (even-odd rule; boundary is outside).

  Follows the ray-crossing rule of GEOS (shapely's `contains`) so self-intersecting
  ignore regions behave as in poseval.
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  polygon = np.asarray(polygon, np.float64).reshape(-1, 2)
  if len(polygon) < 3 or len(points) == 0:
    return np.zeros(len(points), bool)
  px, py = points[:, 0:1], points[:, 1:2]
  x1, y1 = polygon[None, :, 0], polygon[None, :, 1]
  x2, y2 = np.roll(x1, -1, axis=1), np.roll(y1, -1, axis=1)
  left_of = (x1 < px) & (x2 < px)
  at_vertex = (px == x2) & (py == y2)
  horizontal = (y1 == py) & (y2 == py)
  on_horizontal = horizontal & (px >= np.minimum(x1, x2)) & (px <= np.maximum(x1, x2))
  straddles = ((y1 > py) & (y2 <= py)) | ((y2 > py) & (y1 <= py))
  det = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
  orient = np.sign(det) * np.where(y2 < y1, -1, 1)
  live = ~left_of
  boundary = live & (at_vertex | (~at_vertex & on_horizontal) |
                     (~at_vertex & ~horizontal & straddles & (det == 0)))
  crossing = live & ~at_vertex & ~horizontal & straddles & (orient > 0)
  return ~boundary.any(axis=1) & (crossing.sum(axis=1) % 2 == 1)


# --- Per-frame filtering and joint extraction ----------------------------------------


@dataclasses.dataclass
class _Joints:
  frame: np.ndarray   # int [N] global evaluated-frame index.
  xy: np.ndarray      # [N, 15, 2]
  has: np.ndarray     # bool [N, 15]
  score: np.ndarray   # [N, 15]
  head: np.ndarray    # [N] head size (GT only).
  source: list        # [N] (file name, frame in file) for messages.
  person: np.ndarray  # int [N] row in the VideoPeople it came from (for track ids).


def prepare_people(video, keep_frame, frame_offset, polygons):
  """Applies poseval's cleanup and ignore regions; returns one person per row."""
  kept = keep_frame[video.frame] & video.has_points
  idx = np.flatnonzero(kept)
  valid = ~np.isnan(video.point_id[idx])
  frames = video.frame[idx]
  alive = np.ones(len(idx), bool)
  for f in np.unique(frames):
    if not polygons[f]:
      continue
    rows = np.flatnonzero(frames == f)
    sel = valid[rows]
    pts = video.point_xy[idx[rows]][sel]
    inside = np.zeros(len(pts), bool)
    for poly in polygons[f]:
      inside |= points_in_polygon(pts, poly)
    v = sel.copy()
    v[sel] = ~inside
    valid[rows] = v
    alive[rows] = v.any(axis=1)
  idx, valid, frames = idx[alive], valid[alive], frames[alive]
  pid = np.where(valid, video.point_id[idx], np.nan)
  eq = pid[:, :, None] == np.arange(NUM_POSEVAL_JOINTS)[None, None, :]  # [N, M, 15]
  has = eq.any(axis=1)
  first = np.argmax(eq, axis=1)  # First point carrying each joint id.
  rows = np.arange(len(idx))[:, None]
  xy = video.point_xy[idx][rows, first]
  score = video.point_score[idx][rows, first]
  hb = video.head[idx]
  head = 0.6 * norm2(np.stack([hb[:, 2] - hb[:, 0], hb[:, 3] - hb[:, 1]], -1))
  return _Joints(frame=frame_offset[frames], xy=xy, has=has, score=score, head=head,
                 source=[(video.name, int(f)) for f in frames], person=idx)


def _concat(parts):
  return _Joints(
      frame=np.concatenate([p.frame for p in parts]).astype(np.int64),
      xy=np.concatenate([p.xy for p in parts]).reshape(-1, NUM_POSEVAL_JOINTS, 2),
      has=np.concatenate([p.has for p in parts]).reshape(-1, NUM_POSEVAL_JOINTS),
      score=np.concatenate([p.score for p in parts]).reshape(-1, NUM_POSEVAL_JOINTS),
      head=np.concatenate([p.head for p in parts]),
      source=[s for p in parts for s in p.source],
      person=np.concatenate([p.person for p in parts]).astype(np.int64))


# --- Matching --------------------------------------------------------------------------


def _scatter(people, lo, hi, f0, nf):
  """Pads the people of frames [lo, hi) (rows of a frame-sorted array) per frame."""
  frame = people.frame[lo:hi] - f0
  starts = np.searchsorted(frame, np.arange(nf))
  rank = np.arange(hi - lo) - starts[frame]
  size = int(rank.max()) + 1 if hi > lo else 0
  return frame, rank, max(size, 1)


def _match_chunk(gt, pr, g_lo, g_hi, p_lo, p_hi, f0, nf):
  """Labels (bool [p_hi - p_lo, 15]) of the predictions of frames [f0, f0 + nf)."""
  gf, gr, gm = _scatter(gt, g_lo, g_hi, f0, nf)
  pf, prk, pm = _scatter(pr, p_lo, p_hi, f0, nf)
  j = NUM_POSEVAL_JOINTS
  g_xy = np.zeros((nf, gm, j, 2))
  g_has = np.zeros((nf, gm, j), bool)
  g_head = np.ones((nf, gm))
  g_real = np.zeros((nf, gm), bool)
  g_xy[gf, gr] = gt.xy[g_lo:g_hi]
  g_has[gf, gr] = gt.has[g_lo:g_hi]
  g_head[gf, gr] = gt.head[g_lo:g_hi]
  g_real[gf, gr] = True
  p_xy = np.zeros((nf, pm, j, 2))
  p_has = np.zeros((nf, pm, j), bool)
  p_real = np.zeros((nf, pm), bool)
  p_xy[pf, prk] = pr.xy[p_lo:p_hi]
  p_has[pf, prk] = pr.has[p_lo:p_hi]
  p_real[pf, prk] = True

  with np.errstate(divide='ignore', invalid='ignore'):
    dist = norm2(g_xy[:, None] - p_xy[:, :, None]) / g_head[:, None, :, None]
  both = p_has[:, :, None, :] & g_has[:, None, :, :]
  match = both & (dist <= DIST_THRESH)                       # [nf, pm, gm, 15]
  n_gt = g_has.sum(-1)                                       # [nf, gm]
  hits = match.sum(-1).astype(np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    pck = np.where(n_gt[:, None, :] > 0, hits / n_gt[:, None, :], hits)
  pck = np.where(g_real[:, None, :], pck, -np.inf)
  best_gt = np.argmax(pck, axis=2)                           # [nf, pm]
  keep = np.arange(gm)[None, None, :] == best_gt[..., None]
  pck = np.where(keep, pck, 0.0)
  pck = np.where(p_real[:, :, None], pck, -np.inf)
  best_pr = np.argmax(pck, axis=1)                           # [nf, gm]
  gt_matched = g_real & (np.max(pck, axis=1) > 0)
  assigned = np.full((nf, pm), -1)
  ff, gg = np.nonzero(gt_matched)
  assigned[ff, best_pr[ff, gg]] = gg
  a = assigned[pf, prk]
  labels = match[pf, prk, np.maximum(a, 0)] & (a >= 0)[:, None]
  # poseval needs the head box of every GT person in a frame with predictions.
  bad = g_real & np.isnan(g_head) & p_real.any(axis=1)[:, None]
  if bad.any():
    f, g = np.argwhere(bad)[0]
    row = g_lo + int(np.flatnonzero((gf == f) & (gr == g))[0])
    name, frame = gt.source[row]
    raise EvalInputError(f'{name}: a GT person in frame {frame} has no head box '
                         '(bbox_head / x1,y1,x2,y2)')
  return labels


def _match(gt, pr, num_frames):
  """Labels of every predicted joint, bool [len(pr.frame), 15]."""
  labels = np.zeros(pr.has.shape, bool)
  g_count = np.bincount(gt.frame, minlength=num_frames)
  p_count = np.bincount(pr.frame, minlength=num_frames)
  g_start = np.concatenate([[0], np.cumsum(g_count)])
  p_start = np.concatenate([[0], np.cumsum(p_count)])
  # Frames with both GT and predictions, cut into chunks of bounded padded size.
  f0, gmax, pmax = 0, 1, 1
  for f in range(num_frames + 1):
    if f < num_frames:
      ng, npr = max(g_count[f], 1), max(p_count[f], 1)
      cost = (f - f0 + 1) * max(gmax, ng) * max(pmax, npr) * NUM_POSEVAL_JOINTS
      if cost <= CHUNK_ELEMENTS or f == f0:
        gmax, pmax = max(gmax, ng), max(pmax, npr)
        continue
    p_lo, p_hi = p_start[f0], p_start[f]
    if p_hi > p_lo:
      labels[p_lo:p_hi] = _match_chunk(gt, pr, g_start[f0], g_start[f], p_lo, p_hi,
                                       f0, f - f0)
    f0, gmax, pmax = f, 1, 1
    if f < num_frames:
      gmax, pmax = max(g_count[f], 1), max(p_count[f], 1)
  return labels


# --- AP ---------------------------------------------------------------------------------


def voc_ap(scores, labels, num_gt):
  """poseval's AP in percent: VOC all-points interpolation over the ranked scores."""
  scores = np.asarray(scores, np.float64)
  if scores.size == 0:
    return 0.0
  order = np.argsort(scores)[::-1]
  tp = np.cumsum(np.asarray(labels)[order] == 1)
  with np.errstate(divide='ignore', invalid='ignore'):
    recall = tp / np.float64(num_gt)
  precision = tp / np.arange(1, len(tp) + 1)
  mpre = np.concatenate([[0.0], precision, [0.0]])
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i])) * 100


def summarize(per_joint_ap):
  """{'summary': {column: AP}, 'per_joint': {name: AP}} from 15 APs in poseval order."""
  ap = np.asarray(per_joint_ap, np.float64)
  summary = {col: float(ap[list(js)].mean()) for col, js in keypoints.POSEVAL_COLUMNS}
  finite = ap[~np.isnan(ap)]
  summary['Total'] = float(finite.mean()) if finite.size else float('nan')
  return {'summary': summary,
          'per_joint': {n: float(v) for n, v in zip(keypoints.POSEVAL_JOINT_NAMES, ap)}}


def format_table(result):
  """poseval's LaTeX-style table of a result dict: a header line and a row, one decimal."""
  columns = keypoints.SUMMARY_COLUMNS
  header = '&' + ' &'.join(f' {c:<4}' for c in columns) + '\\\\'
  cells = ['{:>5}'.format('%1.1f' % result['summary'][c]) for c in columns]
  return header + '\n&' + ' &'.join(cells) + ' \\\\'


# --- Entry points -------------------------------------------------------------------------


def parse_pair(name, gt_data, pr_data):
  """(gt, pred) VideoPeople of one video (parsed JSON objects or VideoPeople), checked the
  way poseval checks them on loading (frame counts agree, track ids)."""
  gt = gt_data if isinstance(gt_data, VideoPeople) else read_video(
      gt_data, f'{name} (ground truth)')
  pr = pr_data if isinstance(pr_data, VideoPeople) else read_video(
      pr_data, f'{name} (predictions)')
  if pr.num_frames != gt.num_frames:
    raise EvalInputError(f'{pr.name}: {pr.num_frames} prediction frames but the '
                         f'ground truth has {gt.num_frames}')
  _check_track_ids(gt, is_pred=False)
  _check_track_ids(pr, is_pred=True)
  return gt, pr


def evaluate_videos(pairs):
  """AP over (gt, pred) pairs of parsed JSON objects or VideoPeople, in pooling order.

  Each pair is (name, gt_data, pred_data). Returns the `--json_out` dict:
  {'summary': {...}, 'per_joint': {...}, 'num_frames': N}.
  """
  gt_parts, pr_parts, num_frames = [], [], 0
  for name, gt_data, pr_data in pairs:
    gt, pr = parse_pair(name, gt_data, pr_data)
    keep = gt.rects_per_frame > 0
    offset = np.full(gt.num_frames, -1, np.int64)
    offset[keep] = num_frames + np.arange(int(keep.sum()))
    gt_parts.append(prepare_people(gt, keep, offset, gt.ignore))
    pr_parts.append(prepare_people(pr, keep, offset, gt.ignore))
    num_frames += int(keep.sum())
  if not gt_parts:
    raise EvalInputError('no videos to evaluate')
  gt, pr = _concat(gt_parts), _concat(pr_parts)
  labels = _match(gt, pr, num_frames)
  n_gt = gt.has.sum(axis=0)
  aps = []
  for j in range(NUM_POSEVAL_JOINTS):
    sel = pr.has[:, j]
    aps.append(voc_ap(pr.score[sel, j], labels[sel, j], float(n_gt[j])))
  out = summarize(aps)
  out['num_frames'] = num_frames
  return out


def gt_files(gt_dir):
  """The sorted `*.json` files of `gt_dir` (local or a `gs://` URI), as paths."""
  gt_dir = paths.path(gt_dir)
  if not gt_dir.is_dir():
    raise EvalInputError(f'{gt_dir}: ground-truth directory does not exist')
  files = sorted((f for f in gt_dir.iterdir() if f.name.endswith('.json')), key=os.fspath)
  if not files:
    raise EvalInputError(f'{gt_dir}: no *.json ground-truth files')
  return files


def read_pairs(gt_dir, pred_dir):
  """(name, gt VideoPeople, pred VideoPeople) of every GT file of gt_dir, in order, read as
  they are used (a generator); every GT file `gt_dir/<video>.json` needs
  `pred_dir/<video>.json`, which is checked at once."""
  files = gt_files(gt_dir)
  pred_dir = paths.path(pred_dir)
  if not pred_dir.is_dir():
    raise EvalInputError(f'{pred_dir}: prediction directory does not exist')
  names = [f.name for f in files]
  present = {f.name for f in pred_dir.iterdir()}  # One listing, not a request per file.
  missing = [n for n in names if n not in present]
  for f, n in zip(files, names):
    if n in missing:
      # An unreadable GT file (say, notes saved as *.json) is the problem to report, not
      # its missing prediction.
      read_video(fileio.load_json(f, EvalInputError), f)
  if missing:
    shown = ', '.join(missing[:10]) + (f' and {len(missing) - 10} more'
                                       if len(missing) > 10 else '')
    raise EvalInputError(f'{pred_dir}: missing prediction files for {len(missing)} of '
                         f'{len(names)} GT videos: {shown}')

  def pairs():
    for f, n in zip(files, names):
      p = pred_dir / n
      yield (n, read_video(fileio.load_json(f, EvalInputError), f),
             read_video(fileio.load_json(p, EvalInputError), p))

  return pairs()


def evaluate_dirs(gt_dir, pred_dir):
  """poseval AP of the per-video prediction files in pred_dir against gt_dir.

  Every GT file `gt_dir/<video>.json` needs `pred_dir/<video>.json`. Returns
  {'summary': {Head..Ankl, Total}, 'per_joint': {15 names}, 'num_frames': N} in percent.
  """
  return evaluate_videos(read_pairs(gt_dir, pred_dir))
