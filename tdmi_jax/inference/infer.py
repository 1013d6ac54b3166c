r"""Run a trained TDMI on a video or a folder of frames.

  python -m tdmi_jax.infer --checkpoint WORKDIR (--video FILE.mp4 | --frames DIR) \
      [--boxes FILE] --out OUT

Writes `OUT/<name>.json` (PoseTrack18 format: every frame, people with keypoints[51],
scores[17], track_id: the project's tracker on the person boxes, see
`video_io.TrackLinker`), `OUT/overlay.mp4` and `OUT/frames/%06d.png` (skeleton coloured by
joint confidence), and `OUT/stats.json` (frames/s, backbone passes, the most frames and
cached backbone outputs held at once).

Person boxes come from --boxes (COCO results or DCPose list format), else from OpenCV's HOG
people detector (`--detector=hog`) or the whole frame (`--detector=whole_frame`), with a
warning: neither is a substitute for a real person detector.

Streaming: frames are decoded as the window reaches them, and a frame is released once
the last window containing it is done, so at most five decoded frames are held whatever
the video's length. The feature cache: the backbone runs once per (crop, frame) and every
window that contains the frame reuses its outputs, instead of five backbone passes per
window; outputs older than the window are evicted. A window crops its five frames with one
affine transform from an anchor box (as in training); a track holds its anchor while its
box stays close, so consecutive windows share crops (see `video_io.CropAnchors`).
`--no_cache` runs the plain per-window model for comparison; both give the same heatmaps
for the same anchors.
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
from tdmi_jax.data import parsers
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
  """Crops (anchor box, frame) pairs at the model's input size, normalised.

  `images` maps frame index -> PIL image: the frames currently held by the stream.
  """

  def __init__(self, images, data_cfg, mirror=False):
    self.mirror = mirror  # The flip test's second input.
    self.images = images
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
    # Fold the backbone's BN once: every backbone call would otherwise fold it again.
    self.variables = tdmi.fold_backbone(model, variables)

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

  @property
  def cache_size(self):
    return len(self.cache)

  def evict_before(self, frame):
    for k in [k for k in self.cache if k[1] < frame]:
      del self.cache[k]


class PlainRunner:
  """The whole model on 5 crops per window: 5 backbone passes per window."""

  def __init__(self, model, variables, batch_size):
    self.backbone_passes = 0
    self.batch_size = batch_size
    self.model = model
    self.variables = tdmi.fold_backbone(model, variables)

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

  cache_size = 0

  def evict_before(self, frame):
    del frame


# --- Overlays -----------------------------------------------------------------------------


class OverlayWriter:
  """overlay.mp4 (and frames/%06d.png), written frame by frame as predictions arrive."""

  def __init__(self, out_dir, fps, png=True):
    self.out_dir = out_dir
    self.fps = fps
    self.png = png
    self.path = os.path.join(out_dir, 'overlay.mp4')
    self.video = None
    if png:
      os.makedirs(os.path.join(out_dir, 'frames'), exist_ok=True)

  def write(self, t, frame, people):
    import cv2  # pylint: disable=g-import-not-at-top
    img = overlay.draw(frame, people)
    if self.video is None:
      h, w = img.shape[:2]
      self.video = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*'mp4v'), self.fps, (w, h))
    self.video.write(np.ascontiguousarray(img[..., ::-1]))
    if self.png:
      Image.fromarray(img).save(os.path.join(self.out_dir, 'frames', f'{t:06d}.png'))

  def close(self):
    if self.video is not None:
      self.video.release()


# --- Driver -------------------------------------------------------------------------------


def predict_video(checkpoint, out_dir, *, video=None, frames=None, boxes=None, detector='hog',
                  box_score_thresh=0.2, reanchor_iou=0.85, use_cache=True, flip_test=False,
                  decode_method='quarter', batch_size=8, png=True, model_and_variables=None):
  """Runs TDMI over every frame of a clip; returns the stats dict also written to stats.json."""
  if (video is None) == (frames is None):
    raise ValueError('Give exactly one of --video and --frames')
  # --- Inputs -------------------------------------------------------------------------
  source = video_io.open_video(video) if video else video_io.open_frames_dir(frames)
  if model_and_variables is None:
    model, variables, config = load_model(checkpoint)
  else:
    model, variables, config = model_and_variables
  if boxes:
    box_file = video_io.BoxFile(boxes, source.seq_name, source.names, box_score_thresh)
    if source.frame_count:  # Fails before any work when no box names a frame.
      box_file.check(source.frame_count, source.seq_name)
    find_boxes = lambda t, img: box_file(t)
  elif detector == 'hog':
    logging.warning('No --boxes: using OpenCV\'s HOG people detector, far weaker than the '
                    'detectors PoseTrack results use. Pass --boxes for real results.')
    hog = video_io.HogDetector(0.0)
    find_boxes = lambda t, img: hog(img)
  else:
    logging.warning('No --boxes: treating the whole frame as one person box.')
    find_boxes = lambda t, img: video_io.whole_frame_box(img)
  link = video_io.TrackLinker()
  anchor = video_io.CropAnchors(reanchor_iou)

  # --- Model over the stream ---------------------------------------------------------
  # Per frame, while its windows are pending: the image, its boxes, track and anchor ids,
  # anchor boxes. Key frame t is run once frame t+2 has arrived (or the stream has ended).
  held, per_frame = {}, {}
  cropper = Cropper(held, config.data)
  runner_cls = CachedRunner if use_cache else PlainRunner
  runner = runner_cls(model, variables, batch_size)
  if flip_test:
    mirrored_cropper = Cropper(held, config.data, mirror=True)
    mirrored_runner = runner_cls(model, variables, batch_size)
  os.makedirs(out_dir, exist_ok=True)
  overlays = OverlayWriter(out_dir, source.fps, png)
  people_per_frame = []
  peak = {'frames_held': 0, 'cache_entries': 0}

  def run_key_frame(t, num_frames):
    boxes_t, tracks_t, anchors_t, anchor_ids_t = per_frame[t]
    anchors = dict(zip((int(a) for a in anchor_ids_t), anchors_t))
    window = video_io.window_indices(t, num_frames)
    windows = [(int(a), window) for a in anchor_ids_t]
    people = []
    if windows:
      heatmaps = runner.heatmaps(windows, cropper, anchors)
      if flip_test:
        flipped = mirrored_runner.heatmaps(windows, mirrored_cropper, anchors)
        heatmaps = decode.fuse_flip(heatmaps, flipped)
      cs = [cropper.center_scale(anchors[a]) for a, _ in windows]
      box_scores = boxes_t[:, 4]
      kp = decode.decode(heatmaps, np.stack([c for c, _ in cs]), np.stack([s for _, s in cs]),
                         None, box_scores, decode_method)
      scores = decode.person_score(kp, box_scores)
      people = [{'keypoints': kp[i], 'score': float(scores[i]), 'track_id': int(tracks_t[i]),
                 'box_score': float(box_scores[i])} for i in range(len(windows))]
    people_per_frame.append(people)
    overlays.write(t, np.asarray(held[t]), people)
    peak['cache_entries'] = max(peak['cache_entries'], runner.cache_size + (
        mirrored_runner.cache_size if flip_test else 0))
    # The next window starts at t-1: older frames and their features are never used again.
    for old in [f for f in held if f < t - 1]:
      del held[old], per_frame[old]
    runner.evict_before(t - 1)
    if flip_test:
      mirrored_runner.evict_before(t - 1)

  start = time.perf_counter()
  n = 0
  next_key = 0
  try:
    for img in tqdm.tqdm(source, total=source.frame_count or None, desc='frames', unit='frame'):
      boxes_n = find_boxes(n, img)
      tracks_n = link(boxes_n)
      anchors_n, anchor_ids_n = anchor(boxes_n, tracks_n)
      held[n] = Image.fromarray(img)
      per_frame[n] = (boxes_n, tracks_n, anchors_n, anchor_ids_n)
      peak['frames_held'] = max(peak['frames_held'], len(held))
      del img
      n += 1
      # Frames up to n-1 exist, so key frame n-3's window (up to n-1) is complete.
      while next_key <= n - 3:
        run_key_frame(next_key, n)
        next_key += 1
    while next_key < n:  # The last two key frames, whose windows repeat the key frame.
      run_key_frame(next_key, n)
      next_key += 1
  finally:
    overlays.close()
  elapsed = time.perf_counter() - start
  if boxes:
    box_file.check(n, source.seq_name, final=True)

  # --- Outputs ---------------------------------------------------------------------------
  names = [source.name(t) for t in range(n)]
  if parsers.video_number(source.seq_name) is not None:
    image_ids = [parsers.posetrack_image_id(source.seq_name, t) for t in range(n)]
  else:  # A user's own video: the frame index.
    image_ids = list(range(n))
  images = [{'id': image_ids[t], 'file_name': names[t], 'frame_id': image_ids[t],
             'nframes': n, 'is_labeled': True} for t in range(n)]
  preds = {image_ids[t]: people_per_frame[t] for t in range(n)}
  json_path = os.path.join(out_dir, f'{source.seq_name}.json')
  writer.write_video(json_path, images, preds)
  stats = {'frames': n, 'people': int(sum(len(p) for p in people_per_frame)),
           'backbone_passes': runner.backbone_passes + (
               mirrored_runner.backbone_passes if flip_test else 0), 'seconds': elapsed,
           'frames_per_sec': n / max(elapsed, 1e-9), 'cache': use_cache,
           'max_frames_held': peak['frames_held'], 'max_cache_entries': peak['cache_entries'],
           'predictions': json_path, 'overlay': overlays.path}
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
