r"""A 3x3 conv's kernel gradient on XLA:CPU: autodiff's convolution against 9 dots, one per tap;
and a DCN's offset and mask convs as two convs against one.

  python benchmarks/conv_grad_bench.py

Shapes of the TDMI-W48 head at 384x288 (96x72 maps): a 48->48 conv at batch 1 and 5, and
an offset conv (48->216, dilation 3) at batch 1. "conv" is `jax.vjp` of
`lax.conv_general_dilated` with respect to the kernel (what training runs today); "9 dots"
sums, per tap, shifted-input^T @ output-gradient. Both are checked equal first. Median of
--repeats calls after a warm-up; GFLOP/s counts 2*B*H*W*Ci*Co*9.

Second table: the forward and backward (`jax.vjp`, all inputs) of a ModulatedDeformConv's
offset (48 -> 216) and mask (48 -> 108) convs, dilation 3, on the same context map: as the
model runs them (two convs) and as one conv of the concatenated kernels (324 outputs, then
split), checked equal first.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _conv(x, w, d):
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(d, d), (d, d)], rhs_dilation=(d, d),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _taps(x, dy, d):
  _, h, w, ci = x.shape
  co = dy.shape[-1]
  xp = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
  rows = dy.reshape(-1, co)
  return jnp.stack([xp[:, i * d:i * d + h, j * d:j * d + w, :].reshape(-1, ci).T @ rows
                    for i in range(3) for j in range(3)]).reshape(3, 3, ci, co)


def _median(f, args, repeats):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  print('| B, H, W, Ci -> Co, dilation | conv ms | conv GFLOP/s | 9 dots ms | 9 dots GFLOP/s '
        '| conv / 9 dots |')
  print('|---|---|---|---|---|---|')
  for b, h, w, ci, co, d in ((1, 96, 72, 48, 48, 1), (1, 96, 72, 48, 216, 3),
                             (5, 96, 72, 48, 48, 1)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, ci)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(b, h, w, co)), jnp.float32)
    w0 = jnp.zeros((3, 3, ci, co), jnp.float32)
    conv = jax.jit(lambda x, dy, d=d: jax.vjp(lambda k: _conv(x, k, d), w0)[1](dy)[0])
    taps = jax.jit(lambda x, dy, d=d: _taps(x, dy, d))
    np.testing.assert_allclose(taps(x, dy), conv(x, dy), rtol=1e-3, atol=1e-2)
    gflop = 2 * b * h * w * ci * co * 9 / 1e9
    tc, tt = _median(conv, (x, dy), args.repeats), _median(taps, (x, dy), args.repeats)
    print(f'| {b}, {h}, {w}, {ci} -> {co}, {d} | {tc * 1e3:.1f} | {gflop / tc:.0f} | '
          f'{tt * 1e3:.1f} | {gflop / tt:.0f} | {tc / tt:.2f} |')
  _offset_mask_pair(args.repeats)


def _offset_mask_pair(repeats):
  def two(x, w1, b1, w2, b2):
    return _conv(x, w1, 3) + b1, _conv(x, w2, 3) + b2

  def one(x, w1, b1, w2, b2):
    y = _conv(x, jnp.concatenate([w1, w2], -1), 3) + jnp.concatenate([b1, b2])
    return y[..., :w1.shape[-1]], y[..., w1.shape[-1]:]

  print('\n| B | two convs ms | one conv ms | one / two |')
  print('|---|---|---|---|')
  for b in (1, 2):
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    args = (r(b, 96, 72, 48), r(3, 3, 48, 216), r(216), r(3, 3, 48, 108), r(108))
    cots = (r(b, 96, 72, 216), r(b, 96, 72, 108))
    fns = [jax.jit(lambda *a, f=f: jax.vjp(f, *a)[1](cots)) for f in (two, one)]
    for g_two, g_one in zip(fns[0](*args), fns[1](*args)):
      np.testing.assert_allclose(g_one, g_two, rtol=1e-4, atol=1e-3 * float(jnp.abs(g_two).max()))
    t_two, t_one = (_median(f, args, repeats) for f in fns)
    print(f'| {b} | {t_two * 1e3:.1f} | {t_one * 1e3:.1f} | {t_one / t_two:.2f} |')


if __name__ == '__main__':
  main()
