"""Appearance branch (SPEC §4): supporting frames' features aligned to the key frame.

FAMI-Pose-style: the four supporting frames' stage-4 features are fused (`sup`), combined
with the key frame (`comb`), and deformable convs at dilation 3 align `sup` to the key
frame. Our reading of "two refine comb; the third warps sup with offsets predicted from
comb; the fourth refines that result" (DCN(x | ctx) = deformable conv of x with offsets and
mask predicted from ctx):

  r1 = comb + DCN1(comb | comb),  r2 = r1 + DCN2(r1 | r1),
  warped = DCN3(sup | r2),        aligned = warped + DCN4(warped | warped).

The refinements are residual because every DCN starts with a near-zero output (SPEC §4
initialisation): a plain chain DCN2(DCN1(comb)) would start at ~1e-9 with gradients that
underflow float32 (~1e-37) for everything upstream, so `comb`, `sup` and the first DCNs
would never train.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmi_jax.models import deform_conv
from tdmi_jax.models import layers

Dtype = Any


class AppearanceAlignment(nn.Module):
  """`__call__(features [B, T, h, w, C], *, train)` -> F_app [B, h, w, C] (key at T // 2)."""
  features: int
  offset_groups: int = 12
  mask_activation: str = 'none'
  dcn_impl: str = 'lean'  # Deformable conv form, see deform_conv.IMPLS.
  sup_blocks: int = 2
  out_blocks: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, frames: jax.Array, *, train: bool) -> jax.Array:
    c = self.features
    t = frames.shape[1]
    key = frames[:, t // 2]
    supports = jnp.concatenate([frames[:, s] for s in range(t) if s != t // 2], axis=-1)
    kw = dict(train=train, dtype=self.dtype)
    sup = layers.basic_chain(supports, c, self.sup_blocks, name='sup', **kw)
    comb = layers.BasicBlock(c, dtype=self.dtype, name='comb')(
        jnp.concatenate([sup, key], axis=-1), train=train)

    def dcn(name):
      return deform_conv.ModulatedDeformConv(
          c, padding=3, dilation=3, offset_groups=self.offset_groups, offset_dilation=3,
          mask_activation=self.mask_activation, impl=self.dcn_impl, dtype=self.dtype,
          name=name)

    r1 = comb + dcn('refine1')(comb, comb)
    r2 = r1 + dcn('refine2')(r1, r1)
    warped = dcn('warp')(sup, r2)
    aligned = warped + dcn('refine_warp')(warped, warped)
    return layers.basic_chain(jnp.concatenate([key, aligned], axis=-1), c, self.out_blocks,
                              name='out', **kw)
