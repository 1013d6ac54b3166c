"""Modulated deformable conv against lax.conv, a NumPy loop, and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmi_jax.models import deform_conv


def _conv(x, kernel, stride, padding, dilation):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding),) * 2, rhs_dilation=(dilation,) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')


def _out_size(n, k, stride, padding, dilation):
  return (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _bilinear(img, y, x):
  """torchvision's bilinear_interpolate: img [H, W], zero outside, partial corners kept."""
  h, w = img.shape
  if y <= -1 or y >= h or x <= -1 or x >= w:
    return 0.0
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  ly, lx = y - y0, x - x0
  val = 0.0
  for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                     (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
    if 0 <= yy < h and 0 <= xx < w:
      val += wt * img[yy, xx]
  return val


def _reference(x, offset, mask, kernel, stride, padding, dilation):
  """Slow loop straight from the definition, torchvision channel layouts."""
  b, h, w, c = x.shape
  kh, kw, _, cout = kernel.shape
  ho, wo = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
  g = offset.shape[-1] // (2 * kh * kw)
  cg = c // g
  out = np.zeros((b, ho, wo, cout))
  for n in range(b):
    for oy in range(ho):
      for ox in range(wo):
        for ch in range(c):
          grp = ch // cg
          for i in range(kh):
            for j in range(kw):
              k = i * kw + j
              dy = offset[n, oy, ox, grp * 2 * kh * kw + 2 * k]
              dx = offset[n, oy, ox, grp * 2 * kh * kw + 2 * k + 1]
              m = mask[n, oy, ox, grp * kh * kw + k]
              v = _bilinear(x[n, :, :, ch], oy * stride - padding + i * dilation + dy,
                            ox * stride - padding + j * dilation + dx)
              out[n, oy, ox] += m * v * kernel[i, j, ch]
  return out


@pytest.mark.parametrize('stride,padding,dilation,groups', [
    (1, 1, 1, 1), (1, 3, 3, 4), (2, 1, 1, 2), (1, 0, 2, 2)])
def test_zero_offsets_unit_mask_equal_conv(stride, padding, dilation, groups):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 8, 8)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 8, 5)).astype(np.float32)
  ho, wo = _out_size(9, 3, stride, padding, dilation), _out_size(8, 3, stride, padding, dilation)
  offset = jnp.zeros((2, ho, wo, 2 * groups * 9))
  mask = jnp.ones((2, ho, wo, groups * 9))
  got = deform_conv.deform_conv2d(x, offset, mask, kernel, stride=stride, padding=padding,
                                  dilation=dilation)
  np.testing.assert_allclose(got, _conv(x, kernel, stride, padding, dilation), rtol=1e-5,
                             atol=1e-5)
  got_v1 = deform_conv.deform_conv2d(x, offset, None, kernel, stride=stride, padding=padding,
                                     dilation=dilation)
  np.testing.assert_allclose(got_v1, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('stride,padding,dilation,groups', [
    (1, 1, 1, 1), (1, 2, 2, 2), (2, 1, 1, 4), (1, 3, 3, 2)])
def test_random_offsets_equal_numpy_loop(stride, padding, dilation, groups):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 6, 5, 4))
  kernel = rng.normal(size=(3, 3, 4, 3))
  ho, wo = _out_size(6, 3, stride, padding, dilation), _out_size(5, 3, stride, padding, dilation)
  # Fractional offsets up to +-4 px: many taps land partly or wholly outside the image.
  offset = rng.uniform(-4, 4, size=(1, ho, wo, 2 * groups * 9))
  mask = rng.uniform(-1, 2, size=(1, ho, wo, groups * 9))
  want = _reference(x, offset, mask, kernel, stride, padding, dilation)
  f = jax.jit(lambda *a: deform_conv.deform_conv2d(*a, stride=stride, padding=padding,
                                                   dilation=dilation))
  got = f(*(jnp.asarray(a, jnp.float32) for a in (x, offset, mask, kernel)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_integer_offset_shifts_input():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 7, 6, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
  # No padding: with it, output column 0's left tap would read x[:, :, 0] at x = -1 + 1,
  # where the shifted input's conv reads padding.
  offset = np.zeros((1, 5, 4, 2 * 2 * 9), np.float32)
  offset[..., 1::2] = 1.0  # dx = +1 for every group and tap.
  got = deform_conv.deform_conv2d(x, offset, np.ones((1, 5, 4, 18), np.float32), kernel)
  shifted = np.zeros_like(x)
  shifted[:, :, :-1] = x[:, :, 1:]  # Sampling at x+1 reads the input moved left by one.
  np.testing.assert_allclose(got, _conv(shifted, kernel, 1, 0, 1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, _conv(x, kernel, 1, 0, 1), rtol=1e-3)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(1, 5, 4, 4)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 2)))
    # Keep sample positions 0.2..0.8 away from integers: bilinear is smooth there.
    offset = jnp.asarray(rng.integers(-2, 2, size=(1, 5, 4, 36))
                         + rng.uniform(0.2, 0.8, size=(1, 5, 4, 36)))
    mask = jnp.asarray(rng.uniform(0, 1, size=(1, 5, 4, 18)))
    probe = jnp.asarray(rng.normal(size=(1, 5, 4, 2)))

    def loss(x, offset, mask, kernel):
      return jnp.sum(probe * deform_conv.deform_conv2d(x, offset, mask, kernel, padding=1))

    args = (x, offset, mask, kernel)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    eps = 1e-6
    for a, (arg, grad) in enumerate(zip(args, grads)):
      assert grad.dtype == jnp.float64
      direction = jnp.asarray(rng.normal(size=arg.shape))
      plus = list(args)
      minus = list(args)
      plus[a] = arg + eps * direction
      minus[a] = arg - eps * direction
      numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=1e-6, atol=1e-8)
      assert float(jnp.abs(grad).max()) > 0


def test_module_starts_near_zero_and_checks_groups():
  layer = deform_conv.ModulatedDeformConv(8, padding=3, dilation=3, offset_groups=2)
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 8))
  params = layer.init(jax.random.key(1), x, x)
  out = layer.apply(params, x, x)
  assert out.shape == (2, 6, 5, 8)
  assert params['params']['conv_offset']['kernel'].shape == (3, 3, 8, 36)
  assert params['params']['conv_mask']['kernel'].shape == (3, 3, 8, 18)
  plain = deform_conv.deform_conv2d(x, jnp.zeros((2, 6, 5, 36)), None,
                                    params['params']['kernel'], padding=3, dilation=3)
  # The near-zero mask scales the output to a few percent of the same conv unmodulated.
  assert float(jnp.abs(out).max()) < 0.05 * float(jnp.abs(plain).max())
  sig = deform_conv.ModulatedDeformConv(8, offset_groups=2, mask_activation='sigmoid')
  assert sig.apply(params, x, x).shape == (2, 6, 5, 8)
  with pytest.raises(ValueError, match='offset groups'):
    deform_conv.ModulatedDeformConv(8, offset_groups=3).init(jax.random.key(1), x, x)
