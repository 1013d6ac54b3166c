"""Readers for PoseTrack annotations, on-disk layouts and detector box files (no TFDS here).

Everything is parsed into `Video` / `Frame` records whose paths are relative to the
manual_dir, so that the builder (and tests) can work on any of the layouts of SPEC §10:

- official per-video layout: `images/{split}/<seq>/<frame>.jpg` with `annotations/{split}/
  <seq>.json` (PoseTrack18, synthetic, converted PoseTrack17) or `posetrack_data/{split}/
  <seq>.json` (PoseTrack21); each JSON is either the 2018 COCO-like format or the 2017
  "annolist" format (detected per file);
- DCPose supplementary layout: `posetrack{17,18}_json_files/posetrack_{split}.json` (merged
  COCO-like), per-video GT in `posetrack{17,18}_annotation_dirs/{split}/` and detector boxes in
  `posetrack{17,18}_precomputed_boxes/val_boxes.json`.

Frame numbering: files named with 8 digits are the converted PoseTrack17 frames, 1-indexed;
every other name (PoseTrack18/21's 6 digits) is 0-indexed.
"""

import dataclasses
import os
import re
import zlib

import numpy as np

from tdmi_jax import fileio
from tdmi_jax import keypoints

NUM_JOINTS = keypoints.NUM_JOINTS


class BadInputError(ValueError):
  """An input file is missing, unreadable or inconsistent; the message names the file."""


@dataclasses.dataclass
class Person:
  keypoints: np.ndarray  # float32 [17, 3] (x, y, visibility) in image pixels.
  bbox: np.ndarray       # float32 [4] x, y, w, h.
  bbox_head: np.ndarray  # float32 [4] x, y, w, h (zeros when absent).
  track_id: int


@dataclasses.dataclass
class Frame:
  image_id: int
  file_name: str         # relative to manual_dir
  frame_index: int       # 0-based position in the video
  is_labeled: bool
  width: int = 0         # 0 = unknown (read from the image header at build time)
  height: int = 0
  ignore_regions: list = dataclasses.field(default_factory=list)  # [(xs, ys), ...]
  persons: list = dataclasses.field(default_factory=list)
  degradation: str = 'none'


@dataclasses.dataclass
class Video:
  name: str              # sequence directory name, e.g. '000342_mpii_test'
  vid_id: str
  nframes: int
  frames: list           # the frames the annotation lists, sorted by frame_index
  gt_file: str = ''      # per-video GT JSON relative to manual_dir ('' if none)


# --- Small helpers -----------------------------------------------------------------------


def _scalar(v, default=None):
  """annolist values are often one-element lists."""
  if isinstance(v, (list, tuple)):
    return v[0] if v else default
  return default if v is None else v


def frame_number(file_name):
  stem = os.path.splitext(os.path.basename(file_name))[0]
  m = re.search(r'(\d+)$', stem)
  if not m:
    raise BadInputError(f'frame file name {file_name!r} does not end with a frame number')
  return int(m.group(1)), len(m.group(1))


def frame_index_of(file_name):
  n, width = frame_number(file_name)
  return n - 1 if width == 8 else n


def neighbour_file(file_name, frame_index):
  """The file name of `frame_index` in the same directory and numbering as `file_name`."""
  _, width = frame_number(file_name)
  n = frame_index + 1 if width == 8 else frame_index
  d, base = os.path.split(file_name)
  stem, ext = os.path.splitext(base)
  return os.path.join(d, stem[:len(stem) - width] + str(n).zfill(width) + ext)


def window_files(video, frame, offsets):
  """Files of the window [t+o for o in offsets[:2]], t, [t+o for the rest] (SPEC §7).

  A frame beyond either end of the video is replaced by the key frame.
  """
  files = []
  for o in offsets:
    i = frame.frame_index + o
    files.append(neighbour_file(frame.file_name, i) if 0 <= i < video.nframes
                 else frame.file_name)
  half = len(files) // 2
  return files[:half] + [frame.file_name] + files[half:]


def video_number(seq_name):
  """The video number a PoseTrack sequence name starts with ('000342_mpii_test' -> 342),
  or None for a name without one (a user's own video)."""
  m = re.match(r'(\d+)', seq_name)
  return int(m.group(1)) if m else None


def posetrack_image_id(seq_name, frame_index):
  """PoseTrack18's id rule: int('1' + 6-digit video number + 4-digit frame index).

  A name without a leading number gets a stable stand-in number (CRC-32 of the name), the
  same in every process, so records and prediction files built apart still agree.
  """
  num = video_number(seq_name)
  if num is None:
    num = zlib.crc32(seq_name.encode()) % 1000000
  return int(f'1{num:06d}{frame_index:04d}')


def box_from_keypoints(kp, enlarge=1.3):
  """PoseTrack18's GT boxes are the annotated joints' extent enlarged x1.3 about its centre."""
  vis = kp[:, 2] > 0
  if not vis.any():
    return np.zeros(4, np.float32)
  lo, hi = kp[vis, :2].min(0), kp[vis, :2].max(0)
  c, size = (lo + hi) / 2, (hi - lo) * enlarge
  return np.array([c[0] - size[0] / 2, c[1] - size[1] / 2, size[0], size[1]], np.float32)


# --- 2018 COCO-like format ---------------------------------------------------------------


def _coco_person(ann, path):
  kp = ann.get('keypoints') or []
  if kp and len(kp) != 3 * NUM_JOINTS:
    raise BadInputError(f'{path}: annotation {ann.get("id")} has {len(kp)} keypoint values, '
                        f'expected {3 * NUM_JOINTS}')
  kp = (np.asarray(kp, np.float32).reshape(NUM_JOINTS, 3) if kp
        else np.zeros((NUM_JOINTS, 3), np.float32))
  kp[:, 2] = (kp[:, 2] > 0).astype(np.float32)
  bbox = ann.get('bbox')
  bbox = (np.asarray(bbox, np.float32) if bbox is not None and len(bbox) == 4
          else box_from_keypoints(kp))
  head = ann.get('bbox_head')
  head = (np.asarray(head, np.float32) if head is not None and len(head) == 4
          else np.zeros(4, np.float32))
  return Person(kp, bbox, head, int(ann.get('track_id', -1)))


def parse_coco(path, rel_path='', data=None):
  """A per-video or merged 2018-format JSON -> list of Video (grouped by sequence)."""
  d = fileio.load_json(path, BadInputError) if data is None else data
  if not isinstance(d, dict) or not isinstance(d.get('images'), list):
    raise BadInputError(f'{path}: expected a COCO-like dict with an "images" list')
  by_image = {}
  for ann in d.get('annotations') or []:
    if not isinstance(ann, dict) or 'image_id' not in ann:
      raise BadInputError(f'{path}: an annotation has no image_id')
    by_image.setdefault(ann['image_id'], []).append(ann)
  videos = {}
  for im in d['images']:
    try:
      file_name = im['file_name']
      seq = os.path.basename(os.path.dirname(file_name))
      fi = frame_index_of(file_name)
      xs, ys = im.get('ignore_regions_x') or [], im.get('ignore_regions_y') or []
      frame = Frame(
          image_id=int(im['id']), file_name=file_name, frame_index=fi,
          is_labeled=bool(im.get('is_labeled', True)),
          width=int(im.get('width', 0) or 0), height=int(im.get('height', 0) or 0),
          ignore_regions=[(list(map(float, x)), list(map(float, y))) for x, y in zip(xs, ys)],
          persons=[_coco_person(a, path) for a in by_image.get(im['id'], [])],
          degradation=str(im.get('degradation', 'none')))
    except BadInputError:
      raise
    except (KeyError, TypeError, ValueError) as e:
      raise BadInputError(f'{path}: malformed image entry {im!r:.200} ({e!r})') from None
    v = videos.get(seq)
    if v is None:
      v = videos[seq] = Video(seq, str(im.get('vid_id', seq)), int(im.get('nframes', 0) or 0),
                              [], rel_path)
    v.frames.append(frame)
  for v in videos.values():
    v.frames.sort(key=lambda f: f.frame_index)
    if not v.nframes:
      v.nframes = v.frames[-1].frame_index + 1
  return list(videos.values())


# --- 2017 annolist format ----------------------------------------------------------------


def parse_annolist(path, rel_path='', data=None):
  """A PoseTrack17 per-video annolist JSON -> [Video]."""
  d = fileio.load_json(path, BadInputError) if data is None else data
  annolist = d.get('annolist') if isinstance(d, dict) else None
  if not isinstance(annolist, list):
    raise BadInputError(f'{path}: expected a dict with an "annolist" list')
  frames = []
  try:
    for entry in annolist:
      name = _scalar(entry['image'])['name']
      fi = frame_index_of(name)
      seq = os.path.basename(os.path.dirname(name))
      regions = []
      for r in entry.get('ignore_regions') or []:
        pts = r.get('point') or []
        regions.append(([float(_scalar(p['x'])) for p in pts],
                        [float(_scalar(p['y'])) for p in pts]))
      persons = []
      for rect in entry.get('annorect') or []:
        kp = np.zeros((NUM_JOINTS, 3), np.float32)
        points = (_scalar(rect.get('annopoints'), {}) or {}).get('point') or []
        for p in points:
          pid = int(_scalar(p['id']))
          slot = keypoints.POSEVAL_FROM_POSETRACK[pid]
          kp[slot] = [float(_scalar(p['x'])), float(_scalar(p['y'])), 1.0]
        if all(k in rect for k in ('x1', 'y1', 'x2', 'y2')):
          x1, y1 = float(_scalar(rect['x1'])), float(_scalar(rect['y1']))
          x2, y2 = float(_scalar(rect['x2'])), float(_scalar(rect['y2']))
          head = np.array([x1, y1, x2 - x1, y2 - y1], np.float32)
        else:
          head = np.zeros(4, np.float32)
        persons.append(Person(kp, box_from_keypoints(kp), head,
                              int(_scalar(rect.get('track_id'), -1))))
      frames.append(Frame(
          image_id=posetrack_image_id(seq, fi), file_name=name, frame_index=fi,
          is_labeled=bool(_scalar(entry.get('is_labeled'), 1)), ignore_regions=regions,
          persons=persons))
  except BadInputError:
    raise
  except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
    raise BadInputError(f'{path}: malformed annolist entry ({e!r})') from None
  if not frames:
    return []
  frames.sort(key=lambda f: f.frame_index)
  seq = os.path.basename(os.path.dirname(frames[0].file_name))
  return [Video(seq, seq.split('_')[0], frames[-1].frame_index + 1, frames, rel_path)]


def parse_annotation_file(path, rel_path=''):
  """Per-file format detection: 'annolist' key -> 2017, else 2018 COCO-like."""
  d = fileio.load_json(path, BadInputError)
  if isinstance(d, dict) and 'annolist' in d:
    return parse_annolist(path, rel_path, d)
  return parse_coco(path, rel_path, d)


# --- Layouts -----------------------------------------------------------------------------

YEAR_TAG = {'posetrack2017': '17', 'posetrack2018': '18', 'posetrack21': '21',
            'synthetic': '18'}


@dataclasses.dataclass
class SplitSource:
  layout: str            # 'official' | 'dcpose'
  files: list            # annotation JSON files, relative to manual_dir
  gt_dir: str            # per-video GT directory relative to manual_dir ('' if none)


def find_split(manual_dir, config_name, split):
  """Locates a split's annotation files in either layout; None if the split is absent."""
  tag = YEAR_TAG[config_name]
  for sub in (f'annotations/{split}', f'posetrack_data/{split}'):
    d = os.path.join(manual_dir, sub)
    if os.path.isdir(d):
      files = sorted(f for f in os.listdir(d) if f.endswith('.json'))
      return SplitSource('official', [f'{sub}/{f}' for f in files], sub)
  merged = f'posetrack{tag}_json_files/posetrack_{split}.json'
  if os.path.isfile(os.path.join(manual_dir, merged)):
    gt = f'posetrack{tag}_annotation_dirs/{split}'
    return SplitSource('dcpose', [merged], gt if os.path.isdir(os.path.join(manual_dir, gt))
                       else '')
  return None


def default_box_file(manual_dir, config_name):
  tag = YEAR_TAG[config_name]
  for rel in (f'posetrack{tag}_precomputed_boxes/val_boxes.json',
              'detections/val_boxes_coco.json', 'detections/val_boxes_dcpose.json',
              'detections/val_boxes.json'):
    if os.path.isfile(os.path.join(manual_dir, rel)):
      return rel
  return ''


def load_split(manual_dir, config_name, split, on_bad_input='error', log=None):
  """Parses a split -> (sorted list of Video, SplitSource) or (None, None) when absent.

  With on_bad_input='skip' a malformed annotation file is skipped and counted in `log`
  (a dict of counters); otherwise it raises BadInputError naming the file.
  """
  src = find_split(manual_dir, config_name, split)
  if src is None:
    return None, None
  videos = {}
  for rel in src.files:
    try:
      parsed = parse_annotation_file(os.path.join(manual_dir, rel), rel)
    except BadInputError:
      if on_bad_input != 'skip':
        raise
      if log is not None:
        log['bad_annotation_files'] = log.get('bad_annotation_files', 0) + 1
      continue
    for v in parsed:
      if src.layout == 'dcpose' and src.gt_dir:
        gt = f'{src.gt_dir}/{v.name}.json'
        v.gt_file = gt if os.path.isfile(os.path.join(manual_dir, gt)) else ''
      if v.name in videos:  # a merged file may list one video in several places
        videos[v.name].frames = sorted(videos[v.name].frames + v.frames,
                                       key=lambda f: f.frame_index)
      else:
        videos[v.name] = v
  return [videos[k] for k in sorted(videos)], src


# --- Detector box files ------------------------------------------------------------------


def _name_key(file_name):
  """'<seq>/<frame file>': how DCPose image names are matched to annotation file names."""
  parts = str(file_name).replace('\\', '/').split('/')
  return '/'.join(parts[-2:])


def read_box_entries(path):
  """The person boxes of a COCO-results or DCPose-list file, checked.

  Returns a list of (key, (x, y, w, h, score)) where key is ('id', image_id) for COCO
  results or ('name', image_name) for the DCPose list; non-person categories are dropped.
  A malformed file or entry (no 4-number bbox, a non-finite number, no image key) is a
  BadInputError naming the file and the entry.
  """
  entries = fileio.load_json(path, BadInputError)
  if isinstance(entries, dict) and isinstance(entries.get('annotations'), list):
    entries = entries['annotations']
  if not isinstance(entries, list):
    raise BadInputError(f'{path}: a box file must hold a list of boxes')
  out = []
  for k, e in enumerate(entries):
    if not isinstance(e, dict) or not isinstance(e.get('bbox'), list) or len(e['bbox']) != 4:
      raise BadInputError(f'{path}: entry {k} has no 4-number "bbox"')
    try:
      values = [float(b) for b in e['bbox']] + [float(e.get('score', 1.0))]
      key = (('name', str(e['image_name'])) if 'image_name' in e
             else ('id', int(e['image_id'])) if 'image_id' in e else None)
      category = int(e.get('category_id', 1))
    except (TypeError, ValueError, OverflowError) as err:
      raise BadInputError(f'{path}: entry {k} has a non-numeric bbox, score, image_id or '
                          f'category_id ({err})') from None
    if key is None:
      raise BadInputError(f'{path}: entry {k} has neither "image_id" nor "image_name"')
    if not np.isfinite(values).all():
      raise BadInputError(f'{path}: entry {k} has a non-finite bbox or score: {values}')
    if category == 1:
      out.append((key, tuple(values)))
  return out


def load_boxes(path, videos, on_bad_input='error', log=None):
  """Reads a COCO-results or DCPose-list box file -> {image_id: float32 [n, 5] (x,y,w,h,s)}.

  Boxes are matched to frames by `image_id` (COCO results) or by `image_name`'s last two
  path components (DCPose list). A box naming a frame that is not in `videos` is an error
  (or skipped and counted under on_bad_input='skip').
  """
  by_id, by_name = {}, {}
  for v in videos:
    for f in v.frames:
      by_id[f.image_id] = f.image_id
      by_name[_name_key(f.file_name)] = f.image_id
  out = {}
  unknown = []
  for (kind, value), box in read_box_entries(path):
    image_id = by_name.get(_name_key(value)) if kind == 'name' else by_id.get(value)
    if image_id is None:
      unknown.append(value)
      continue
    out.setdefault(image_id, []).append(box)
  if unknown:
    msg = (f'{path}: {len(unknown)} boxes name frames that are not in the annotations '
           f'(first: {unknown[0]!r})')
    if on_bad_input != 'skip':
      raise BadInputError(msg)
    if log is not None:
      log['unknown_box_frames'] = log.get('unknown_box_frames', 0) + len(unknown)
  return {k: np.asarray(v, np.float32).reshape(-1, 5) for k, v in out.items()}
