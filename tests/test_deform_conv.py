"""Modulated deformable conv against lax.conv, a NumPy loop, and finite differences.

Both forms (`deform_conv.IMPLS`: 'gather', the autodiff one, and 'lean', one gather with a
recomputing VJP) run every reference test; the lean form's gradients are also checked
against the gather form's, in bf16, and with its backward loop over examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tdmi_jax.models import deform_conv
from tdmi_jax.models import tdmi

IMPLS = sorted(deform_conv.IMPLS)


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


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride,padding,dilation,groups', [
    (1, 1, 1, 1), (1, 3, 3, 4), (2, 1, 1, 2), (1, 0, 2, 2)])
def test_zero_offsets_unit_mask_equal_conv(stride, padding, dilation, groups, impl):
  dcn = deform_conv.IMPLS[impl]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 8, 8)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 8, 5)).astype(np.float32)
  ho, wo = _out_size(9, 3, stride, padding, dilation), _out_size(8, 3, stride, padding, dilation)
  offset = jnp.zeros((2, ho, wo, 2 * groups * 9))
  mask = jnp.ones((2, ho, wo, groups * 9))
  got = dcn(x, offset, mask, kernel, stride=stride, padding=padding, dilation=dilation)
  np.testing.assert_allclose(got, _conv(x, kernel, stride, padding, dilation), rtol=1e-5,
                             atol=1e-5)
  got_v1 = dcn(x, offset, None, kernel, stride=stride, padding=padding, dilation=dilation)
  np.testing.assert_allclose(got_v1, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride,padding,dilation,groups', [
    (1, 1, 1, 1), (1, 2, 2, 2), (2, 1, 1, 4), (1, 3, 3, 2)])
def test_random_offsets_equal_numpy_loop(stride, padding, dilation, groups, impl):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 6, 5, 4))
  kernel = rng.normal(size=(3, 3, 4, 3))
  ho, wo = _out_size(6, 3, stride, padding, dilation), _out_size(5, 3, stride, padding, dilation)
  # Fractional offsets up to +-4 px: many taps land partly or wholly outside the image.
  offset = rng.uniform(-4, 4, size=(1, ho, wo, 2 * groups * 9))
  mask = rng.uniform(-1, 2, size=(1, ho, wo, groups * 9))
  want = _reference(x, offset, mask, kernel, stride, padding, dilation)
  f = jax.jit(lambda *a: deform_conv.IMPLS[impl](*a, stride=stride, padding=padding,
                                                 dilation=dilation))
  got = f(*(jnp.asarray(a, jnp.float32) for a in (x, offset, mask, kernel)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', IMPLS)
def test_integer_offset_shifts_input(impl):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 7, 6, 4)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
  # No padding: with it, output column 0's left tap would read x[:, :, 0] at x = -1 + 1,
  # where the shifted input's conv reads padding.
  offset = np.zeros((1, 5, 4, 2 * 2 * 9), np.float32)
  offset[..., 1::2] = 1.0  # dx = +1 for every group and tap.
  got = deform_conv.IMPLS[impl](x, offset, np.ones((1, 5, 4, 18), np.float32), kernel)
  shifted = np.zeros_like(x)
  shifted[:, :, :-1] = x[:, :, 1:]  # Sampling at x+1 reads the input moved left by one.
  np.testing.assert_allclose(got, _conv(shifted, kernel, 1, 0, 1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, _conv(x, kernel, 1, 0, 1), rtol=1e-3)


@pytest.mark.parametrize('impl', IMPLS)
def test_gradients_match_finite_differences(impl):
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
      return jnp.sum(probe * deform_conv.IMPLS[impl](x, offset, mask, kernel, padding=1))

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


def _random_case(rng, b, h, w, c, cout, groups, stride, padding, dilation, dtype=np.float32):
  ho, wo = _out_size(h, 3, stride, padding, dilation), _out_size(w, 3, stride, padding, dilation)
  x = rng.normal(size=(b, h, w, c))
  kernel = rng.normal(size=(3, 3, c, cout)) / np.sqrt(9 * c)
  # Fractional offsets up to +-4 px: taps wholly inside, straddling the border and wholly
  # outside the image.
  offset = rng.uniform(-4, 4, size=(b, ho, wo, 2 * groups * 9))
  mask = rng.uniform(-1, 2, size=(b, ho, wo, groups * 9))
  return tuple(jnp.asarray(a, dtype) for a in (x, offset, mask, kernel))


@pytest.mark.parametrize('stride,padding,dilation,groups,with_mask', [
    (1, 1, 1, 1, True), (1, 3, 3, 4, True), (2, 1, 1, 2, True), (1, 0, 2, 2, False)])
def test_lean_gradients_equal_gather_gradients(stride, padding, dilation, groups, with_mask):
  rng = np.random.default_rng(4)
  x, offset, mask, kernel = _random_case(rng, 2, 7, 6, 8, 5, groups, stride, padding, dilation)
  mask = mask if with_mask else None
  out = deform_conv.deform_conv2d(x, offset, mask, kernel, stride=stride, padding=padding,
                                  dilation=dilation)
  probe = jnp.asarray(rng.normal(size=out.shape), jnp.float32)

  def grads(impl):
    def loss(x, offset, mask, kernel):
      return jnp.sum(probe * deform_conv.IMPLS[impl](x, offset, mask, kernel, stride=stride,
                                                     padding=padding, dilation=dilation))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, offset, mask, kernel)

  want, got = grads('gather'), grads('lean')
  assert (got[2] is None) == (mask is None)
  for name, g, ref in zip(('x', 'offset', 'mask', 'kernel'), got, want):
    if ref is None:
      continue
    assert g.dtype == ref.dtype and g.shape == ref.shape, name
    assert float(jnp.abs(ref).max()) > 0, name
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()),
                               err_msg=name)


def test_lean_backward_loop_over_examples(monkeypatch):
  """With the chunk limit below one example's taps, the backward loops one example at a
  time; the gradients do not change."""
  rng = np.random.default_rng(6)
  args = _random_case(rng, 3, 6, 5, 4, 3, 2, 1, 1, 1)
  probe = jnp.asarray(rng.normal(size=(3, 6, 5, 3)), jnp.float32)
  loss = lambda *a: jnp.sum(probe * deform_conv.deform_conv2d_lean(*a, padding=1))
  whole = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
  assert deform_conv._bwd_chunk(3, 6 * 5 * 18) == 3
  monkeypatch.setattr(deform_conv, '_BWD_TAPS', 6 * 5 * 18)  # One example's taps.
  assert deform_conv._bwd_chunk(3, 6 * 5 * 18) == 1
  looped = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(looped, whole):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lean_bf16_input_gradient_accumulates_in_float32():
  rng = np.random.default_rng(5)
  x, offset, mask, kernel = _random_case(rng, 2, 12, 10, 16, 8, 4, 1, 1, 1)
  x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  mask = jnp.abs(mask)
  probe = jnp.asarray(rng.normal(size=(2, 12, 10, 8)), jnp.float32)

  def grad_x(impl, x, kernel):
    loss = lambda x: jnp.sum(probe * deform_conv.IMPLS[impl](
        x, offset, mask, kernel, padding=1).astype(jnp.float32))
    return jax.grad(loss)(x)

  # The same bf16-rounded inputs, all in float32.
  ref = grad_x('gather', x.astype(jnp.float32), kernel.astype(jnp.float32))
  err = {}
  for impl in IMPLS:
    g = grad_x(impl, x, kernel)
    assert g.dtype == jnp.bfloat16
    err[impl] = float(jnp.abs(g.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  # The lean form rounds once at the end (bf16's 2^-9 relative step); the gather form's
  # bf16 scatter-adds round every partial sum.
  assert err['lean'] < 4e-3, err
  assert err['lean'] < err['gather'], err


def test_config_field_selects_the_impl():
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 8))
  layer = deform_conv.ModulatedDeformConv(8, offset_groups=2)
  assert layer.impl == 'lean'
  params = layer.init(jax.random.key(1), x, x)
  # Offsets of a few pixels, so that the two forms really sample between pixels.
  params = jax.tree_util.tree_map(lambda p: p * 300, params)
  outs = {impl: deform_conv.ModulatedDeformConv(8, offset_groups=2, impl=impl).apply(
      params, x, x) for impl in IMPLS}
  np.testing.assert_allclose(outs['lean'], outs['gather'], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='model.dcn.impl'):
    deform_conv.ModulatedDeformConv(8, offset_groups=2, impl='pallas').apply(params, x, x)



def test_model_dcn_impl_reaches_every_deformable_conv(monkeypatch):
  calls = []
  original = dict(deform_conv.IMPLS)

  def counting(impl):
    def f(*args, **kwargs):
      calls.append(impl)
      return original[impl](*args, **kwargs)
    return f

  monkeypatch.setattr(deform_conv, 'IMPLS', {k: counting(k) for k in IMPLS})
  cfg = common.model_config('tiny')
  assert cfg.dcn.impl == 'lean'
  frames = jnp.zeros((1, 5, 64, 32, 3))
  for impl in IMPLS:
    cfg.dcn.impl = impl
    model = tdmi.build_model(cfg)
    calls.clear()
    jax.eval_shape(lambda m=model: m.init(jax.random.key(0), frames, train=False))
    # Four in the TDE, four in the appearance alignment.
    assert calls == [impl] * 8
  cfg.dcn.impl = 'torchvision'
  with pytest.raises(ValueError, match='model.dcn.impl'):
    tdmi.build_model(cfg)
