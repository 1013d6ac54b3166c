r"""Input pipeline throughput and dataset size (figures for BENCHMARKS.md "Input pipeline").

  python benchmarks/input_bench.py [--batch 8] [--steps 4] [--rounds 3] [--workers 2] \
      [--work DIR] [--full_hd auto|real|synthetic]

Two datasets, both built through the posetrack TFDS builder:
- synthetic: `tdmi_jax.data.synthesize` default preset (320x240 frames);
- full-HD: 1920x1080 frames, every example decoding five distinct full-HD JPEGs as on
  PoseTrack. `real` cycles the real PoseTrack18 fixture frames with their GT persons (the
  `posetrack18_real` folder of $TDMI_FIXTURES_DIR, else ../shared/fixtures); `synthetic`
  renders a 60-frame full-HD video with the synthetic generator (its JPEGs are not
  photographs: measured 1.74 MB per five-frame window against 0.64 MB for the real frames,
  so decoding costs differ); `auto` (the default) uses the real frames when they are
  there.
Prints per dataset: array_record bytes per labeled frame, the JPEG bytes the same window would
take if stored in the record, record reads/s (random access via tfds data_source), and
training examples/s (5 frames at 384x288, augmentation on) with JPEG draft decoding on and off.
"""

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from tdmi_jax.data import input_pipeline  # noqa: E402

# The real-PoseTrack fixtures are not part of the repository (tests/conftest.py).
FIXTURES = os.environ.get('TDMI_FIXTURES_DIR') or ROOT.parent / 'shared' / 'fixtures'
FIXTURE = pathlib.Path(FIXTURES) / 'posetrack18_real'


def full_hd_dataset(root, nframes=60):
  """images/train/000100_bench/%06d.jpg -> the fixture's frames cycled, with their GT."""
  ann_dir = FIXTURE / 'annotations' / 'val'
  sources = []
  for p in sorted(ann_dir.glob('*.json')):
    d = json.loads(p.read_text())
    sources.append((FIXTURE / d['images'][0]['file_name'], d['images'][0], d['annotations']))
  seq = '000100_bench'
  (root / 'images' / 'train' / seq).mkdir(parents=True, exist_ok=True)
  images, anns = [], []
  for i in range(nframes):
    src, im, src_anns = sources[i % len(sources)]
    dst = root / 'images' / 'train' / seq / f'{i:06d}.jpg'
    if not dst.exists():
      os.symlink(src, dst)
    image_id = int(f'1000100{i:04d}')
    labeled = 2 <= i < nframes - 2  # every labeled frame has a full five-frame window
    images.append({'id': image_id, 'file_name': f'images/train/{seq}/{i:06d}.jpg',
                   'nframes': nframes, 'vid_id': '000100', 'is_labeled': labeled,
                   'width': im['width'], 'height': im['height']})
    if labeled:
      for j, a in enumerate(src_anns):
        anns.append(dict(a, image_id=image_id, id=image_id * 100 + j))
  (root / 'annotations' / 'train').mkdir(parents=True, exist_ok=True)
  (root / 'annotations' / 'train' / f'{seq}.json').write_text(
      json.dumps({'images': images, 'annotations': anns, 'categories': []}))


def synthetic_full_hd_dataset(root, nframes=60):
  """One synthetic train video of full-HD frames (and one small val video, which the
  generator always writes)."""
  from tdmi_jax.data import synthesize  # pylint: disable=g-import-not-at-top
  if not (root / 'annotations').is_dir():
    synthesize.generate(str(root), videos=2, val_videos=1, frames=nframes,
                        image_size=(1080, 1920), overwrite=True)


def measure(name, manual_dir, data_dir, batch, steps, workers, rounds):
  cfg = common.data_config('posetrack18' if name == 'full-HD (real)' else 'synthetic')
  cfg.manual_dir = str(manual_dir)
  cfg.data_dir = str(data_dir)
  cfg.num_workers = workers
  t0 = time.perf_counter()
  builder = input_pipeline.get_builder(cfg)
  build_s = time.perf_counter() - t0
  src = builder.as_data_source('train')
  n = len(src)
  files = list(pathlib.Path(builder.data_dir).glob('*-train.array_record*'))
  rec_bytes = sum(f.stat().st_size for f in files) / n
  rng = np.random.default_rng(0)
  order = rng.integers(0, n, 2000)
  t0 = time.perf_counter()
  for i in order:
    src[int(i)]
  reads_per_s = len(order) / (time.perf_counter() - t0)
  recs = input_pipeline.load_records(cfg, 'train')
  jpeg_bytes = np.mean([sum(os.path.getsize(os.path.join(cfg.manual_dir, f))
                            for f in set(r['window_files'])) for r in recs])
  print(f'[{name}] {n} labeled train frames, build {build_s:.1f} s')
  print(f'[{name}] array_record bytes per labeled frame: {rec_bytes:.0f} '
        f'(window JPEGs if stored as bytes: {jpeg_bytes:.0f})')
  print(f'[{name}] record reads/s (random access, data_source): {reads_per_s:.0f}')
  # Same examples (seed, steps) for both variants, interleaved over rounds because the CPU is
  # shared; the best round of each is reported.
  datas = {}
  for draft in (True, False):
    c = cfg.copy_and_resolve_references()
    c.jpeg_draft = draft
    datas[draft] = input_pipeline.TrainData(c, batch, seed=0, process_index=0,
                                            process_count=1, device_count=1, records=recs)
    datas[draft].batch(0)  # warm up (threads, page cache)
  best = {True: np.inf, False: np.inf}
  for _ in range(rounds):
    for draft, data in datas.items():
      t0 = time.perf_counter()
      for s in range(1, steps + 1):
        b = data.batch(s)
      best[draft] = min(best[draft], (time.perf_counter() - t0) / steps)
      assert b['frames'].shape == (batch, 5, 384, 288, 3)
  for draft, dt in best.items():
    print(f'[{name}] train examples/s (5x384x288, augment, {workers} threads, '
          f'jpeg_draft={draft}): {batch / dt:.1f}  ({dt:.2f} s per batch of {batch})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--work', default='/tmp/input_bench')
  parser.add_argument('--full_hd', choices=('auto', 'real', 'synthetic'), default='auto',
                      help='where the full-HD frames come from')
  args = parser.parse_args()
  source = args.full_hd
  if source == 'auto':
    source = 'real' if (FIXTURE / 'annotations' / 'val').is_dir() else 'synthetic'
  elif source == 'real' and not (FIXTURE / 'annotations' / 'val').is_dir():
    parser.error(f'--full_hd=real: {FIXTURE} not found (set TDMI_FIXTURES_DIR)')
  work = pathlib.Path(args.work)
  print('load average before: %.2f %.2f %.2f' % os.getloadavg())
  synth = work / 'synthetic'
  if not (synth / 'annotations').is_dir():
    from tdmi_jax.data import synthesize  # pylint: disable=g-import-not-at-top
    synthesize.generate(str(synth), overwrite=True)
  measure('synthetic', synth, work / 'tfds', args.batch, args.steps, args.workers,
          args.rounds)
  hd = work / f'full_hd_{source}'
  (full_hd_dataset if source == 'real' else synthetic_full_hd_dataset)(hd)
  measure(f'full-HD ({source})', hd, work / 'tfds', args.batch, args.steps, args.workers,
          args.rounds)
  print('load average after: %.2f %.2f %.2f' % os.getloadavg())


if __name__ == '__main__':
  main()
