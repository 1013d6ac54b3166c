"""Frames, boxes, tracks and crop anchors for video inference."""

import json

import numpy as np
import pytest

from tdmi_jax.evaluation import tracker
from tdmi_jax.inference import video_io


def _clip(n=6, seq='000001_mpiinew_test'):
  frames = lambda: iter(np.zeros((n, 40, 60, 3), np.uint8))
  return video_io.FrameSource(seq, 25.0, n, [f'{i:06d}.jpg' for i in range(n)], frames)


def test_read_real_video_and_frames(pt18_real):
  d = pt18_real / 'videos' / '000001_mpiinew_test'
  video = video_io.open_video(d / '000001_mpiinew_test.mp4')
  frames = video_io.open_frames_dir(d)
  assert video.frame_count == frames.frame_count == 5
  assert frames.names == [f'{i:06d}.jpg' for i in range(5)] and video.names is None
  assert video.name(3) == '000003.jpg' == frames.name(3)
  video_frames, folder_frames = np.stack(list(video)), np.stack(list(frames))
  assert video_frames.shape == (5, 720, 1280, 3) == folder_frames.shape
  # Same content up to the video codec's loss.
  assert np.abs(video_frames.astype(float) - folder_frames).mean() < 20


def test_frames_are_decoded_one_at_a_time(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for t in range(3):
    Image.new('RGB', (8, 6), (40 * t, 0, 0)).save(tmp_path / f'{t:06d}.png')
  source = video_io.open_frames_dir(tmp_path)
  (tmp_path / '000002.png').write_bytes(b'corrupted after listing')
  it = iter(source)
  assert next(it)[0, 0, 0] == 0 and next(it)[0, 0, 0] == 40  # Decoded lazily, in order...
  with pytest.raises(ValueError, match='000002.png'):  # ...so the bad file shows up third.
    next(it)


def test_frames_dir_errors(tmp_path):
  with pytest.raises(ValueError, match='no image files'):
    video_io.open_frames_dir(tmp_path)
  (tmp_path / '000000.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(ValueError, match='000000.jpg'):
    list(video_io.open_frames_dir(tmp_path))
  with pytest.raises(FileNotFoundError, match='missing.mp4'):
    video_io.open_video(tmp_path / 'missing.mp4')
  (tmp_path / 'empty.mp4').write_bytes(b'')
  with pytest.raises(ValueError, match='empty.mp4'):
    list(video_io.open_video(tmp_path / 'empty.mp4'))


def test_load_boxes_both_formats(tmp_path):
  clip = _clip()
  coco = [{'image_id': 10000010003, 'bbox': [1, 2, 30, 40], 'score': 0.9, 'category_id': 1},
          {'image_id': 2, 'bbox': [5, 5, 10, 20], 'score': 0.1},
          {'image_id': 99, 'bbox': [5, 5, 10, 20], 'score': 0.9}]
  (tmp_path / 'coco.json').write_text(json.dumps(coco))
  boxes = video_io.load_boxes(tmp_path / 'coco.json', clip, score_thresh=0.2)
  assert [len(b) for b in boxes] == [0, 0, 0, 1, 0, 0]
  np.testing.assert_allclose(boxes[3][0], [1, 2, 30, 40, 0.9], rtol=1e-6)
  dcpose = [{'image_name': 'images/val/000001_mpiinew_test/000004.jpg', 'bbox': [1, 2, 3, 4],
             'score': 0.5}]
  (tmp_path / 'dcpose.json').write_text(json.dumps(dcpose))
  boxes = video_io.load_boxes(tmp_path / 'dcpose.json', clip)
  assert [len(b) for b in boxes] == [0, 0, 0, 0, 1, 0]


def test_load_boxes_errors(tmp_path):
  clip = _clip()
  (tmp_path / 'bad.json').write_text('{not json')
  with pytest.raises(ValueError, match='bad.json'):
    video_io.load_boxes(tmp_path / 'bad.json', clip)
  (tmp_path / 'other.json').write_text(json.dumps([{'image_id': 123, 'bbox': [0, 0, 5, 5]}]))
  with pytest.raises(ValueError, match='no box'):
    video_io.load_boxes(tmp_path / 'other.json', clip)
  (tmp_path / 'nan.json').write_text('[{"image_id": 1, "bbox": [NaN, 0, 5, 5]}]')
  with pytest.raises(ValueError, match='nan.json: entry 0 has a non-finite bbox'):
    video_io.load_boxes(tmp_path / 'nan.json', clip)


def test_box_file_matches_frames_of_a_video_by_index_id_and_name(tmp_path):
  entries = [{'image_id': 3, 'bbox': [1, 2, 30, 40], 'score': 0.9},
             {'image_id': 10000010004, 'bbox': [1, 2, 30, 40], 'score': 0.9},
             {'image_name': 'x/000001_mpiinew_test/000005.jpg', 'bbox': [1, 2, 3, 4]},
             {'image_id': 7, 'bbox': [1, 2, 30, 40], 'score': 0.9}]
  (tmp_path / 'b.json').write_text(json.dumps(entries))
  # A video: frame names are %06d.jpg and the frame count is only known at the end.
  boxes = video_io.BoxFile(tmp_path / 'b.json', '000001_mpiinew_test', None)
  assert [len(boxes(t)) for t in range(7)] == [0, 0, 0, 1, 1, 1, 0]
  boxes.check(7, 'clip', final=True)  # Entry 4 (frame 7) names no frame: a warning only.
  with pytest.raises(ValueError, match='no box'):
    boxes.check(3, 'clip')


def test_link_tracks_and_anchors():
  # Two people moving right by 1 px per frame; listed in swapped order on odd frames.
  a = lambda t: [10 + t, 10, 20, 40, 1.0]
  b = lambda t: [100 + t, 10, 20, 40, 1.0]
  boxes = [np.asarray([a(t), b(t)] if t % 2 == 0 else [b(t), a(t)], np.float32) for t in range(8)]
  ids = video_io.link_tracks(boxes)
  for t in range(8):
    expect = [0, 1] if t % 2 == 0 else [1, 0]
    assert list(ids[t]) == expect
  anchors, anchor_ids = video_io.crop_anchors(boxes, ids, reanchor_iou=0.85)
  # IoU of a box shifted by k px (w=20): (20-k)/(20+k) >= 0.85 for k <= 1.6, so the anchor is
  # renewed every 2 frames, and the held anchor is the box where it was renewed.
  first = {int(i): anchor_ids[0][k] for k, i in enumerate(ids[0])}
  assert anchor_ids[1][list(ids[1]).index(0)] == first[0]
  assert anchor_ids[2][list(ids[2]).index(0)] != first[0]
  np.testing.assert_allclose(anchors[1][list(ids[1]).index(0)], a(0)[:4])


def test_streamed_linking_is_the_tracker_on_box_iou():
  # Frame by frame (as infer streams) the ids are tracker.link's on the same boxes, empty
  # frames and overlapping neighbours included.
  rng = np.random.default_rng(0)
  boxes = []
  for t in range(12):
    n = int(rng.integers(0, 4)) if t != 5 else 0
    xy = rng.uniform(0, 60, (n, 2)) + t
    boxes.append(np.concatenate([xy, np.full((n, 2), 40.0), np.ones((n, 1))], 1))
  boxes += [np.array([[0, 0, 10, 10, 1], [6, 0, 10, 10, 1]], np.float32),
            np.array([[3, 0, 10, 10, 1], [10, 0, 10, 10, 1]], np.float32)]
  linker = video_io.TrackLinker(0.3)
  streamed = [linker(b) for b in boxes]
  corners = [np.concatenate([b[:, :2], b[:, :2] + b[:, 2:4]], 1) for b in boxes]
  batch = tracker.link(corners, similarity='iou', min_similarity=0.3, max_age=0)
  assert [list(i) for i in streamed] == [list(i) for i in batch]
  assert [list(i) for i in video_io.link_tracks(boxes)] == [list(i) for i in batch]


def test_window_indices_pad_with_key_frame():
  assert video_io.window_indices(0, 5) == [0, 0, 0, 1, 2]
  assert video_io.window_indices(1, 5) == [1, 0, 1, 2, 3]
  assert video_io.window_indices(4, 5) == [2, 3, 4, 4, 4]
  assert video_io.window_indices(0, 1) == [0, 0, 0, 0, 0]
