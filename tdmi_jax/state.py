"""The training state: a plain pytree of arrays (what the step donates and orbax saves).

Functions (model.apply, the optimizer, the trainable mask) are not part of the state;
they are closed over by the jitted step, so the state is trivially checkpointable.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from tdmi_jax import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: optimizer steps taken.
  params: Any                     # Full model params (frozen backbone included).
  batch_stats: Any                # Full BatchNorm statistics.
  opt_state: Any                  # Optimizer state of the trainable partition only.
  club_params: Any = None         # vCLUB variational network (mi.estimator='club').
  club_opt_state: Any = None


def create(variables, mask, tx, club_params=None, club_tx=None):
  """Initial state from model variables ({'params', 'batch_stats'}) and the mask."""
  params = variables['params']
  trainable, _ = optim.split_params(params, mask)
  club_opt_state = None
  if club_params is not None:
    club_opt_state = club_tx.init(club_params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(trainable),
      club_params=club_params,
      club_opt_state=club_opt_state)
