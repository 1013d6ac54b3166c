"""Input pipeline: batch layout, windows, targets, determinism, sharding, eval coverage, bad input."""

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from configs import common
from tdmi_jax import keypoints
from tdmi_jax.data import input_pipeline
from tdmi_jax.data import transforms
from tests import fake_posetrack

ONE = dict(process_index=0, process_count=1, device_count=1)
VIDEOS = (('000001_mpii_test', 6, (0, 2, 5)), ('000002_mpii_test', 4, (1, 3)))


def _cfg(manual_dir, data_dir, **kw):
  c = common.data_config('posetrack18')
  c.manual_dir = str(manual_dir)
  c.data_dir = str(data_dir)
  c.image_size = (64, 48)
  c.heatmap_size = (16, 12)
  c.sigma = 1.0
  for k, v in kw.items():
    if '.' in k:
      a, b = k.split('.')
      c[a][b] = v
    else:
      c[k] = v
  return c


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('pt18')
  truth = {}
  for split in ('train', 'val'):
    truth.update(fake_posetrack.write_posetrack18(root, split=split, videos=VIDEOS))
  return root, truth


def _frame_index_of_pixels(frames):
  """Recovers, per window slot, the frame index a flat-colour fake frame encodes."""
  red = frames[..., 0].astype(np.float64)
  vals = np.median(red.reshape(red.shape[0], -1), axis=1)
  colours = {i: fake_posetrack.frame_colour(i)[0] for i in range(10)}
  return [min(colours, key=lambda i: abs(colours[i] - v)) for v in vals]


def test_train_batch_layout(tiny, tmp_path):
  root, _ = tiny
  data = input_pipeline.TrainData(_cfg(root, tmp_path), 4, seed=0, **ONE)
  assert data.num_examples == 5 * 2  # 5 labeled frames x 2 persons
  b = data.batch(0)
  want = {'frames': ((4, 5, 64, 48, 3), np.uint8), 'target': ((4, 16, 12, 17), np.float32),
          'target_weight': ((4, 17), np.float32), 'mask': ((4,), np.float32),
          'center': ((4, 2), np.float32), 'scale': ((4, 2), np.float32),
          'rotation': ((4,), np.float32), 'box_score': ((4,), np.float32),
          'image_id': ((4,), np.int64), 'video_index': ((4,), np.int32),
          'frame_index': ((4,), np.int32), 'degraded': ((4,), np.int32),
          'num_skipped': ((4,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
  assert (b['mask'] == 1).all() and (b['degraded'] == 0).all()
  assert (b['target_weight'][:, 3:5] == 0).all()  # ears are never annotated


def test_windows_follow_the_boundary_rule(tiny, tmp_path):
  root, _ = tiny
  cfg = _cfg(root, tmp_path, **{'augment.enabled': False})
  data = input_pipeline.TrainData(cfg, 2, seed=0, **ONE)
  seen = {}
  for step in range(5):
    b = data.batch(step)
    for i in range(2):
      seen[(int(b['video_index'][i]), int(b['frame_index'][i]))] = _frame_index_of_pixels(
          b['frames'][i])
  assert seen == {(0, 0): [0, 0, 0, 1, 2], (0, 2): [0, 1, 2, 3, 4], (0, 5): [3, 4, 5, 5, 5],
                  (1, 1): [1, 0, 1, 2, 3], (1, 3): [1, 2, 3, 3, 3]}


def test_targets_peak_at_the_joints_without_augmentation(tiny, tmp_path):
  root, truth = tiny
  cfg = _cfg(root, tmp_path, **{'augment.enabled': False})
  data = input_pipeline.TrainData(cfg, 2, seed=1, **ONE)
  b = data.batch(0)
  for i in range(2):
    kps = truth[int(b['image_id'][i])]
    m = transforms.affine_matrix(b['center'][i], b['scale'][i], 0.0, (48, 64))
    # Which person: the one whose transformed nose peaks where the target does.
    peak = np.unravel_index(np.argmax(b['target'][i, :, :, 0]), (16, 12))
    hits = 0
    for kp in kps:
      crop = transforms.transform_points(kp, m)
      want = np.floor(crop[:, :2] / 4 + 0.5).astype(int)  # stride 4
      if tuple(want[0][::-1]) == peak:
        hits += 1
        for k in range(17):
          if kp[k, 2] > 0 and 0 <= want[k, 0] < 12 and 0 <= want[k, 1] < 16:
            assert b['target_weight'][i, k] == 1
            assert b['target'][i, want[k, 1], want[k, 0], k] == 1.0
          else:
            assert b['target_weight'][i, k] == 0
    assert hits == 1


def test_deterministic_given_seed_and_step(tiny, tmp_path):
  root, _ = tiny
  cfg = _cfg(root, tmp_path)
  a = input_pipeline.TrainData(cfg, 4, seed=3, **ONE)
  b3 = a.batch(3)
  restarted = input_pipeline.TrainData(cfg, 4, seed=3, **ONE)  # a "restart"
  it = restarted.iterator(start_step=3)
  first, second = next(it), next(it)
  it.close()
  for k in b3:
    np.testing.assert_array_equal(first[k], b3[k], err_msg=k)
  assert not np.array_equal(second['frames'], b3['frames'])
  other_seed = input_pipeline.TrainData(cfg, 4, seed=4, **ONE).batch(3)
  assert not np.array_equal(other_seed['frames'], b3['frames'])


@pytest.mark.parametrize('workers', [0, 2])
def test_grain_iterator_matches_batch_for_any_worker_count(tiny, tmp_path, workers):
  """Worker processes build whole batches; the stream is still batch(step), in order."""
  root, _ = tiny
  cfg = _cfg(root, tmp_path, num_workers=workers, prefetch=1)
  data = input_pipeline.TrainData(cfg, 2, seed=7, **ONE)
  it = data.iterator(start_step=4)
  got = [next(it) for _ in range(3)]
  it.close()
  for step, b in zip((4, 5, 6), got):
    want = data.batch(step)
    assert b['frames'].dtype == np.uint8
    for k in want:
      np.testing.assert_array_equal(b[k], want[k], err_msg=f'step {step} {k}')


def test_grain_workers_survive_ctrl_c_so_the_driver_can_checkpoint(tiny, tmp_path):
  root, _ = tiny
  cfg = _cfg(root, tmp_path, num_workers=2, prefetch=1)
  data = input_pipeline.TrainData(cfg, 2, seed=1, **ONE)
  # Only this iterator's workers (an earlier iterator's may still be exiting).
  before = {p.pid for p in multiprocessing.active_children()}
  it = data.iterator(0)
  # Batches 0 and 1 come from workers 0 and 1: both have started (and set their handlers).
  next(it), next(it)
  workers = [p for p in multiprocessing.active_children() if p.pid not in before]
  assert len(workers) >= 2
  for w in workers:  # What a terminal's Ctrl-C does to the process group.
    os.kill(w.pid, signal.SIGINT)
    os.kill(w.pid, signal.SIGTERM)
  time.sleep(1.0)
  got = [next(it) for _ in range(3)]
  it.close()
  for step, b in zip((2, 3, 4), got):
    np.testing.assert_array_equal(b['frames'], data.batch(step)['frames'])


def test_grain_workers_count_skips_and_report_bad_files(tmp_path):
  root = tmp_path / 'pt'
  fake_posetrack.write_posetrack18(root, split='train', videos=(('000001_a', 9, (0, 8)),),
                                   persons=1)
  cfg = _cfg(root, tmp_path / 'tfds', on_bad_input='skip', num_workers=2, prefetch=1,
             **{'augment.enabled': False})
  data = input_pipeline.TrainData(cfg, 2, seed=0, **ONE)
  os.remove(root / 'images' / 'train' / '000001_a' / '000007.jpg')  # in frame 8's window
  it = data.iterator(0)
  b = next(it)
  it.close()
  # Counted in the worker that built the batch, summed here.
  assert b['num_skipped'].tolist() == [0, 1] and data.skipped == 1
  assert b['frame_index'].tolist() == [0, 0]
  cfg.on_bad_input = 'error'
  strict = input_pipeline.TrainData(cfg, 2, seed=0, records=data.records, **ONE)
  it = strict.iterator(0)
  with pytest.raises(Exception, match='000001_a/000007.jpg: image not found'):
    next(it)
  it.close()


def test_epoch_is_a_permutation(tiny, tmp_path):
  root, _ = tiny
  data = input_pipeline.TrainData(_cfg(root, tmp_path), 2, seed=0, **ONE)
  n = data.num_examples
  for epoch in range(2):
    perm = data._perm(epoch)
    assert sorted(perm.tolist()) == list(range(n))
  assert not np.array_equal(data._perm(0), data._perm(1))


def test_process_slices_make_the_global_batch(tiny, tmp_path):
  root, _ = tiny
  cfg = _cfg(root, tmp_path)
  whole = input_pipeline.TrainData(cfg, 4, seed=5, **ONE).batch(2)
  parts = [input_pipeline.TrainData(cfg, 4, seed=5, process_index=p, process_count=2,
                                    device_count=2).batch(2) for p in range(2)]
  assert parts[0]['frames'].shape[0] == 2
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=k)


def test_batch_not_divisible_by_devices(tiny, tmp_path):
  root, _ = tiny
  with pytest.raises(ValueError, match=r'batch_size=3 is not divisible by the number of devices'):
    input_pipeline.TrainData(_cfg(root, tmp_path), 3, seed=0, process_index=0,
                             process_count=1, device_count=2)
  # Default topology comes from jax (2 CPU devices in tests).
  with pytest.raises(ValueError, match=r'number of devices \(2\)'):
    input_pipeline.TrainData(_cfg(root, tmp_path), 5, seed=0)


def test_eval_covers_every_box_once(tiny, tmp_path):
  root, truth = tiny
  cfg = _cfg(root, tmp_path)
  data = input_pipeline.EvalData(cfg, 4, **ONE)
  dets = json.loads((root / 'detections' / 'val_boxes_coco.json').read_text())
  kept = [d for d in dets if d['score'] >= cfg.det_score_thresh]
  assert data.num_boxes == len(kept) == 10
  batches = list(data)
  assert len(batches) == data.num_batches == 3
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.tolist() == [1] * 10 + [0] * 2
  ids = np.concatenate([b['image_id'] for b in batches])[:10]
  assert ids.tolist() == [d['image_id'] for d in kept]  # (video, frame) order, file order
  np.testing.assert_allclose(np.concatenate([b['box_score'] for b in batches])[:10], 0.9)
  centers = np.concatenate([b['center'] for b in batches])[:10]
  np.testing.assert_allclose(
      centers, [[d['bbox'][0] + d['bbox'][2] / 2, d['bbox'][1] + d['bbox'][3] / 2]
                for d in kept], rtol=1e-5)
  assert (np.concatenate([b['rotation'] for b in batches]) == 0).all()
  # Two processes: their slices of each global batch interleave to the same items.
  parts = [input_pipeline.EvalData(cfg, 4, process_index=p, process_count=2, device_count=2)
           for p in range(2)]
  got = [np.concatenate([parts[0].batch(i)['image_id'], parts[1].batch(i)['image_id']])
         for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(got)[:10], ids)


def test_eval_with_gt_boxes_and_targets(tiny, tmp_path):
  root, truth = tiny
  cfg = _cfg(root, tmp_path, use_gt_boxes_for_val=True)
  data = input_pipeline.EvalData(cfg, 4, **ONE)
  assert data.num_boxes == sum(len(v) for v in truth.values()) == 10
  b = data.batch(0)
  assert (b['box_score'] == 1).all() and b['target_weight'].sum() > 0


def test_eval_needs_boxes(tiny, tmp_path):
  root, _ = tiny
  cfg = _cfg(root, tmp_path, det_score_thresh=0.95)
  assert input_pipeline.EvalData(cfg, 2, **ONE).num_boxes == 0
  other = tmp_path / 'nobox'
  fake_posetrack.write_posetrack18(other, videos=VIDEOS, box_file=False)
  with pytest.raises(input_pipeline.BadInputError, match='no detector boxes'):
    input_pipeline.EvalData(_cfg(other, tmp_path), 2, **ONE)


def test_val_gt_dir(tiny, tmp_path):
  root, _ = tiny
  assert input_pipeline.val_gt_dir(_cfg(root, tmp_path)) == os.path.join(
      str(root), 'annotations', 'val')


def test_missing_split_is_a_clear_error(pt18_real, tmp_path):
  cfg = _cfg(pt18_real, tmp_path, missing_support_frame='key_frame')
  with pytest.raises(input_pipeline.BadInputError, match="no 'train' split"):
    input_pipeline.TrainData(cfg, 2, seed=0, **ONE)


def test_real_fixture_end_to_end(pt18_real, tmp_path):
  dets = 'annotations/test_posetrack18_human_detections.json'
  cfg = _cfg(pt18_real, tmp_path, missing_support_frame='key_frame',
             det_boxes=str(pt18_real / dets))
  data = input_pipeline.EvalData(cfg, 8, **ONE)
  scores = [d['score'] for d in json.loads((pt18_real / dets).read_text())]
  assert data.num_boxes == sum(s >= 0.2 for s in scores)
  b = data.batch(0)
  assert b['frames'].dtype == np.uint8 and b['frames'].std() > 25
  # The same key frame in all five slots (trimmed copy).
  np.testing.assert_array_equal(b['frames'][:, 0], b['frames'][:, 2])
  train = input_pipeline.TrainData(cfg, 2, seed=0, split='val', **ONE)
  assert train.num_examples == 14
  tb = train.batch(0)
  assert tb['target'].max() == 1.0 and tb['target_weight'].sum() > 0


# --- Bad image files at read time --------------------------------------------------------


def _fresh(tmp_path):
  root = tmp_path / 'pt'
  fake_posetrack.write_posetrack18(root, split='train', videos=(('000001_a', 3, (0, 1, 2)),),
                              persons=1)
  return root


def test_corrupt_jpeg(tmp_path):
  root = _fresh(tmp_path)
  cfg = _cfg(root, tmp_path / 'tfds', **{'augment.enabled': False})
  data = input_pipeline.TrainData(cfg, 3, seed=0, **ONE)  # built while the files were good
  bad = root / 'images' / 'train' / '000001_a' / '000001.jpg'
  raw = bad.read_bytes()
  bad.write_bytes(raw[:200])  # truncated JPEG
  with pytest.raises(input_pipeline.BadInputError, match='000001_a/000001.jpg: cannot decode'):
    data.batch(0)
  bad.write_bytes(b'not a jpeg at all')
  with pytest.raises(input_pipeline.BadInputError, match='000001_a/000001.jpg: cannot decode'):
    data.batch(0)
  # skip: every example's window touches frame 1, so nothing can load: a clear error.
  cfg.on_bad_input = 'skip'
  skipping = input_pipeline.TrainData(cfg, 3, seed=0, records=data.records, **ONE)
  with pytest.raises(input_pipeline.BadInputError, match='every training example failed'):
    skipping.batch(0)


def test_skip_substitutes_and_counts(tmp_path):
  root = tmp_path / 'pt'
  fake_posetrack.write_posetrack18(root, split='train', videos=(('000001_a', 9, (0, 8)),),
                              persons=1)
  cfg = _cfg(root, tmp_path / 'tfds', on_bad_input='skip', **{'augment.enabled': False})
  data = input_pipeline.TrainData(cfg, 2, seed=0, **ONE)
  os.remove(root / 'images' / 'train' / '000001_a' / '000007.jpg')  # in frame 8's window
  b = data.batch(0)
  assert data.skipped == 1
  assert b['frame_index'].tolist() == [0, 0] and (b['mask'] == 1).all()
  cfg.on_bad_input = 'error'
  strict = input_pipeline.TrainData(cfg, 2, seed=0, records=data.records, **ONE)
  with pytest.raises(input_pipeline.BadInputError, match='000001_a/000007.jpg: image not found'):
    strict.batch(0)


def test_eval_skip_masks_the_box(tmp_path):
  root = tmp_path / 'pt'
  fake_posetrack.write_posetrack18(root, videos=(('000001_a', 9, (0, 8)),), persons=1)
  cfg = _cfg(root, tmp_path / 'tfds', on_bad_input='skip')
  data = input_pipeline.EvalData(cfg, 2, **ONE)
  os.remove(root / 'images' / 'val' / '000001_a' / '000007.jpg')
  b = data.batch(0)
  assert b['mask'].tolist() == [1.0, 0.0] and data.skipped == 1


# --- The synthetic generator's output, end to end ----------------------------------------


def test_synthetic_end_to_end(synthetic, tmp_path):
  cfg = _cfg(synthetic, tmp_path)
  cfg.name = 'synthetic'
  train = input_pipeline.TrainData(cfg, 4, seed=0, **ONE)
  ann = {}
  for p in (synthetic / 'annotations').glob('*/*.json'):
    d = json.loads(p.read_text())
    for im in d['images']:
      ann[im['id']] = (im, [a for a in d['annotations'] if a['image_id'] == im['id']])
  labeled_train = [i for i, (im, _) in ann.items() if im['is_labeled'] and '/train/' in
                   im['file_name']]
  assert train.num_examples == sum(
      sum(1 for a in ann[i][1] if max(a['keypoints'][2::3]) > 0) for i in labeled_train)
  b = train.batch(0)
  assert b['frames'].shape == (4, 5, 64, 48, 3) and np.isfinite(b['frames']).all()
  assert b['target_weight'].sum() > 0
  # Eval: every detector box above threshold once; the degradation flag comes through.
  ev = input_pipeline.EvalData(cfg, 4, **ONE)
  dets = json.loads((synthetic / 'detections' / 'val_boxes_coco.json').read_text())
  kept = sorted((d['image_id'] for d in dets if d['score'] >= cfg.det_score_thresh))
  assert ev.num_boxes == len(kept) > 0
  batches = list(ev)
  mask = np.concatenate([x['mask'] for x in batches]) > 0
  ids = np.concatenate([x['image_id'] for x in batches])[mask]
  assert sorted(ids.tolist()) == kept
  degraded = np.concatenate([x['degraded'] for x in batches])[mask]
  want = [int(ann[i][0].get('degradation', 'none') != 'none') for i in ids]
  assert degraded.tolist() == want and sum(want) > 0
  # The DCPose-format box file attaches the same boxes to the same frames.
  cfg2 = _cfg(synthetic, tmp_path,
              det_boxes=str(synthetic / 'detections' / 'val_boxes_dcpose.json'))
  cfg2.name = 'synthetic'
  ev2 = input_pipeline.EvalData(cfg2, 4, **ONE)
  assert [(i[0], i[2]) for i in ev2.items] == [(i[0], i[2]) for i in ev.items]
  np.testing.assert_allclose([i[1] for i in ev2.items], [i[1] for i in ev.items], atol=1e-3)


def test_jpeg_draft_decoding_matches_box_downsampling(pt18_real, tmp_path):
  cfg = _cfg(pt18_real, tmp_path, missing_support_frame='key_frame', use_gt_boxes_for_val=True)
  cfg.image_size, cfg.heatmap_size = (96, 72), (24, 18)
  recs = input_pipeline.load_records(cfg, 'val')
  rec = recs[0]  # 003418: one person filling most of a 1920x1080 frame -> 1/8 decode
  assert rec['bbox'][0, 2] > 1000
  ex = input_pipeline.make_example(cfg, str(pt18_real), rec, rec['bbox'][0],
                                   rec['keypoints'][0].astype(float))
  # Reference: full decode, 8x8 box average (what DCT scaling computes), same crop geometry.
  m = transforms.affine_matrix(ex['center'], ex['scale'], 0.0, (72, 96))
  with Image.open(pt18_real / rec['window_files'][2]) as im:
    ref = transforms.warp_image(im.convert('RGB').reduce(8), m, (72, 96),
                                image_scale=(8.0, 8.0))
  inside = np.any(ref > 0, axis=-1)  # crop pixels inside the image (the padding is 0)
  assert inside.mean() > 0.3
  diff = np.abs(ex['frames'][2].astype(float) - ref)[inside]
  assert diff.mean() < 1.5, diff.mean()  # measured 0.2


def test_config_errors(tiny, tmp_path):
  root, _ = tiny
  with pytest.raises(ValueError, match='config.data.on_bad_input'):
    input_pipeline.TrainData(_cfg(root, tmp_path, on_bad_input='skp'), 2, seed=0, **ONE)
  with pytest.raises(ValueError, match='config.data.name'):
    input_pipeline.load_records(_cfg(root, tmp_path, name='posetrack19'), 'val')
  with pytest.raises(ValueError, match='manual_dir is empty'):
    input_pipeline.load_records(_cfg('', tmp_path), 'val')
  with pytest.raises(FileNotFoundError, match='does-not-exist'):
    input_pipeline.load_records(_cfg(tmp_path / 'does-not-exist', tmp_path), 'val')
  with pytest.raises(ValueError, match='window'):
    input_pipeline.TrainData(_cfg(root, tmp_path, window=(-1, 1)), 2, seed=0, **ONE)


def test_image_size_disagreeing_with_annotation(tmp_path):
  root = _fresh(tmp_path)
  data = input_pipeline.TrainData(_cfg(root, tmp_path / 'tfds'), 3, seed=0, **ONE)
  bad = root / 'images' / 'train' / '000001_a' / '000002.jpg'
  Image.new('RGB', (50, 40)).save(bad)
  with pytest.raises(input_pipeline.BadInputError, match='^/.*000002.jpg: image is 50x40 but '
                     'its annotation says 96x72$'):
    data.batch(0)
