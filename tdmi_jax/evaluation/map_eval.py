"""A model's PoseTrack mAP on val: predict every detector box, write, evaluate.

`map_evaluation(config, workdir, step, predict_fn)` is the whole job, used by the training
driver's periodic and final evaluation, by `--mode=eval`, by batch evaluation and by the
hard-frame experiment. Predictions go to `<workdir>/predictions/<step>/` (one 2018-format
file per GT video, people linked into tracks by the writer's tracker with
config.eval.tracker) and the metric to `<workdir>/eval_results.json` (schema of
`python -m tdmi_jax.evaluate --json_out`, with its "tracking" block under config.eval.track),
plus `<workdir>/eval_results_<step>.json` so earlier steps stay readable.
"""


import numpy as np
import tqdm

from tdmi_jax import fileio
from tdmi_jax import paths
from tdmi_jax import sharding
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import decode
from tdmi_jax.evaluation import overlay
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import tracking
from tdmi_jax.evaluation import writer

# Frame subsets reported besides 'all' when the GT marks degraded frames (synthetic data).
SUBSETS = {
    'clean': lambda im: im.get('degradation', 'none') == 'none',
    'degraded': lambda im: im.get('degradation', 'none') != 'none',
}


# What decoding needs from an eval batch besides the heatmaps.
META_KEYS = ('center', 'scale', 'rotation', 'box_score', 'image_id', 'mask')


def predict(predict_fn, eval_data, *, flip_test=False, method='quarter', progress=True,
            gather=None):
  """{image_id: [people]} (the writer's input) for every box of `eval_data`.

  `predict_fn(batch) -> heatmaps [B, h, w, K]` (numpy, this process's rows). `gather`, if
  given, maps this process's {'heatmaps', META_KEYS} rows to all processes' rows (multi-host
  evaluation: every process runs the collective predict_fn, process 0 uses the result).
  """
  predictions = {}
  for batch in tqdm.tqdm(eval_data, total=eval_data.num_batches, desc='predict',
                         leave=False, disable=not progress):
    heatmaps = np.asarray(predict_fn(batch), np.float32)
    if flip_test:
      mirrored = dict(batch, frames=np.ascontiguousarray(decode.flip_images(batch['frames'])))
      heatmaps = decode.fuse_flip(heatmaps, np.asarray(predict_fn(mirrored), np.float32))
    rows = {'heatmaps': heatmaps, **{k: batch[k] for k in META_KEYS if k in batch}}
    if gather is not None:
      rows = gather(rows)
    for image_id, people in decode.batch_predictions(rows, rows['heatmaps'], method).items():
      predictions.setdefault(image_id, []).extend(people)
  return predictions


def _subset_gt(data, keep):
  """GT JSON whose people on frames failing `keep` are removed (poseval then skips them)."""
  kept = {im['id'] for im in data.get('images', []) if keep(im)}
  return dict(data, annotations=[a for a in data.get('annotations', [])
                                 if a.get('image_id') in kept])


def subset_results(gt_dir, pred_dir, track=False):
  """{'all': result, and 'clean'/'degraded' results where the GT marks degraded frames}.

  With `track`, 'all' also holds poseval's tracking metrics under 'tracking' (subsets have
  none: dropping frames would change what the tracking metrics count).
  """
  pairs = list(posetrack_map.read_pairs(gt_dir, pred_dir))
  results = {'all': posetrack_map.evaluate_videos(pairs)}
  if track:
    results['all']['tracking'] = tracking.evaluate_videos(pairs)
  files = posetrack_map.gt_files(gt_dir)
  pred_dir = paths.path(pred_dir)
  gts = [(f.name, fileio.load_json(f, posetrack_map.EvalInputError)) for f in files]
  marked = any(im.get('degradation', 'none') != 'none'
               for _, data in gts if isinstance(data, dict) for im in data.get('images', []))
  if not marked:
    return results
  preds = {}
  for n, _ in gts:
    path = pred_dir / n
    preds[n] = posetrack_map.read_video(fileio.load_json(path, posetrack_map.EvalInputError),
                                        path)
  for name, keep in SUBSETS.items():
    pairs = [(n, posetrack_map.read_video(_subset_gt(data, keep), n), preds[n])
             for n, data in gts]
    results[name] = posetrack_map.evaluate_videos(pairs)
  return results


def finalize(predictions, gt_dir, workdir, step, *, track=False, tracker_cfg=None):
  """Writes `<workdir>/predictions/<step>/`, evaluates it, writes the results files.

  People are linked into tracks by the writer (`tracker_cfg`: config.eval.tracker); `track`
  adds the tracking metrics. Returns {'all': {...}, optionally 'clean'/'degraded'};
  `eval_results.json` holds 'all' (the CLI schema) plus 'step' and a 'subsets' entry with
  the others.
  """
  workdir = paths.path(workdir)
  pred_dir = workdir / 'predictions' / str(int(step))
  writer.write_predictions(predictions, gt_dir, pred_dir, tracker_cfg)
  results = subset_results(gt_dir, pred_dir, track)
  out = dict(results['all'])
  out['step'] = int(step)
  if len(results) > 1:
    out['subsets'] = {k: v for k, v in results.items() if k != 'all'}
  fileio.write_json(workdir / f'eval_results_{int(step)}.json', out)
  fileio.write_json(workdir / 'eval_results.json', out)
  return results


def flat_metrics(results):
  """{'map/Total': ..., 'map/Head': ..., 'map_degraded/Total': ..., and with tracking
  'mota/Head' .. 'mota/Total', 'motp/Total', 'prec/Total', 'rec/Total'} for logging."""
  out = {}
  for subset, result in results.items():
    prefix = 'map' if subset == 'all' else f'map_{subset}'
    for k, v in result['summary'].items():
      out[f'{prefix}/{k}'] = float(v) if v is not None else float('nan')
  if 'tracking' in results.get('all', {}):
    for k, v in tracking.columns(results['all']['tracking']).items():
      metric, column = k.split(' ')
      out[f'{metric.lower()}/{column}'] = float(v)
  return out


def map_evaluation(config, workdir, step, predict_fn, title=None):
  """PoseTrack mAP on val detector boxes: predictions/<step>/ and eval_results.json.

  `predict_fn(batch) -> heatmaps` (numpy, this process's rows), e.g.
  `train_step.make_predict_fn`. Every process predicts its slice; process 0 gathers the
  rows, writes the files (people linked by the tracker of config.eval.tracker) and
  evaluates, with poseval's tracking metrics when config.eval.track. Returns flat metrics
  ({'map/Total': ..., 'map_degraded/Total': ... on synthetic data, 'mota/Total': ... with
  tracking}); {} when config.eval.map is off.
  """
  if not config.eval.map:
    return {}
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.use_gt_boxes_for_val = config.eval.use_gt_boxes
  eval_data = input_pipeline.EvalData(data_cfg, config.eval_batch_size)
  predictions = predict(
      predict_fn, eval_data, flip_test=config.eval.flip_test, method=config.eval.decode,
      progress=sharding.is_writer(), gather=sharding.gather_rows)
  metrics = {}
  if sharding.is_writer():
    gt_dir = input_pipeline.val_gt_dir(data_cfg)
    results = finalize(predictions, gt_dir, workdir, step, track=config.eval.track,
                       tracker_cfg=config.eval.tracker)
    if config.eval.num_overlays:
      overlay.write_eval_overlays(
          predictions, posetrack_map.gt_files(gt_dir), data_cfg.manual_dir,
          paths.path(workdir) / 'overlays' / str(int(step)), config.eval.num_overlays)
    title = title or f'PoseTrack mAP at step {int(step)}'
    print(f'{title} ({results["all"]["num_frames"]} frames):')
    print(posetrack_map.format_table(results['all']))
    if 'tracking' in results['all']:
      print(tracking.format_table(results['all']['tracking']))
    for name in ('clean', 'degraded'):
      if name in results:
        print(f'{name} key frames ({results[name]["num_frames"]} frames): Total '
              f'{results[name]["summary"]["Total"]:.1f}')
    metrics = flat_metrics(results)
  sharding.sync('map_evaluation')
  return metrics


def backbone_baseline(config, workdir, step, state, mesh):
  """PoseTrack mAP of the model's own (frozen) backbone as a single-frame estimator.

  Same val boxes and decoding as the TDMI evaluation, so the two tables differ only by
  what the temporal model adds. Files go to <workdir>/backbone_baseline/.
  """
  from tdmi_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  from tdmi_jax.models import tdmi  # pylint: disable=g-import-not-at-top
  sf_config = config.copy_and_resolve_references()
  sf_config.model.arch = 'single_frame'
  sf_config.eval.num_overlays = 0
  sf_model = tdmi.build_model(sf_config.model)
  sf_state = state.replace(
      params={'backbone': state.params['backbone']},
      batch_stats={k: v for k, v in state.batch_stats.items() if k == 'backbone'})
  eval_step = train_step_lib.make_eval_step(model=sf_model, mesh=mesh)
  return map_evaluation(sf_config, paths.path(workdir) / 'backbone_baseline', step,
                        train_step_lib.make_predict_fn(sf_state, eval_step, mesh),
                        title='Single-frame backbone alone, same boxes')
