r"""Where a compiled program's time goes, per fused op: the W48 train step or the HRNet forward.

  python benchmarks/op_profile.py --program=step          # frozen-backbone TDMI train step
  python benchmarks/op_profile.py --program=backbone      # HRNet forward (BN folded), 5 frames
  python benchmarks/op_profile.py --program=step --no_materialize   # the program before it

Runs the program a few times (wall time per call), then once under `jax.profiler` with a
perfetto trace, and sums each fused op's duration (thread time: the two cores' ops add up,
so the total exceeds the wall time). Each op is labelled from the compiled HLO: forward or
backward (the op_name of its root holds `transpose(` in the backward pass), backbone or head
(the module path), and its kind (convolution, gather, dot, elementwise). Prints the totals
per label group, the top fused ops by module, and the most conv outputs any elementwise
fusion reads (a recomputed residual chain shows as dozens; one epilogue reads one or two). `--no_materialize` makes
`layers.materialize` the identity, as `train_bench.py` does.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_util  # noqa: E402
from configs import posetrack18  # noqa: E402
from tdmi_jax import sharding  # noqa: E402
from tdmi_jax import train_step as train_step_lib  # noqa: E402
from tdmi_jax.models import hrnet  # noqa: E402
from tdmi_jax.models import layers  # noqa: E402
from tdmi_jax.models import tdmi  # noqa: E402

_KINDS = ('convolution', 'dot', 'gather', 'scatter')


def _program(args):
  """(compiled, arguments, one-call runner) of the requested program."""
  h, w = (int(v) for v in args.size.lower().split('x'))
  config = posetrack18.get_config(f'variant={args.variant}').copy_and_resolve_references()
  config.data.image_size, config.data.heatmap_size = (h, w), (h // 4, w // 4)
  model = tdmi.build_model(config.model)
  variables = bench_util.random_variables(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, h, w, 3)), train=False)))
  mesh = sharding.make_mesh(jax.devices()[:1])
  rng = jax.random.key(0)
  frames = jax.random.normal(rng, (args.batch, 5, h, w, 3))
  if args.program == 'backbone':
    net = hrnet.HRNet(model.spec, frozen_bn=True, bn_folded=True)
    v = jax.jit(hrnet.fold_batch_norm)({'params': variables['params']['backbone'],
                                         'batch_stats': variables['batch_stats']['backbone']})
    x = frames.reshape(-1, h, w, 3)
    compiled = jax.jit(lambda v, x: net.apply(v, x, train=False)[0]).lower(v, x).compile()
    return compiled, lambda: compiled(v, x)
  st, mask, tx, schedule = bench_util.train_state(config, variables, mesh)
  step = train_step_lib.make_train_step(model=model, config=config, tx=tx, schedule=schedule,
                                        mask=mask, mesh=mesh)
  batch = sharding.shard_batch({
      'frames': frames, 'target': jnp.zeros((args.batch, h // 4, w // 4, 17)) + 0.05,
      'target_weight': jnp.ones((args.batch, 17)), 'mask': jnp.ones((args.batch,))},
                               mesh, train_step_lib.TRAIN_KEYS)
  compiled = step.lower(st, batch).compile()
  holder = [st]

  def run():
    holder[0], metrics = compiled(holder[0], batch)  # The state is donated: thread it.
    return metrics
  return compiled, run


def _labels(hlo_text, backbone_only):
  """fused-op name -> (label, module, operand count) from the compiled HLO text."""
  bodies = dict(re.findall(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.M | re.S))
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*? fusion\((.*?)\), kind=[^\n]*'
                       r'calls=%?([\w.\-]+)', hlo_text, re.M):
    name, operands, body = m.group(1), m.group(2), bodies.get(m.group(3), '')
    ops = set(re.findall(r'= \S+ ([a-z][\w-]*)\(', body))
    kind = next((k for k in _KINDS if k in ops), 'elementwise')
    root = [line for line in body.split('\n') if 'ROOT' in line]
    names = re.findall(r'op_name="([^"]+)"', root[0] if root else '') or re.findall(
        r'op_name="([^"]+)"', body)
    path = names[0] if names else ''
    part = 'backbone' if backbone_only or '/backbone/' in path else 'head'
    module = '/'.join(p for p in re.sub(r'(transpose|jvp)\(|\)', '', path).split('/')[1:4])
    conv_inputs = sum(n.startswith(('ynn_fusion', 'convolution', 'conv_general'))
                      for n in re.findall(r'%([\w.\-]+)', operands))
    out[name] = (('bwd' if 'transpose(' in path else 'fwd', part, kind), module, conv_inputs)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--program', default='step', choices=['step', 'backbone'])
  parser.add_argument('--variant', default='hrnet_w48', choices=sorted(hrnet.VARIANTS))
  parser.add_argument('--size', default='384x288', help='HxW of the input crop')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--calls', type=int, default=3, help='timed calls after a warm-up')
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--no_materialize', action='store_true')
  args = parser.parse_args()
  if args.no_materialize:
    layers.materialize = lambda x: x
  t0 = time.perf_counter()
  compiled, run = _program(args)
  print(f'# {args.program}, {args.variant} {args.size}, batch {args.batch}, materialize '
        f'{"off" if args.no_materialize else "on"}; compile {time.perf_counter() - t0:.1f} s '
        f'(with variable set-up), load average {os.getloadavg()[0]:.1f}')
  jax.block_until_ready(run())
  times = []
  for _ in range(args.calls):
    t = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t)
  print(f'# wall per call: {", ".join(f"{t:.3f}" for t in times)} s (median '
        f'{sorted(times)[len(times) // 2]:.3f})')
  labels = _labels(compiled.as_text(), args.program == 'backbone')
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    jax.block_until_ready(run())
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  groups, modules, count = collections.Counter(), collections.Counter(), collections.Counter()
  widest = collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or e['name'] not in labels:
      continue
    group, module, operands = labels[e['name']]
    groups[group] += e['dur']
    modules[(group, module)] += e['dur']
    count[(group, module)] += 1
    if group[2] == 'elementwise':
      widest[group[1]] = max(widest[group[1]], operands)
  print(f'# fused ops: {sum(groups.values()) / 1e3:.1f} ms of thread time')
  print('| pass | part | kind | thread ms |')
  print('|---|---|---|---|')
  for (p, part, kind), v in groups.most_common():
    print(f'| {p} | {part} | {kind} | {v / 1e3:.1f} |')
  print(f'# top {args.top} by module (thread ms, fused ops):')
  for (group, module), v in modules.most_common(args.top):
    print(f'  {v / 1e3:8.1f}  {count[(group, module)]:4d}  {" ".join(group)}  {module}')
  print('# most conv outputs read by one elementwise fusion: ' +
        ', '.join(f'{part} {n}' for part, n in widest.most_common()))

if __name__ == '__main__':
  main()
