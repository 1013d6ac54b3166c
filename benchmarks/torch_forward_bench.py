r"""HRNet eval forward: JAX unfolded vs JAX with BatchNorm folded vs the PyTorch network.

  python benchmarks/torch_forward_bench.py --variant=hrnet_w48 --batch=1,5 --size=384x288

Needs the torch extra (`pip install -r requirements-torch.txt`). One process, same weights
everywhere: a PyTorch pose_hrnet with the official module names (the reference network
of tests/test_convert_torch.py) gets random weights and BN statistics, and its state_dict
is imported with `convert_torch.convert_state_dict`. Variants, all returning heatmaps only:

  torch           the PyTorch network, eval, `torch.inference_mode`, NCHW float32;
  jax             `hrnet.HRNet` on running statistics (conv, then BN), jitted;
  jax_folded      `HRNet(bn_folded=True)` on `hrnet.fold_batch_norm` of the same variables,
                  folded once outside the timed function (what inference can do);
  jax_fold_in_jit the fold inside the jitted function on every call (what TDMI's eval
                  forward and the frozen-backbone train step do).

Interleaved rounds: every round times one call of each variant in turn, so load from other
processes hits all of them alike; the figure is the median over --rounds after one
warm-up call each. Ratios are JAX / PyTorch medians. Outputs are compared once (max abs
difference relative to the heatmaps' range). XLA flags (e.g. XLA_FLAGS=--xla_cpu_use_onednn)
are process-wide, so compare them by running the script under each and reading the ratios.

`--train_step` also times the real frozen-backbone TDMI train step
(`train_step.make_train_step`, model.backbone.fold_bn True vs False, same variables), in
interleaved rounds of --train_rounds steps each.
"""

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from tdmi_jax import convert_torch  # noqa: E402
from tdmi_jax.models import hrnet  # noqa: E402


def _torch_reference():
  """The PyTorch pose_hrnet of the parity tests (official module names), or a clear exit."""
  if importlib.util.find_spec('torch') is None:
    sys.exit('This benchmark needs PyTorch: pip install -r requirements-torch.txt')
  from tests import test_convert_torch as torch_ref
  return torch_ref


def _forward_variants(spec, torch_net):
  """name -> prepare(x NHWC numpy) -> (run() returning heatmaps, XLA cost or None)."""
  import torch
  params, stats = convert_torch.convert_state_dict(torch_net.state_dict(), spec)
  variables = jax.device_put({'params': params, 'batch_stats': stats})
  folded = jax.block_until_ready(jax.jit(hrnet.fold_batch_norm)(variables))
  net = hrnet.HRNet(spec, frozen_bn=True)
  net_folded = hrnet.HRNet(spec, frozen_bn=True, bn_folded=True)
  jax_fn = jax.jit(lambda v, x: net.apply(v, x, train=False)[0])
  folded_fn = jax.jit(lambda v, x: net_folded.apply(v, x, train=False)[0])
  in_jit_fn = jax.jit(
      lambda v, x: net_folded.apply(hrnet.fold_batch_norm(v), x, train=False)[0])

  def torch_run(x_nchw):
    with torch.inference_mode():
      return torch_net(x_nchw)

  def compiled(fn, v):
    """prepare(x): compile `fn` once for x's shape; run() then calls that executable."""
    def prepare(x):
      x = jax.device_put(x)
      exe = fn.lower(v, x).compile()  # Variables stay arguments, not folded constants.
      cost = exe.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return (lambda: exe(v, x)), cost
    return prepare

  def torch_prepare(x):
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return (lambda: torch_run(x)), None

  return {
      'torch': torch_prepare,
      'jax': compiled(jax_fn, variables),
      'jax_folded': compiled(folded_fn, folded),
      'jax_fold_in_jit': compiled(in_jit_fn, variables),
  }


def _block(y):
  return jax.block_until_ready(y) if isinstance(y, jax.Array) else y


def _to_nhwc(name, y):
  y = np.asarray(y)
  return y.transpose(0, 2, 3, 1) if name == 'torch' else y


def forward_bench(args, torch_ref):
  import torch
  spec = hrnet.get_spec(args.variant)
  h, w = (int(v) for v in args.size.lower().split('x'))
  torch_net = torch_ref._randomise(torch_ref.TorchPoseHRNet(spec), seed=0)  # pylint: disable=protected-access
  variants = _forward_variants(spec, torch_net)
  names = [n for n in args.variants.split(',')]
  for n in names:
    if n not in variants:
      raise ValueError(f'--variants: unknown {n!r}; known: {sorted(variants)}')
  print(f'# jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), {args.variant} {h}x{w}, float32, '
        f'rounds={args.rounds}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, '
        f'load average {os.getloadavg()[0]:.1f}', flush=True)
  print('| batch | ' + ' | '.join(f'{n} ms' for n in names) + ' | ' +
        ' | '.join(f'{n}/torch' for n in names if n != 'torch') + ' | max rel. diff vs torch |')
  print('|---' * (1 + 2 * len(names)) + '|')
  for b in (int(v) for v in args.batch.split(',')):
    x = np.random.default_rng(1).normal(size=(b, h, w, 3)).astype(np.float32)
    runs, outs, costs = {}, {}, []
    for n in names:  # Compile and warm up each variant, check the outputs agree.
      runs[n], cost = variants[n](x)
      outs[n] = _to_nhwc(n, _block(runs[n]()))
      if cost:  # XLA's own count for the compiled program: load-independent.
        costs.append(f'{n} {cost["flops"] / 1e9:.4g} GFLOP, '
                     f'{cost["bytes accessed"] / 1e9:.4g} GB')
    print(f'# batch {b}, XLA cost analysis: ' + '; '.join(costs), flush=True)
    ref = outs.get('torch', outs[names[0]])
    diff = max(float(np.abs(outs[n] - ref).max()) for n in names) / float(np.abs(ref).max())
    times = {n: [] for n in names}
    for _ in range(args.rounds):
      for n in names:
        t0 = time.perf_counter()
        _block(runs[n]())
        times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med.get('torch')
    ratios = [f'{med[n] / base:.2f}' if base else 'n/a' for n in names if n != 'torch']
    print(f'| {b} | ' + ' | '.join(f'{1e3 * med[n]:.0f}' for n in names) + ' | ' +
          ' | '.join(ratios) + f' | {diff:.1e} |', flush=True)
  print(f'# load average at the end {os.getloadavg()[0]:.1f}')


def train_step_bench(args):
  """Frozen-backbone TDMI train step with fold_bn on and off: interleaved, same state."""
  import bench_util
  from configs import posetrack18
  from tdmi_jax import sharding
  from tdmi_jax import train_step as train_step_lib
  from tdmi_jax.models import tdmi
  h, w = (int(v) for v in args.size.lower().split('x'))
  mesh = sharding.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = {'frames': rng.normal(size=(args.train_batch, 5, h, w, 3)).astype(np.float32),
           'target': rng.random((args.train_batch, h // 4, w // 4, 17)).astype(np.float32) * .1,
           'target_weight': np.ones((args.train_batch, 17), np.float32),
           'mask': np.ones((args.train_batch,), np.float32)}
  steps, variables = {}, None
  for fold in (False, True):
    config = posetrack18.get_config(f'variant={args.variant}').copy_and_resolve_references()
    config.model.backbone.frozen = True
    config.model.backbone.bn = 'frozen'
    config.model.backbone.fold_bn = fold
    config.data.image_size = (h, w)
    config.data.heatmap_size = (h // 4, w // 4)
    model = tdmi.build_model(config.model)
    if variables is None:  # Random values of the right shapes (timing does not read them).
      shapes = jax.eval_shape(lambda m=model: m.init(
          jax.random.key(0), jnp.zeros((1, 5, h, w, 3)), train=False))
      variables = bench_util.random_variables(shapes)
    st, mask, tx, schedule = bench_util.train_state(config, variables, mesh)
    sharded = sharding.shard_batch(batch, mesh, train_step_lib.TRAIN_KEYS)
    step = train_step_lib.make_train_step(model=model, config=config, tx=tx,
                                          schedule=schedule, mask=mask, mesh=mesh)
    t0 = time.perf_counter()
    compiled = step.lower(st, sharded).compile()
    compile_s = time.perf_counter() - t0
    holder = [jax.block_until_ready(compiled(st, sharded)[0])]  # Warm-up; state is donated.
    steps[fold] = (compiled, holder, sharded, compile_s)
  times = {False: [], True: []}
  for _ in range(args.train_rounds):
    for fold, (compiled, holder, sharded, _) in steps.items():
      t0 = time.perf_counter()
      holder[0] = jax.block_until_ready(compiled(holder[0], sharded)[0])
      times[fold].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f'# frozen-backbone TDMI train step, {args.variant} {h}x{w}, batch {args.train_batch}, '
        f'{args.train_rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f}')
  print('| fold_bn | compile s | step s (median) |')
  print('|---|---|---|')
  for fold in (False, True):
    print(f'| {fold} | {steps[fold][3]:.1f} | {med[fold]:.2f} |')
  print(f'# folded / unfolded step time: {med[True] / med[False]:.3f}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='hrnet_w48', choices=sorted(hrnet.VARIANTS))
  parser.add_argument('--batch', default='1,5', help='comma-separated batch sizes')
  parser.add_argument('--size', default='384x288', help='HxW of the input crop')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--variants', default='torch,jax,jax_folded,jax_fold_in_jit')
  parser.add_argument('--train_step', action='store_true',
                      help='also time the frozen-backbone train step, fold_bn on vs off')
  parser.add_argument('--train_batch', type=int, default=1)
  parser.add_argument('--train_rounds', type=int, default=3)
  parser.add_argument('--skip_forward', action='store_true')
  args = parser.parse_args()
  if not args.skip_forward:
    forward_bench(args, _torch_reference())
  if args.train_step:
    train_step_bench(args)
  print(f'# process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} '
        'MiB')


if __name__ == '__main__':
  main()
