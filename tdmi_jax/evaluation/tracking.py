"""PoseTrack pose-tracking metrics (MOTA, MOTP, precision, recall) by the rules of the
official poseval tool (`poseval -t`, which counts events with motmetrics 1.4.0).

A clean-room re-implementation that reuses the AP module's reading and cleanup. The rules,
as poseval applies them:

Reading and cleanup (shared with AP, see posetrack_map):
* Frames whose GT lists no person are dropped; people without a point list are dropped;
  points inside the GT frame's ignore regions are removed from GT and predictions, and a
  person left without a point goes.
* Track ids: a 2018 file must give every person a `track_id` (poseval's conversion fails
  otherwise); a 2017 file may leave it out, and then, per frame, the ids of the people that
  have one are handed out by position to the frame's people (after cleanup), so a missing
  id shifts the later ids onto earlier people. A person that is left without an id and has
  a joint makes poseval fail, and is reported here as an error naming the file. Ids must be
  numbers below 10000 and prediction ids unique within a frame (posetrack_map checks).

Per video (a GT file is one sequence with its own accumulators, one per joint):
* The last frame that survives the cleanup is left out (poseval drops it).
* A frame with both GT and predicted people: for each joint, the GT people that have that
  joint are the objects and the predictions that have it the hypotheses; a pair can match
  when the distance is within 0.5 head sizes (head size = 0.6 x head-box diagonal), and its
  motmetrics distance is that normalised distance.
* A frame with GT people but no prediction, or predictions but no GT person (all removed by
  ignore regions), adds for every joint one object and one hypothesis that cannot match:
  one miss and one false positive, whatever the number of people.
* motmetrics' update: object/hypothesis pairs of the previous frames are kept where they
  still can match; the rest is assigned with minimum total distance (motmetrics' solver, so
  ties break as in poseval); a kept object paired with a new hypothesis is a switch.

Metrics per joint over all videos, in percent, as poseval forms them:
* MOTA = 1 - (misses + switches + false positives) / objects (NaN without objects);
* MOTP = 1 - D / detections, detections = matches + switches (0 without detections),
  where D sums the distance column of all motmetrics events, its 'RAW' events included:
  every pair within the threshold once, every match or switch once more, and once more
  again for each of its 'ASCEND', 'TRANSFER' and 'MIGRATE' events (so MOTP can drop below 0);
* Prec = detections / (detections + false positives); Rec = detections / objects;
* Total = mean over the joints whose value is not NaN; the table's column values are
  plain means of their joints.

One difference by design: a video with a single surviving frame makes poseval stop with an
IndexError (nothing is left after dropping the last frame); here it adds nothing.
"""

import dataclasses

import numpy as np

from tdmi_jax import keypoints
from tdmi_jax.evaluation import posetrack_map

METRICS = ('MOTA', 'MOTP', 'Prec', 'Rec')
NUM_JOINTS = posetrack_map.NUM_POSEVAL_JOINTS


@dataclasses.dataclass
class Counts:
  """motmetrics' event counts per poseval joint, summed over sequences (float [15] each)."""
  objects: np.ndarray
  misses: np.ndarray
  false_positives: np.ndarray
  matches: np.ndarray
  switches: np.ndarray
  sum_d: np.ndarray

  @classmethod
  def zeros(cls, num_joints=NUM_JOINTS):
    return cls(*(np.zeros(num_joints) for _ in dataclasses.fields(cls)))


class _State:
  """motmetrics' MOTAccumulator state per joint over dense object / hypothesis ids."""

  def __init__(self, num_joints, num_objects, num_hyps):
    self.pair = np.full((num_joints, num_objects), -1)      # Object -> last hypothesis.
    self.res = np.full((num_joints, num_hyps), -1)          # Hypothesis -> last object.
    self.hyp_seen = np.zeros((num_joints, num_hyps), bool)   # Hypothesis ever matched.
    self.obj_seen = np.zeros((num_joints, num_objects), bool)  # Object ever matched.
    self.occurred = np.zeros((num_joints, num_objects), bool)  # Object in an earlier frame.


def _assign(cost):
  """motmetrics' minimum-cost assignment (NaN: no pair) -> (rows, cols) of real pairs."""
  # Imported here: motmetrics pulls in pandas (about a second), and most frames are solved
  # without it. Its default solver is what poseval gets, so ties break the same way.
  from motmetrics import lap  # pylint: disable=g-import-not-at-top
  rows, cols = lap.linear_sum_assignment(cost)
  keep = np.isfinite(cost[rows, cols]) if len(rows) else np.zeros(0, bool)
  return rows[keep], cols[keep]


def _events(st, c, j, o, h, d):
  """Counts assigned pairs (arrays j, o, h, d) as motmetrics' step 2 does and updates the
  state. Pairs given together must not share an object or a hypothesis of one joint (they
  would interact through the state); `_update_sequential` passes one pair at a time."""
  prev = st.pair[j, o]
  switch = (prev >= 0) & (prev != h)
  ascend = switch & ~st.hyp_seen[j, h]
  owner = st.res[j, h]
  transfer = (owner >= 0) & (owner != o)
  migrate = transfer & ~st.obj_seen[j, o]
  np.add.at(c.sum_d, j, d * (1 + ascend + transfer + migrate))
  np.add.at(c.switches, j, switch)
  np.add.at(c.matches, j, ~switch)
  st.hyp_seen[j, h] = True
  st.obj_seen[j, o] = True
  st.pair[j, o] = h
  st.res[j, h] = o


def _update_sequential(st, c, o, h, gt_has, pr_has, d):
  """motmetrics' update step by step, for frames with a repeated id (rare: then pairs of
  one frame interact through the state). Arrays as in `update`, without the V axis."""
  c.objects += gt_has.sum(1)
  c.sum_d += np.where(np.isnan(d), 0.0, d).sum((1, 2))  # motmetrics' 'RAW' events.
  for j in range(gt_has.shape[0]):
    rows, cols = np.flatnonzero(gt_has[j]), np.flatnonzero(pr_has[j])
    oids, hids = o[rows], h[cols]
    dist = d[j][np.ix_(rows, cols)].copy()
    omask = np.zeros(len(rows), bool)
    hmask = np.zeros(len(cols), bool)
    if len(rows) and len(cols):
      for i, oid in enumerate(oids):
        hprev = st.pair[j, oid]
        if hprev < 0:
          continue
        k = np.flatnonzero(~hmask & (hids == hprev))
        if k.size and np.isfinite(dist[i, k[0]]):
          omask[i] = hmask[k[0]] = True
          st.obj_seen[j, oid] = st.hyp_seen[j, hprev] = True
          c.matches[j] += 1
          c.sum_d[j] += dist[i, k[0]]
      dist[omask, :] = np.nan
      dist[:, hmask] = np.nan
      for i, k in zip(*_assign(dist)):
        prev = st.pair[j, oids[i]]
        if prev >= 0 and prev != hids[k] and not st.occurred[j, oids[i]]:
          # motmetrics looks up when the object was last seen, and it was not yet.
          raise posetrack_map.EvalInputError(
              'a GT track id appears twice in one frame and both are matched the first '
              'time it appears (poseval fails there with a KeyError)')
        _events(st, c, np.array([j]), oids[i:i + 1], hids[k:k + 1], dist[i:i + 1, k])
        omask[i] = hmask[k] = True
    c.misses[j] += (~omask).sum()
    c.false_positives[j] += (~hmask).sum()
    st.occurred[j, oids] = True


def update(st, c, o, h, gt_has, pr_has, d):
  """One frame of each of V videos (distinct ids across videos), every joint at once.

  o: int [V, G] dense object ids; h: int [V, P] dense hypothesis ids, unique within each
  frame (padding: ids whose state stays empty); gt_has: bool [V, J, G] and pr_has: bool
  [V, J, P], which people are objects / hypotheses of each joint; d: float [V, J, G, P],
  the distance where a pair may match, NaN elsewhere.
  """
  fin = ~np.isnan(d)
  c.objects += gt_has.sum((0, 2))
  c.sum_d += np.where(fin, d, 0.0).sum((0, 2, 3))  # motmetrics' 'RAW' events.
  num_v, num_j, num_g, num_p = d.shape
  matched = np.zeros(num_j)
  # 1. Pairs of earlier frames carry on where they can still match; a hypothesis remembered
  # by several objects goes to the first of them (motmetrics walks the objects in order).
  prev = st.pair[np.arange(num_j)[None, :, None], o[:, None, :]]       # [V, J, G]
  column = np.full(st.res.shape[1], -1)
  column[h] = np.arange(num_p)[None, :]
  cand = np.where(prev >= 0, column[prev], -1)
  vv, jj, gg = np.nonzero(cand >= 0)
  pp = cand[vv, jj, gg]
  ok = fin[vv, jj, gg, pp]
  vv, jj, gg, pp = vv[ok], jj[ok], gg[ok], pp[ok]
  _, first = np.unique((vv * num_j + jj) * num_p + pp, return_index=True)
  vv, jj, gg, pp = vv[first], jj[first], gg[first], pp[first]
  row_used = np.zeros((num_v, num_j, num_g), bool)
  col_used = np.zeros((num_v, num_j, num_p), bool)
  row_used[vv, jj, gg] = True
  col_used[vv, jj, pp] = True
  np.add.at(c.matches, jj, 1)
  np.add.at(c.sum_d, jj, d[vv, jj, gg, pp])
  np.add.at(matched, jj, 1)
  st.obj_seen[jj, o[vv, gg]] = True
  st.hyp_seen[jj, h[vv, pp]] = True
  # 2. The rest by minimum-cost assignment. Where no object or hypothesis has two candidate
  # pairs, the assignment takes every candidate pair (it maximises the number of real pairs
  # first), so the solver is only needed for the other joints.
  rest = fin & ~row_used[..., None] & ~col_used[..., None, :]
  simple = (rest.sum(3) <= 1).all(2) & (rest.sum(2) <= 1).all(2)       # [V, J]
  v2, j2, g2, p2 = (list(a) for a in np.nonzero(rest & simple[..., None, None]))
  for v, j in zip(*np.nonzero(~simple)):
    rows, cols = np.flatnonzero(gt_has[v, j]), np.flatnonzero(pr_has[v, j])
    cost = d[v, j][np.ix_(rows, cols)]
    cost = np.where(row_used[v, j, rows][:, None] | col_used[v, j, cols][None, :], np.nan,
                    cost)
    r, q = _assign(cost)
    v2 += [v] * len(r)
    j2 += [j] * len(r)
    g2 += list(rows[r])
    p2 += list(cols[q])
  v2, j2, g2, p2 = (np.asarray(a, np.int64) for a in (v2, j2, g2, p2))
  _events(st, c, j2, o[v2, g2], h[v2, p2], d[v2, j2, g2, p2])
  np.add.at(matched, j2, 1)
  c.misses += gt_has.sum((0, 2)) - matched
  c.false_positives += pr_has.sum((0, 2)) - matched
  v3, j3, g3 = np.nonzero(gt_has)
  st.occurred[j3, o[v3, g3]] = True


def _row_track_ids(video, joints):
  """Track id (float, NaN: none) of each prepared row, read the way poseval reads them."""
  if video.format == '2018':
    for f, t in zip(video.frame.tolist(), video.track_id):
      if t is None:
        raise posetrack_map.EvalInputError(
            f'{video.name}: a person in frame {f} has no track_id (poseval needs one on '
            'every person of a 2018-format file to evaluate tracking)')
  ids = np.array([np.nan if video.track_id[i] is None else float(video.track_id[i])
                  for i in joints.person], np.float64)
  for f in np.unique(joints.frame[np.isnan(ids)]):
    rows = np.flatnonzero(joints.frame == f)
    given = ids[rows][~np.isnan(ids[rows])]
    ids[rows] = np.concatenate([given, np.full(len(rows) - len(given), np.nan)])
  return ids


def _dense(ids, offset):
  """Dense ints from `offset` for float ids (equal ids equal); each NaN (a person without
  id and joints, never an object) gets an index of its own."""
  valid = ~np.isnan(ids)
  uniq, inv = np.unique(ids[valid], return_inverse=True)
  out = np.empty(len(ids), np.int64)
  out[valid] = inv
  out[~valid] = len(uniq) + np.arange(int((~valid).sum()))
  return out + offset, offset + len(ids) + len(uniq) - int(valid.sum())


@dataclasses.dataclass
class _Rows:
  """GT or prediction people of all videos, concatenated (lists of per-video arrays)."""
  xy: list = dataclasses.field(default_factory=list)
  has: list = dataclasses.field(default_factory=list)
  head: list = dataclasses.field(default_factory=list)
  ids: list = dataclasses.field(default_factory=list)
  source: list = dataclasses.field(default_factory=list)
  num_rows: int = 0
  num_ids: int = 0

  def add(self, video, joints, num_frames):
    """Appends a video's prepared people; returns (track ids, first row of each frame)."""
    ids = _row_track_ids(video, joints)
    dense, self.num_ids = _dense(ids, self.num_ids)
    self.xy.append(joints.xy)
    self.has.append(joints.has)
    self.head.append(joints.head)
    self.ids.append(dense)
    self.source.extend(joints.source)
    starts = self.num_rows + np.searchsorted(joints.frame, np.arange(num_frames + 1))
    self.num_rows += len(dense)
    return ids, starts

  def concat(self):
    return (np.concatenate(self.xy).reshape(-1, NUM_JOINTS, 2),
            np.concatenate(self.has).reshape(-1, NUM_JOINTS),
            np.concatenate(self.head), np.concatenate(self.ids).astype(np.int64))


def _video(gt, pr, counts, rows_gt, rows_pr, frames):
  """Reads one checked video into the row stores and appends its tracked frames, (GT rows
  start, end, prediction rows start, end, rank in the video), to `frames`; counts its
  stand-in frames."""
  keep = gt.rects_per_frame > 0
  num = int(keep.sum())
  local = np.full(gt.num_frames, -1, np.int64)
  local[keep] = np.arange(num)
  g = posetrack_map.prepare_people(gt, keep, local, gt.ignore)
  p = posetrack_map.prepare_people(pr, keep, local, gt.ignore)
  g_ids, g_start = rows_gt.add(gt, g, num)
  p_ids, p_start = rows_pr.add(pr, p, num)
  both = (np.diff(g_start) > 0) & (np.diff(p_start) > 0)
  for ids, j in ((g_ids, g), (p_ids, p)):
    # A person with joints but no id makes poseval fail in any frame with both sides.
    bad = np.isnan(ids) & j.has.any(1) & both[j.frame]
    if bad.any():
      name, frame = j.source[int(np.argmax(bad))]
      raise posetrack_map.EvalInputError(
          f'{name}: frame {frame} has more people with joints than track ids (poseval '
          'hands the ids of a 2017-format frame out by position and fails here)')
  no_head = np.isnan(g.head) & both[g.frame]
  if no_head.any():
    name, frame = g.source[int(np.argmax(no_head))]
    raise posetrack_map.EvalInputError(
        f'{name}: a GT person in frame {frame} has no head box (bbox_head / x1,y1,x2,y2)')
  # poseval leaves each video's last frame out; a frame missing one side gets its
  # stand-in pair (object 0, hypothesis 0) that never matches.
  tracked = np.flatnonzero(both[:num - 1]) if num else np.zeros(0, np.int64)
  stand_ins = max(num - 1, 0) - len(tracked)
  counts.objects += stand_ins
  counts.misses += stand_ins
  counts.false_positives += stand_ins
  frames.extend((g_start[f], g_start[f + 1], p_start[f], p_start[f + 1], r)
                for r, f in enumerate(tracked))


def _pad(starts, ends):
  """(slot, rank, rows) that scatter rows [start, end) of each frame into padded slots."""
  sizes = ends - starts
  slot = np.repeat(np.arange(len(starts)), sizes)
  first = np.cumsum(sizes) - sizes
  rank = np.arange(int(sizes.sum())) - first[slot]
  return slot, rank, starts[slot] + rank, max(int(sizes.max(initial=0)), 1)


def _accumulate(rows_gt, rows_pr, frames, counts):
  """Runs the accumulators over the tracked frames, frame k of every video at once."""
  if not frames:
    return
  g_xy, g_has, g_head, g_ids = rows_gt.concat()
  p_xy, p_has, _, p_ids = rows_pr.concat()
  # One spare id per side for padding: its state is never written.
  st = _State(NUM_JOINTS, rows_gt.num_ids + 1, rows_pr.num_ids + 1)
  frames = np.array(frames, np.int64)
  # Frames with a repeated id (two people with one id in a frame) run step by step.
  repeated = np.zeros(len(frames), bool)
  for lo, hi, ids in ((0, 1, g_ids), (2, 3, p_ids)):
    slot, _, rows, _ = _pad(frames[:, lo], frames[:, hi])
    key = np.stack([slot, ids[rows]], 1)
    _, first_of = np.unique(key, axis=0, return_index=True)
    repeated[slot[~np.isin(np.arange(len(slot)), first_of)]] = True
  for r in range(int(frames[:, 4].max()) + 1):
    sel = np.flatnonzero((frames[:, 4] == r) & ~repeated)
    for f in np.flatnonzero((frames[:, 4] == r) & repeated):
      gs, ge, ps, pe, _ = frames[f]
      d = _distances(g_xy[gs:ge][None], g_has[gs:ge][None], g_head[gs:ge][None],
                     p_xy[ps:pe][None], p_has[ps:pe][None])[0]
      try:
        _update_sequential(st, counts, g_ids[gs:ge], p_ids[ps:pe], g_has[gs:ge].T,
                           p_has[ps:pe].T, d)
      except posetrack_map.EvalInputError as e:
        name, frame = rows_gt.source[gs]
        raise posetrack_map.EvalInputError(f'{name}: frame {frame}: {e}') from None
    if not sel.size:
      continue
    gs, ge, ps, pe = (frames[sel, k] for k in range(4))
    g_slot, g_rank, g_rows, num_g = _pad(gs, ge)
    p_slot, p_rank, p_rows, num_p = _pad(ps, pe)
    shape = (len(sel), num_g)
    o = np.full(shape, rows_gt.num_ids)
    gx = np.zeros(shape + (NUM_JOINTS, 2))
    gh = np.zeros(shape + (NUM_JOINTS,), bool)
    head = np.ones(shape)
    o[g_slot, g_rank] = g_ids[g_rows]
    gx[g_slot, g_rank] = g_xy[g_rows]
    gh[g_slot, g_rank] = g_has[g_rows]
    head[g_slot, g_rank] = g_head[g_rows]
    shape = (len(sel), num_p)
    h = np.full(shape, rows_pr.num_ids)
    px = np.zeros(shape + (NUM_JOINTS, 2))
    ph = np.zeros(shape + (NUM_JOINTS,), bool)
    h[p_slot, p_rank] = p_ids[p_rows]
    px[p_slot, p_rank] = p_xy[p_rows]
    ph[p_slot, p_rank] = p_has[p_rows]
    d = _distances(gx, gh, head, px, ph)
    update(st, counts, o, h, gh.transpose(0, 2, 1), ph.transpose(0, 2, 1), d)


def _distances(g_xy, g_has, g_head, p_xy, p_has):
  """[V, J, G, P] normalised distance where a pair may match (within the threshold), NaN
  elsewhere; the same floating-point operations as poseval."""
  with np.errstate(divide='ignore', invalid='ignore'):
    dist = posetrack_map.norm2(g_xy[:, None] - p_xy[:, :, None]) / g_head[:, None, :, None]
  pairable = (p_has[:, :, None] & g_has[:, None] & (dist <= posetrack_map.DIST_THRESH))
  return np.where(pairable, dist, np.nan).transpose(0, 3, 2, 1)


def metrics(counts):
  """{'per_joint': {name: {MOTA, MOTP, Prec, Rec}}, 'total': {...}} in percent."""
  c = counts
  with np.errstate(divide='ignore', invalid='ignore'):
    objects = np.where(c.objects > 0, c.objects, np.nan)
    det = c.matches + c.switches
    values = {
        'MOTA': 100 * (1 - (c.misses + c.switches + c.false_positives) / objects),
        'MOTP': np.where(det > 0, 100 * (1 - c.sum_d / np.where(det > 0, det, 1)), 0.0),
        'Prec': 100 * det / np.where(det + c.false_positives > 0,
                                     det + c.false_positives, np.nan),
        'Rec': 100 * det / objects,
    }
  total = {}
  for k, v in values.items():
    finite = v[~np.isnan(v)]
    total[k] = float(finite.mean()) if finite.size else float('nan')
  per_joint = {name: {k: float(values[k][i]) for k in METRICS}
               for i, name in enumerate(keypoints.POSEVAL_JOINT_NAMES)}
  return {'per_joint': per_joint, 'total': total}


def evaluate_videos(pairs):
  """Tracking metrics over (name, gt, pred) pairs (parsed JSON objects or VideoPeople)."""
  counts, rows_gt, rows_pr, frames, n = Counts.zeros(), _Rows(), _Rows(), [], 0
  for name, gt_data, pr_data in pairs:
    gt, pr = posetrack_map.parse_pair(name, gt_data, pr_data)
    _video(gt, pr, counts, rows_gt, rows_pr, frames)
    n += 1
  if not n:
    raise posetrack_map.EvalInputError('no videos to evaluate')
  _accumulate(rows_gt, rows_pr, frames, counts)
  return metrics(counts)


def evaluate_dirs(gt_dir, pred_dir):
  """poseval's tracking metrics of pred_dir against gt_dir (one JSON per video)."""
  return evaluate_videos(posetrack_map.read_pairs(gt_dir, pred_dir))


def columns(result):
  """The MOT table's values: MOTA of Head..Ankl (means of their joints) and Total, then the
  MOTP, Prec and Rec totals (poseval's order)."""
  mota = np.array([result['per_joint'][n]['MOTA'] for n in keypoints.POSEVAL_JOINT_NAMES])
  out = {f'MOTA {col}': float(mota[list(js)].mean()) for col, js in keypoints.POSEVAL_COLUMNS}
  out['MOTA Total'] = result['total']['MOTA']
  for k in ('MOTP', 'Prec', 'Rec'):
    out[f'{k} Total'] = result['total'][k]
  return out


def format_table(result):
  """poseval's MOT table: two header lines and a row, one decimal."""
  names = [c for c, _ in keypoints.POSEVAL_COLUMNS] + ['Total']
  top = '&' + ' MOTA &' * 8 + ' MOTP &' + ' Prec &' + ' Rec  \\\\'
  bottom = ('&' + ''.join(f' {n:<4} &' for n in names[:-1]) + ' Total&' * 3 + ' Total\\\\')
  cells = ['{:>5}'.format('%1.1f' % v) for v in columns(result).values()]
  return top + '\n' + bottom + '\n&' + ' &'.join(cells) + ' \\\\'
