r"""Train-step time, memory and MFU of TDMI (default HRNet-W48 at 384x288), in one run:

  * tdmi_step        the real train step (frozen backbone: no backbone gradient/opt state)
  * tdmi_step_bb     the same step with model.backbone.frozen=False (backprop into HRNet)
  * tdmi_forward     TDMI forward only (eval mode)
  * backbone_fwd     HRNet forward only on the B*5 frames (what the frozen backbone costs)
  * backbone_folded  the same with BatchNorm folded into the convs once, outside the timed
                     call (`hrnet.fold_batch_norm`; what video inference runs)
  * tdmi_e2e         (--e2e) the train step fed by the real input pipeline
                     (`input_pipeline.TrainData(...).iterator`) on the synthetic dataset

for each compute dtype of --dtypes, the frozen step's scaling from 1 to N devices at a fixed
global batch, and (--sweep) the frozen step at batch 1, 2, 4, ... until the device runs out
of memory (the last batch that fit is reported).

  python benchmarks/train_bench.py                      # CPU: batch 1 and 2, 1 and 2 devices
  python benchmarks/train_bench.py --batches=8 --devices=1,8 --kinds=tdmi_step  # a GPU/TPU box
  python benchmarks/train_bench.py --preset=gpu         # the whole set on a GPU (or TPU) box

Per row: compile s, step s (median of --steps after a warm-up), examples/s, GFLOP/s (XLA's
cost analysis of the compiled step, summed over devices), MFU, XLA's memory estimate per
device, and the device's own peak bytes in use.

* MFU = the per-device FLOPs of one step (XLA's `cost_analysis()`: what the compiled
  program executes, elementwise ops included) / step time / the device's peak FLOP/s
  from PEAK_FLOPS for the row's dtype; "n/a" on CPU and on device kinds not in the table.
* Peak memory per device: on GPU/TPU `memory_stats()['peak_bytes_in_use']`, the largest
  over the row's devices. That counter only grows within a process, so on GPU/TPU every
  row runs in a subprocess of its own (--isolate=auto); on CPU (no memory stats) the
  XLA column is the per-device figure (arguments + outputs + temporaries - donated).
* OOM: a row whose compile or run raises RESOURCE_EXHAUSTED / out of memory is reported
  as "OOM" and the run goes on; the sweep stops there. On CPU the host would swap or be
  killed first, so the sweep stops at --max_batch (default 4 on CPU).
* tdmi_e2e: `--e2e_steps` steps of next(iterator) -> sharding.shard_batch -> step, with no
  host sync inside the loop (input preparation overlaps the step as far as the pipeline
  lets it), timed to the last step's completion; "input wait" is the time spent in next().
  The synthetic dataset is generated (tdmi_jax.data.synthesize, `--synthetic_preset`) and
  built under --data_workdir on first use and reused afterwards.

On CPU the simulated device count is set from --devices before JAX starts.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

# Peak dense FLOP/s per device (one chip; NVIDIA: without 2:4 sparsity), by dtype.
# 'float32' is what JAX's default matmul/conv precision runs f32 on: TF32 tensor cores on
# NVIDIA Ampere and later, single-pass bf16 on the TPU MXU. With
# jax_default_matmul_precision='highest' the true f32 peak is far lower (A100 19.5 T,
# H100 SXM 67 T), so MFU would read low. Keys: jax.devices()[0].device_kind, lower case;
# TPU kinds match exactly, NVIDIA kinds by leading words (the first key that matches).
PEAK_FLOPS = {
    'tpu v4': {'bfloat16': 275e12, 'float32': 275e12},
    'tpu v5 lite': {'bfloat16': 197e12, 'float32': 197e12},   # v5e
    'tpu v5e': {'bfloat16': 197e12, 'float32': 197e12},
    'tpu v5': {'bfloat16': 459e12, 'float32': 459e12},        # v5p
    'tpu v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'tpu v6 lite': {'bfloat16': 918e12, 'float32': 918e12},   # v6e (Trillium)
    'tpu v6e': {'bfloat16': 918e12, 'float32': 918e12},
    'nvidia a100': {'bfloat16': 312e12, 'float32': 156e12},
    'nvidia h100 pcie': {'bfloat16': 756e12, 'float32': 378e12},
    'nvidia h100 nvl': {'bfloat16': 835e12, 'float32': 418e12},
    'nvidia h100': {'bfloat16': 989e12, 'float32': 495e12},   # SXM ("H100 80GB HBM3")
    'nvidia h200 nvl': {'bfloat16': 835e12, 'float32': 418e12},
    'nvidia h200': {'bfloat16': 989e12, 'float32': 495e12},
    'nvidia l4': {'bfloat16': 121e12, 'float32': 60e12},
}
KINDS = ('tdmi_step', 'tdmi_step_bb', 'tdmi_forward', 'backbone_fwd', 'backbone_folded')
# What --preset sets (flags given explicitly on the command line win).
PRESETS = {
    'gpu': dict(variant='hrnet_w48', height=384, width=288, batches='1,8', devices='1,all',
                kinds=','.join(KINDS), kinds_batch=8, dtypes='float32,bfloat16', steps=5,
                sweep=True, sweep_start=8, max_batch=0, e2e=True, e2e_batch=32,
                e2e_steps=20, num_workers=0),
}


def peak_flops(device_kind, dtype):
  """Peak FLOP/s of one device of this kind for `dtype`, or None (CPU, unknown kind)."""
  kind = device_kind.strip().lower()
  if kind.startswith('tpu'):
    entry = PEAK_FLOPS.get(kind)
  else:
    # 'nvidia l4' must not take 'nvidia l40s': the key ends the name or a word of it.
    entry = next((v for k, v in PEAK_FLOPS.items() if not k.startswith('tpu')
                  and kind.startswith(k) and not kind[len(k):len(k) + 1].isalnum()), None)
  return None if entry is None else entry[dtype]


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='', choices=['', *PRESETS],
                 help='a ready set of flags: gpu = every row, f32 and bf16, sweep, e2e')
  p.add_argument('--variant', default='hrnet_w48')
  p.add_argument('--height', type=int, default=384)
  p.add_argument('--width', type=int, default=288)
  p.add_argument('--batches', default='1,2', help='global batch sizes, comma separated')
  p.add_argument('--devices', default='1,2',
                 help="device counts for the scaling rows ('all': every local device)")
  p.add_argument('--scaling_batch', type=int, default=0,
                 help='global batch of the scaling rows (default: the largest --batches)')
  p.add_argument('--kinds', default=','.join(KINDS))
  p.add_argument('--kinds_batch', type=int, default=0,
                 help='batch for the kinds other than tdmi_step (default: the smallest)')
  p.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='compute dtype when --dtypes is not given')
  p.add_argument('--dtypes', default='',
                 help='compute dtypes, comma separated: every row once per dtype')
  p.add_argument('--mi', default='off', choices=['off', 'reference', 'variational'],
                 help="the step's MI objective (off: the shipped configs' heatmap loss alone)")
  p.add_argument('--sweep', action='store_true',
                 help='double the tdmi_step batch until out of memory (or --max_batch)')
  p.add_argument('--sweep_start', type=int, default=1)
  p.add_argument('--max_batch', type=int, default=-1,
                 help='largest sweep batch; 0 = until OOM (default: 4 on CPU, 0 elsewhere)')
  p.add_argument('--e2e', action='store_true',
                 help='add tdmi_e2e rows: the step fed by the real input pipeline')
  p.add_argument('--e2e_batch', type=int, default=0,
                 help='global batch of the e2e rows (default: the largest --batches)')
  p.add_argument('--e2e_steps', type=int, default=0, help='timed e2e steps (default --steps)')
  p.add_argument('--data_workdir', default='/tmp/tdmi_train_bench_data',
                 help='where the synthetic dataset is generated and built (reused)')
  p.add_argument('--synthetic_preset', default='default',
                 help='tdmi_jax.data.synthesize preset of that dataset (tiny, default)')
  p.add_argument('--num_workers', type=int, default=-1,
                 help='config.data.num_workers of the e2e rows (-1: the config default, '
                      '0: one per CPU core)')
  p.add_argument('--isolate', default='auto', choices=['auto', 'yes', 'no'],
                 help='each row in its own process (auto: on GPU/TPU, for per-row peaks)')
  p.add_argument('--json', default='', help='also write the rows to this JSON file')
  p.add_argument('--no_materialize', action='store_true',
                 help='make layers.materialize the identity (the step before it existed)')
  p.add_argument('--row', default='', help=argparse.SUPPRESS)  # Internal: one row, as JSON.
  return p


def _args():
  p = _parser()
  args = p.parse_args()
  if args.preset:
    given = {a.split('=')[0].lstrip('-') for a in sys.argv[1:] if a.startswith('--')}
    for key, value in PRESETS[args.preset].items():
      if key not in given:
        setattr(args, key, value)
  args.dtypes = [d for d in (args.dtypes or args.dtype).split(',') if d]
  for d in args.dtypes:
    if d not in ('float32', 'bfloat16'):
      p.error(f'--dtypes: {d!r} is not float32 or bfloat16')
  return args


ARGS = _args()
_NUMERIC_DEVICES = [int(d) for d in ARGS.devices.split(',') if d != 'all']
_MAX_DEVICES = max(_NUMERIC_DEVICES or [1])
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  # Only the CPU backend reads it; a GPU/TPU box keeps its real devices.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_MAX_DEVICES}')
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import bench_util
from configs import posetrack18
from configs import synthetic
from tdmi_jax import losses
from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.models import hrnet
from tdmi_jax.models import mi
from tdmi_jax.models import tdmi


if ARGS.no_materialize:
  from tdmi_jax.models import layers  # pylint: disable=g-import-not-at-top
  layers.materialize = lambda x: x


def _on_cpu():
  return jax.devices()[0].platform == 'cpu'


def _config(frozen, dtype):
  config = posetrack18.get_config(f'variant={ARGS.variant}').copy_and_resolve_references()
  config.model.backbone.frozen = frozen
  config.model.dtype = dtype
  config.data.image_size = (ARGS.height, ARGS.width)
  config.data.heatmap_size = (ARGS.height // 4, ARGS.width // 4)
  config.mi.enabled = ARGS.mi != 'off'
  if ARGS.mi != 'off':
    config.mi.objective = ARGS.mi
    # The variational objective's task term needs the M_u heatmap head.
    config.model.useful_head = ARGS.mi == 'variational'
  return config


def _batch(b, config):
  h, w = config.data.image_size
  hh, hw = config.data.heatmap_size
  rng = np.random.default_rng(0)
  return {'frames': rng.normal(size=(b, 5, h, w, 3)).astype(np.float32),
          'target': rng.random((b, hh, hw, 17)).astype(np.float32) * 0.1,
          'target_weight': np.ones((b, 17), np.float32),
          'mask': np.ones((b,), np.float32)}


def _memory(compiled):
  """XLA's per-device estimate in bytes (None when the backend gives none)."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
          - ma.alias_size_in_bytes)


def _flops(compiled):
  """FLOPs of one device's program (None when the backend has no cost analysis)."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', float('nan')))
  except Exception:  # pylint: disable=broad-except
    return None
  return flops if np.isfinite(flops) and flops > 0 else None


def _device_peak(devices):
  """Largest peak_bytes_in_use over `devices` (None on CPU / without memory stats)."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      peaks.append(stats['peak_bytes_in_use'])
  return max(peaks) if peaks else None


def _time(run, steps):
  jax.block_until_ready(run())  # Warm-up.
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


_VARIABLES = {}


def _variables(model, config):
  """Random variables of the right shapes without compiling model.init (bench_util).

  Parameters are float32 whatever the compute dtype, so every dtype shares them.
  """
  key = (config.model.variant, tuple(config.data.image_size), config.model.useful_head)
  if key not in _VARIABLES:
    h, w = config.data.image_size
    _VARIABLES[key] = bench_util.random_variables(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, h, w, 3)), train=False)))
  return _VARIABLES[key]


def _train_state(config, model, variables, mesh):
  """(state, step fn) of the real train step, with the vCLUB critic when the MI uses it."""
  club_tx = club_params = None
  if losses.uses_club(config.mi):
    club_tx = optim.make_club_optimizer(config.mi)
    club_params = mi.init_club(jax.random.key(1), config.mi,
                               hrnet.get_spec(config.model.variant).width)['params']
  st, mask, tx, schedule = bench_util.train_state(config, variables, mesh, club_params,
                                                  club_tx)
  step = train_step_lib.make_train_step(model=model, config=config, tx=tx,
                                        schedule=schedule, mask=mask, mesh=mesh,
                                        club_tx=club_tx)
  return st, step


def _e2e_data(config, batch_size):
  """TrainData on the project's synthetic dataset (generated and built on first use)."""
  from tdmi_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from tdmi_jax.data import synthesize  # pylint: disable=g-import-not-at-top
  data_config = synthetic.get_config().unlock()
  data_config.synthetic = dict(synthesize.PRESETS[ARGS.synthetic_preset], seed=0)
  data_config.data.image_size = config.data.image_size
  data_config.data.heatmap_size = config.data.heatmap_size
  if ARGS.num_workers >= 0 and 'num_workers' in data_config.data:
    data_config.data.num_workers = ARGS.num_workers or os.cpu_count()
  workdir = pathlib.Path(ARGS.data_workdir) / ARGS.synthetic_preset
  t0 = time.perf_counter()
  input_pipeline.prepare_data(data_config, os.fspath(workdir))
  data = input_pipeline.TrainData(data_config.data, batch_size, data_config.seed)
  return data, time.perf_counter() - t0


def _is_oom(e):
  text = f'{type(e).__name__}: {e}'
  return any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory',
                                 'OOM'))


def measure(kind, batch_size, num_devices, dtype, steps):
  """One row: a dict of figures (see `_line`)."""
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  config = _config(frozen=kind != 'tdmi_step_bb', dtype=dtype)
  model = tdmi.build_model(config.model)
  h, w = config.data.image_size
  variables = _variables(model, config)
  row = dict(kind=kind, batch=batch_size, devices=num_devices, dtype=dtype, status='ok')
  extra = {}
  t0 = time.perf_counter()
  if kind in ('tdmi_step', 'tdmi_step_bb', 'tdmi_e2e'):
    st, step = _train_state(config, model, variables, mesh)
    if kind == 'tdmi_e2e':
      data, prep_s = _e2e_data(config, batch_size)
      iterator = data.iterator(0)
      host_batch = next(iterator)
      extra['data_prep_s'] = prep_s
      t0 = time.perf_counter()  # Compile time without the dataset's preparation.
      # The pipeline's own batch (its dtypes, e.g. uint8 frames) is what the step compiles for.
      batch = sharding.shard_batch(host_batch, mesh, train_step_lib.TRAIN_KEYS)
    else:
      batch = sharding.shard_batch(_batch(batch_size, config), mesh,
                                   train_step_lib.TRAIN_KEYS)
    compiled = step.lower(st, batch).compile()
    holder = [st]

    def run():
      holder[0] = compiled(holder[0], batch)[0]  # The state is donated: thread it.
      return holder[0]
  elif kind == 'tdmi_forward':
    batch = sharding.shard_batch(_batch(batch_size, config), mesh, train_step_lib.TRAIN_KEYS)
    v = sharding.replicate(variables, mesh)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)[0]).lower(
        v, batch['frames']).compile()
    run = lambda: compiled(v, batch['frames'])
  elif kind in ('backbone_fwd', 'backbone_folded'):
    batch = sharding.shard_batch(_batch(batch_size, config), mesh, train_step_lib.TRAIN_KEYS)
    folded = kind == 'backbone_folded'
    net = hrnet.HRNet(hrnet.get_spec(config.model.variant), frozen_bn=True,
                      dtype=jnp.dtype(config.model.dtype), bn_folded=folded)
    v = {'params': variables['params']['backbone'],
         'batch_stats': variables['batch_stats']['backbone']}
    v = sharding.replicate(jax.jit(hrnet.fold_batch_norm)(v) if folded else v, mesh)
    frames = jax.device_put(batch['frames'].reshape((-1, h, w, 3)),
                            sharding.data_sharded(mesh))
    compiled = jax.jit(lambda v, x: net.apply(v, x, train=False)[0]).lower(v, frames).compile()
    run = lambda: compiled(v, frames)
  else:
    raise ValueError(kind)
  row['compile_s'] = time.perf_counter() - t0
  if kind == 'tdmi_e2e':
    # Warm-up on the batch already fetched, then the timed loop on fresh batches.
    jax.block_until_ready(run())
    wait = 0.0
    t = time.perf_counter()
    for _ in range(steps):
      w0 = time.perf_counter()
      host_batch = next(iterator)
      wait += time.perf_counter() - w0
      holder[0] = compiled(holder[0], sharding.shard_batch(
          host_batch, mesh, train_step_lib.TRAIN_KEYS))[0]
    jax.block_until_ready(holder[0])
    row['step_s'] = (time.perf_counter() - t) / steps
    extra['input_wait_s'] = wait / steps
    iterator.close()
  else:
    row['step_s'] = _time(run, steps)
  flops = _flops(compiled)  # One device's program.
  peak = peak_flops(jax.devices()[0].device_kind, dtype)
  row.update(
      examples_s=batch_size / row['step_s'],
      gflop_per_step=None if flops is None else flops * num_devices / 1e9,
      gflops_s=None if flops is None else flops * num_devices / row['step_s'] / 1e9,
      mfu=None if flops is None or peak is None else flops / row['step_s'] / peak,
      xla_mem_bytes=_memory(compiled),
      device_peak_bytes=_device_peak(mesh.devices.flat),
      **extra)
  return row


def _fmt(value, spec, scale=1.0, unit=''):
  return 'n/a' if value is None else f'{value * scale:{spec}}{unit}'


def _line(row, isolated):
  head = (f"{row['kind']:13s} {row['dtype']:8s} batch={row['batch']} "
          f"devices={row['devices']}")
  if row['status'] != 'ok':
    return f"{head} {row['status'].upper()}" + (f": {row['error']}" if row.get('error') else '')
  peak_name = 'device_peak' if isolated or row['device_peak_bytes'] is None else (
      'device_peak_cumulative')
  line = (f"{head} compile={row['compile_s']:7.1f}s step={row['step_s']:8.3f}s "
          f"examples/s={row['examples_s']:7.2f} GFLOP/s={_fmt(row['gflops_s'], '7.1f')} "
          f"MFU={_fmt(row['mfu'], '.1f', 100, '%')} "
          f"xla_peak_mem_per_device={_fmt(row['xla_mem_bytes'], '.1f', 2**-20, 'MiB')} "
          f"{peak_name}={_fmt(row['device_peak_bytes'], '.1f', 2**-20, 'MiB')}")
  if 'input_wait_s' in row:
    line += (f" input_wait/step={row['input_wait_s']:.3f}s "
             f"data_prep={row['data_prep_s']:.1f}s")
  return line


def _run_row(spec, isolate):
  """Measures one row in this process or in a child process; OOM becomes a status."""
  if not isolate:
    try:
      return measure(**spec)
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e):
        return dict(spec, status='oom', error=str(e).splitlines()[0][:200])
      raise
  argv = [a for a in sys.argv[1:] if not a.startswith('--row')]
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                         '--row=' + json.dumps(spec)], capture_output=True, text=True,
                        check=False)
  for line in proc.stdout.splitlines():
    if line.startswith('ROW '):
      return json.loads(line[4:])
  # No row: the child died, e.g. killed by the kernel for host memory, or failed.
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  status = 'oom' if proc.returncode in (-9, 137) or any(map(_is_oom_text, tail)) else 'error'
  return dict(spec, status=status, error=f'rc={proc.returncode} ' + ' | '.join(tail)[-300:])


def _is_oom_text(text):
  return _is_oom(Exception(text))


def _child(spec):
  try:
    row = measure(**spec)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    row = dict(spec, status='oom', error=str(e).splitlines()[0][:200])
  print('ROW ' + json.dumps(row), flush=True)


def _table(rows):
  """The rows as a Markdown table (what BENCHMARKS.md records)."""
  out = ['| measurement | dtype | batch | devices | compile s | step s | examples/s | '
         'GFLOP/s | MFU | XLA MiB/device | peak MiB/device |',
         '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if r['status'] != 'ok':
      out.append(f"| {r['kind']} | {r['dtype']} | {r['batch']} | {r['devices']} | "
                 f"{r['status'].upper()} | | | | | | |")
      continue
    out.append(
        f"| {r['kind']} | {r['dtype']} | {r['batch']} | {r['devices']} | "
        f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {r['examples_s']:.2f} | "
        f"{_fmt(r['gflops_s'], '.1f')} | {_fmt(r['mfu'], '.1f', 100, '%')} | "
        f"{_fmt(r['xla_mem_bytes'], '.0f', 2**-20)} | "
        f"{_fmt(r['device_peak_bytes'], '.0f', 2**-20)} |")
  return '\n'.join(out)


def main():
  if ARGS.row:
    _child(json.loads(ARGS.row))
    return
  n_local = jax.local_device_count()
  devices = [n_local if d == 'all' else int(d) for d in ARGS.devices.split(',')]
  devices = list(dict.fromkeys(d for d in devices if d <= n_local)) or [1]
  batches = [int(b) for b in ARGS.batches.split(',')]
  kinds = ARGS.kinds.split(',')
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f'--kinds: unknown kind {k!r}; known: {KINDS}')
  isolate = {'yes': True, 'no': False}.get(ARGS.isolate, not _on_cpu())
  max_batch = ARGS.max_batch if ARGS.max_batch >= 0 else (4 if _on_cpu() else 0)
  kind0 = jax.devices()[0].device_kind
  print(f'# {kind0} x{jax.device_count()}, {ARGS.variant} {ARGS.height}x{ARGS.width}, '
        f'dtypes {",".join(ARGS.dtypes)}, MI {ARGS.mi}, jax {jax.__version__}, '
        f'rows isolated: {isolate}'
        f'{", layers.materialize off" if ARGS.no_materialize else ""}', flush=True)
  rows = []

  def add(kind, batch, num_devices, dtype, steps=ARGS.steps):
    for r in rows:  # The sweep meets the batches measured already: not twice.
      if (r['kind'], r['batch'], r['devices'], r['dtype']) == (kind, batch, num_devices, dtype):
        return r
    row = _run_row(dict(kind=kind, batch_size=batch, num_devices=num_devices, dtype=dtype,
                        steps=steps), isolate)
    row.setdefault('batch', batch)
    row.setdefault('devices', num_devices)
    row.setdefault('kind', kind)
    row.setdefault('dtype', dtype)
    rows.append(row)
    print(_line(row, isolate), flush=True)
    return row

  for dtype in ARGS.dtypes:
    for b in batches:
      if 'tdmi_step' in kinds:
        add('tdmi_step', b, devices[0], dtype)
    kinds_batch = ARGS.kinds_batch or min(batches)
    for kind in kinds:
      if kind != 'tdmi_step':
        add(kind, kinds_batch, devices[0], dtype)
    scaling_batch = ARGS.scaling_batch or max(batches)
    for d in devices[1:]:
      add('tdmi_step', scaling_batch, d, dtype)
    if ARGS.e2e:
      n = jax.device_count()  # TrainData splits the global batch over every device.
      e2e_batch = ARGS.e2e_batch or max(batches)
      e2e_batch = -(-e2e_batch // n) * n
      add('tdmi_e2e', e2e_batch, n, dtype, ARGS.e2e_steps or ARGS.steps)
  for dtype in ARGS.dtypes if ARGS.sweep else ():
    b, fit, why = max(1, ARGS.sweep_start), None, ''
    while True:
      row = add('tdmi_step', b, devices[0], dtype)
      if row['status'] != 'ok':
        why = f"{row['status'].upper()} at batch {b}"
        break
      fit = b
      if max_batch and 2 * b > max_batch:
        why = f'stopped at --max_batch={max_batch}, no OOM'
        break
      b *= 2
    best = next((r for r in rows if r['kind'] == 'tdmi_step' and r['dtype'] == dtype
                 and r['batch'] == fit and r['devices'] == devices[0]), None)
    rate = f", {best['examples_s']:.2f} examples/s there" if best else ''
    print(f'# sweep {dtype} on {devices[0]} device(s): largest batch that fit: {fit} '
          f'({why}){rate}', flush=True)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'# process peak RSS {rss:.2f} GiB' + (' (this process; rows ran in children)'
                                               if isolate else ''), flush=True)
  print(_table(rows), flush=True)
  if ARGS.json:
    pathlib.Path(ARGS.json).write_text(json.dumps(
        {'device_kind': kind0, 'device_count': jax.device_count(), 'args': vars(ARGS),
         'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
