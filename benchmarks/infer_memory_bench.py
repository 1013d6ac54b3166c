r"""Peak memory of streaming video inference against the video's length.

  python benchmarks/infer_memory_bench.py [--frames 150,600] [--image 1080x1920] [--variant tiny]

Writes one synthetic mp4 per length (a bright figure walking across a flat background, one
person box per frame), then runs `python -m tdmi_jax.infer`'s library call on it in a fresh
child process per length and prints the child's peak resident memory (ru_maxrss), the most
decoded frames and cached backbone outputs held at once, and what holding every decoded frame
would take (frames x H x W x 3 bytes, as the implementation before streaming did, twice).
Random weights: memory does not depend on them. Streaming is bounded if the peak does not
grow with the length.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)


def write_video(path, num_frames, h, w):
  import cv2  # pylint: disable=g-import-not-at-top
  out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 25.0, (w, h))
  boxes = []
  fig_w, fig_h = w // 12, h // 2
  for t in range(num_frames):
    img = np.full((h, w, 3), 40, np.uint8)
    x = (w // 20 + 4 * t) % (w - 2 * fig_w)
    img[h // 4:h // 4 + fig_h, x:x + fig_w] = (200, 180, 160)
    out.write(img)
    boxes.append({'image_id': t, 'bbox': [x - fig_w // 4, h // 4 - 20, fig_w * 1.5, fig_h + 40],
                  'score': 0.9})
  out.release()
  return boxes


def child(video, boxes, out, variant):
  """Runs in a fresh process: prints the stats and the process's peak RSS as JSON."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=g-import-not-at-top
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from tdmi_jax.inference import infer  # pylint: disable=g-import-not-at-top
  from tdmi_jax.models import tdmi  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config(f'variant={variant}')
  model = tdmi.build_model(config.model)
  h, w = config.data.image_size
  variables = jax.jit(lambda r: model.init(r, np.zeros((1, 5, h, w, 3), np.float32),
                                           train=False))(jax.random.key(0, impl='unsafe_rbg'))
  stats = infer.predict_video(None, out, video=video, boxes=boxes, png=False, batch_size=1,
                              model_and_variables=(model, variables, config))
  stats['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print('RESULT ' + json.dumps(stats))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--frames', default='150,600', help='comma list of video lengths')
  parser.add_argument('--image', default='1080x1920', help='frame HxW')
  parser.add_argument('--variant', default='tiny')
  parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child, args.variant)
    return
  h, w = (int(v) for v in args.image.split('x'))
  print('load average before: %.2f %.2f %.2f' % os.getloadavg())
  with tempfile.TemporaryDirectory() as tmp:
    for n in (int(v) for v in args.frames.split(',')):
      video = os.path.join(tmp, f'walk_{n}.mp4')
      box_file = os.path.join(tmp, f'boxes_{n}.json')
      with open(box_file, 'w') as f:
        json.dump(write_video(video, n, h, w), f)
      proc = subprocess.run(
          [sys.executable, __file__, '--variant', args.variant, '--child', video, box_file,
           os.path.join(tmp, f'out_{n}')], capture_output=True, text=True, cwd=ROOT,
          env=dict(os.environ, PYTHONPATH=ROOT))
      line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
      if proc.returncode or not line:
        sys.exit(f'child failed:\n{proc.stderr[-3000:]}')
      r = json.loads(line[0][len('RESULT '):])
      clip = n * h * w * 3
      print(f'{n:5d} frames {h}x{w}: peak RSS {r["peak_rss_bytes"] / 2**20:7.0f} MiB, '
            f'max frames held {r["max_frames_held"]}, max cached backbone outputs '
            f'{r["max_cache_entries"]}, {r["frames_per_sec"]:.1f} frames/s; the decoded clip '
            f'alone would be {clip / 2**20:.0f} MiB')
  print('load average after: %.2f %.2f %.2f' % os.getloadavg())


if __name__ == '__main__':
  main()
