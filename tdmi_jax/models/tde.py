"""Multi-stage Temporal Difference Encoder (SPEC §2).

For each backbone stage j, the differences of consecutive frames' stage-j features are
fused to C channels, and a deformable conv whose offsets are conditioned on the key
frame's stage-4 feature extracts motion from them; the four stages are accumulated
coarse-to-fine (M^j = smooth_j(M^{j-1} + DCN_j)). The result is the motion feature M_t.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmi_jax.models import deform_conv
from tdmi_jax.models import layers

Dtype = Any


class TemporalDifferenceEncoder(nn.Module):
  """`__call__(stage_features, *, train)`: four [B, T, h, w, C] maps -> M_t [B, h, w, C]."""
  features: int
  fuse_blocks: Sequence[int] = (2, 2, 2, 2)  # BasicBlocks in fuse_j (SPEC [decision]).
  offset_groups: int = 12
  mask_activation: str = 'none'
  impl: str = 'lean'  # Deformable conv form, see deform_conv.IMPLS.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, stage_features: Sequence[jax.Array], *, train: bool) -> jax.Array:
    if len(stage_features) != len(self.fuse_blocks):
      raise ValueError(f'TDE got {len(stage_features)} stage features for '
                       f'{len(self.fuse_blocks)} fuse_blocks entries')
    c = self.features
    key = stage_features[-1].shape[1] // 2
    key_feature = stage_features[-1][:, key]
    motion = None
    for j, (f, n) in enumerate(zip(stage_features, self.fuse_blocks), start=1):
      diffs = jnp.concatenate([f[:, s + 1] - f[:, s] for s in range(f.shape[1] - 1)], axis=-1)
      fused = layers.basic_chain(diffs, c, n, train=train, dtype=self.dtype, name=f'fuse{j}')
      ctx = layers.BasicBlock(c, dtype=self.dtype, name=f'ctx{j}')(
          jnp.concatenate([key_feature, fused], axis=-1), train=train)
      m = deform_conv.ModulatedDeformConv(
          c, padding=1, dilation=1, offset_groups=self.offset_groups, offset_dilation=3,
          mask_activation=self.mask_activation, impl=self.impl, dtype=self.dtype,
          name=f'dcn{j}')(fused, ctx)
      if motion is None:
        motion = m
      else:
        motion = layers.BasicBlock(c, dtype=self.dtype, name=f'smooth{j}')(motion + m,
                                                                           train=train)
    return motion
