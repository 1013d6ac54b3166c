"""Video inference on the real PoseTrack clip with the tiny variant."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from tdmi_jax.inference import infer
from tdmi_jax.models import tdmi

CLIP = '000001_mpiinew_test'


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A workdir as training leaves it: config.json and checkpoints/<step>/state."""
  config = synthetic.get_config('runlocal')
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
