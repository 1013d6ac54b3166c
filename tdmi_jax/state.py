"""The training state: a plain pytree of arrays (what the step donates and orbax saves).

Functions (model.apply, the optimizer, the trainable mask) are not part of the state;
they are closed over by the jitted step, so the state is trivially checkpointable.
`create_state(config, mesh, ...)` builds the model and its initial state from a config:
the training driver and batch evaluation both use it, so checkpoints always fit.
"""

from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp

from tdmi_jax import checkpointing
from tdmi_jax import losses
from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax.models import mi
from tdmi_jax.models import tdmi


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


def create_state(config, mesh, steps_per_epoch, mode='train_and_eval'):
  """The model and its initial replicated TrainState (config.init_from applied).

  Returns (model, state, mask, tx, schedule, club_tx). Also the restore target of batch
  evaluation, so checkpoints of `train.train_and_evaluate` always fit it.
  """
  model = tdmi.build_model(config.model)
  h, w = config.data.image_size
  dummy = jnp.zeros((1, 5, h, w, 3), jnp.float32)
  # unsafe_rbg: the init of an HRNet compiles ~3x faster than with threefry keys; still a
  # deterministic function of the seed on a given backend.
  init_rng, club_rng = jax.random.split(jax.random.key(config.seed, impl='unsafe_rbg'))
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_rng)
  variables = {'params': variables['params'],
               'batch_stats': variables.get('batch_stats', {})}
  if config.init_from:
    variables = checkpointing.apply_pretrained(
        variables, checkpointing.load_pretrained(config.init_from), config.init_from_kind)
  elif config.model.backbone.frozen and mode != 'eval':
    logging.warning('The backbone is frozen but config.init_from is empty: it stays at its '
                    'random initialisation (a resumed run restores its weights anyway).')
  mask = tdmi.trainable_mask(variables['params'], config.model)
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch)
  club_tx = club_params = None
  losses.warn_if_unbounded(config.mi)
  if losses.uses_club(config.mi):
    _, aux_shapes = jax.eval_shape(
        lambda v: model.apply(v, dummy, train=False), variables)
    if 'useful' in aux_shapes:
      club_tx = optim.make_club_optimizer(config.mi)
      club_params = mi.init_club(club_rng, config.mi, aux_shapes['useful'].shape[-1])['params']
  state = create(variables, mask, tx, club_params, club_tx)
  state = sharding.replicate(state, mesh)
  return model, state, mask, tx, schedule, club_tx
