"""The posetrack TFDS builder: real PoseTrack18 files, both layouts, 2017 annolist, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tdmi_jax.data import parsers
from tdmi_jax.data import records
from tests import fake_posetrack

DETS = 'annotations/test_posetrack18_human_detections.json'
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build(manual_dir, data_dir, name='t', **kw):
  kw.setdefault('kind', 'posetrack2018')
  builder = records.Builder(config=records.PosetrackConfig(name=name, **kw), data_dir=str(data_dir))
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  out = {}
  for split in builder.info.splits:
    src = builder.as_data_source(split)
    recs = [src[i] for i in range(len(src))]
    out[split] = sorted(recs, key=lambda r: (int(r['video_index']), int(r['frame_index'])))
  return out


@pytest.fixture(scope='module')
def real_records(pt18_real, tmp_path_factory):
  return _build(pt18_real, tmp_path_factory.mktemp('tfds'), det_boxes=DETS,
                missing_support_frame='key_frame')


def test_real_records_equal_the_json(real_records, pt18_real):
  assert set(real_records) == {'val'}  # the fixture has no train split
  recs = real_records['val']
  ann_dir = pt18_real / 'annotations' / 'val'
  assert [r['video_name'].decode() for r in recs] == sorted(
      p.stem for p in ann_dir.glob('*.json'))
  for rec in recs:
    gt = json.loads((ann_dir / (rec['video_name'].decode() + '.json')).read_text())
    (image,) = gt['images']
    anns = gt['annotations']
    assert int(rec['image_id']) == image['id']
    assert int(rec['nframes']) == image['nframes']
    assert int(rec['frame_index']) == 0
    assert list(rec['image_size']) == [image['height'], image['width']]
    assert rec['gt_file'].decode() == f'annotations/val/{rec["video_name"].decode()}.json'
    assert len(rec['keypoints']) == len(anns) == len(rec['bbox_head']) == len(rec['track_id'])
    for i, a in enumerate(anns):
      kp = np.asarray(a['keypoints'], np.float32).reshape(17, 3)
      np.testing.assert_allclose(rec['keypoints'][i], kp)
      np.testing.assert_allclose(rec['bbox_head'][i], a['bbox_head'])
      np.testing.assert_allclose(rec['bbox'][i], a['bbox'], rtol=1e-6)
      assert rec['track_id'][i] == a['track_id']
    # Ignore regions: same polygons, same order, same points.
    xs, ys = image['ignore_regions_x'], image['ignore_regions_y']
    assert list(rec['ignore_len']) == [len(x) for x in xs]
    np.testing.assert_allclose(rec['ignore_x'], [v for x in xs for v in x])
    np.testing.assert_allclose(rec['ignore_y'], [v for y in ys for v in y])
    # Frame 0 of a long video: t-2, t-1 are beyond the start; t+1, t+2 are not in the trimmed
    # copy, so the key frame stands in for all four.
    assert [f.decode() for f in rec['window_files']] == [image['file_name']] * 5


def test_real_detections_attach_to_their_frames(real_records, pt18_real):
  dets = json.loads((pt18_real / DETS).read_text())
  for rec in real_records['val']:
    mine = [d for d in dets if d['image_id'] == int(rec['image_id'])]
    assert len(mine) > 0
    np.testing.assert_allclose(rec['det_boxes'][:, :4], [d['bbox'] for d in mine], rtol=1e-6)
    np.testing.assert_allclose(rec['det_boxes'][:, 4], [d['score'] for d in mine], rtol=1e-6)
  assert sum(len(r['det_boxes']) for r in real_records['val']) == len(dets)


def _dcpose_layout(pt18_real, root):
  """The fixture rearranged as DCPose's supplementary files, boxes in DCPose list format."""
  os.makedirs(root / 'posetrack18_json_files')
  os.makedirs(root / 'posetrack18_annotation_dirs')
  os.makedirs(root / 'posetrack18_precomputed_boxes')
  os.symlink(pt18_real / 'annotations' / 'test_posetrack18_val.json',
             root / 'posetrack18_json_files' / 'posetrack_val.json')
  os.symlink(pt18_real / 'annotations' / 'val', root / 'posetrack18_annotation_dirs' / 'val')
  os.symlink(pt18_real / 'images', root / 'images')
  merged = json.loads((pt18_real / 'annotations' / 'test_posetrack18_val.json').read_text())
  names = {im['id']: im['file_name'] for im in merged['images']}
  dets = json.loads((pt18_real / DETS).read_text())
  listed = [{'image_name': names[d['image_id']], 'bbox': d['bbox'], 'score': d['score']}
            for d in dets]
  (root / 'posetrack18_precomputed_boxes' / 'val_boxes.json').write_text(json.dumps(listed))


def test_dcpose_layout_gives_the_same_records(real_records, pt18_real, tmp_path):
  root = tmp_path / 'dcpose'
  _dcpose_layout(pt18_real, root)
  recs = _build(root, tmp_path / 'tfds', missing_support_frame='key_frame')['val']
  ref = real_records['val']
  assert len(recs) == len(ref)
  for a, b in zip(recs, ref):
    for k in ('image_id', 'nframes', 'image_size', 'keypoints', 'bbox_head', 'track_id',
              'ignore_x', 'ignore_y', 'ignore_len', 'det_boxes'):
      np.testing.assert_allclose(a[k], b[k], err_msg=k)
    assert a['video_name'] == b['video_name']
    assert a['gt_file'].decode() == f'posetrack18_annotation_dirs/val/{a["video_name"].decode()}.json'


def test_window_boundary_rule(tmp_path):
  fake_posetrack.write_posetrack18(tmp_path / 'pt', videos=(('000007_mpii_test', 6, (0, 2, 5)),))
  recs = _build(tmp_path / 'pt', tmp_path / 'tfds')['val']
  windows = [[int(f.decode()[-10:-4]) for f in r['window_files']] for r in recs]
  assert windows == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [3, 4, 5, 5, 5]]
  assert [int(r['image_id']) for r in recs] == [10000070000, 10000070002, 10000070005]
  # Default box file found in detections/, every box attached (threshold is the pipeline's).
  assert [len(r['det_boxes']) for r in recs] == [3, 3, 3]


def test_posetrack17_annolist(tmp_path):
  d = fake_posetrack.write_posetrack17_annolist(tmp_path / 'pt17', nframes=5, labeled=(0, 4))
  recs = _build(tmp_path / 'pt17', tmp_path / 'tfds', kind='posetrack2017')['val']
  assert len(recs) == 2
  r0, r4 = recs
  # 1-indexed 8-digit files; boundary rule on frame indices 0..4.
  assert [f.decode()[-12:] for f in r0['window_files']] == [
      '00000001.jpg', '00000001.jpg', '00000001.jpg', '00000002.jpg', '00000003.jpg']
  assert [f.decode()[-12:] for f in r4['window_files']] == [
      '00000003.jpg', '00000004.jpg', '00000005.jpg', '00000005.jpg', '00000005.jpg']
  assert int(r4['frame_index']) == 4 and int(r4['nframes']) == 5
  assert int(r4['image_id']) == 10158600004
  kp = r4['keypoints'][0]
  # poseval ids -> PoseTrack slots: 13 nose -> 0, 12 neck -> 1, 14 head_top -> 2,
  # 9 l_shoulder -> 5, 0 r_ankle -> 16.
  np.testing.assert_allclose(kp[[0, 1, 2, 5, 16]], [[44, 20, 1], [44, 26, 1], [44, 12, 1],
                                                    [50, 30, 1], [40, 60, 1]])
  assert kp[:, 2].sum() == 5
  np.testing.assert_allclose(r4['bbox_head'][0], [34, 10, 12, 14])
  assert r4['track_id'][0] == 7
  assert list(r4['image_size']) == [72, 96]  # read from the JPEG header
  np.testing.assert_allclose(r4['ignore_x'], [1, 5, 5])
  # GT box = joint extent x1.3 about its centre (PoseTrack18's rule).
  np.testing.assert_allclose(r4['bbox'][0], [45 - 10 * 1.3 / 2, 36 - 48 * 1.3 / 2,
                                             10 * 1.3, 48 * 1.3], rtol=1e-5)
  assert d['annolist'][4]['is_labeled'] == [1]


# --- Bad input ---------------------------------------------------------------------------


def test_malformed_json_names_the_file(tmp_path):
  fake_posetrack.write_posetrack18(tmp_path / 'pt', videos=(('000001_a', 3, (1,)),
                                                        ('000002_b', 3, (1,))))
  bad = tmp_path / 'pt' / 'annotations' / 'val' / '000002_b.json'
  bad.write_text('{"images": [')
  with pytest.raises(parsers.BadInputError, match='000002_b.json.*malformed JSON'):
    _build(tmp_path / 'pt', tmp_path / 'tfds1')
  # skip: the other video still builds (boxes naming the bad video's frames are skipped too).
  recs = _build(tmp_path / 'pt', tmp_path / 'tfds2', on_bad_input='skip')['val']
  assert [r['video_name'] for r in recs] == [b'000001_a']


def test_box_file_naming_unknown_frames(tmp_path):
  fake_posetrack.write_posetrack18(tmp_path / 'pt', videos=(('000001_a', 3, (1,)),))
  boxes = tmp_path / 'pt' / 'detections' / 'val_boxes_coco.json'
  dets = json.loads(boxes.read_text())
  dets.append({'image_id': 19999990000, 'bbox': [1, 2, 3, 4], 'score': 0.9})
  boxes.write_text(json.dumps(dets))
  with pytest.raises(parsers.BadInputError, match='val_boxes_coco.json.*19999990000'):
    _build(tmp_path / 'pt', tmp_path / 'tfds1')
  recs = _build(tmp_path / 'pt', tmp_path / 'tfds2', on_bad_input='skip')['val']
  assert len(recs[0]['det_boxes']) == len(dets) - 1
  with pytest.raises(parsers.BadInputError, match='nope.json: file not found'):
    _build(tmp_path / 'pt', tmp_path / 'tfds3', det_boxes='nope.json')
  (tmp_path / 'pt' / 'bad.json').write_text('[{"image_id": 10000010001}]')
  with pytest.raises(parsers.BadInputError, match='bad.json: entry 0 has no 4-number "bbox"'):
    _build(tmp_path / 'pt', tmp_path / 'tfds4', det_boxes='bad.json')


def test_dcpose_box_names_unknown_frame(tmp_path, pt18_real):
  root = tmp_path / 'dcpose'
  _dcpose_layout(pt18_real, root)
  f = root / 'posetrack18_precomputed_boxes' / 'val_boxes.json'
  dets = json.loads(f.read_text())
  dets.append({'image_name': 'images/val/999999_x/000003.jpg', 'bbox': [0, 0, 5, 5],
               'score': 1.0})
  f.write_text(json.dumps(dets))
  with pytest.raises(parsers.BadInputError, match='val_boxes.json.*999999_x/000003.jpg'):
    _build(root, tmp_path / 'tfds', missing_support_frame='key_frame')


def test_empty_split(tmp_path):
  fake_posetrack.write_posetrack18(tmp_path / 'pt', videos=(('000001_a', 3, ()),), box_file=False)
  with pytest.raises(parsers.BadInputError, match=r'annotations/val.*empty split'):
    _build(tmp_path / 'pt', tmp_path / 'tfds')


def test_no_annotations_at_all(tmp_path):
  (tmp_path / 'pt').mkdir()
  (tmp_path / 'pt' / 'README.txt').write_text('not a dataset')
  with pytest.raises(parsers.BadInputError, match='no PoseTrack annotations'):
    _build(tmp_path / 'pt', tmp_path / 'tfds')


def test_missing_images(tmp_path):
  fake_posetrack.write_posetrack18(tmp_path / 'pt', videos=(('000001_a', 5, (1, 4)),))
  os.remove(tmp_path / 'pt' / 'images' / 'val' / '000001_a' / '000003.jpg')  # t+2 of 1
  with pytest.raises(parsers.BadInputError, match='000001_a/000003.jpg: window frame not'):
    _build(tmp_path / 'pt', tmp_path / 'tfds1')
  recs = _build(tmp_path / 'pt', tmp_path / 'tfds2', missing_support_frame='key_frame')['val']
  assert [f.decode()[-10:-4] for f in recs[0]['window_files']] == [
      '000001', '000000', '000001', '000002', '000001']
  os.remove(tmp_path / 'pt' / 'images' / 'val' / '000001_a' / '000004.jpg')  # a key frame
  with pytest.raises(parsers.BadInputError, match='000001_a/000004.jpg: image of labeled'):
    _build(tmp_path / 'pt', tmp_path / 'tfds3', missing_support_frame='key_frame')
  recs = _build(tmp_path / 'pt', tmp_path / 'tfds4', missing_support_frame='key_frame',
                on_bad_input='skip')['val']
  assert [int(r['frame_index']) for r in recs] == [1]


def test_posetrack21_layout_and_tfds_data_source(pt18_real, tmp_path):
  """PoseTrack21 keeps per-video JSON in posetrack_data/; records read via tfds.data_source."""
  root = tmp_path / 'pt21'
  (root / 'posetrack_data').mkdir(parents=True)
  os.symlink(pt18_real / 'annotations' / 'val', root / 'posetrack_data' / 'val')
  os.symlink(pt18_real / 'images', root / 'images')
  _build(root, tmp_path / 'tfds', name='pt21', kind='posetrack21',
         missing_support_frame='key_frame')
  src = tfds.data_source('posetrack/pt21', split='val', data_dir=str(tmp_path / 'tfds'))
  recs = sorted((src[i] for i in range(len(src))), key=lambda r: int(r['image_id']))
  assert [int(r['image_id']) for r in recs] == [10034180000, 10094730000, 10128340000]
  assert [len(r['keypoints']) for r in recs] == [1, 2, 11]
  assert recs[0]['gt_file'] == b'posetrack_data/val/003418_mpii_test.json'


def test_image_id_rule_is_the_same_in_every_process():
  assert parsers.posetrack_image_id('000342_mpii_test', 7) == 10003420007
  assert parsers.video_number('my_clip') is None
  # A name without a video number gets a stand-in number; hash() would differ per process
  # (PYTHONHASHSEED), and records and prediction files are often written by different ones.
  code = 'from tdmi_jax.data import parsers; print(parsers.posetrack_image_id("my_clip", 3))'
  ids = {subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT)),
                        check=True).stdout.strip() for seed in ('1', '2')}
  assert ids == {str(parsers.posetrack_image_id('my_clip', 3))}
