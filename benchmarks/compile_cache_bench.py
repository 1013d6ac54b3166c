r"""What the persistent compilation cache saves when a run starts again (restart, resume).

  python benchmarks/compile_cache_bench.py                 # runlocal synthetic config, CPU
  python benchmarks/compile_cache_bench.py --config=configs/synthetic.py --steps=2

Starts the training driver (`train.train_and_evaluate`, --mode=train, a fresh workdir each
time, one shared synthetic dataset) three times, each in its own process so that nothing stays in memory:

  no_cache   config.compilation_cache_dir='' (the driver compiles everything)
  cold       a new, empty cache folder (compiles and fills it)
  warm       the same folder again: the second start loads the compiled programs

and prints, per start, the time JAX spent obtaining executables (its
'/jax/core/compile/backend_compile_duration' events: compiling, or reading the cache),
the number of cache hits, and the wall time of the whole start-up and run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args):
  """One start of the driver; prints a RESULT line."""
  start = time.perf_counter()
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  from tdmi_jax import train  # pylint: disable=g-import-not-at-top

  totals = {'compile_s': 0.0, 'programs': 0, 'cache_hits': 0}

  def on_duration(event, duration, **kw):
    del kw
    if event == '/jax/core/compile/backend_compile_duration':
      totals['compile_s'] += duration
      totals['programs'] += 1

  def on_event(event, **kw):
    del kw
    if event == '/jax/compilation_cache/cache_hits':
      totals['cache_hits'] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)
  path, _, arg = args.config.partition(':')
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None).unlock()
  config.num_train_steps = args.steps
  config.compilation_cache_dir = args.cache
  config.data.manual_dir = os.path.join(args.data, 'synthetic')
  config.data.data_dir = os.path.join(args.data, 'tfds')
  # Small programs compile in under JAX's default 1 s threshold; cache them too.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  train.train_and_evaluate(config, args.workdir, mode='train')
  totals['wall_s'] = time.perf_counter() - start
  print('RESULT ' + json.dumps(totals), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/synthetic.py:runlocal')
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--workdir', help=argparse.SUPPRESS)
  p.add_argument('--cache', default='', help=argparse.SUPPRESS)
  p.add_argument('--data', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return _child(args)
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # It would override the config field.
  scratch = tempfile.mkdtemp(prefix='compile_cache_bench_')
  cache = os.path.join(scratch, 'cache')
  # One synthetic dataset for every start (made by the first): not what is measured.
  data = os.path.join(scratch, 'data')
  rows = []
  for name, cache_dir in (('no_cache', ''), ('cold', cache), ('warm', cache)):
    workdir = os.path.join(scratch, name)
    cmd = [sys.executable, os.path.abspath(__file__), '--child', f'--config={args.config}',
           f'--steps={args.steps}', f'--workdir={workdir}', f'--cache={cache_dir}',
           f'--data={data}']
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      sys.exit(f'{name} failed:\n{proc.stderr[-3000:]}')
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1][7:])
    rows.append((name, result))
    print(f'{name:9s} compile {result["compile_s"]:7.1f} s over {result["programs"]:3d} '
          f'programs, {result["cache_hits"]:3d} cache hits, wall {result["wall_s"]:7.1f} s',
          flush=True)
  cold, warm = rows[1][1], rows[2][1]
  print(f'second start: compile {warm["compile_s"]:.1f} s instead of {cold["compile_s"]:.1f} s '
        f'({cold["compile_s"] / max(warm["compile_s"], 1e-9):.0f}x less), wall '
        f'{warm["wall_s"]:.1f} s instead of {cold["wall_s"]:.1f} s')


if __name__ == '__main__':
  main()
