"""What several benchmarks share: random variables of a model's shapes, a train state.

Imported by the scripts in this folder (run as `python benchmarks/<name>.py`, which puts
this folder on sys.path) after they have put the repository root on sys.path.
"""

import jax
import numpy as np

from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax.models import tdmi


def random_variables(shapes, seed=0):
  """Values for a tree of ShapeDtypeStructs: BatchNorm variances 1, the rest N(0, 0.01).

  Timing does not depend on the values; these keep activations finite. Building them from
  `jax.eval_shape(model.init)` avoids compiling init (minutes for W48 on 2 cores).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return np.ones(s.shape, s.dtype)
    return (rng.normal(size=s.shape) * 0.01).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def train_state(config, variables, mesh, club_params=None, club_tx=None):
  """(state replicated over mesh, trainable mask, tx, schedule) as the driver builds them."""
  mask = tdmi.trainable_mask(variables['params'], config.model)
  tx, schedule = optim.make_optimizer(config.optim, 1000)
  st = sharding.replicate(state_lib.create(variables, mask, tx, club_params, club_tx), mesh)
  return st, mask, tx, schedule
