r"""Video inference frames/s with and without the streaming backbone feature cache.

  python benchmarks/infer_bench.py --variant=hrnet_w48 --frames=8 --people=1

Runs `tdmi_jax.inference.infer.predict_video` twice in one process on the same synthetic
clip and random weights (speed does not depend on the weights): once with the cache (one backbone pass per
(crop, frame)) and once without (five per window). The theoretical saving of the cache is
the backbone's share of a window's cost times 4/5; the script prints both runs, the
backbone-pass counts and the measured speed-up. The first frame's compilation is excluded
by a warm-up run on the same shapes.
"""

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from configs import posetrack18  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdmi_jax.inference import infer  # pylint: disable=g-import-not-at-top,wrong-import-position
from tdmi_jax.models import tdmi  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='hrnet_w48')
  parser.add_argument('--frames', type=int, default=8)
  parser.add_argument('--people', type=int, default=1)
  parser.add_argument('--size', default='384x288', help='crop HxW')
  parser.add_argument('--image', default='720x1280', help='frame HxW')
  args = parser.parse_args()

  config = posetrack18.get_config(f'variant={args.variant}').unlock()
  config.data.image_size = tuple(int(v) for v in args.size.split('x'))
  model = tdmi.build_model(config.model)
  h, w = config.data.image_size
  variables = jax.jit(lambda r: model.init(r, np.zeros((1, 5, h, w, 3), np.float32),
                                           train=False))(jax.random.key(0, impl='unsafe_rbg'))
  ih, iw = (int(v) for v in args.image.split('x'))
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    frames_dir = os.path.join(tmp, 'frames')
    os.makedirs(frames_dir)
    for t in range(args.frames):
      Image.fromarray(rng.integers(0, 255, (ih, iw, 3), np.uint8)).save(
          os.path.join(frames_dir, f'{t:06d}.jpg'))
    boxes = [{'image_id': t, 'bbox': [100 + 300 * p + 2 * t, 100, 200, 400], 'score': 0.9}
             for t in range(args.frames) for p in range(args.people)]
    box_file = os.path.join(tmp, 'boxes.json')
    with open(box_file, 'w') as f:
      json.dump(boxes, f)
    kw = dict(frames=frames_dir, boxes=box_file, png=False, batch_size=args.people,
              model_and_variables=(model, variables, config))
    results = {}
    for use_cache in (True, False):
      # Warm-up on two frames compiles the same shapes as the timed run.
      warm = os.path.join(tmp, 'warm')
      os.makedirs(warm, exist_ok=True)
      for t in range(2):
        os.link(os.path.join(frames_dir, f'{t:06d}.jpg'), os.path.join(warm, f'{t:06d}.jpg'))
      infer.predict_video(None, os.path.join(tmp, 'w'), **{**kw, 'frames': warm},
                          use_cache=use_cache)
      for t in range(2):
        os.remove(os.path.join(warm, f'{t:06d}.jpg'))
      results[use_cache] = infer.predict_video(None, os.path.join(tmp, f'out{use_cache}'),
                                               **kw, use_cache=use_cache)
  for use_cache, r in results.items():
    print(f"{'cache   ' if use_cache else 'no cache'}: {r['frames_per_sec']:.3f} frames/s, "
          f"{r['backbone_passes']} backbone passes, {r['seconds']:.1f} s for {r['frames']} "
          f'frames x {args.people} people ({args.variant}, crop {args.size})')
  print(f'speed-up with cache: {results[True]["frames_per_sec"] / results[False]["frames_per_sec"]:.2f}x '
        f'(backbone passes {results[False]["backbone_passes"] / results[True]["backbone_passes"]:.2f}x fewer)')


if __name__ == '__main__':
  main()
