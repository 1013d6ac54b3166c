"""A model's PoseTrack mAP on val: predict every detector box, write, evaluate.

Used by the training driver's periodic and final evaluation, by `--mode=eval`, by batch
evaluation and by the hard-frame experiment. Predictions go to
`<workdir>/predictions/<step>/` (one 2018-format file per GT video) and the metric to
`<workdir>/eval_results.json` (schema of `python -m tdmi_jax.evaluate --json_out`), plus
`<workdir>/eval_results_<step>.json` so earlier steps stay readable.
"""

import json
import os

import numpy as np
import tqdm

from tdmi_jax.evaluation import decode
from tdmi_jax.evaluation import posetrack_map
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


def evaluate_subsets(gt_dir, pred_dir):
  """{'all': result, and 'clean'/'degraded' results where the GT marks degraded frames}."""
  results = {'all': posetrack_map.evaluate_dirs(gt_dir, pred_dir)}
  files = posetrack_map.gt_files(gt_dir)
  gts = [(os.path.basename(f), posetrack_map.load_json(f)) for f in files]
  marked = any(im.get('degradation', 'none') != 'none'
               for _, data in gts if isinstance(data, dict) for im in data.get('images', []))
  if not marked:
    return results
  preds = {n: posetrack_map.read_video(posetrack_map.load_json(os.path.join(pred_dir, n)),
                                       os.path.join(pred_dir, n)) for n, _ in gts}
  for name, keep in SUBSETS.items():
    pairs = [(n, posetrack_map.read_video(_subset_gt(data, keep), n), preds[n])
             for n, data in gts]
    results[name] = posetrack_map.evaluate_videos(pairs)
  return results


def write_results(result, path):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(_jsonable(result), f, indent=2)
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def finalize(predictions, gt_dir, workdir, step):
  """Writes `<workdir>/predictions/<step>/`, evaluates it, writes the results files.

  Returns {'all': {...}, optionally 'clean'/'degraded'}; `eval_results.json` holds 'all'
  (the CLI schema) plus 'step' and a 'subsets' entry with the others.
  """
  pred_dir = os.path.join(workdir, 'predictions', str(int(step)))
  writer.write_predictions(predictions, gt_dir, pred_dir)
  results = evaluate_subsets(gt_dir, pred_dir)
  out = dict(results['all'])
  out['step'] = int(step)
  if len(results) > 1:
    out['subsets'] = {k: v for k, v in results.items() if k != 'all'}
  write_results(out, os.path.join(workdir, f'eval_results_{int(step)}.json'))
  write_results(out, os.path.join(workdir, 'eval_results.json'))
  return results


def evaluate_model(predict_fn, eval_data, gt_dir, workdir, step, *, flip_test=False,
                   method='quarter', progress=True):
  """`predict` then `finalize`, in one process."""
  predictions = predict(predict_fn, eval_data, flip_test=flip_test, method=method,
                        progress=progress)
  return finalize(predictions, gt_dir, workdir, step)


def flat_metrics(results):
  """{'map/Total': ..., 'map/Head': ..., 'map_degraded/Total': ...} for logging."""
  out = {}
  for subset, result in results.items():
    prefix = 'map' if subset == 'all' else f'map_{subset}'
    for k, v in result['summary'].items():
      out[f'{prefix}/{k}'] = float(v) if v is not None else float('nan')
  return out
