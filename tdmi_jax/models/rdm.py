"""Representation Disentanglement Module (SPEC §3).

Channel gates computed from the globally pooled motion feature split M_t into useful
motion M_u = a_u * M_t and noisy motion M_n (M_n only feeds the objective):

* noisy='gate' (reference): a second, independent gate, M_n = a_n * M_t. "Minimise
  I(M_u; M_n)" is then solved trivially by a_n -> 0, whatever the estimator.
* noisy='complement': M_n = M_t - M_u = (1 - a_u) * M_t. The two parts always add up to
  the motion, so making them independent is a real constraint on the split.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class RepresentationDisentanglement(nn.Module):
  """`__call__(motion [B, h, w, C])` -> (M_u, M_n), each [B, h, w, C]."""
  hidden: int = 128
  noisy: str = 'gate'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, motion: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = motion.shape[-1]
    pooled = jnp.mean(motion.astype(jnp.float32), axis=(1, 2))

    def gate(name):
      h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=f'{name}_fc1')(pooled))
      return nn.sigmoid(nn.Dense(c, dtype=self.dtype, name=f'{name}_fc2')(h))

    a_u = gate('useful')
    useful = motion * a_u[:, None, None, :].astype(motion.dtype)
    if self.noisy == 'complement':
      return useful, motion - useful
    if self.noisy != 'gate':
      raise ValueError(f"model.rdm_noisy={self.noisy!r}; expected 'gate' or 'complement'")
    a_n = gate('noisy')
    return useful, motion * a_n[:, None, None, :].astype(motion.dtype)
