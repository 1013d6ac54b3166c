r"""Forward time, compile time, memory and achieved GFLOP/s of TDMI and of its backbone.

  python benchmarks/model_bench.py --variant=hrnet_w48 --batch=1,4 --size=384x288

For every batch size B it compiles and times (eval mode, jitted, one device):
  tdmi      the full model on frames [B, 5, H, W, 3];
  backbone  HRNet alone on the same B*5 frames (the share of the backbone in TDMI).
Compile time (lower + compile) is reported apart from the forward time (median of
--repeats runs after one warm-up run). Memory is XLA's buffer assignment for the compiled
program (arguments + outputs + temporaries - aliased), i.e. the peak the program needs;
the process' peak RSS is printed at the end. FLOPs come from XLA's cost analysis of the
compiled program (2 per multiply-add), GFLOP/s = FLOPs / forward time.

Weights are random with fan-in scaling (not the N(0, 0.001) training init) so activations
have realistic magnitudes: timings do not depend on the values otherwise. Small runs:
`--variant=tiny --batch=1 --size=64x32`.
"""

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from configs import common  # noqa: E402
from tdmi_jax.models import hrnet  # noqa: E402
from tdmi_jax.models import tdmi  # noqa: E402


def _random_variables(module, *args):
  """Variables with the module's structure: fan-in scaled kernels, unit BN statistics."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, train=False))
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2.0 / fan_in), s.shape), s.dtype)
    if name in ('scale', 'var'):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _measure(fn, variables, x, repeats):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(variables, x).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(variables, x))  # Warm-up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, x))
    times.append(time.perf_counter() - t0)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) if mem is not None else float('nan')
  return dict(compile_s=compile_s, forward_s=statistics.median(times), flops=flops,
              peak_bytes=peak, temp_bytes=mem.temp_size_in_bytes if mem else float('nan'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='hrnet_w48', choices=sorted(hrnet.VARIANTS))
  parser.add_argument('--batch', default='1,4', help='comma-separated batch sizes')
  parser.add_argument('--size', default='384x288', help='HxW of the input crop')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--parts', default='tdmi,backbone')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  args = parser.parse_args()
  h, w = (int(v) for v in args.size.lower().split('x'))
  cfg = common.model_config(args.variant)
  cfg.dtype = args.dtype
  model = tdmi.build_model(cfg)
  backbone = hrnet.HRNet(model.spec, num_joints=cfg.num_joints, frozen_bn=True,
                         dtype=model.dtype)
  print(f'# jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'variant={args.variant}, input {h}x{w}, dtype={args.dtype}, repeats={args.repeats}')
  print('| part | batch | frames | compile s | forward s | ms/frame | GFLOP | GFLOP/s '
        '| XLA peak MiB |')
  print('|---|---|---|---|---|---|---|---|---|')
  for b in (int(v) for v in args.batch.split(',')):
    frames = jnp.asarray(np.random.default_rng(1).normal(size=(b, 5, h, w, 3)), jnp.float32)
    for part in args.parts.split(','):
      if part == 'tdmi':
        module, x = model, frames
      elif part == 'backbone':
        module, x = backbone, frames.reshape(b * 5, h, w, 3)
      else:
        raise ValueError(f'--parts: unknown part {part!r} (tdmi, backbone)')
      variables = _random_variables(module, x)
      r = _measure(lambda v, x, m=module: m.apply(v, x, train=False), variables, x,
                   args.repeats)
      print(f'| {part} | {b} | {b * 5} | {r["compile_s"]:.1f} | {r["forward_s"]:.3g} | '
            f'{1e3 * r["forward_s"] / (b * 5):.0f} | {r["flops"] / 1e9:.4g} | '
            f'{r["flops"] / 1e9 / r["forward_s"]:.1f} | {r["peak_bytes"] / 2**20:.0f} |',
            flush=True)
  print(f'# process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB')


if __name__ == '__main__':
  main()
