"""TFDS builder `posetrack`: one array_record example per labeled PoseTrack frame.

The record format of the input pipeline. `datasets/posetrack/` exposes the same builder to
TFDS's command line (`tfds build datasets/posetrack`); the library never imports that folder.

Configs posetrack2017, posetrack2018, posetrack21 and synthetic (PoseTrack18 layout, written by
`python -m tdmi_jax.data.synthesize`). Reads the user's download from `manual_dir` (see
MANUAL_DOWNLOAD_INSTRUCTIONS); no TensorFlow is needed: build with file_format='array_record'
and read with `tfds.data_source` / `builder.as_data_source`.

Records hold frame *references* (paths relative to manual_dir), not pixels;
datasets/posetrack/README.md gives the measurements behind that choice.
"""

import dataclasses
import os

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tdmi_jax import paths
from tdmi_jax.data import parsers

WINDOW = (-2, -1, 1, 2)  # SPEC §7; the pipeline reads the five files stored per record.


@dataclasses.dataclass(eq=False)
class PosetrackConfig(tfds.core.BuilderConfig):
  """`kind` is the dataset (a key of parsers.YEAR_TAG); the rest controls ingestion.

  det_boxes: val box file (COCO results or DCPose list), absolute or relative to manual_dir;
    '' = the layout's default file if present.
  on_bad_input: 'error' (raise, naming the file) | 'skip' (drop, count, log).
  missing_support_frame: a window frame inside the video whose file is absent: 'error' |
    'key_frame' (use the key frame; for trimmed copies such as the shared test fixtures).
  """
  kind: str = 'posetrack2018'
  det_boxes: str = ''
  on_bad_input: str = 'error'
  missing_support_frame: str = 'error'


MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download PoseTrack yourself (registration required) and point manual_dir at its root.

posetrack2018 / posetrack21 (official layout):
  <manual_dir>/images/{train,val}/<seq>/000000.jpg ...     (every frame, 0-indexed)
  <manual_dir>/annotations/{train,val}/<seq>.json          (PoseTrack18, COCO-like per video)
  <manual_dir>/posetrack_data/{train,val}/<seq>.json       (PoseTrack21's name for the same)
posetrack2017: the same tree after the usual conversion (frames %08d.jpg, 1-indexed), with
  per-video JSON in either the 2018 COCO-like format or the original 2017 "annolist" format.
DCPose supplementary layout (instead of annotations/):
  <manual_dir>/posetrack{17,18}_json_files/posetrack_{train,val}.json   (merged COCO-like)
  <manual_dir>/posetrack{17,18}_annotation_dirs/{train,val}/<seq>.json  (per-video GT)
  <manual_dir>/posetrack{17,18}_precomputed_boxes/val_boxes.json        (detector boxes)
Detector boxes for val: the DCPose file above, or detections/val_boxes_coco.json, or any file
given as config.data.det_boxes (COCO results {image_id, bbox, score} or DCPose list
{image_name, bbox, score}).
synthetic: run `python -m tdmi_jax.data.synthesize --out <manual_dir>`.
"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """PoseTrack labeled frames with their window, persons, ignore regions and val boxes."""

  # Explicit: TFDS would otherwise name a class `Builder` after its package ('data').
  name = 'posetrack'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      PosetrackConfig(name=k, kind=k, description=f'{k}, reading manual_dir')
      for k in ('posetrack2017', 'posetrack2018', 'posetrack21', 'synthetic')
  ]

  def _info(self):
    f = tfds.features
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=f.FeaturesDict({
            'video_name': f.Text(),
            'video_id': f.Text(),
            'video_index': np.int32,
            'frame_index': np.int32,
            'nframes': np.int32,
            'image_id': np.int64,
            'image_size': f.Tensor(shape=(2,), dtype=np.int32),  # (h, w)
            'window_files': f.Sequence(f.Text()),  # t-2, t-1, t, t+1, t+2
            'gt_file': f.Text(),
            'degradation': f.Text(),
            'keypoints': f.Tensor(shape=(None, parsers.NUM_JOINTS, 3), dtype=np.float32),
            'bbox': f.Tensor(shape=(None, 4), dtype=np.float32),
            'bbox_head': f.Tensor(shape=(None, 4), dtype=np.float32),
            'track_id': f.Tensor(shape=(None,), dtype=np.int32),
            'ignore_x': f.Tensor(shape=(None,), dtype=np.float32),
            'ignore_y': f.Tensor(shape=(None,), dtype=np.float32),
            'ignore_len': f.Tensor(shape=(None,), dtype=np.int32),
            'det_boxes': f.Tensor(shape=(None, 5), dtype=np.float32),  # x, y, w, h, score
        }),
        homepage='https://posetrack.net/',
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    splits = {}
    for split in ('train', 'val'):
      log = {}
      videos, src = parsers.load_split(manual_dir, cfg.kind, split, cfg.on_bad_input, log)
      if videos is None:
        logging.warning('posetrack/%s: no %s split under %s', cfg.kind, split, manual_dir)
        continue
      where = os.path.join(manual_dir, os.path.dirname(src.files[0]) if src.files else
                           f'annotations/{split}')
      if not any(f.is_labeled for v in videos for f in v.frames):
        raise parsers.BadInputError(
            f'{where}: the {split} split has no labeled frames (empty split)')
      boxes = {}
      if split == 'val':
        box_file = cfg.det_boxes or parsers.default_box_file(manual_dir, cfg.kind)
        if box_file:
          box_path = os.path.join(manual_dir, box_file)
          boxes = parsers.load_boxes(box_path, videos, cfg.on_bad_input, log)
          logging.info('posetrack/%s: %d boxes from %s', cfg.kind,
                       sum(len(b) for b in boxes.values()), box_path)
        else:
          logging.warning('posetrack/%s: no detector box file for val', cfg.kind)
      splits[split] = self._generate_examples(manual_dir, videos, boxes, log, split)
    if not splits:
      raise parsers.BadInputError(
          f'{manual_dir}: no PoseTrack annotations found.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return splits

  def _generate_examples(self, manual_dir, videos, boxes, log, split):
    cfg = self.builder_config
    files = _Files(manual_dir)
    for video_index, video in enumerate(videos):
      for frame in video.frames:
        if not frame.is_labeled:
          continue
        try:
          example = _example(files, video, video_index, frame, boxes, cfg)
        except parsers.BadInputError as e:
          if cfg.on_bad_input != 'skip':
            raise
          log['skipped_frames'] = log.get('skipped_frames', 0) + 1
          logging.warning('posetrack/%s %s: skipped a frame: %s', cfg.kind, split, e)
          continue
        yield f'{video.name}/{frame.frame_index:06d}', example
    if log:
      logging.warning('posetrack/%s %s: bad input skipped: %s', cfg.kind, split, log)


class _Files:
  """Which images exist under manual_dir: a stat per file on a local disk, one listing per
  folder on an object store (a request per frame would take hours for PoseTrack on GCS)."""

  def __init__(self, manual_dir):
    self.root = paths.path(manual_dir)
    self.remote = paths.is_uri(self.root)
    self._listings = {}

  def path(self, rel):
    return self.root / rel

  def exists(self, rel):
    if not self.remote:
      return os.path.isfile(self.root / rel)
    folder, name = os.path.split(rel)
    if folder not in self._listings:
      d = self.root / folder
      self._listings[folder] = {p.name for p in d.iterdir()} if d.is_dir() else set()
    return name in self._listings[folder]


def _example(image_files, video, video_index, frame, boxes, cfg):
  manual_dir = os.fspath(image_files.root)
  files = parsers.window_files(video, frame, WINDOW)
  if not image_files.exists(frame.file_name):
    raise parsers.BadInputError(
        f'{os.path.join(manual_dir, frame.file_name)}: image of labeled frame not found')
  for i, rel in enumerate(files):
    if not image_files.exists(rel):
      if cfg.missing_support_frame == 'key_frame':
        files[i] = frame.file_name
      else:
        raise parsers.BadInputError(
            f'{os.path.join(manual_dir, rel)}: window frame not found (frame '
            f'{frame.frame_index} of {video.name}, nframes={video.nframes}); set '
            "missing_support_frame='key_frame' for trimmed copies")
  h, w = frame.height, frame.width
  if not (h and w):
    path = os.path.join(manual_dir, frame.file_name)
    try:
      with image_files.path(frame.file_name).open('rb') as f, Image.open(f) as im:
        w, h = im.size
    except OSError as e:
      raise parsers.BadInputError(f'{path}: unreadable image ({e})') from None
  persons = frame.persons
  regions = frame.ignore_regions
  return {
      'video_name': video.name,
      'video_id': video.vid_id,
      'video_index': video_index,
      'frame_index': frame.frame_index,
      'nframes': video.nframes,
      'image_id': frame.image_id,
      'image_size': np.array([h, w], np.int32),
      'window_files': files,
      'gt_file': video.gt_file,
      'degradation': frame.degradation,
      'keypoints': np.asarray([p.keypoints for p in persons], np.float32).reshape(
          -1, parsers.NUM_JOINTS, 3),
      'bbox': np.asarray([p.bbox for p in persons], np.float32).reshape(-1, 4),
      'bbox_head': np.asarray([p.bbox_head for p in persons], np.float32).reshape(-1, 4),
      'track_id': np.asarray([p.track_id for p in persons], np.int32),
      'ignore_x': np.asarray([x for xs, _ in regions for x in xs], np.float32),
      'ignore_y': np.asarray([y for _, ys in regions for y in ys], np.float32),
      'ignore_len': np.asarray([len(xs) for xs, _ in regions], np.int32),
      'det_boxes': boxes.get(frame.image_id, np.zeros((0, 5), np.float32)),
  }
