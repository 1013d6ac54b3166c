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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmi_jax.models import layers

Dtype = Any


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

  pos_dtype = jnp.promote_types(offset.dtype, jnp.float32)
  off = offset.astype(pos_dtype).reshape(b, ho, wo, g, k, 2)
  tap_y = jnp.repeat(jnp.arange(kh) * dh, kw)  # [K], k = i*kw + j.
  tap_x = jnp.tile(jnp.arange(kw) * dw, kh)
  base_y = (jnp.arange(ho) * sh - ph)[:, None] + tap_y[None, :]  # [Ho, K]
  base_x = (jnp.arange(wo) * sw - pw)[:, None] + tap_x[None, :]  # [Wo, K]
  py = base_y[None, :, None, None, :] + off[..., 0]  # [B, Ho, Wo, G, K]
  px = base_x[None, None, :, None, :] + off[..., 1]
  y0, x0 = jnp.floor(py), jnp.floor(px)
  ly, lx = py - y0, px - x0
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
    x = x.astype(self.dtype)
    return deform_conv2d(x, offset.astype(jnp.float32), mask, kernel.astype(self.dtype),
                         padding=self.padding, dilation=self.dilation)
