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
training examples/s (5 frames at 384x288, augmentation on) with JPEG draft decoding on and off,
and the streaming comparison (`--workers_list`, default 0,1,2), in one interleaved run:
  old        today's pipeline before grain: a thread pool of --workers threads over the
             examples, frames normalised to float32 on the host, one batch prepared ahead;
  grain wN   `TrainData.iterator` (grain, N worker processes, uint8 frames; N = 0: one
             background thread in this process).
For each: examples/s, CPU seconds used (this process and its workers, from /proc) and the
per-core rate = examples per CPU second, and the bytes per example that cross to the device.
The script takes any N (`--workers_list 0,1,2,4,8` on a real host).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
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
from tdmi_jax.data import transforms  # noqa: E402

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


def measure(name, manual_dir, data_dir, batch, steps, workers, rounds, args):
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
  stream = compare_streams(name, cfg, recs, batch, args.stream_steps, workers,
                           [int(w) for w in args.workers_list.split(',')], rounds)
  if args.skip_draft:
    return stream
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
  return stream


def _cpu_seconds():
  """User+system CPU of this process and of its live children (grain's workers)."""
  tick = os.sysconf('SC_CLK_TCK')
  total = 0.0
  for pid in [os.getpid()] + [p.pid for p in multiprocessing.active_children()]:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
      pass
  return total


def _old_stream(data, threads):
  """The pre-grain pipeline, rebuilt from the same pieces: a decode thread pool, host
  float32 normalisation, one batch prepared ahead by another thread."""
  pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
  ahead = concurrent.futures.ThreadPoolExecutor(1)

  def batch(step):
    start = step * data.global_batch_size
    examples = list(pool.map(data.example, range(start, start + data.local_batch_size)))
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out['frames'] = transforms.normalize(out['frames'])
    return out

  step, pending = 0, ahead.submit(batch, 0)
  try:
    while True:
      out = pending.result()
      step += 1
      pending = ahead.submit(batch, step)
      yield out
  finally:
    pool.shutdown(wait=False)
    ahead.shutdown(wait=False)


def _time_stream(make_stream, steps, skip):
  """(examples/s, CPU s, bytes of frames per example) over `steps` batches, after `skip`
  batches: worker start-up and the batches buffered meanwhile are not the steady rate."""
  it = make_stream()
  first = next(it)
  for _ in range(skip):
    next(it)
  t0, c0 = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    b = next(it)
  dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  it.close()
  n = steps * len(b['frames'])
  del first
  return n / dt, cpu, b['frames'][0].nbytes


def compare_streams(name, cfg, recs, batch, steps, threads, workers_list, rounds):
  """Old pipeline vs grain with each worker count, interleaved over rounds; best round."""
  def data_for(workers):
    c = cfg.copy_and_resolve_references()
    c.num_workers = workers
    c.prefetch = 2
    return input_pipeline.TrainData(c, batch, seed=0, process_index=0, process_count=1,
                                    device_count=1, records=recs)
  # (stream, batches to drain first): what can be buffered is (per worker) grain's
  # per-worker buffer plus the worker's own read-ahead, each `prefetch` = 2 batches.
  variants = {f'old ({threads} threads)': (lambda: _old_stream(data_for(threads), threads), 2)}
  for w in workers_list:
    variants[f'grain w{w}'] = (lambda w=w: data_for(w).iterator(0), max(1, w) * 5)
  best = {}
  for _ in range(rounds):
    for label, (make, skip) in variants.items():
      rate, cpu, nbytes = _time_stream(make, steps, skip)
      if label not in best or rate > best[label][0]:
        best[label] = (rate, cpu, nbytes)
  print(f'[{name}] streaming, {steps} batches of {batch} after the buffered ones, best of '
        f'{rounds}:')
  for label, (rate, cpu, nbytes) in best.items():
    per_core = steps * batch / max(cpu, 1e-9)
    print(f'[{name}]   {label:18s} {rate:7.1f} examples/s  {cpu:6.2f} CPU s  '
          f'{per_core:6.1f} examples per CPU s  {nbytes / 1e6:.2f} MB/example to the device')
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--workers', type=int, default=2,
                      help='threads of the draft on/off rows and of the old pipeline')
  parser.add_argument('--workers_list', default='0,1,2',
                      help='grain worker process counts for the streaming rows')
  parser.add_argument('--stream_steps', type=int, default=6)
  parser.add_argument('--skip_draft', action='store_true',
                      help='only the streaming comparison (and the dataset figures)')
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
          args.rounds, args)
  hd = work / f'full_hd_{source}'
  (full_hd_dataset if source == 'real' else synthetic_full_hd_dataset)(hd)
  hd_stream = measure(f'full-HD ({source})', hd, work / 'tfds', args.batch, args.steps,
                      args.workers, args.rounds, args)
  # A TPU v4-8 / v5e-8 host at global batch 64 and ~0.3 s per step (issue 12's figure).
  need = 64 / 0.3
  for label, (rate, cpu, _) in hd_stream.items():
    per_core = args.stream_steps * args.batch / max(cpu, 1e-9)
    print(f'[projection] {label}: {need:.0f} full-HD examples/s need ~{need / per_core:.1f} '
          'cores at this per-core rate')
  print('load average after: %.2f %.2f %.2f' % os.getloadavg())


if __name__ == '__main__':
  main()
