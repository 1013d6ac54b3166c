r"""Train-step time and memory of TDMI (default HRNet-W48 at 384x288), in one run:

  * tdmi_step        the real train step (frozen backbone: no backbone gradient/opt state)
  * tdmi_step_bb     the same step with model.backbone.frozen=False (backprop into HRNet)
  * tdmi_forward     TDMI forward only (eval mode)
  * backbone_fwd     HRNet forward only on the B*5 frames (what the frozen backbone costs)

and the frozen step's scaling from 1 to N devices at a fixed global batch.

  python benchmarks/train_bench.py                      # CPU: batch 1 and 2, 1 and 2 devices
  python benchmarks/train_bench.py --batches=8 --devices=1,8 --kinds=tdmi_step  # a GPU/TPU box

Prints one line per measurement (compile s, step s (median), examples/s, GFLOP/s from XLA's
cost analysis summed over devices, XLA's peak-memory estimate per device) and, on GPU/TPU,
the device's peak bytes in use. On CPU the simulated device count is set from --devices before JAX starts.
"""

import argparse
import os
import resource
import sys
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', default='hrnet_w48')
  p.add_argument('--height', type=int, default=384)
  p.add_argument('--width', type=int, default=288)
  p.add_argument('--batches', default='1,2', help='global batch sizes, comma separated')
  p.add_argument('--devices', default='1,2', help='device counts for the scaling rows')
  p.add_argument('--scaling_batch', type=int, default=0,
                 help='global batch of the scaling rows (default: the largest --batches)')
  p.add_argument('--kinds', default='tdmi_step,tdmi_step_bb,tdmi_forward,backbone_fwd')
  p.add_argument('--kinds_batch', type=int, default=0,
                 help='batch for the kinds other than tdmi_step (default: the smallest)')
  p.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  return p.parse_args()


ARGS = _args()
_MAX_DEVICES = max(int(d) for d in ARGS.devices.split(','))
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_MAX_DEVICES}')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from configs import posetrack18
from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.models import hrnet
from tdmi_jax.models import tdmi


def _config(frozen):
  config = posetrack18.get_config(f'variant={ARGS.variant}').copy_and_resolve_references()
  config.model.backbone.frozen = frozen
  config.model.dtype = ARGS.dtype
  config.data.image_size = (ARGS.height, ARGS.width)
  config.data.heatmap_size = (ARGS.height // 4, ARGS.width // 4)
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
  ma = compiled.memory_analysis()
  if ma is None:
    return float('nan')
  total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
           - ma.alias_size_in_bytes)
  return total / 2**30


def _flops(compiled):
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))
  except Exception:  # pylint: disable=broad-except
    return float('nan')


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
  """Random variables of the right shapes without compiling model.init (minutes for W48).

  Timing does not depend on the values; weights ~ N(0, 0.01) keep activations finite.
  """
  key = (config.model.variant, tuple(config.data.image_size))
  if key not in _VARIABLES:
    h, w = config.data.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, h, w, 3)),
                                               train=False))
    rng = np.random.default_rng(0)

    def fill(path, s):
      if jax.tree_util.keystr(path).endswith("['var']"):
        return np.ones(s.shape, s.dtype)
      return (rng.normal(size=s.shape) * 0.01).astype(s.dtype)

    _VARIABLES[key] = jax.tree_util.tree_map_with_path(fill, shapes)
  return _VARIABLES[key]


def measure(kind, batch_size, num_devices):
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  config = _config(frozen=kind != 'tdmi_step_bb')
  model = tdmi.build_model(config.model)
  h, w = config.data.image_size
  variables = _variables(model, config)
  batch = sharding.shard_batch(_batch(batch_size, config), mesh, train_step_lib.TRAIN_KEYS)
  t0 = time.perf_counter()
  if kind in ('tdmi_step', 'tdmi_step_bb'):
    mask = tdmi.trainable_mask(variables['params'], config.model)
    tx, schedule = optim.make_optimizer(config.optim, 1000)
    st = sharding.replicate(state_lib.create(variables, mask, tx), mesh)
    step = train_step_lib.make_train_step(model=model, config=config, tx=tx,
                                          schedule=schedule, mask=mask, mesh=mesh)
    compiled = step.lower(st, batch).compile()
    holder = [st]

    def run():
      holder[0] = compiled(holder[0], batch)[0]  # The state is donated: thread it.
      return holder[0]
  elif kind == 'tdmi_forward':
    v = sharding.replicate(variables, mesh)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)[0]).lower(
        v, batch['frames']).compile()
    run = lambda: compiled(v, batch['frames'])
  elif kind == 'backbone_fwd':
    net = hrnet.HRNet(hrnet.get_spec(config.model.variant), frozen_bn=True,
                      dtype=jnp.dtype(config.model.dtype))
    v = sharding.replicate({'params': variables['params']['backbone'],
                            'batch_stats': variables['batch_stats']['backbone']}, mesh)
    frames = jax.device_put(batch['frames'].reshape((-1, h, w, 3)),
                            sharding.data_sharded(mesh))
    compiled = jax.jit(lambda v, x: net.apply(v, x, train=False)[0]).lower(v, frames).compile()
    run = lambda: compiled(v, frames)
  else:
    raise ValueError(kind)
  compile_s = time.perf_counter() - t0
  step_s = _time(run, ARGS.steps)
  flops = _flops(compiled) * num_devices  # cost_analysis counts one device's program.
  row = (f'{kind:13s} batch={batch_size} devices={num_devices} compile={compile_s:7.1f}s '
         f'step={step_s:8.3f}s examples/s={batch_size / step_s:7.2f} '
         f'GFLOP/s={flops / step_s / 1e9:7.1f} '
         f'xla_peak_mem_per_device={_memory(compiled):6.2f}GiB')
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row += f' device_peak={stats["peak_bytes_in_use"] / 2**30:.2f}GiB'
  print(row, flush=True)


def main():
  batches = [int(b) for b in ARGS.batches.split(',')]
  devices = [int(d) for d in ARGS.devices.split(',')]
  kinds = ARGS.kinds.split(',')
  print(f'# {jax.devices()[0].device_kind} x{jax.device_count()}, {ARGS.variant} '
        f'{ARGS.height}x{ARGS.width}, dtype {ARGS.dtype}, jax {jax.__version__}', flush=True)
  for b in batches:
    if 'tdmi_step' in kinds:
      measure('tdmi_step', b, devices[0])
  kinds_batch = ARGS.kinds_batch or min(batches)
  for kind in kinds:
    if kind != 'tdmi_step':
      measure(kind, kinds_batch, devices[0])
  scaling_batch = ARGS.scaling_batch or max(batches)
  for d in devices[1:]:
    measure('tdmi_step', scaling_batch, d)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'# process peak RSS {rss:.2f} GiB', flush=True)


if __name__ == '__main__':
  main()
