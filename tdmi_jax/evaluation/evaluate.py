r"""PoseTrack mAP (and tracking metrics) of per-video prediction files, as the official
poseval computes them.

  python -m tdmi_jax.evaluate --gt_dir GT --pred_dir PRED [--track] [--json_out FILE]

GT holds one ground-truth JSON per video (2017 annolist or 2018 format), PRED one
prediction file per GT video with the same name. Prints the poseval table (percent,
one decimal) and the number of evaluated frames; `--json_out` writes
{"summary": {Head, Shou, Elb, Wri, Hip, Knee, Ankl, Total}, "per_joint": {15 joints},
"num_frames": N} at full precision (a joint without any GT annotation has AP NaN in
poseval; it is written as null).

`--track` adds poseval's tracking evaluation (`poseval -t`, tdmi_jax.evaluation.tracking):
its MOT table (MOTA of Head .. Ankl and Total; MOTP, Prec, Rec totals) after the AP table,
and in the JSON "tracking": {"per_joint": {joint: {"MOTA", "MOTP", "Prec", "Rec"}},
"total": {"MOTA", "MOTP", "Prec", "Rec"}} in percent (NaN as null).
"""

import argparse
import sys

from tdmi_jax import fileio
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import tracking


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m tdmi_jax.evaluate',
      description='PoseTrack per-joint AP (and with --track the MOT metrics) exactly as the '
      'official poseval tool.')
  parser.add_argument('--gt_dir', required=True, help='ground-truth JSON per video')
  parser.add_argument('--pred_dir', required=True, help='prediction JSON per GT video')
  parser.add_argument('--json_out', default=None, help='write the results here')
  parser.add_argument('--track', action='store_true',
                      help="also poseval's tracking metrics (MOTA, MOTP, Prec, Rec)")
  args = parser.parse_args(argv)
  try:
    pairs = list(posetrack_map.read_pairs(args.gt_dir, args.pred_dir))
    result = posetrack_map.evaluate_videos(pairs)
    if args.track:
      result['tracking'] = tracking.evaluate_videos(pairs)
  except posetrack_map.EvalInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print('Average Precision (AP) metric:')
  print(posetrack_map.format_table(result))
  print(f'# evaluated frames: {result["num_frames"]}')
  if args.track:
    print('Multiple Object Tracking (MOT) metrics:')
    print(tracking.format_table(result['tracking']))
  if args.json_out:
    try:
      fileio.write_json(args.json_out, result)
    except OSError as e:
      print(f'error: cannot write {args.json_out}: {e}', file=sys.stderr)
      return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
