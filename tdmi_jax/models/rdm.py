"""Representation Disentanglement Module (SPEC §3).

Two channel gates computed from the globally pooled motion feature split M_t into useful
motion M_u = a_u * M_t and noisy motion M_n = a_n * M_t (M_n only feeds the objective).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class RepresentationDisentanglement(nn.Module):
  """`__call__(motion [B, h, w, C])` -> (M_u, M_n), each [B, h, w, C]."""
  hidden: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, motion: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = motion.shape[-1]
    pooled = jnp.mean(motion.astype(jnp.float32), axis=(1, 2))

    def gate(name):
      h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=f'{name}_fc1')(pooled))
      return nn.sigmoid(nn.Dense(c, dtype=self.dtype, name=f'{name}_fc2')(h))

    a_u, a_n = gate('useful'), gate('noisy')
    return (motion * a_u[:, None, None, :].astype(motion.dtype),
            motion * a_n[:, None, None, :].astype(motion.dtype))
