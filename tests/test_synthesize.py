"""The synthetic PoseTrack18-layout dataset: layout, JSON, pixels, determinism, errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tdmi_jax import keypoints
from tdmi_jax.data import synthesize

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(videos=4, val_videos=2, frames=16, image_size=(96, 128), seed=5)
MARKERS = {0: (255, 0, 255), 9: (0, 255, 255), 16: (255, 255, 0)}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  out = tmp_path_factory.mktemp('small') / 'ds'
  summary = synthesize.generate(out, **SMALL)
  return out, summary


def _videos(root, split):
  return {p.stem: json.loads(p.read_text())
          for p in sorted((root / 'annotations' / split).glob('*.json'))}


def _files(root):
  return {p.relative_to(root).as_posix(): p.read_bytes()
          for p in sorted(root.rglob('*')) if p.is_file()}


def _sharpness(path):
  a = np.asarray(Image.open(path).convert('L'), np.float32)
  return np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  args = dict(synthesize.PRESETS['tiny'], seed=3)
  synthesize.generate(tmp_path / 'a', **args)
  synthesize.generate(tmp_path / 'b', **args)
  synthesize.generate(tmp_path / 'c', **dict(args, seed=4))
  a, b, c = (_files(tmp_path / k) for k in 'abc')
  assert a == b
  assert len(a) == 2 * 8 + 2 + 2  # frames, one JSON per video, two box files.
  assert a.keys() == c.keys()
  differing = [k for k in a if a[k] != c[k]]
  assert any(k.endswith('.jpg') for k in differing)
  assert any(k.startswith('annotations/') for k in differing)


def test_layout_ids_and_structure_match_real_posetrack18(small, pt18_real):
  root, summary = small
  real = json.loads(next((pt18_real / 'annotations' / 'val').glob('*.json')).read_text())
  real_image_keys = set(real['images'][0]) - {'mask_file'}  # We write no masks.
  real_ann_keys = set(real['annotations'][0])
  numbers = set()
  for split, n_videos in (('train', 2), ('val', 2)):
    videos = _videos(root, split)
    assert len(videos) == n_videos == summary[split]['videos']
    assert sorted(p.name for p in (root / 'images' / split).iterdir()) == sorted(videos)
    for name, gt in videos.items():
      assert list(gt) == ['categories', 'images', 'annotations']
      assert gt['categories'] == real['categories']
      assert gt['categories'][0]['keypoints'] == list(keypoints.JOINT_NAMES)
      number = int(name[:6])
      assert name == f'{number:06d}_synth' and number not in numbers
      numbers.add(number)
      assert len(gt['images']) == SMALL['frames']
      for t, im in enumerate(gt['images']):
        assert real_image_keys <= set(im)
        assert im['id'] == im['frame_id'] == int(f'1{number:06d}{t:04d}')
        assert im['file_name'] == f'images/{split}/{name}/{t:06d}.jpg'
        assert im['vid_id'] == name[:6] and im['nframes'] == SMALL['frames']
        assert (im['height'], im['width']) == SMALL['image_size']
        with Image.open(root / im['file_name']) as img:
          assert img.size == (im['width'], im['height']) and img.format == 'JPEG'
        assert im['degradation'] in ('none', 'motion_blur', 'occlusion', 'defocus')
      anns = gt['annotations']
      assert anns and real_ann_keys <= set(anns[0])
      ann_ids = [a['id'] for a in anns]
      assert len(set(ann_ids)) == len(ann_ids)
      labeled = {im['id'] for im in gt['images'] if im['is_labeled']}
      assert {a['image_id'] for a in anns} == labeled
      tracks = None
      for im in gt['images']:
        mine = [a for a in anns if a['image_id'] == im['id']]
        if not im['is_labeled']:
          assert not mine and im['ignore_regions_x'] == im['ignore_regions_y'] == []
          continue
        assert [a['id'] for a in mine] == [im['id'] * 100 + k for k in range(len(mine))]
        # Every annotated person is in every labeled frame, under the same track id.
        tracks = tracks or [a['track_id'] for a in mine]
        assert [a['track_id'] for a in mine] == tracks and len(tracks) >= 2
  assert summary['train']['labeled_frames'] == 2 * SMALL['frames']
  assert summary['val']['labeled_frames'] < 2 * SMALL['frames']


def test_keypoints_boxes_and_ignore_regions(small):
  root, _ = small
  n_regions = 0
  for split in ('train', 'val'):
    for gt in _videos(root, split).values():
      w, h = gt['images'][0]['width'], gt['images'][0]['height']
      for a in gt['annotations']:
        kp = np.array(a['keypoints'], float).reshape(17, 3)
        assert a['category_id'] == 1 and a['num_keypoints'] == 15
        np.testing.assert_array_equal(kp[[3, 4]], 0)  # Ears: never annotated.
        vis = np.ones(17, bool)
        vis[[3, 4]] = False
        np.testing.assert_array_equal(kp[vis, 2], 1)
        pts = kp[vis, :2]
        assert (pts >= 0).all() and (pts[:, 0] <= w - 1).all() and (pts[:, 1] <= h - 1).all()
        x, y, bw, bh = a['bbox']
        assert (pts[:, 0] >= x).all() and (pts[:, 0] <= x + bw).all()
        assert (pts[:, 1] >= y).all() and (pts[:, 1] <= y + bh).all()
        hx, hy, hw, hh = a['bbox_head']
        head = kp[:3, :2]
        assert all(isinstance(v, int) for v in a['bbox_head'])
        assert (head[:, 0] >= hx).all() and (head[:, 0] <= hx + hw).all()
        assert (head[:, 1] >= hy).all() and (head[:, 1] <= hy + hh).all()
        # Head boxes are head sized: much smaller than the person, big enough for PCKh.
        assert 0.1 * bh < hh < 0.4 * bh and hw >= 3
        assert head[2, 1] < head[0, 1] < head[1, 1]  # top, nose, bottom from above.
      for im in gt['images']:
        xs, ys = im['ignore_regions_x'], im['ignore_regions_y']
        assert len(xs) == len(ys)
        for px, py in zip(xs, ys):
          n_regions += 1
          assert len(px) == len(py) >= 3
          assert all(0 <= v < w for v in px) and all(0 <= v < h for v in py)
  assert n_regions > 0


def test_degraded_val_key_frames_have_clean_windows(small):
  root, summary = small
  kinds = set()
  for split in ('train', 'val'):
    n_degraded = 0
    for gt in _videos(root, split).values():
      deg = [im['degradation'] for im in gt['images']]
      for t, kind in enumerate(deg):
        if kind == 'none':
          continue
        n_degraded += 1
        if split == 'val':
          kinds.add(kind)
        assert gt['images'][t]['is_labeled']
        assert 2 <= t <= len(deg) - 3
        assert all(deg[s] == 'none' for s in (t - 2, t - 1, t + 1, t + 2))
        if kind != 'occlusion':  # Blurred frames are measurably softer than their window.
          paths = [root / gt['images'][s]['file_name'] for s in (t - 2, t - 1, t + 1, t + 2)]
          sharp = np.mean([_sharpness(p) for p in paths])
          assert _sharpness(root / gt['images'][t]['file_name']) < 0.8 * sharp
    assert n_degraded == sum(summary[split]['degraded'].values()) > 0
  assert kinds == {'motion_blur', 'occlusion', 'defocus'}


def test_occluder_changes_the_frame_where_a_person_is(small):
  root, _ = small
  found = 0
  for split in ('train', 'val'):
    for gt in _videos(root, split).values():
      for t, im in enumerate(gt['images']):
        if im['degradation'] != 'occlusion':
          continue
        found += 1
        frames = [np.asarray(Image.open(root / gt['images'][s]['file_name']), np.float32)
                  for s in (t - 1, t, t + 1)]
        change = np.abs(frames[1] - 0.5 * (frames[0] + frames[2])).mean(-1)
        # A large compact region changes, and it touches some person's box.
        assert (change > 40).mean() > 0.01
        ys, xs = np.nonzero(change > 40)
        boxes = [a['bbox'] for a in gt['annotations'] if a['image_id'] == im['id']]
        assert any(((xs >= x) & (xs <= x + w) & (ys >= y) & (ys <= y + h)).mean() > 0.5
                   for x, y, w, h in boxes)
  assert found


def test_rendered_markers_sit_at_the_annotated_joints(tmp_path, small):
  root, _ = small
  marked = tmp_path / 'marked'
  synthesize.generate(marked, **SMALL, markers=MARKERS)
  # The marker option changes pixels only: the annotations are those of the real run.
  for split in ('train', 'val'):
    for p in (root / 'annotations' / split).glob('*.json'):
      assert (marked / 'annotations' / split / p.name).read_bytes() == p.read_bytes()
  errors = []
  for split in ('train', 'val'):
    for gt in _videos(marked, split).values():
      for im in gt['images']:
        if not im['is_labeled'] or im['degradation'] != 'none':
          continue
        img = np.asarray(Image.open(marked / im['file_name']), np.float32)
        kps = [np.array(a['keypoints']).reshape(17, 3)
               for a in gt['annotations'] if a['image_id'] == im['id']]
        for joint, colour in MARKERS.items():
          for i, kp in enumerate(kps):
            x, y = kp[joint, :2]
            others = [k[jt, :2] for j, k in enumerate(kps) for jt in MARKERS
                      if (j, jt) != (i, joint)]
            if any(np.hypot(*(o - (x, y))) < 8 for o in others):
              continue  # Another marker covers or touches this one.
            x0, y0 = int(round(x)) - 5, int(round(y)) - 5
            win = img[max(0, y0):y0 + 11, max(0, x0):x0 + 11]
            dist = np.linalg.norm(win - np.array(colour, np.float32), axis=-1)
            weight = np.clip(1 - dist / 160, 0, None)
            assert weight.sum() > 2, (im['file_name'], joint)
            gy, gx = np.mgrid[max(0, y0):y0 + 11, max(0, x0):x0 + 11]
            cx, cy = (gx * weight).sum() / weight.sum(), (gy * weight).sum() / weight.sum()
            errors.append(np.hypot(cx - x, cy - y))
  errors = np.array(errors)
  assert len(errors) > 50
  assert errors.max() < 1.5, errors.max()
  assert np.median(errors) < 0.5


def test_detections_cover_val_people_in_both_formats(small):
  root, _ = small
  coco = json.loads((root / 'detections' / 'val_boxes_coco.json').read_text())
  dcpose = json.loads((root / 'detections' / 'val_boxes_dcpose.json').read_text())
  assert len(coco) == len(dcpose) > 0
  images = {im['id']: im for gt in _videos(root, 'val').values() for im in gt['images']}
  by_name = {im['file_name']: im['id'] for im in images.values()}
  anns = [a for gt in _videos(root, 'val').values() for a in gt['annotations']]
  for c, d in zip(coco, dcpose):
    assert set(c) == {'image_id', 'category_id', 'bbox', 'score'}
    assert set(d) == {'image_name', 'bbox', 'score'}
    assert by_name[d['image_name']] == c['image_id'] and c['bbox'] == d['bbox']
    im = images[c['image_id']]
    assert im['is_labeled'] and 0 < c['score'] <= 1
    x, y, w, h = c['bbox']
    assert w > 0 and h > 0 and x >= 0 and y >= 0
    assert x + w <= im['width'] and y + h <= im['height']
  assert {c['image_id'] for c in coco} == {a['image_id'] for a in anns}

  def iou(a, b):
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)

  # Every GT person has a kept (score >= 0.2) detection on it.
  for a in anns:
    best = max(iou(a['bbox'], c['bbox']) for c in coco
               if c['image_id'] == a['image_id'] and c['score'] >= 0.2)
    assert best > 0.4


def test_bad_arguments_are_clear_errors_and_keep_existing_data(tmp_path):
  with pytest.raises(ValueError, match='frames=2.*at least 5'):
    synthesize.generate(tmp_path / 'x', videos=2, frames=2)
  with pytest.raises(ValueError, match='train and one val'):
    synthesize.generate(tmp_path / 'x', videos=2, val_videos=2, frames=8)
  assert not (tmp_path / 'x').exists()
  out = tmp_path / 'ds'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='not empty.*overwrite'):
    synthesize.generate(out, **synthesize.PRESETS['tiny'])
  assert [p.name for p in out.iterdir()] == ['notes.txt']
  synthesize.generate(out, **synthesize.PRESETS['tiny'], overwrite=True)
  assert (out / 'notes.txt').read_text() == 'mine'
  before = _files(out)
  assert len(before) == 21


def test_failed_run_leaves_previous_dataset_intact(tmp_path, monkeypatch):
  out = tmp_path / 'ds'
  synthesize.generate(out, **synthesize.PRESETS['tiny'])
  before = _files(out)

  def boom(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(synthesize, '_annotation', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    synthesize.generate(out, **synthesize.PRESETS['tiny'], seed=9, overwrite=True)
  with pytest.raises(RuntimeError, match='disk full'):
    synthesize.generate(tmp_path / 'new', **synthesize.PRESETS['tiny'])
  assert _files(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ds']  # No partial directories.


def test_cli_tiny_matches_library(tmp_path):
  cmd = [sys.executable, '-m', 'tdmi_jax.data.synthesize', '--out', str(tmp_path / 'cli'),
         '--preset', 'tiny', '--seed', '2']
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  summary = json.loads(res.stdout)
  assert summary['val']['videos'] == summary['train']['videos'] == 1
  synthesize.generate(tmp_path / 'lib', **synthesize.PRESETS['tiny'], seed=2)
  assert _files(tmp_path / 'cli') == _files(tmp_path / 'lib')
  bad = subprocess.run(cmd[:3] + ['--out', str(tmp_path / 'bad'), '--frames', '2'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'frames=2' in bad.stderr
  assert not (tmp_path / 'bad').exists()
