r"""The two deformable-conv forms (`model.dcn.impl`) side by side, in one run.

  python benchmarks/dcn_bench.py                     # the issue-12 case: B=8, W48 head
  python benchmarks/dcn_bench.py --batch=2 --step_batch=0   # quick look, op only

Two measurements, each for impl = gather (four gathers, plain autodiff) and lean (one
neighbourhood gather, recomputing VJP; the default), printed with lean/gather ratios:
  op    one DCN forward + backward (`jax.vjp` with a given output cotangent): x
        [B, H, W, C], 3x3 kernel C -> C, padding 1, G offset groups, offsets ~ U(-2, 2)
        and mask ~ U(0, 1) (defaults: B=8, 96x72x48, 12 groups: the W48 head's size);
  step  the frozen-backbone TDMI train step (`train_step.make_train_step`: loss, gradients,
        Adam update) at --step_batch fed with cached backbone outputs
        (`train_step.model_inputs`' 'backbone_outputs'), i.e. the head's step: the TDE,
        the appearance alignment and the fusion head, 8 DCNs.
For each: XLA's temporary memory (`compiled.memory_analysis().temp_size_in_bytes`), bytes
accessed and FLOPs (`compiled.cost_analysis()`), and the median wall time of --repeats runs
after one warm-up (--step_repeats for the step; 0 skips timing).

The lean backward loops over chunks of examples (`deform_conv._BWD_TAPS`), and XLA's cost
analysis counts a loop body once: the 'lean' cost columns would miss most of the backward.
So its bytes and FLOPs come from a second compilation with the whole batch in one chunk
(row 'lean/1chunk': same operations, no loop; its memory is that of the unchunked form).
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import bench_util  # noqa: E402
from configs import posetrack18
from tdmi_jax import sharding
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.models import deform_conv
from tdmi_jax.models import tdmi


def _args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=8, help='batch of the op measurement')
  p.add_argument('--size', default='96x72', help='HxW of the op input (and of the head maps)')
  p.add_argument('--channels', type=int, default=48)
  p.add_argument('--groups', type=int, default=12)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--step_batch', type=int, default=8, help='0 skips the train step')
  p.add_argument('--step_repeats', type=int, default=2)
  p.add_argument('--variant', default='hrnet_w48')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  return p.parse_args()


def _costs(compiled):
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'temp_mb': mem.temp_size_in_bytes / 1e6,
          'gbytes': float(cost.get('bytes accessed', float('nan'))) / 1e9,
          'gflop': float(cost.get('flops', float('nan'))) / 1e9}


def _median_time(run, repeats):
  if repeats <= 0:
    return float('nan')
  jax.block_until_ready(run())  # Warm-up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


class _OneChunk:
  """Context: the lean backward without its loop over examples (for the cost columns)."""

  def __enter__(self):
    self.saved = deform_conv._BWD_TAPS  # pylint: disable=protected-access
    deform_conv._BWD_TAPS = 1 << 62  # pylint: disable=protected-access

  def __exit__(self, *exc):
    deform_conv._BWD_TAPS = self.saved  # pylint: disable=protected-access


def _op_rows(args):
  h, w = (int(v) for v in args.size.lower().split('x'))
  b, c, g = args.batch, args.channels, args.groups
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, h, w, c)), dtype)
  offset = jnp.asarray(rng.uniform(-2, 2, size=(b, h, w, 2 * g * 9)), jnp.float32)
  mask = jnp.asarray(rng.uniform(0, 1, size=(b, h, w, g * 9)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, c, c)) / np.sqrt(9 * c), dtype)
  cot = jnp.asarray(rng.normal(size=(b, h, w, c)), dtype)
  inputs = (x, offset, mask, kernel, cot)
  rows = {}
  for name in ('gather', 'lean', 'lean/1chunk'):
    fn = deform_conv.IMPLS[name.split('/')[0]]

    def fwd_bwd(x, offset, mask, kernel, cot, fn=fn):
      out, vjp = jax.vjp(lambda *a: fn(*a, padding=1), x, offset, mask, kernel)
      return out, vjp(cot)

    if name == 'lean/1chunk':
      with _OneChunk():
        compiled = jax.jit(fwd_bwd).lower(*inputs).compile()
      rows[name] = _costs(compiled)
      rows[name]['time_s'] = float('nan')
      _row(name, rows[name])
      continue
    compiled = jax.jit(fwd_bwd).lower(*inputs).compile()
    rows[name] = _costs(compiled)
    rows[name]['time_s'] = _median_time(lambda c=compiled: c(*inputs), args.repeats)
    _row(name, rows[name])
  return rows


def _step_rows(args):
  h, w = (int(v) for v in args.size.lower().split('x'))
  b = args.step_batch
  rows = {}
  for name in ('gather', 'lean', 'lean/1chunk'):
    config = posetrack18.get_config(f'variant={args.variant}').copy_and_resolve_references()
    config.model.dtype = args.dtype
    config.model.dcn.impl = name.split('/')[0]
    model = tdmi.build_model(config.model)
    c, k = model.spec.width, config.model.num_joints
    mesh = sharding.make_mesh(jax.devices()[:1])
    # Variable shapes from the full model at a 4x input; random values (timing does not
    # depend on them; weights ~ N(0, 0.01) keep activations finite).
    shapes = jax.eval_shape(lambda m=model: m.init(
        jax.random.key(0), jnp.zeros((1, 5, 4 * h, 4 * w, 3)), train=False))
    variables = bench_util.random_variables(shapes)
    st, mask, tx, schedule = bench_util.train_state(config, variables, mesh)
    rng = np.random.default_rng(0)
    batch = {
        'backbone_heatmaps': rng.normal(size=(b, 5, h, w, k)).astype(np.float32),
        'backbone_features': tuple(rng.normal(size=(b, 5, h, w, c)).astype(np.float32)
                                   for _ in range(4)),
        'target': (rng.random((b, h, w, k)) * 0.1).astype(np.float32),
        'target_weight': np.ones((b, k), np.float32),
        'mask': np.ones((b,), np.float32)}
    batch = jax.device_put(batch, sharding.data_sharded(mesh))
    step = train_step_lib.make_train_step(model=model, config=config, tx=tx,
                                          schedule=schedule, mask=mask, mesh=mesh)
    if name == 'lean/1chunk':
      with _OneChunk():
        rows[name] = _costs(step.lower(st, batch).compile())
      rows[name]['time_s'] = float('nan')
      _row(name, rows[name])
      continue
    compiled = step.lower(st, batch).compile()
    rows[name] = _costs(compiled)
    holder = [st]

    def run(compiled=compiled, holder=holder):
      holder[0] = compiled(holder[0], batch)[0]  # The state is donated: thread it.
      return holder[0]

    rows[name]['time_s'] = _median_time(run, args.step_repeats)
    _row(name, rows[name])
  return rows


def _header(title):
  print(f'\n{title}')
  print('| impl | XLA temp MB | GB accessed | GFLOP | median s |')
  print('|---|---|---|---|---|', flush=True)


def _row(name, r):
  print(f'| {name} | {r["temp_mb"]:.0f} | {r["gbytes"]:.2f} | {r["gflop"]:.2f} | '
        f'{r["time_s"]:.3g} |', flush=True)


def _ratios(rows):
  g, lean, one = rows['gather'], rows['lean'], rows['lean/1chunk']
  print(f'lean/gather: temp {lean["temp_mb"] / g["temp_mb"]:.2f}x, '
        f'bytes (1chunk) {one["gbytes"] / g["gbytes"]:.2f}x, '
        f'FLOPs (1chunk) {one["gflop"] / g["gflop"]:.2f}x, '
        f'time {lean["time_s"] / g["time_s"]:.2f}x', flush=True)


def main():
  args = _args()
  print(f'# jax {jax.__version__} on {jax.devices()[0].device_kind}, dtype {args.dtype}; '
        f'op: B={args.batch} {args.size}x{args.channels}, {args.groups} groups, 3x3; '
        f'step: B={args.step_batch} {args.variant}', flush=True)
  _header('DCN op, forward + backward')
  _ratios(_op_rows(args))
  if args.step_batch > 0:
    _header(f'TDMI head train step (cached backbone outputs), B={args.step_batch}')
    _ratios(_step_rows(args))


if __name__ == '__main__':
  main()
