"""The pure, jitted train and eval steps.

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`: jitted with the
state donated and explicit shardings over a mesh with a 'data' axis (batch split, state
replicated). GSPMD turns the global-batch means of the loss into cross-device reductions,
so the same code runs on 1 device, N devices or N hosts and gives the same numbers.
"""

import jax
import jax.numpy as jnp
import optax

from tdmi_jax import optim
from tdmi_jax import sharding as sharding_lib

# Batch entries the step reads; the rest of a batch (crop meta) stays on the host.
TRAIN_KEYS = ('frames', 'target', 'target_weight', 'mask')
# Per-term gradient norms (make_term_grad_norms): the driver computes them on log steps.
GRAD_NORM_PREFIX = 'grad_norm/'
PCK_THRESHOLD = 0.5  # In units of heatmap_size / 10 (HRNet's training accuracy).


def _default_objective():
  from tdmi_jax import losses  # pylint: disable=g-import-not-at-top
  return losses.objective, losses.club_learning_loss


def model_inputs(batch):
  """(args, kwargs) of the model call: frames, or cached backbone outputs.

  A batch with 'backbone_heatmaps' [B, 5, h, w, K] and 'backbone_features' (a tuple of
  four [B, 5, h, w, C]) skips the backbone: only valid for a frozen backbone with frozen
  BatchNorm, whose outputs do not depend on the step (the hard-frame experiment caches
  them once per training window).
  """
  if 'backbone_heatmaps' in batch:
    return (None,), {'backbone_outputs': (batch['backbone_heatmaps'],
                                          tuple(batch['backbone_features']))}
  return (batch['frames'],), {}


def _default_heatmap_loss():
  from tdmi_jax import losses  # pylint: disable=g-import-not-at-top
  return losses.heatmap_loss


def make_train_step(*, model, config, tx, schedule, mask, mesh, club_tx=None,
                    objective_fn=None, club_loss_fn=None):
  """Builds the jitted train step.

  Args:
    model: the linen TDMI (or any module with the same apply contract).
    config: the full config (reads config.seed, config.model, config.mi).
    tx, schedule: from optim.make_optimizer; tx acts on the trainable partition.
    mask: tdmi.trainable_mask(params, config.model), a concrete pytree of bools.
    mesh: jax.sharding.Mesh with a 'data' axis.
    club_tx: vCLUB's optimizer; the state must then hold club_params.
    objective_fn, club_loss_fn: default to losses.objective / losses.club_learning_loss
      (arguments only so that tests can stand in for them).
  """
  # Only the project's objective takes the step (MI warm-up) and the backbone flag;
  # stand-ins from the tests keep the plain signature.
  own_objective = objective_fn is None
  if objective_fn is None:
    objective_fn, default_club_loss = _default_objective()
    club_loss_fn = club_loss_fn or default_club_loss
  base_key = jax.random.key(config.seed)
  freeze_backbone_bn = config.model.backbone.bn == 'frozen'
  mi_cfg = config.get('mi')

  def train_step(state, batch):
    trainable, frozen = optim.split_params(state.params, mask)
    loss_fn = _loss_closure(model, config, objective_fn, own_objective, base_key, state,
                            frozen, batch)

    (loss, (metrics, batch_stats, aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    batch_stats = dict(batch_stats)
    if freeze_backbone_bn and 'backbone' in state.batch_stats:
      # SPEC §1 'frozen': the backbone's running statistics never move, whatever the
      # module did with them.
      batch_stats['backbone'] = state.batch_stats['backbone']

    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics)
    metrics['loss'] = loss
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['lr'] = schedule(state.step)

    club_params, club_opt_state = state.club_params, state.club_opt_state
    if club_params is not None:
      # Isolated: the CLUB network sees stop-gradient features and only its own params
      # are differentiated, so the main model gets no gradient from this term.
      aux_sg = jax.lax.stop_gradient(aux)
      club_loss, club_grads = jax.value_and_grad(
          lambda p: club_loss_fn({'params': p}, aux_sg, batch.get('mask'), mi_cfg))(club_params)
      club_updates, club_opt_state = club_tx.update(club_grads, club_opt_state, club_params)
      club_params = optax.apply_updates(club_params, club_updates)
      metrics['club/learning_loss'] = club_loss

    new_state = state.replace(
        step=state.step + 1,
        params=optim.merge_params(trainable, frozen),
        batch_stats=batch_stats,
        opt_state=opt_state,
        club_params=club_params,
        club_opt_state=club_opt_state)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return new_state, metrics

  replicated = sharding_lib.replicated(mesh)
  return jax.jit(
      train_step,
      in_shardings=(replicated, sharding_lib.data_sharded(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,))


def _loss_closure(model, config, objective_fn, own_objective, base_key, state, frozen,
                  batch):
  """`loss_fn(trainable) -> (loss, (metrics, batch_stats updates, aux))` of one step."""
  rng = jax.random.fold_in(base_key, state.step)
  club_vars = None
  if state.club_params is not None:
    club_vars = {'params': jax.lax.stop_gradient(state.club_params)}

  def loss_fn(trainable):
    params = optim.merge_params(trainable, frozen)
    args, inputs_kw = model_inputs(batch)
    (heatmaps, aux), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, *args,
        train=True, mutable=['batch_stats'], rngs={'dropout': rng}, **inputs_kw)
    kwargs = {}
    if own_objective:
      kwargs = dict(step=state.step, backbone_trainable=not config.model.backbone.frozen)
    if club_vars is not None:
      kwargs['club_variables'] = club_vars
    loss, metrics = objective_fn(heatmaps, aux, batch, config.get('mi'), **kwargs)
    return loss, (metrics, updates.get('batch_stats', {}), aux)

  return loss_fn


def make_term_grad_norms(*, model, config, mask, mesh):
  """`term_grad_norms(state, batch) -> {'grad_norm/<part>': norm}`, jitted.

  The norm, on the trainable parameters, of the gradient of each weighted share of the loss
  (the objective's 'contrib/<part>' metrics, losses.CONTRIB_PREFIX) at `state`: what the
  train step on the same (state, batch) would combine. One forward and one backward per
  share, so the driver calls it on log steps only, before the step (which donates the
  state); a separate program, so the train step itself compiles and runs as before.
  Returns {} when the objective has fewer than two shares (heatmap loss alone).
  """
  from tdmi_jax import losses  # pylint: disable=g-import-not-at-top
  objective_fn, _ = _default_objective()
  base_key = jax.random.key(config.seed)
  prefix = losses.CONTRIB_PREFIX

  def term_grad_norms(state, batch):
    trainable, frozen = optim.split_params(state.params, mask)
    loss_fn = _loss_closure(model, config, objective_fn, True, base_key, state, frozen,
                            batch)
    shares = lambda t: {k: v for k, v in loss_fn(t)[1][0].items() if k.startswith(prefix)}
    values, vjp = jax.vjp(shares, trainable)
    if len(values) < 2:
      return {}
    out = {}
    for k in values:
      (g,) = vjp({j: jnp.float32(j == k) for j in values})
      out[GRAD_NORM_PREFIX + k[len(prefix):]] = optax.tree.norm(g).astype(jnp.float32)
    return out

  replicated = sharding_lib.replicated(mesh)
  return jax.jit(term_grad_norms, in_shardings=(replicated, sharding_lib.data_sharded(mesh)),
                 out_shardings=replicated)


def pck_counts(heatmaps, target, target_weight, mask):
  """(correct, total) joints whose argmax is within PCK_THRESHOLD of the target's.

  Distances are normalised by heatmap_size / 10 per axis, as in HRNet's training
  accuracy; only joints with weight > 0 on real (unpadded) examples count.
  """
  b, h, w, k = heatmaps.shape

  def argmax_xy(x):
    idx = jnp.argmax(x.reshape(b, h * w, k), axis=1)
    return jnp.stack([idx % w, idx // w], axis=-1).astype(jnp.float32)  # [B, K, 2]

  norm = jnp.array([w / 10.0, h / 10.0], jnp.float32)
  dist = jnp.linalg.norm((argmax_xy(heatmaps) - argmax_xy(target)) / norm, axis=-1)
  valid = (target_weight > 0) & (mask[:, None] > 0) & (target.max(axis=(1, 2)) > 0)
  correct = jnp.sum(valid & (dist < PCK_THRESHOLD))
  return correct.astype(jnp.float32), jnp.sum(valid).astype(jnp.float32)


def make_eval_step(*, model, mesh, heatmap_loss_fn=None):
  """`eval_step(state, batch) -> (sums, heatmaps)`; sums add up over batches.

  sums: 'heatmap_loss_sum' (batch-mean loss x real examples), 'num_examples',
  'pck_correct', 'pck_total'. heatmaps stay sharded like the batch (for the mAP hook).
  """
  heatmap_loss_fn = heatmap_loss_fn or _default_heatmap_loss()

  def eval_step(state, batch):
    heatmaps, _ = model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, batch['frames'],
        train=False)
    heatmaps = heatmaps.astype(jnp.float32)
    mask = batch['mask']
    n = jnp.sum(mask)
    loss = heatmap_loss_fn(heatmaps, batch['target'], batch['target_weight'], mask=mask)
    correct, total = pck_counts(heatmaps, batch['target'], batch['target_weight'], mask)
    sums = {
        'heatmap_loss_sum': loss * n,
        'num_examples': n,
        'pck_correct': correct,
        'pck_total': total,
    }
    return sums, heatmaps

  return jax.jit(
      eval_step,
      in_shardings=(sharding_lib.replicated(mesh), sharding_lib.data_sharded(mesh)),
      out_shardings=(sharding_lib.replicated(mesh), sharding_lib.data_sharded(mesh)))


def make_predict_fn(state, eval_step, mesh):
  """`batch -> heatmaps` (numpy, this process's rows) of `state`: the mAP evaluation's input."""

  def predict_fn(batch):
    _, heatmaps = eval_step(state, sharding_lib.shard_batch(batch, mesh, TRAIN_KEYS))
    return sharding_lib.local_rows(heatmaps)

  return predict_fn
