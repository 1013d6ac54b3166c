"""Predict -> write -> poseval mAP, with the clean/degraded split, on the synthetic data."""

import json

import numpy as np

from configs import common
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import map_eval

ONE = dict(process_index=0, process_count=1, device_count=1)


def _cfg(root, data_dir):
  c = common.data_config('synthetic')
  c.manual_dir = str(root)
  c.data_dir = str(data_dir)
  c.image_size = (128, 96)
  c.heatmap_size = (64, 48)
  c.sigma = 1.0
  c.use_gt_boxes_for_val = True
  return c


def test_target_heatmaps_evaluate_near_perfect_on_every_subset(synthetic, tmp_path):
  cfg = _cfg(synthetic, tmp_path / 'tfds')
  data = input_pipeline.EvalData(cfg, 4, **ONE)
  workdir = tmp_path / 'work'
  # The targets are the GT joints rendered as heatmaps: decoding them must land each
  # joint within a heatmap pixel of the GT; the tiny preset's heads are ~10 px, so a few
  # joints near the 0.5 head-size radius may still miss.
  predictions = map_eval.predict(lambda b: b['target'], data, progress=False)
  results = map_eval.finalize(predictions, input_pipeline.val_gt_dir(cfg), str(workdir), 7)
  assert set(results) == {'all', 'clean', 'degraded'}
  for name, r in results.items():
    assert r['summary']['Total'] > 95.0, (name, r['summary'])
  assert results['clean']['num_frames'] + results['degraded']['num_frames'] == \
      results['all']['num_frames']
  assert results['degraded']['num_frames'] > 0
  saved = json.loads((workdir / 'eval_results.json').read_text())
  assert saved['step'] == 7 and set(saved['summary']) == {
      'Head', 'Shou', 'Elb', 'Wri', 'Hip', 'Knee', 'Ankl', 'Total'}
  assert set(saved['subsets']) == {'clean', 'degraded'}
  assert (workdir / 'eval_results_7.json').is_file()
  assert len(list((workdir / 'predictions' / '7').glob('*.json'))) == len(
      list((synthetic / 'annotations' / 'val').glob('*.json')))
  flat = map_eval.flat_metrics(results)
  assert flat['map/Total'] == results['all']['summary']['Total']
  assert 'map_degraded/Ankl' in flat


def test_wrong_heatmaps_score_low_and_flip_test_is_used(synthetic, tmp_path):
  cfg = _cfg(synthetic, tmp_path / 'tfds')
  data = input_pipeline.EvalData(cfg, 4, **ONE)
  calls = []

  def shifted(batch):
    calls.append(batch['frames'][0, 2, 0, 0, 0])
    return np.roll(batch['target'], 20, axis=2)  # 20 heatmap px = 40 crop px off.

  predictions = map_eval.predict(shifted, data, flip_test=True, progress=False)
  results = map_eval.finalize(predictions, input_pipeline.val_gt_dir(cfg), str(tmp_path / 'w'), 0)
  assert results['all']['summary']['Total'] < 50
  assert len(calls) == 2 * data.num_batches  # Original and mirrored input per batch.
