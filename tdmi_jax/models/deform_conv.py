"""Modulated deformable convolution (DCN v2, Zhu et al. 2019) in pure JAX (SPEC §5).

Layouts follow torchvision's `deform_conv2d` so PyTorch weights and offset convs port
unchanged, transposed to NHWC:
  offset [B, Ho, Wo, 2*G*kh*kw]: for offset group g and tap k = i*kw + j, channel
         g*2*kh*kw + 2*k holds dy and the next channel dx;
  mask   [B, Ho, Wo, G*kh*kw]: channel g*kh*kw + k;
  input channel c belongs to offset group c // (C / G).
Tap k of output pixel (y, x) samples the input at
  (y*stride - pad + i*dilation + dy, x*stride - pad + j*dilation + dx)
by bilinear interpolation with zeros outside the image, is multiplied by the mask, and the
gathered taps [B, Ho, Wo, 9*C] meet the weights in one matmul.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmi_jax.models import layers

Dtype = Any
# Lean form: taps (output pixel x offset group x kernel tap) per step of the backward
# pass's loop over examples; bounds its temporaries (~100 B per tap in float32).
_BWD_TAPS = 1 << 20


def _gather(x, idx):
  """x [HW, G, Cg], idx int [Ho, Wo, G, K] -> [Ho, Wo, G, K, Cg] (group g reads its channels)."""
  groups = jnp.arange(x.shape[1])[:, None]
  return x[idx, groups]


def deform_conv2d(x: jax.Array, offset: jax.Array, mask: jax.Array | None, kernel: jax.Array,
                  *, stride=1, padding=0, dilation=1) -> jax.Array:
  """Modulated deformable conv. x [B, H, W, C], kernel [kh, kw, C, Cout] (HWIO).

  `mask=None` means an unmodulated (DCN v1) conv. The number of offset groups is read from
  the offset channels. Returns [B, Ho, Wo, Cout] in x's dtype.
  """
  b, h, w, c = x.shape
  kh, kw, cin, cout = kernel.shape
  if cin != c:
    raise ValueError(f'deform_conv2d: kernel expects {cin} input channels, x has {c}')
  (sh, sw), (ph, pw), (dh, dw) = map(layers.as_tuple, (stride, padding, dilation))
  ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  k = kh * kw
  if offset.shape[:3] != (b, ho, wo) or offset.shape[3] % (2 * k):
    raise ValueError(f'deform_conv2d: offset shape {offset.shape} does not fit output '
                     f'{(b, ho, wo)} and a {kh}x{kw} kernel')
  g = offset.shape[3] // (2 * k)
  if c % g:
    raise ValueError(f'deform_conv2d: {g} offset groups do not divide {c} input channels')
  if mask is not None and mask.shape != (b, ho, wo, g * k):
    raise ValueError(f'deform_conv2d: mask shape {mask.shape}, expected {(b, ho, wo, g * k)}')

  y0, x0, ly, lx, pos_dtype = _sample_positions(offset, (ho, wo), (kh, kw), (sh, sw),
                                                (ph, pw), (dh, dw))
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  modulation = 1.0 if mask is None else mask.astype(pos_dtype).reshape(b, ho, wo, g, k)

  xg = x.reshape(b, h * w, g, c // g)
  sampled = jnp.zeros((b, ho, wo, g, k, c // g), x.dtype)
  for dy, dx, weight in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                         (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
    yy, xx = y0 + dy, x0 + dx
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
    coef = (weight * inside * modulation).astype(x.dtype)
    sampled = sampled + jax.vmap(_gather)(xg, idx) * coef[..., None]
  # Sampled taps are ordered (g, k, c_in_group); reorder the small kernel to match
  # instead of the large tensor.
  wmat = kernel.reshape(k, g, c // g, cout).transpose(1, 0, 2, 3).reshape(g * k * (c // g), cout)
  out = sampled.reshape(b, ho, wo, g * k * (c // g)) @ wmat.astype(x.dtype)
  return out


# ---------------------------------------------------------------------------------------
# Lean form. Same semantics as `deform_conv2d`, built for memory traffic:
#  * The input is padded by one zero pixel and re-laid out once as a table whose row
#    (b, p, q, g) holds group g's channels of the 2x2 neighbourhood xpad[b, p:p+2, q:q+2]
#    ([B*(H+1)*(W+1)*G, 4, Cg], 4x the input: small next to the sampled taps). Each tap then
#    needs one gather of one row with a flat int32 index, instead of four gathers with
#    (batch, pixel, group) index triples; the zero border stands in for the per-corner
#    inside tests, and a tap whose whole neighbourhood is outside gets weight 0.
#  * A custom VJP saves only the inputs (x, offset, mask, kernel), not the
#    [B, Ho, Wo, G*K*Cg] sampled taps, and recomputes the sampling in the backward pass.
#  * The backward pass loops over chunks of examples (at most _BWD_TAPS taps each): XLA
#    materialises the gathered [taps, 4, Cg] neighbourhoods there (a gather feeding several
#    consumers is not fused), so its temporaries scale with the chunk, not the batch.
#  * The input gradient is the gather's adjoint, one scatter-add of 4*Cg-wide rows into
#    the table, in float32 whatever x's dtype (a bf16 scatter-add would round every
#    partial sum), folded back onto the image and cast to x's dtype at the end.


def _sample_positions(offset, out_hw, kernel_hw, stride, padding, dilation):
  """Floor and fraction of every tap's sample position, [B, Ho, Wo, G, K] each, in the
  position dtype (float32, or float64 under x64): (y0, x0, ly, lx, pos_dtype)."""
  (ho, wo), (kh, kw) = out_hw, kernel_hw
  (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
  k = kh * kw
  b, g = offset.shape[0], offset.shape[3] // (2 * k)
  pos_dtype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.astype(pos_dtype).reshape(b, ho, wo, g, k, 2)
  tap_y = jnp.repeat(jnp.arange(kh) * dh, kw)  # [K], k = i*kw + j.
  tap_x = jnp.tile(jnp.arange(kw) * dw, kh)
  base_y = (jnp.arange(ho) * sh - ph)[:, None] + tap_y[None, :]  # [Ho, K]
  base_x = (jnp.arange(wo) * sw - pw)[:, None] + tap_x[None, :]  # [Wo, K]
  py = base_y[None, :, None, None, :] + off[..., 0]  # [B, Ho, Wo, G, K]
  px = base_x[None, None, :, None, :] + off[..., 1]
  y0, x0 = jnp.floor(py), jnp.floor(px)
  return y0, x0, py - y0, px - x0, pos_dtype


def _out_geometry(x_shape, kernel_shape, offset_shape, stride, padding, dilation):
  """Checks shapes; returns (ho, wo, groups)."""
  b, h, w, c = x_shape
  kh, kw, cin, _ = kernel_shape
  if cin != c:
    raise ValueError(f'deform_conv2d: kernel expects {cin} input channels, x has {c}')
  (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
  ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
  wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
  k = kh * kw
  if tuple(offset_shape[:3]) != (b, ho, wo) or offset_shape[3] % (2 * k):
    raise ValueError(f'deform_conv2d: offset shape {offset_shape} does not fit output '
                     f'{(b, ho, wo)} and a {kh}x{kw} kernel')
  g = offset_shape[3] // (2 * k)
  if c % g:
    raise ValueError(f'deform_conv2d: {g} offset groups do not divide {c} input channels')
  return ho, wo, g


def _flat_row(p, q, rows, cols, g):
  """Flat int32 row of (b, p, q, g) in a [B, rows, cols, G] table; p, q [B, Ho, Wo, G, K]."""
  bi = jnp.arange(p.shape[0], dtype=jnp.int32)[:, None, None, None, None]
  gi = jnp.arange(g, dtype=jnp.int32)[None, None, None, :, None]
  return ((bi * rows + p) * cols + q) * g + gi


def _lean_sampling(x_shape, kernel_shape, offset, mask, geometry):
  """Per tap: neighbourhood position, bilinear fractions and the tap's weight.

  Returns (p, q, ly, lx, touches, scale), all [B, Ho, Wo, G, K]: p, q (int32) the
  neighbourhood's top-left corner in the zero-padded image, ly, lx the fractional parts of
  the sample position, touches = 1 where the 2x2 neighbourhood touches the image (else 0),
  scale = mask * touches; the float ones in the position dtype (float32, or float64 under
  x64).
  """
  stride, padding, dilation = geometry
  b, h, w, _ = x_shape
  kh, kw = kernel_shape[:2]
  ho, wo, g = _out_geometry(x_shape, kernel_shape, offset.shape, *geometry)
  (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
  k = kh * kw
  if b * (h + 2) * (w + 2) * g >= 2**31:
    raise ValueError('deform_conv2d (lean): input too large for int32 row indices')
  if mask is not None and mask.shape != (b, ho, wo, g * k):
    raise ValueError(f'deform_conv2d: mask shape {mask.shape}, expected {(b, ho, wo, g * k)}')
  y0, x0, ly, lx, pos_dtype = _sample_positions(offset, (ho, wo), (kh, kw), (sh, sw),
                                                (ph, pw), (dh, dw))
  # Neighbourhood rows y0, y0+1 touch the image iff -1 <= y0 <= h-1; the padded image's
  # row is then p = y0 + 1 in [0, h]. Clipping the others keeps every index in bounds.
  touches = ((y0 >= -1) & (y0 <= h - 1) & (x0 >= -1) & (x0 <= w - 1)).astype(pos_dtype)
  p = jnp.clip(y0 + 1, 0, h).astype(jnp.int32)
  q = jnp.clip(x0 + 1, 0, w).astype(jnp.int32)
  scale = touches
  if mask is not None:
    scale = touches * mask.astype(pos_dtype).reshape(b, ho, wo, g, k)
  return p, q, ly, lx, touches, scale


def _corner_weights(ly, lx):
  """Bilinear weights of corners (0,0), (0,1), (1,0), (1,1) (the table's order).

  A tuple, not a stacked [..., 4] array, so that XLA fuses each into its consumers.
  """
  return ((1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx)


def _dot_last(a, b):
  """sum(a * b, -1) for a small last axis, unrolled: XLA:CPU emits a reduction as a library
  call that cannot fuse with the gather producing `a`, so it would materialise it."""
  if a.shape[-1] > 16:
    return jnp.sum(a * b, axis=-1)
  return functools.reduce(lambda s, i: s + a[..., i] * b[..., i], range(1, a.shape[-1]),
                          a[..., 0] * b[..., 0])


def _neighbour_table(x, g):
  """x [B, H, W, C] -> [B*(H+1)*(W+1)*G, 4, Cg]: row (b, p, q, g) = xpad[b, p:p+2, q:q+2]."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, h + 2, w + 2, g, c // g)
  corners = [xp[:, :-1, :-1], xp[:, :-1, 1:], xp[:, 1:, :-1], xp[:, 1:, 1:]]
  return jnp.stack(corners, axis=4).reshape(b * (h + 1) * (w + 1) * g, 4, c // g)


def _gather_rows(table, rows):
  """The one gather: each tap's 2x2 neighbourhood [B, Ho, Wo, G, K, 4, Cg]."""
  return table.at[rows.reshape(-1)].get(mode='promise_in_bounds').reshape(
      *rows.shape, *table.shape[1:])


def _kernel_matrix(kernel, g):
  """[kh, kw, C, Cout] -> [G*K*Cg, Cout] in the sampled taps' (g, k, c) order."""
  kh, kw, c, cout = kernel.shape
  k = kh * kw
  return kernel.reshape(k, g, c // g, cout).transpose(1, 0, 2, 3).reshape(g * k * (c // g),
                                                                          cout)


def _lean_sample(x, offset, mask, kernel_shape, geometry):
  """Unmodulated bilinear samples [B, Ho, Wo, G, K, Cg] (float32 or wider) and their making.

  The modulated taps are `bilinear * scale[..., None]`.
  """
  b, h, w, _ = x.shape
  g = _out_geometry(x.shape, kernel_shape, offset.shape, *geometry)[2]
  p, q, ly, lx, touches, scale = _lean_sampling(x.shape, kernel_shape, offset, mask, geometry)
  acc = jnp.promote_types(x.dtype, ly.dtype)
  rows = _flat_row(p, q, h + 1, w + 1, g)
  table = _neighbour_table(x, g)
  nb = _gather_rows(table, rows)
  wts = _corner_weights(ly, lx)
  # A sum of four products, not an einsum or jnp.sum: XLA lowers those to a dot or a
  # reduction that materialises the gathered neighbourhoods; this fuses with the gather.
  bilinear = sum(nb[..., i, :].astype(acc) * wt.astype(acc)[..., None]
                 for i, wt in enumerate(wts))
  return bilinear, (g, p, q, ly, lx, touches, scale, wts, table, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _deform_conv2d_lean(x, offset, mask, kernel, geometry):
  bilinear, (g, *_, scale, _, _, _) = _lean_sample(x, offset, mask, kernel.shape, geometry)
  b, ho, wo = bilinear.shape[:3]
  sampled = (bilinear * scale.astype(bilinear.dtype)[..., None]).astype(x.dtype)
  wmat = _kernel_matrix(kernel, g).astype(x.dtype)
  return sampled.reshape(b, ho, wo, -1) @ wmat


def _lean_fwd(x, offset, mask, kernel, geometry):
  # Residuals are the (small) inputs only; the sampled taps are recomputed.
  return _deform_conv2d_lean(x, offset, mask, kernel, geometry), (x, offset, mask, kernel)


def _bwd_chunk(b, taps_per_example):
  """Examples per step of the backward pass's loop: the largest divisor of b keeping a
  step's taps under _BWD_TAPS (at least 1)."""
  fits = [n for n in range(1, b + 1) if b % n == 0 and n * taps_per_example <= _BWD_TAPS]
  return max(fits, default=1)


def _lean_bwd(geometry, residuals, d_out):
  # The barrier keeps XLA from merging this recomputation with the forward pass's (CSE),
  # which would keep the forward's sampled taps alive until here.
  x, offset, mask, kernel, d_out = jax.lax.optimization_barrier(residuals + (d_out,))
  b = x.shape[0]
  ho, wo, _ = _out_geometry(x.shape, kernel.shape, offset.shape, *geometry)
  n = _bwd_chunk(b, ho * wo * offset.shape[-1] // 2)
  # Examples are independent (each tap reads its own example's rows), so the backward
  # pass runs over chunks of n examples: its [taps, 4, Cg] temporaries scale with n, not
  # with the batch.
  split = lambda a: None if a is None else a.reshape(b // n, n, *a.shape[1:])
  chunks = (split(x), split(offset), split(mask), split(d_out))
  d_x, d_offset, d_mask, d_kernel = jax.lax.map(
      lambda args: _lean_bwd_chunk(geometry, kernel, *args), chunks)
  merge = lambda a, like: None if a is None else a.reshape(like.shape)
  return (merge(d_x, x), merge(d_offset, offset), merge(d_mask, mask),
          jnp.sum(d_kernel, axis=0).astype(kernel.dtype))


def _lean_bwd_chunk(geometry, kernel, x, offset, mask, d_out):
  """The VJP on a few examples: (d_x, d_offset, d_mask, d_kernel in float32 or wider)."""
  bilinear, (g, p, q, ly, lx, touches, scale, wts, table, rows) = _lean_sample(
      x, offset, mask, kernel.shape, geometry)
  b, h, w, c = x.shape
  ho, wo = bilinear.shape[1:3]
  acc = jnp.promote_types(bilinear.dtype, d_out.dtype)
  n = b * ho * wo
  d_out2 = d_out.reshape(n, -1).astype(x.dtype)
  sampled = (bilinear * scale.astype(acc)[..., None]).astype(x.dtype)
  d_wmat = jnp.matmul(sampled.reshape(n, -1).T, d_out2, preferred_element_type=acc)
  d_kernel = d_wmat.reshape(g, kernel.shape[0] * kernel.shape[1], c // g, -1).transpose(
      1, 0, 2, 3).reshape(kernel.shape)
  # d(sampled taps), in float32 (or wider) whatever x's dtype.
  wmat = _kernel_matrix(kernel, g).astype(x.dtype)
  d_s = jnp.matmul(d_out2, wmat.T, preferred_element_type=acc).reshape(bilinear.shape)
  # Per tap and corner, <d_s, corner value>: d tap / d ly and d lx are differences of
  # corner values, d tap / d mask their bilinear mean.
  nb = _gather_rows(table, rows)
  c00, c01, c10, c11 = (_dot_last(nb[..., i, :].astype(acc), d_s).astype(ly.dtype)
                        for i in range(4))
  d_ly = scale * ((1 - lx) * (c10 - c00) + lx * (c11 - c01))
  d_lx = scale * ((1 - ly) * (c01 - c00) + ly * (c11 - c10))
  d_offset = jnp.stack([d_ly, d_lx], axis=-1).reshape(offset.shape).astype(offset.dtype)
  d_mask = None
  if mask is not None:
    d_mask = touches * (wts[0] * c00 + wts[1] * c01 + wts[2] * c10 + wts[3] * c11)
    d_mask = d_mask.reshape(mask.shape).astype(mask.dtype)
  # The input gradient: the adjoint of the table gather, one scatter-add of 4*Cg-wide
  # rows, then the table folded back onto the image (four shifted adds), all in float32
  # (or wider) and cast to x's dtype at the end.
  coef = jnp.stack(wts, axis=-1) * scale[..., None]
  upd = coef.astype(acc)[..., None] * d_s[..., None, :]  # [..., 4, Cg]
  d_table = jnp.zeros(table.shape, acc).at[rows.reshape(-1)].add(
      upd.reshape(-1, *table.shape[1:]), mode='promise_in_bounds')
  d_x = _fold_table(d_table, x.shape, g).astype(x.dtype)
  return d_x, d_offset, d_mask, d_kernel


def _fold_table(d_table, x_shape, g):
  """Adjoint of `_neighbour_table`: [B*(H+1)*(W+1)*G, 4, Cg] -> [B, H, W, C]."""
  b, h, w, c = x_shape
  t = d_table.reshape(b, h + 1, w + 1, g, 4, c // g)
  z = (0, 0)
  dxp = (jnp.pad(t[..., 0, :], (z, (0, 1), (0, 1), z, z))
         + jnp.pad(t[..., 1, :], (z, (0, 1), (1, 0), z, z))
         + jnp.pad(t[..., 2, :], (z, (1, 0), (0, 1), z, z))
         + jnp.pad(t[..., 3, :], (z, (1, 0), (1, 0), z, z)))
  return dxp[:, 1:-1, 1:-1].reshape(b, h, w, c)


_deform_conv2d_lean.defvjp(_lean_fwd, _lean_bwd)


def deform_conv2d_lean(x: jax.Array, offset: jax.Array, mask: jax.Array | None,
                       kernel: jax.Array, *, stride=1, padding=0, dilation=1) -> jax.Array:
  """`deform_conv2d` (same arguments, layouts and result) in the lean form above."""
  geometry = tuple(map(layers.as_tuple, (stride, padding, dilation)))
  _out_geometry(x.shape, kernel.shape, offset.shape, *geometry)
  return _deform_conv2d_lean(x, offset, mask, kernel, geometry)


# `model.dcn.impl`: the forms give the same values (tests/test_deform_conv.py). At the
# W48 head's size 'lean' needs 0.24x the XLA temporaries of 'gather' per DCN (0.35x and
# 0.77x the bytes in the head's train step) and less CPU time (BENCHMARKS.md).
IMPLS = {'lean': deform_conv2d_lean, 'gather': deform_conv2d}


class ModulatedDeformConv(nn.Module):
  """DCN v2 layer whose offsets and mask are predicted from a context map `ctx`.

  `__call__(x, ctx)`: offsets (2*G*kh*kw channels) and mask (G*kh*kw channels) come from
  two parallel 3x3 convs with bias on `ctx` (dilation `offset_dilation`, 'same' padding),
  then the deformable conv (no bias, one weight group) runs on `x`. `ctx` must have the
  output's spatial size. Offset/mask convs start at N(0, 0.001) weights and zero bias, so
  offsets start near 0 and, with `mask_activation='none'`, the output starts near 0.
  """
  features: int
  kernel_size: int = 3
  padding: int = 1
  dilation: int = 1
  offset_groups: int = 1
  offset_dilation: int = 3
  mask_activation: str = 'none'   # 'none' (reference) | 'sigmoid' (DCN v2 paper).
  impl: str = 'lean'              # A key of IMPLS (config field model.dcn.impl).
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: jax.Array) -> jax.Array:
    k = self.kernel_size ** 2
    offset = layers.conv(2 * self.offset_groups * k, 3, dilation=self.offset_dilation,
                         use_bias=True, dtype=self.dtype, name='conv_offset')(ctx)
    mask = layers.conv(self.offset_groups * k, 3, dilation=self.offset_dilation,
                       use_bias=True, dtype=self.dtype, name='conv_mask')(ctx)
    if self.mask_activation == 'sigmoid':
      mask = nn.sigmoid(mask)
    elif self.mask_activation != 'none':
      raise ValueError(f"mask_activation must be 'none' or 'sigmoid', got {self.mask_activation!r}")
    kernel = self.param('kernel', layers.conv_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    if self.impl not in IMPLS:
      raise ValueError(f'model.dcn.impl={self.impl!r}; expected one of {sorted(IMPLS)}')
    x = x.astype(self.dtype)
    return IMPLS[self.impl](x, offset.astype(jnp.float32), mask, kernel.astype(self.dtype),
                            padding=self.padding, dilation=self.dilation)
