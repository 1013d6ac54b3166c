"""PoseTrack input pipeline: TFDS array_record records -> 5-frame person crops -> batches.

Entry points (batch layout: CONTRACTS.md "Data"):
- `TrainData(data_cfg, global_batch_size, seed)`: `.batch(step)` is this process's slice of the
  global batch of `step`, a pure function of (seed, step) — identical after a restart — and
  `.iterator(start_step)` yields steps start_step, start_step + 1, ... with prefetching.
- `EvalData(data_cfg, global_batch_size)`: every val person box exactly once, in (video,
  frame, box) order; the last batch is padded with mask = 0.
- `val_gt_dir(data_cfg)`: the per-video GT annotation folder for the prediction writer.
- `load_records(data_cfg, split)`: the split's records (builds the TFDS data on first use).

`config.data` fields (configs/common.py:data_config):
  name: 'synthetic' | 'posetrack17' | 'posetrack18' | 'posetrack21' (TFDS builder config).
  manual_dir: the download (or synthetic output) root; data_dir: TFDS data dir ('' = TFDS
    default). The built data is keyed by a hash of manual_dir and the ingestion fields below,
    so two downloads never share a build. Both may be local or `gs://` (etils.epath):
    images and annotations are then read from the bucket; array_record files can only be
    read from local disk, so a `gs://` data_dir holds the published build, which every host
    copies once into its local cache (`local_build_dir`).
  image_size / heatmap_size (H, W), sigma, window (supporting offsets), aspect_ratio,
    box_enlarge: SPEC §7 crops and SPEC §6 targets.
  det_boxes, det_score_thresh, use_gt_boxes_for_val: which boxes val crops come from.
  on_bad_input: 'error' raises naming the file; 'skip' drops the frame/example, substitutes the
    next example of the permutation (train) or masks the box out (eval) and counts it in
    `.skipped` and the log.
  missing_support_frame: 'error' | 'key_frame' (window files absent on disk, e.g. trimmed copies).
  num_workers: training: grain worker *processes* (`mp_prefetch`), each building whole
    batches (0: one background thread in this process); evaluation: decode/crop threads.
  prefetch: training batches each worker (or the thread) prepares ahead.
  jpeg_draft: decode a JPEG at 1/k size (k = 2, 4, 8; libjpeg's DCT scaling) when the crop
    maps >= k source pixels onto one crop pixel: same detail, much less decoding.
  augment.*: SPEC §7 augmentation switches (train only).
"""

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import signal
import threading

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tdmi_jax import paths
from tdmi_jax import sharding
from tdmi_jax.data import parsers
from tdmi_jax.data import records
from tdmi_jax.data import transforms

BadInputError = parsers.BadInputError
_KIND = {'synthetic': 'synthetic', 'posetrack17': 'posetrack2017',
         'posetrack18': 'posetrack2018', 'posetrack21': 'posetrack21'}


# --- Building and reading the TFDS records -----------------------------------------------


def builder_config(data_cfg):
  """The TFDS builder config for `data_cfg` (name = kind + hash of what the build reads)."""
  if data_cfg.name not in _KIND:
    raise ValueError(f'config.data.name={data_cfg.name!r}; known: {sorted(_KIND)}')
  if not data_cfg.manual_dir:
    raise ValueError('config.data.manual_dir is empty: point it at the PoseTrack download '
                     '(or the output of `python -m tdmi_jax.data.synthesize --out DIR`)')
  for field, allowed in (('on_bad_input', ('error', 'skip')),
                         ('missing_support_frame', ('error', 'key_frame'))):
    if data_cfg[field] not in allowed:
      raise ValueError(f'config.data.{field}={data_cfg[field]!r}; allowed: {allowed}')
  kind = _KIND[data_cfg.name]
  manual_dir = os.fspath(paths.path(data_cfg.manual_dir))
  det = os.fspath(paths.path(data_cfg.det_boxes)) if data_cfg.det_boxes else ''
  key = '|'.join([manual_dir, det, data_cfg.on_bad_input, data_cfg.missing_support_frame])
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return records.PosetrackConfig(
      name=f'{kind}_{digest}', kind=kind, det_boxes=det,
      on_bad_input=data_cfg.on_bad_input, missing_support_frame=data_cfg.missing_support_frame,
      description=f'{kind} from {manual_dir}')


def local_build_dir(data_dir):
  """This host's copy of the build published under a `gs://` data_dir (array_record
  reads local files only): `$XDG_CACHE_HOME/tdmi_jax/tfds/<hash of data_dir>`."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  digest = hashlib.sha1(os.fspath(data_dir).encode()).hexdigest()[:12]
  return os.path.join(cache, 'tdmi_jax', 'tfds', digest)


def get_builder(data_cfg):
  """The builder, with its array_record files built from manual_dir if not yet there.

  With several processes every one calls this: process 0 builds first (hosts sharing a
  data_dir must not race), the others then find the build (or make their own copy).
  """
  if not data_cfg.manual_dir or not paths.path(data_cfg.manual_dir).is_dir():
    builder_config(data_cfg)  # raises the empty-field error first
    raise FileNotFoundError(f'config.data.manual_dir={data_cfg.manual_dir!r} does not exist')
  config = builder_config(data_cfg)
  remote = data_cfg.data_dir if paths.is_uri(data_cfg.data_dir) else None
  if remote:
    data_dir = local_build_dir(remote)
  else:
    data_dir = os.fspath(paths.path(data_cfg.data_dir)) if data_cfg.data_dir else None
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(paths.path(data_cfg.manual_dir)))

  def prepare():
    builder = records.Builder(config=config, data_dir=data_dir)
    build = lambda: builder.download_and_prepare(file_format='array_record',
                                                 download_config=download_config)
    if remote:
      _sync_published_build(builder, data_dir, remote, build)
    else:
      build()

  if jax.process_count() > 1 and jax.process_index() == 0:
    prepare()
  sharding.sync('tdmi_jax: dataset built')
  if jax.process_count() == 1 or jax.process_index() != 0:
    prepare()
  # A fresh builder: one made before a download does not see the downloaded files.
  return records.Builder(config=config, data_dir=data_dir)


_BUILD_MARKER = 'dataset_info.json'  # TFDS writes it last; it is published last too.


def _sync_published_build(builder, local_root, remote_root, build):
  """Makes `builder.data_dir` (under local_root) hold the build published under
  remote_root: copies it here, or builds it here and publishes it. Returns which."""
  rel = os.path.relpath(builder.data_dir, local_root)
  local, remote = paths.path(builder.data_dir), paths.path(remote_root) / rel
  if (local / _BUILD_MARKER).exists():
    return 'cached'
  if (remote / _BUILD_MARKER).exists():
    # Processes of one host share the cache: each copies into its own folder, and the
    # first to finish renames it into place.
    tmp = local.parent / f'{local.name}.download-{os.getpid()}'
    paths.copy_tree(remote, tmp)
    try:
      os.rename(tmp, local)
    except OSError:
      shutil.rmtree(tmp)
    logging.info('Copied the dataset build %s to %s.', remote, local)
    return 'copied'
  build()
  for rel in sorted(paths.files_under(local), key=lambda r: r.endswith(_BUILD_MARKER)):
    paths.copy_file(local / rel, remote / rel)
  logging.info('Published the dataset build %s to %s.', local, remote)
  return 'built'


def prepare_data(config, workdir):
  """Fills in config.data's paths; synthesises the synthetic dataset on first use.

  Real PoseTrack data is never downloaded: a missing manual_dir is an error that carries
  the download instructions. With several processes, every one must call this (it holds
  barriers); process 0 writes, the others read.
  """
  d = config.data
  workdir = paths.path(workdir)
  if d.name == 'synthetic':
    if not d.manual_dir:
      d.manual_dir = os.fspath(workdir / 'data' / 'synthetic')
    if not d.data_dir:
      d.data_dir = os.fspath(workdir / 'data' / 'tfds')
    # Process 0 alone looks and writes; every process reaches the barrier (which of them
    # would see the folder depends on how far process 0 has got).
    if sharding.is_writer() and not (paths.path(d.manual_dir) / 'annotations').is_dir():
      # Imported here: the generator (and its renderer) is only needed on first use.
      from tdmi_jax.data import synthesize  # pylint: disable=g-import-not-at-top
      logging.info('Synthesising the dataset into %s (first use).', d.manual_dir)
      summary = synthesize.generate(d.manual_dir, overwrite=True, **config.synthetic.to_dict())
      logging.info('Synthetic dataset: %s', json.dumps(summary))
    sharding.sync('tdmi_jax: synthetic dataset')
  elif not d.manual_dir or not paths.path(d.manual_dir).is_dir():
    raise FileNotFoundError(
        f'config.data.manual_dir={d.manual_dir!r} ({d.name}) does not exist. PoseTrack '
        'cannot be downloaded automatically; set --config.data.manual_dir=DIR after '
        f'downloading it:\n{records.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  if jax.process_count() > 1:
    get_builder(d)  # Every process: get_builder orders the build and has the barrier.


def load_records(data_cfg, split):
  """All records of `split` as dicts, sorted by (video_index, frame_index)."""
  builder = get_builder(data_cfg)
  if split not in builder.info.splits:
    raise BadInputError(
        f'{data_cfg.manual_dir}: no {split!r} split (found {sorted(builder.info.splits)}); '
        f'expected annotations/{split}/*.json or the DCPose layout')
  source = builder.as_data_source(split)
  recs = [source[i] for i in range(len(source))]
  if not recs:
    raise BadInputError(f'{data_cfg.manual_dir}: the {split} split is empty')
  for r in recs:
    for k in ('video_name', 'video_id', 'gt_file', 'degradation'):
      r[k] = r[k].decode() if isinstance(r[k], bytes) else r[k]
    r['window_files'] = [f.decode() if isinstance(f, bytes) else f for f in r['window_files']]
  recs.sort(key=lambda r: (int(r['video_index']), int(r['frame_index'])))
  return recs


def val_gt_dir(data_cfg):
  """Absolute path of the per-video val GT JSON folder (what the prediction writer mirrors)."""
  manual_dir = os.fspath(paths.path(data_cfg.manual_dir))
  src = parsers.find_split(manual_dir, _KIND[data_cfg.name], 'val')
  if src is None or not src.gt_dir:
    raise BadInputError(f'{manual_dir}: no per-video val GT folder (annotations/val, '
                        'posetrack_data/val or posetrack1x_annotation_dirs/val)')
  return os.path.join(manual_dir, src.gt_dir)


# --- One example -------------------------------------------------------------------------


def _load_crop(path, m, out_wh, draft=True, expect_wh=None):
  """Decodes `path` (JPEG draft mode when the crop downsamples) and warps it to out_wh."""
  try:
    with paths.path(path).open('rb') as f, Image.open(f) as im:
      w, h = im.size
      if expect_wh is not None and (w, h) != tuple(expect_wh):
        raise BadInputError(f'{path}: image is {w}x{h} but its annotation says '
                            f'{expect_wh[0]}x{expect_wh[1]}')
      # Source pixels per crop pixel; decode at 1/k (k = 1, 2, 4, 8) without losing detail.
      src_per_out = 1.0 / math.sqrt(abs(np.linalg.det(np.asarray(m)[:, :2])))
      k = 1
      while k * 2 <= min(src_per_out, 8.0):
        k *= 2
      if draft and k > 1 and im.format == 'JPEG':
        im.draft('RGB', (-(-w // k), -(-h // k)))
      im.load()
      sx = 2.0 ** round(math.log2(w / im.size[0]))
      sy = 2.0 ** round(math.log2(h / im.size[1]))
      return transforms.warp_image(im, m, out_wh, image_scale=(sx, sy))
  except BadInputError:
    raise
  except FileNotFoundError:
    raise BadInputError(f'{path}: image not found') from None
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInputError(f'{path}: cannot decode image ({e})') from None


def make_example(data_cfg, manual_dir, rec, box, joints, rng=None, box_score=1.0):
  """One crop of a record's window around `box` (x, y, w, h); augmented when rng is given."""
  out_h, out_w = data_cfg.image_size
  img_h, img_w = (int(v) for v in rec['image_size'])
  center, scale = transforms.box_to_center_scale(box, data_cfg.aspect_ratio,
                                                 data_cfg.box_enlarge)
  rotation, flip = 0.0, False
  if rng is not None and data_cfg.augment.enabled:
    center, scale, rotation, flip, joints = transforms.sample_augmentation(
        rng, data_cfg.augment, joints, center, scale, img_w, data_cfg.aspect_ratio)
  m_points = transforms.affine_matrix(center, scale, rotation, (out_w, out_h))
  m_pixels = (transforms.compose_affine(m_points, transforms.flip_matrix(img_w)) if flip
              else m_points)
  decoded = {}
  frames = []
  for rel in rec['window_files']:
    if rel not in decoded:
      decoded[rel] = _load_crop(os.path.join(manual_dir, rel), m_pixels, (out_w, out_h),
                                data_cfg.jpeg_draft, (img_w, img_h))
    frames.append(decoded[rel])
  # uint8 to the device (a quarter of float32's bytes); the model normalises.
  frames = np.stack(frames)
  target, weight = transforms.heatmap_targets(
      transforms.transform_points(joints, m_points), data_cfg.image_size,
      data_cfg.heatmap_size, data_cfg.sigma)
  return {
      'frames': frames, 'target': target, 'target_weight': weight,
      'mask': np.float32(1.0),
      'center': center.astype(np.float32), 'scale': np.asarray(scale, np.float32),
      'rotation': np.float32(rotation), 'box_score': np.float32(box_score),
      'image_id': np.int64(rec['image_id']), 'video_index': np.int32(rec['video_index']),
      'frame_index': np.int32(rec['frame_index']),
      'degraded': np.int32(rec['degradation'] not in ('', 'none')),
  }


def _empty_example(data_cfg):
  out_h, out_w = data_cfg.image_size
  hh, hw = data_cfg.heatmap_size
  k = parsers.NUM_JOINTS
  return {
      'frames': np.zeros((1 + len(data_cfg.window), out_h, out_w, 3), np.uint8),
      'target': np.zeros((hh, hw, k), np.float32), 'target_weight': np.zeros(k, np.float32),
      'mask': np.float32(0.0), 'center': np.zeros(2, np.float32),
      'scale': np.ones(2, np.float32), 'rotation': np.float32(0.0),
      'box_score': np.float32(0.0), 'image_id': np.int64(-1), 'video_index': np.int32(-1),
      'frame_index': np.int32(-1), 'degraded': np.int32(0),
  }


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _check_window(data_cfg):
  if tuple(data_cfg.window) != records.WINDOW:
    raise ValueError(f'config.data.window={tuple(data_cfg.window)}: the built records hold the '
                     f'window {records.WINDOW}')


def _process_slice(global_batch_size, process_index, process_count, device_count):
  process_index = jax.process_index() if process_index is None else process_index
  per = sharding.check_batch_size(global_batch_size,
                                  device_count=device_count or jax.device_count(),
                                  process_count=process_count)
  return process_index * per, per


# --- Training ----------------------------------------------------------------------------


class TrainData:
  """Deterministic training batches: example g = step * B + i uses permutation epoch g // N.

  `batch(step)` builds a batch here; `iterator(start_step)` streams them through grain, in
  `num_workers` worker processes. Either way the batch of a step is a pure function of
  (seed, step), whatever the number of workers, so a resumed run sees the same batches.
  Batches carry 'num_skipped' [B] int32 besides the CONTRACTS.md keys: how many examples
  on_bad_input='skip' passed over to reach each one, counted in whichever process built it;
  `.skipped` is this object's running total of what it built or received.
  """

  def __init__(self, data_cfg, global_batch_size, seed, *, split='train', process_index=None,
               process_count=None, device_count=None, records=None):
    _check_window(data_cfg)
    self.cfg = data_cfg
    self.seed = int(seed)
    self.global_batch_size = int(global_batch_size)
    self.offset, self.local_batch_size = _process_slice(
        self.global_batch_size, process_index, process_count, device_count)
    self.manual_dir = os.fspath(paths.path(data_cfg.manual_dir))
    self.records = load_records(data_cfg, split) if records is None else records
    # Persons worth a training example: a positive-area box and an annotated joint.
    self.index = [(r, p) for r, rec in enumerate(self.records)
                  for p in range(len(rec['bbox']))
                  if rec['bbox'][p, 2] > 0 and rec['bbox'][p, 3] > 0
                  and (rec['keypoints'][p, :, 2] > 0).any()]
    if not self.index:
      raise BadInputError(f'{self.manual_dir}: the {split} split has no annotated person')
    self.skipped = 0
    self._init_local()

  def _init_local(self):
    self._lock = threading.Lock()
    self._perms = collections.OrderedDict()

  # Worker processes receive a pickled copy: locks and caches are rebuilt there.
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_lock', '_perms')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_local()

  @property
  def num_examples(self):
    return len(self.index)

  def _perm(self, epoch):
    with self._lock:
      if epoch not in self._perms:
        rng = np.random.default_rng([self.seed, epoch])
        self._perms[epoch] = rng.permutation(len(self.index))
        while len(self._perms) > 3:
          self._perms.popitem(last=False)
      return self._perms[epoch]

  def _example(self, g):
    """The example at global position g, with 'num_skipped'."""
    n = len(self.index)
    epoch, pos = divmod(int(g), n)
    perm = self._perm(epoch)
    for attempt in range(n):
      r, p = self.index[perm[(pos + attempt) % n]]
      rec = self.records[r]
      rng = np.random.default_rng([self.seed, int(g), attempt])
      try:
        ex = make_example(self.cfg, self.manual_dir, rec, rec['bbox'][p],
                          rec['keypoints'][p].astype(np.float64), rng)
        ex['num_skipped'] = np.int32(attempt)
        return ex
      except BadInputError as e:
        if self.cfg.on_bad_input != 'skip':
          raise
        logging.warning('skipped training example (at position %d): %s', g, e)
    raise BadInputError(f'{self.manual_dir}: every training example failed to load')

  def example(self, g):
    """The training example at global position g (a pure function of seed and g)."""
    ex = self._example(g)
    self.skipped += int(ex['num_skipped'])
    return ex

  def _batch(self, step):
    start = int(step) * self.global_batch_size + self.offset
    return _stack([self._example(g) for g in range(start, start + self.local_batch_size)])

  def batch(self, step):
    """This process's slice of the global batch of `step`."""
    out = self._batch(step)
    self.skipped += int(out['num_skipped'].sum())
    return out

  def dataset(self, start_step=0):
    """The grain pipeline of steps start_step, start_step + 1, ...: an IterDataset."""
    workers, ahead = int(self.cfg.num_workers), max(1, int(self.cfg.prefetch))
    if workers < 0:
      raise ValueError(f'config.data.num_workers={workers}: must be >= 0')
    steps = grain.MapDataset.range(int(start_step), _LAST_STEP).map(self._batch)
    # Inside a worker one thread builds the batches, so workers are what scale it.
    ds = steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=ahead))
    if workers:
      _mark_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=ahead),
                          worker_init_fn=_worker_init)
    return ds

  def iterator(self, start_step=0):
    """Batches for start_step, start_step + 1, ... (prefetched by grain); close() stops
    the workers."""
    it = iter(self.dataset(start_step))
    try:
      while True:
        out = next(it)
        self.skipped += int(out['num_skipped'].sum())
        yield out
    finally:
      close = getattr(it, 'close', None)
      if close is not None:
        close()


# Far beyond any run; grain's MapDataset.range needs an end.
_LAST_STEP = 1 << 40


def _worker_init(worker_index, worker_count):
  """Ctrl-C reaches the whole process group and a scheduler's SIGTERM may too: the
  driver turns them into a checkpoint at the next step, which needs the workers alive.
  They stop when the iterator is closed (grain's stop event, then SIGKILL)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _mark_flags_parsed():
  """grain's worker processes read absl flags (their defaults here): outside an absl app
  (tests, notebooks, library use) mark them parsed, as absl.app.run would have."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# --- Evaluation --------------------------------------------------------------------------


class EvalData:
  """Every val person box once: detector boxes (score >= det_score_thresh) or GT boxes."""

  def __init__(self, data_cfg, global_batch_size, *, split='val', process_index=None,
               process_count=None, device_count=None, records=None):
    _check_window(data_cfg)
    self.cfg = data_cfg
    self.global_batch_size = int(global_batch_size)
    self.offset, self.local_batch_size = _process_slice(
        self.global_batch_size, process_index, process_count, device_count)
    self.manual_dir = os.fspath(paths.path(data_cfg.manual_dir))
    self.records = load_records(data_cfg, split) if records is None else records
    self.items = []  # (record index, box [4], score, person index or -1)
    use_gt = data_cfg.use_gt_boxes_for_val
    if not use_gt and not any(len(r['det_boxes']) for r in self.records):
      raise BadInputError(
          f'{self.manual_dir}: the {split} records have no detector boxes; set '
          'config.data.det_boxes to a box file or config.data.use_gt_boxes_for_val=True')
    for i, rec in enumerate(self.records):
      if use_gt:
        for p, box in enumerate(rec['bbox']):
          if box[2] > 0 and box[3] > 0:
            self.items.append((i, box, 1.0, p))
      else:
        for b in rec['det_boxes']:
          if b[4] >= data_cfg.det_score_thresh and b[2] > 0 and b[3] > 0:
            self.items.append((i, b[:4], float(b[4]), -1))
    self.skipped = 0
    self._lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, data_cfg.num_workers))

  @property
  def num_boxes(self):
    return len(self.items)

  @property
  def num_batches(self):
    return -(-len(self.items) // self.global_batch_size)

  def example(self, j):
    if j >= len(self.items):
      return _empty_example(self.cfg)
    r, box, score, p = self.items[j]
    rec = self.records[r]
    joints = (rec['keypoints'][p].astype(np.float64) if p >= 0
              else np.zeros((parsers.NUM_JOINTS, 3)))
    try:
      return make_example(self.cfg, self.manual_dir, rec, box, joints, None, score)
    except BadInputError as e:
      if self.cfg.on_bad_input != 'skip':
        raise
      with self._lock:
        self.skipped += 1
      logging.warning('skipped eval box (%d so far; masked out): %s', self.skipped, e)
      return _empty_example(self.cfg)

  def batch(self, i):
    start = int(i) * self.global_batch_size + self.offset
    return _stack(list(self._pool.map(self.example,
                                      range(start, start + self.local_batch_size))))

  def __iter__(self):
    for i in range(self.num_batches):
      yield self.batch(i)
