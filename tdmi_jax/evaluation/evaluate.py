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
import sys

from tdmi_jax import fileio
from tdmi_jax.evaluation import posetrack_map


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
  print(posetrack_map.format_table(result))
  print(f'# evaluated frames: {result["num_frames"]}')
  if args.json_out:
    try:
      fileio.write_json(args.json_out, result)
    except OSError as e:
      print(f'error: cannot write {args.json_out}: {e}', file=sys.stderr)
      return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
