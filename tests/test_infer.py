"""Video inference on the real PoseTrack clip with the tiny variant."""

import json
import os
import pathlib
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from tdmi_jax.inference import infer
from tdmi_jax.models import tdmi

CLIP = '000001_mpiinew_test'
# What the whole-clip implementation (before streaming) predicted on the real clip with the
# tiny_workdir weights, for the runs of test_streaming_gives_the_same_outputs_as_before.
EXPECTED = pathlib.Path(__file__).parent / 'testdata' / 'infer_real_clip_expected.json'


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A workdir as training leaves it: config.json and checkpoints/<step>/state."""
  config = synthetic.get_config('runlocal').unlock()
  # The plain TDMI the expected outputs were recorded with (the quick start's extras off).
  config.model.head_residual = False
  config.model.useful_head = False
  config.model.rdm_noisy = 'gate'
  model = tdmi.build_model(config.model)
  h, w = config.data.image_size
  variables = jax.jit(lambda r: model.init(r, np.zeros((1, 5, h, w, 3), np.float32),
                                           train=False))(jax.random.key(0, impl='unsafe_rbg'))
  # Non-zero heatmaps: the reference init puts near-zero weights on the TDMI head.
  variables = jax.tree_util.tree_map(lambda x: x + 0.01 * np.cos(np.arange(x.size).reshape(
      x.shape)), variables)
  workdir = tmp_path_factory.mktemp('workdir')
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(workdir / 'checkpoints' / '3' / 'state',
             {'params': variables['params'], 'batch_stats': variables['batch_stats']})
  ckptr.wait_until_finished()
  ckptr.close()
  return workdir


def test_cache_matches_plain_run_with_fewer_backbone_passes(tiny_workdir, pt18_real, tmp_path):
  frames = pt18_real / 'videos' / CLIP
  loaded = infer.load_model(tiny_workdir)
  kw = dict(frames=str(frames), detector='whole_frame', png=False, batch_size=4,
            model_and_variables=loaded)
  cached = infer.predict_video(None, str(tmp_path / 'cached'), use_cache=True, **kw)
  plain = infer.predict_video(None, str(tmp_path / 'plain'), use_cache=False, **kw)
  # One track, one anchor: 5 frames -> 5 backbone passes instead of 5 per window.
  assert cached['backbone_passes'] == 5
  assert plain['backbone_passes'] == 25
  a = json.loads((tmp_path / 'cached' / f'{CLIP}.json').read_text())
  b = json.loads((tmp_path / 'plain' / f'{CLIP}.json').read_text())
  kp_a = np.array([x['keypoints'] for x in a['annotations']])
  kp_b = np.array([x['keypoints'] for x in b['annotations']])
  np.testing.assert_allclose(kp_a, kp_b, atol=1e-3)
  np.testing.assert_allclose([x['scores'] for x in a['annotations']],
                             [x['scores'] for x in b['annotations']], rtol=1e-4, atol=1e-6)
  flipped = infer.predict_video(None, str(tmp_path / 'flip'), use_cache=True, flip_test=True, **kw)
  assert flipped['backbone_passes'] == 10
  c = json.loads((tmp_path / 'flip' / f'{CLIP}.json').read_text())
  assert not np.allclose([x['scores'] for x in c['annotations']],
                         [x['scores'] for x in a['annotations']])


def test_cli_on_real_clip_writes_posetrack_json_and_overlays(tiny_workdir, pt18_real, tmp_path):
  video_dir = pt18_real / 'videos' / CLIP
  boxes = [{'image_id': t, 'bbox': [300 + 5 * t, 150, 300, 500], 'score': 0.9}
           for t in range(5)] + [{'image_id': 2, 'bbox': [800, 100, 200, 400], 'score': 0.8}]
  (tmp_path / 'boxes.json').write_text(json.dumps(boxes))
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'tdmi_jax.infer', f'--checkpoint={tiny_workdir}',
       f'--video={video_dir / (CLIP + ".mp4")}', f'--boxes={tmp_path / "boxes.json"}',
       f'--out={out}', '--batch_size=2'],
      capture_output=True, text=True, timeout=600, cwd=os.getcwd())
  assert proc.returncode == 0, proc.stderr[-3000:]
  pred = json.loads((out / f'{CLIP}.json').read_text())
  assert [im['id'] for im in pred['images']] == [10000010000 + t for t in range(5)]
  per_frame = {}
  for ann in pred['annotations']:
    assert len(ann['keypoints']) == 51 and len(ann['scores']) == 17
    per_frame.setdefault(ann['image_id'], []).append(ann['track_id'])
  assert [len(per_frame[10000010000 + t]) for t in range(5)] == [1, 1, 2, 1, 1]
  # The moving person keeps track 0 across frames.
  assert all(0 in ids for ids in per_frame.values())
  assert len(set(per_frame[10000010002])) == 2
  assert pred['categories'][0]['keypoints'][0] == 'nose'
  import cv2  # pylint: disable=g-import-not-at-top
  cap = cv2.VideoCapture(str(out / 'overlay.mp4'))
  count = 0
  while cap.read()[0]:
    count += 1
  assert count == 5
  assert sorted(os.listdir(out / 'frames')) == [f'{t:06d}.png' for t in range(5)]
  stats = json.loads((out / 'stats.json').read_text())
  assert stats['frames'] == 5 and stats['people'] == 6


def test_cli_errors_name_the_problem(tmp_path, pt18_real):
  proc = subprocess.run(
      [sys.executable, '-m', 'tdmi_jax.infer', f'--checkpoint={tmp_path}',
       f'--frames={pt18_real / "videos" / CLIP}', f'--out={tmp_path / "o"}'],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert 'config.json' in proc.stderr


def test_streaming_gives_the_same_outputs_as_before(tiny_workdir, pt18_real, tmp_path):
  clip = pt18_real / 'videos' / CLIP
  boxes = [{'image_id': t, 'bbox': [300 + 5 * t, 150, 300, 500], 'score': 0.9}
           for t in range(5)] + [{'image_id': 2, 'bbox': [800, 100, 200, 400], 'score': 0.8}]
  (tmp_path / 'boxes.json').write_text(json.dumps(boxes))
  video, box_file = str(clip / f'{CLIP}.mp4'), str(tmp_path / 'boxes.json')
  runs = {'frames_whole_frame': dict(frames=str(clip), detector='whole_frame'),
          'video_boxes': dict(video=video, boxes=box_file),
          'video_boxes_flip': dict(video=video, boxes=box_file, flip_test=True),
          'video_boxes_nocache': dict(video=video, boxes=box_file, use_cache=False),
          'frames_hog': dict(frames=str(clip), detector='hog')}
  expected = json.loads(EXPECTED.read_text())
  loaded = infer.load_model(tiny_workdir)
  for name, kw in runs.items():
    stats = infer.predict_video(None, str(tmp_path / name), png=False, batch_size=2,
                                model_and_variables=loaded, **kw)
    got = json.loads((tmp_path / name / f'{CLIP}.json').read_text())
    want = expected[name]
    assert stats['backbone_passes'] == want['backbone_passes'], name
    assert [im['id'] for im in got['images']] == want['images'], name
    anns, want_anns = got['annotations'], want['annotations']
    assert [(a['image_id'], a['track_id']) for a in anns] == [
        (a['image_id'], a['track_id']) for a in want_anns], name
    np.testing.assert_allclose([a['keypoints'] for a in anns],
                               [a['keypoints'] for a in want_anns], atol=1e-3, err_msg=name)
    np.testing.assert_allclose([a['scores'] for a in anns], [a['scores'] for a in want_anns],
                               rtol=1e-4, atol=1e-6, err_msg=name)


def _moving_person_video(path, num_frames, size_hw=(240, 320)):
  """An mp4 of a bright figure walking right; returns its per-frame boxes (COCO results)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = size_hw
  out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), 25.0, (w, h))
  boxes = []
  for t in range(num_frames):
    img = np.full((h, w, 3), 40, np.uint8)
    x = 20 + t % (w - 100)  # 1 px per frame: the crop is re-anchored every ~6 frames.
    img[60:200, x:x + 50] = (200, 180, 160)
    out.write(img)
    boxes.append({'image_id': t, 'bbox': [x - 10, 50, 70, 160], 'score': 0.9})
  out.release()
  return boxes


def test_streaming_memory_is_bounded_by_the_window_on_a_long_video(tiny_workdir, tmp_path):
  frame_bytes = 240 * 320 * 3
  loaded = infer.load_model(tiny_workdir)
  peaks = {}
  for num_frames in (40, 120):
    video, box_file = tmp_path / f'walk{num_frames}.mp4', tmp_path / f'boxes{num_frames}.json'
    box_file.write_text(json.dumps(_moving_person_video(video, num_frames)))
    tracemalloc.start()
    try:
      stats = infer.predict_video(None, str(tmp_path / f'out{num_frames}'), video=str(video),
                                  boxes=str(box_file), png=False, batch_size=2,
                                  model_and_variables=loaded)
      peaks[num_frames] = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert stats['frames'] == num_frames and stats['people'] == num_frames
    # Five decoded frames at most (the window), whatever the length; the cache holds one
    # track's window (twice while its crop is re-anchored).
    assert stats['max_frames_held'] == 5
    assert stats['max_cache_entries'] <= 10
    # Each frame's backbone ran once except where the track's crop moved.
    assert stats['backbone_passes'] < 2 * num_frames
  # Every array allocated meanwhile (decoded frames, crops, overlays, heatmaps): holding
  # the clip would add 80 frames' worth when the length triples. Streaming adds only the
  # per-frame results and allocator noise (measured 0.6-1.8 frames; the bound leaves room
  # for a loaded CI machine while still failing at a tenth of the clip).
  assert peaks[120] < peaks[40] + 8 * frame_bytes, {
      k: v / frame_bytes for k, v in peaks.items()}
  assert peaks[120] < 30 * frame_bytes, peaks[120] / frame_bytes
