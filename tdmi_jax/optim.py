"""Optimizer and learning-rate schedule from `config.optim`, and the trainable split.

The optimizer only ever sees the trainable partition of the parameters (`split_params`
with `tdmi.trainable_mask`): the frozen backbone therefore gets no gradient computed and
holds no optimizer state, and its weights pass through the step untouched.
"""

import flax.traverse_util
import optax


def learning_rate_schedule(optim_cfg, steps_per_epoch):
  """Linear warmup, then piecewise-constant x decay_factor at each decay epoch."""
  base = optim_cfg.learning_rate
  steps = [int(round(e * steps_per_epoch)) for e in optim_cfg.decay_epochs]
  steps += [int(s) for s in optim_cfg.get('decay_steps', ())]
  boundaries = {s: optim_cfg.decay_factor for s in steps}
  decay = optax.piecewise_constant_schedule(base, boundaries)
  warmup_steps = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, base, warmup_steps)
  # join_schedules restarts the step count of the second schedule at the boundary;
  # the decays are counted from step 0, so shift them back.
  shifted = lambda step: decay(step + warmup_steps)
  return optax.join_schedules([warmup, shifted], [warmup_steps])


def make_optimizer(optim_cfg, steps_per_epoch):
  """Returns (tx, schedule) for the trainable parameters."""
  schedule = learning_rate_schedule(optim_cfg, steps_per_epoch)
  if optim_cfg.name == 'adam':
    opt = optax.adam(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  elif optim_cfg.name == 'adamw':
    opt = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay)
  else:
    raise ValueError(f"config.optim.name={optim_cfg.name!r}; expected 'adam' or 'adamw'.")
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), opt)
  return opt, schedule


def make_club_optimizer(mi_cfg):
  """vCLUB's variational network is trained by its own plain Adam (config.mi.club)."""
  return optax.adam(mi_cfg.club.learning_rate)


def split_params(params, mask):
  """Splits a nested param dict into (trainable, frozen) nested dicts by a bool mask.

  Subtrees with no leaf of a kind are dropped, so e.g. `frozen` is {} when nothing is
  frozen and `trainable` holds no backbone entry when the backbone is frozen.
  """
  flat = flax.traverse_util.flatten_dict(params)
  flat_mask = flax.traverse_util.flatten_dict(mask)
  if set(flat) != set(flat_mask):
    raise ValueError('trainable mask does not match the parameter tree: '
                     f'{sorted(set(flat) ^ set(flat_mask))[:5]}')
  trainable = {k: v for k, v in flat.items() if bool(flat_mask[k])}
  frozen = {k: v for k, v in flat.items() if not bool(flat_mask[k])}
  return (flax.traverse_util.unflatten_dict(trainable),
          flax.traverse_util.unflatten_dict(frozen))


def merge_params(trainable, frozen):
  flat = flax.traverse_util.flatten_dict(trainable)
  flat.update(flax.traverse_util.flatten_dict(frozen))
  return flax.traverse_util.unflatten_dict(flat)
