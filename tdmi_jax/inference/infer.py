r"""Run a trained TDMI on a video or a folder of frames.

  python -m tdmi_jax.infer --checkpoint WORKDIR (--video FILE.mp4 | --frames DIR) \
      [--boxes FILE] --out OUT

Writes `OUT/<name>.json` (PoseTrack18 format: every frame, people with keypoints[51],
scores[17], track_id: the project's tracker on the person boxes, see
`video_io.link_tracks`), `OUT/overlay.mp4` and `OUT/frames/%06d.png` (skeleton coloured by
joint confidence), and `OUT/stats.json` (frames/s, backbone passes).

Person boxes come from --boxes (COCO results or DCPose list format), else from OpenCV's HOG
people detector (`--detector=hog`) or the whole frame (`--detector=whole_frame`), with a
warning: neither is a substitute for a real person detector.

Streaming feature cache: the backbone runs once per (crop, frame) and every window that
contains the frame reuses its outputs, instead of five backbone passes per window. A window
crops its five frames with one affine transform from an anchor box (as in training); a
track holds its anchor while its box stays close, so consecutive windows share crops (see
`video_io.crop_anchors`). `--no_cache` runs the plain per-window model for comparison; both
give the same heatmaps for the same anchors.
"""

import functools
import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from tdmi_jax import checkpointing
from tdmi_jax import fileio
from tdmi_jax.data import transforms
from tdmi_jax.evaluation import decode
from tdmi_jax.evaluation import overlay
from tdmi_jax.evaluation import writer
from tdmi_jax.inference import video_io
from tdmi_jax.models import tdmi

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Training workdir (with config.json and '
                    'checkpoints/) or one of its checkpoints/<step> folders.')
flags.DEFINE_string('video', None, 'Input video file (mp4, avi, ...).')
flags.DEFINE_string('frames', None, 'Input folder of frames (sorted by name).')
flags.DEFINE_string('boxes', None, 'Person boxes: COCO results or DCPose list JSON.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.DEFINE_enum('detector', 'hog', ['hog', 'whole_frame'],
                  'Box source when --boxes is not given.')
flags.DEFINE_float('box_score_thresh', 0.2, 'Boxes scoring below this are dropped.')
flags.DEFINE_float('reanchor_iou', 0.85, 'A track keeps its crop while IoU(box, crop box) '
                   'stays at or above this.')
flags.DEFINE_bool('no_cache', False, 'Run the backbone on all 5 frames of every window.')
flags.DEFINE_bool('flip_test', False, 'Average with the mirrored input (twice the work).')
flags.DEFINE_enum('decode', 'quarter', ['quarter', 'dark', 'argmax'], 'Heatmap decoding.')
flags.DEFINE_integer('batch_size', 8, 'Crops per backbone call / windows per head call.')
flags.DEFINE_bool('png', True, 'Write the overlay frames as PNG too.')


# --- Model --------------------------------------------------------------------------------


def find_config(path):
  """The config.json of the training workdir that holds `path`."""
  p = pathlib.Path(path).resolve()
  for d in (p, *p.parents):
    if (d / 'config.json').is_file():
      try:
        return ml_collections.ConfigDict(json.loads((d / 'config.json').read_text()))
      except json.JSONDecodeError as e:
        raise ValueError(f'{d / "config.json"} is not valid JSON ({e})') from None
  raise FileNotFoundError(f'--checkpoint={path}: no config.json in it or its parents (expected '
                          'a training workdir written by launch.py)')


def load_model(path):
  """(model, variables, config) of a training workdir's latest (or a given) checkpoint."""
  config = find_config(path)
  model = tdmi.build_model(config.model)
  raw = checkpointing.load_pretrained(path)
  variables = {'params': raw['params'], 'batch_stats': raw['batch_stats']}
  return model, jax.tree_util.tree_map(jnp.asarray, variables), config


# --- Crops --------------------------------------------------------------------------------


class Cropper:
  """Crops (anchor box, frame) pairs at the model's input size, normalised."""

  def __init__(self, clip, data_cfg, mirror=False):
    self.mirror = mirror  # The flip test's second input.
    self.images = [Image.fromarray(f) for f in clip.frames]
    self.size_hw = tuple(data_cfg.image_size)
    self.aspect = float(data_cfg.aspect_ratio)
    self.enlarge = float(data_cfg.box_enlarge)

  def center_scale(self, box):
    return transforms.box_to_center_scale(box, self.aspect, self.enlarge)

  def __call__(self, box, frame):
    center, scale = self.center_scale(box)
    m = transforms.affine_matrix(center, scale, 0.0, self.size_hw[::-1])
    crop = transforms.normalize(transforms.warp_image(self.images[frame], m, self.size_hw[::-1]))
    return crop[:, ::-1] if self.mirror else crop


# --- Runners ------------------------------------------------------------------------------
# Module-level jits with the (hashable) model static: runners share compiled code.


@functools.partial(jax.jit, static_argnums=0)
def _backbone(model, variables, images):
  return tdmi.backbone_apply(model, variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _head(model, variables, heatmaps, features):
  return model.apply(variables, None, train=False, backbone_outputs=(heatmaps, features))[0]


@functools.partial(jax.jit, static_argnums=0)
def _full(model, variables, frames):
  return model.apply(variables, frames, train=False)[0]



class CachedRunner:
  """Backbone once per (anchor, frame); windows assembled from cached outputs."""

  def __init__(self, model, variables, batch_size):
    self.cache = {}
    self.backbone_passes = 0
    self.batch_size = batch_size
    self.model = model
    self.variables = variables

  def _fill(self, keys, cropper, anchors):
    missing = [k for k in dict.fromkeys(keys) if k not in self.cache]
    for i in range(0, len(missing), self.batch_size):
      chunk = missing[i:i + self.batch_size]
      crops = np.stack([cropper(anchors[a], f) for a, f in chunk])
      crops = np.concatenate([crops, np.zeros_like(crops[:1]).repeat(
          self.batch_size - len(chunk), 0)]) if len(chunk) < self.batch_size else crops
      hm, feats = jax.device_get(_backbone(self.model, self.variables, crops))
      self.backbone_passes += len(chunk)
      for j, k in enumerate(chunk):
        self.cache[k] = (hm[j], tuple(f[j] for f in feats))

  def heatmaps(self, windows, cropper, anchors):
    """windows: list of (anchor id, [5 frame indices]) -> heatmaps [n, h, w, K]."""
    self._fill([(a, f) for a, frames in windows for f in frames], cropper, anchors)
    out = []
    for i in range(0, len(windows), self.batch_size):
      chunk = windows[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)
      entries = [[self.cache[(a, f)] for f in frames] for a, frames in chunk]
      entries += [entries[0]] * pad
      hm = np.stack([np.stack([e[0] for e in w]) for w in entries])
      feats = [np.stack([np.stack([e[1][j] for e in w]) for w in entries]) for j in range(4)]
      out.append(np.asarray(_head(self.model, self.variables, hm, feats))[:len(chunk)])
    return np.concatenate(out) if out else None

  def evict_before(self, frame):
    for k in [k for k in self.cache if k[1] < frame]:
      del self.cache[k]


class PlainRunner:
  """The whole model on 5 crops per window: 5 backbone passes per window."""

  def __init__(self, model, variables, batch_size):
    self.backbone_passes = 0
    self.batch_size = batch_size
    self.model = model
    self.variables = variables

  def heatmaps(self, windows, cropper, anchors):
    out = []
    for i in range(0, len(windows), self.batch_size):
      chunk = windows[i:i + self.batch_size]
      x = np.stack([np.stack([cropper(anchors[a], f) for f in frames]) for a, frames in chunk])
      if len(chunk) < self.batch_size:
        x = np.concatenate([x, np.repeat(x[:1], self.batch_size - len(chunk), 0)])
      out.append(np.asarray(_full(self.model, self.variables, x))[:len(chunk)])
      self.backbone_passes += 5 * len(chunk)
    return np.concatenate(out) if out else None

  def evict_before(self, frame):
    del frame


# --- Overlays -----------------------------------------------------------------------------


def write_overlays(out_dir, clip, people_per_frame, png=True):
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = clip.frames.shape[1:3]
  video_path = os.path.join(out_dir, 'overlay.mp4')
  vw = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*'mp4v'), clip.fps, (w, h))
  if png:
    os.makedirs(os.path.join(out_dir, 'frames'), exist_ok=True)
  for t, frame in enumerate(clip.frames):
    img = overlay.draw(frame, people_per_frame[t])
    vw.write(np.ascontiguousarray(img[..., ::-1]))
    if png:
      Image.fromarray(img).save(os.path.join(out_dir, 'frames', f'{t:06d}.png'))
  vw.release()
  return video_path


# --- Driver -------------------------------------------------------------------------------


def predict_video(checkpoint, out_dir, *, video=None, frames=None, boxes=None, detector='hog',
        box_score_thresh=0.2, reanchor_iou=0.85, use_cache=True, flip_test=False,
        decode_method='quarter', batch_size=8, png=True, model_and_variables=None):
  """Runs TDMI over every frame of a clip; returns the stats dict also written to stats.json."""
  if (video is None) == (frames is None):
    raise ValueError('Give exactly one of --video and --frames')
  # --- Inputs -------------------------------------------------------------------------
  clip = video_io.read_video(video) if video else video_io.read_frames_dir(frames)
  if model_and_variables is None:
    model, variables, config = load_model(checkpoint)
  else:
    model, variables, config = model_and_variables
  if boxes:
    per_frame = video_io.load_boxes(boxes, clip, box_score_thresh)
  elif detector == 'hog':
    logging.warning('No --boxes: using OpenCV\'s HOG people detector, far weaker than the '
                    'detectors PoseTrack results use. Pass --boxes for real results.')
    per_frame = video_io.detect_people(clip, 0.0)
  else:
    logging.warning('No --boxes: treating the whole frame as one person box.')
    per_frame = video_io.whole_frame_boxes(clip)
  track_ids = video_io.link_tracks(per_frame)
  anchor_boxes, anchor_ids = video_io.crop_anchors(per_frame, track_ids, reanchor_iou)
  anchors = {}
  for a_boxes, a_ids in zip(anchor_boxes, anchor_ids):
    anchors.update({int(i): b for i, b in zip(a_ids, a_boxes)})

  # --- Model over every frame ------------------------------------------------------------
  cropper = Cropper(clip, config.data)
  runner_cls = CachedRunner if use_cache else PlainRunner
  runner = runner_cls(model, variables, batch_size)
  if flip_test:
    mirrored_cropper = Cropper(clip, config.data, mirror=True)
    mirrored_runner = runner_cls(model, variables, batch_size)
  n = len(clip.names)
  people_per_frame = []
  start = time.perf_counter()
  for t in tqdm.tqdm(range(n), desc='frames', unit='frame'):
    window = video_io.window_indices(t, n)
    windows = [(int(a), window) for a in anchor_ids[t]]
    people = []
    if windows:
      heatmaps = runner.heatmaps(windows, cropper, anchors)
      if flip_test:
        flipped = mirrored_runner.heatmaps(windows, mirrored_cropper, anchors)
        heatmaps = decode.fuse_flip(heatmaps, flipped)
      cs = [cropper.center_scale(anchors[a]) for a, _ in windows]
      box_scores = per_frame[t][:, 4]
      kp = decode.decode(heatmaps, np.stack([c for c, _ in cs]), np.stack([s for _, s in cs]),
                         None, box_scores, decode_method)
      scores = decode.person_score(kp, box_scores)
      people = [{'keypoints': kp[i], 'score': float(scores[i]), 'track_id': int(track_ids[t][i]),
                 'box_score': float(box_scores[i])} for i in range(len(windows))]
    people_per_frame.append(people)
    runner.evict_before(t - 1)  # The next window starts at t-1.
    if flip_test:
      mirrored_runner.evict_before(t - 1)
  elapsed = time.perf_counter() - start

  # --- Outputs ---------------------------------------------------------------------------
  os.makedirs(out_dir, exist_ok=True)
  image_ids = [video_io.posetrack_image_id(clip.seq_name, t) or t for t in range(n)]
  images = [{'id': image_ids[t], 'file_name': clip.names[t], 'frame_id': image_ids[t],
             'nframes': n, 'is_labeled': True} for t in range(n)]
  preds = {image_ids[t]: people_per_frame[t] for t in range(n)}
  json_path = os.path.join(out_dir, f'{clip.seq_name}.json')
  writer.write_video(json_path, images, preds)
  video_path = write_overlays(out_dir, clip, people_per_frame, png)
  stats = {'frames': n, 'people': int(sum(len(p) for p in people_per_frame)),
           'backbone_passes': runner.backbone_passes + (
               mirrored_runner.backbone_passes if flip_test else 0), 'seconds': elapsed,
           'frames_per_sec': n / max(elapsed, 1e-9), 'cache': use_cache,
           'predictions': json_path, 'overlay': video_path}
  fileio.write_json(os.path.join(out_dir, 'stats.json'), stats)
  return stats


def main(argv):
  del argv
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError('--checkpoint and --out are required')
  try:
    stats = predict_video(FLAGS.checkpoint, FLAGS.out, video=FLAGS.video, frames=FLAGS.frames,
                boxes=FLAGS.boxes, detector=FLAGS.detector,
                box_score_thresh=FLAGS.box_score_thresh, reanchor_iou=FLAGS.reanchor_iou,
                use_cache=not FLAGS.no_cache, flip_test=FLAGS.flip_test,
                decode_method=FLAGS.decode, batch_size=FLAGS.batch_size, png=FLAGS.png)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(stats, indent=2))


if __name__ == '__main__':
  app.run(main)
