"""Fusion of useful motion and appearance, and the heatmap head (SPEC §4)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmi_jax.models import layers

Dtype = Any


class FusionHead(nn.Module):
  """`__call__(useful, appearance, *, train)` -> (heatmaps [B, h, w, K] float32, F~ [B, h, w, C]).

  F~ = BasicBlock chain on concat[M_u, F_app]; heatmaps = 3x3 conv with bias on F~.
  """
  features: int
  num_joints: int = 17
  fusion_blocks: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, useful: jax.Array, appearance: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    fused = layers.basic_chain(jnp.concatenate([useful, appearance], axis=-1), self.features,
                               self.fusion_blocks, train=train, dtype=self.dtype, name='fusion')
    heatmaps = layers.conv(self.num_joints, 3, use_bias=True, dtype=self.dtype,
                           name='final')(fused)
    return heatmaps.astype(jnp.float32), fused
