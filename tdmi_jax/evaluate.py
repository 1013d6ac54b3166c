r"""PoseTrack mAP of per-video prediction files, as the official poseval computes it.

  python -m tdmi_jax.evaluate --gt_dir GT --pred_dir PRED [--json_out FILE]

GT holds one ground-truth JSON per video (2017 annolist or 2018 format), PRED one
prediction file per GT video with the same name. Prints the poseval table (percent,
one decimal) and the number of evaluated frames; `--json_out` writes
{"summary": {Head, Shou, Elb, Wri, Hip, Knee, Ankl, Total}, "per_joint": {15 joints},
"num_frames": N} at full precision (a joint without any GT annotation has AP NaN in
poseval; it is written as null).
"""

import argparse
import json
import math
import os
import sys

from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import writer

COLUMNS = ('Head', 'Shou', 'Elb', 'Wri', 'Hip', 'Knee', 'Ankl', 'Total')


def format_table(result):
  """poseval's LaTeX-style table: a header line and a row, one decimal."""
  header = '&' + ' &'.join(f' {c:<4}' for c in COLUMNS) + '\\\\'
  cells = ['{:>5}'.format('%1.1f' % result['summary'][c]) for c in COLUMNS]
  return header + '\n&' + ' &'.join(cells) + ' \\\\'


def _nan_to_none(value):
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def write_json(result, path):
  """Writes the result dict (NaN as null) atomically, so a failure keeps the old file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(_nan_to_none(result), f, indent=1)
  os.replace(tmp, path)


def evaluate_predictions(predictions, gt_dir, pred_dir, json_out=None):
  """Writes the prediction files (writer) into pred_dir, evaluates them against gt_dir and
  optionally writes `json_out` (the CLI's schema). Returns the result dict."""
  writer.write_predictions(predictions, gt_dir, pred_dir)
  result = posetrack_map.evaluate_dirs(gt_dir, pred_dir)
  if json_out:
    write_json(result, json_out)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m tdmi_jax.evaluate',
      description='PoseTrack per-joint AP exactly as the official poseval tool.')
  parser.add_argument('--gt_dir', required=True, help='ground-truth JSON per video')
  parser.add_argument('--pred_dir', required=True, help='prediction JSON per GT video')
  parser.add_argument('--json_out', default=None, help='write the results here')
  args = parser.parse_args(argv)
  try:
    result = posetrack_map.evaluate_dirs(args.gt_dir, args.pred_dir)
  except posetrack_map.EvalInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print('Average Precision (AP) metric:')
  print(format_table(result))
  print(f'# evaluated frames: {result["num_frames"]}')
  if args.json_out:
    try:
      write_json(result, args.json_out)
    except OSError as e:
      print(f'error: cannot write {args.json_out}: {e}', file=sys.stderr)
      return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
