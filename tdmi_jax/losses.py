"""The TDMI objective (SPEC §6): joint-weighted heatmap MSE plus the MI terms.

Everything here is computed in float32, whatever dtype the model's outputs arrive in
(model.dtype='bfloat16' included): `objective` and `club_learning_loss` cast them first.

Reductions, exactly:

* `heatmap_loss`: per joint k, mean over examples and pixels of (w_k (pred_k - gt_k))^2,
  summed over joints and divided by K (no 1/2). With every joint sharing the same pixel
  count this is the mean over all elements; with `mask` [B] it is the mean over the
  unmasked examples only (0 when every example is masked).
* Each MI term V(A -> B) (`mi.divergence`, per example) is averaged over the unmasked
  examples, the mask being `batch['mask']` when the batch has one. For 'kl' that is KL per
  (example, channel) summed over the H*W pixels, then the mean over examples and
  channels; for 'reference' it is the mean over all elements.
* A is gradient-stopped in every term except I_un, whose gradient reaches both M_u and
  M_n; H(.) maps and the backbone heatmaps come from the model already gradient-stopped.

Groups (reference signs, kept for both divergences; see SPEC §6 on why they look odd):
  L_motion = 2 I_un - I_mu,  L_mm = I_ua - I_uf - I_af,  L_reg = I_uy - I_uf + I_ay - I_af,
  L = L_H + alpha L_motion + beta L_mm + gamma L_reg.
With `mi.estimator='club'` the vCLUB bound replaces I_un in L_motion (2 * bound - I_mu);
I_un is still computed and logged, without gradient.

`mi.objective` selects the family:

* 'reference': the seven terms above (`mi.divergence` 'reference' is bounded below;
  'kl' is unbounded below with these signs and is only for experiments).
* 'variational': bounds that mean what they say, on pooled cells of the maps:
    L = L_H + r(step) * (w_un * max(vCLUB(M_u; M_n), 0) + w_uy * L_uy - w_mu * NCE(M_t; M_u))
  - vCLUB on standardised samples (gradient-stopped statistics), critic trained in the
    same step by its own likelihood; clamped at 0 (a true MI is never negative);
  - L_uy: the joint-weighted MSE of an auxiliary heatmap head on M_u alone (a Gaussian
    log-likelihood, i.e. a variational lower bound on I(M_u; Y) up to a constant), so its
    weight means the same thing at every heatmap size and no term pushes on Y^ itself;
  - NCE: InfoNCE lower bound on I(M_t; M_u), at most log N;
  so L >= L_H - w_mu log N >= -w_mu log N whatever the features do.
  'mi/I_un_gauss' (the Gaussian estimate -1/2 sum log(1 - rho^2)) is logged as a
  deterministic cross-check of the vCLUB value.
r(step) (`mi.warmup_steps`, `mi.ramp_steps`) is 0 before the warm-up ends, then ramps
linearly to 1; it scales every MI term of either objective and is logged as 'mi/ramp'.
"""

from absl import logging

import jax
import jax.numpy as jnp

from tdmi_jax.models import mi

# aux keys the MI terms read (CONTRACTS.md "Model"). A 'single_frame' aux has none.
MI_AUX_KEYS = ('motion', 'useful', 'noisy', 'appearance', 'fused',
               'useful_heatmaps', 'appearance_heatmaps')
# (metric name, A key, B key, gradient to A). A key 'heatmaps' means the final heatmaps.
TERMS = (
    ('I_un', 'useful', 'noisy', True),
    ('I_mu', 'motion', 'useful', False),
    ('I_ua', 'useful', 'appearance', False),
    ('I_uf', 'useful', 'fused', False),
    ('I_af', 'appearance', 'fused', False),
    ('I_uy', 'useful_heatmaps', 'heatmaps', False),
    ('I_ay', 'appearance_heatmaps', 'heatmaps', False),
)


def _f32(tree):
  """Floating leaves as float32.

  Under model.dtype='bfloat16' every MI term and loss is computed in f32. Casting the
  model's outputs once, at the entry, also makes the cotangents of a map that several
  terms read add up in f32 (rounded to the compute dtype once, on the way back).
  """
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _masked_mean(per_example, mask):
  if mask is None:
    return jnp.mean(per_example)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def heatmap_loss(pred, target, target_weight, mask=None):
  """Joint-weighted MSE (SPEC §6). pred, target [B, h, w, K]; target_weight [B, K]."""
  if pred.shape != target.shape:
    raise ValueError(f'heatmap_loss: pred {pred.shape} and target {target.shape} differ')
  w = target_weight.astype(jnp.float32)[:, None, None, :]
  err = (w * (pred.astype(jnp.float32) - target.astype(jnp.float32))) ** 2
  return _masked_mean(jnp.mean(err, axis=(1, 2, 3)), mask)


def _check_mi_cfg(mi_cfg):
  objective = mi_cfg.get('objective', 'reference')
  if objective not in ('reference', 'variational'):
    raise ValueError(
        f"mi.objective must be 'reference' or 'variational', got {objective!r}")
  if mi_cfg.divergence not in ('kl', 'reference'):
    raise ValueError(f"mi.divergence must be 'kl' or 'reference', got {mi_cfg.divergence!r}")
  if mi_cfg.estimator not in ('divergence', 'club'):
    raise ValueError(
        f"mi.estimator must be 'divergence' or 'club', got {mi_cfg.estimator!r}")


def uses_club(mi_cfg):
  """Whether the objective needs the vCLUB critic (and so the state its parameters)."""
  if not mi_cfg.enabled:
    return False
  if mi_cfg.get('objective', 'reference') == 'variational':
    return float(mi_cfg.w_un) > 0
  return mi_cfg.estimator == 'club'


def warn_if_unbounded(mi_cfg):
  """Logs (and returns True) when the configured objective is unbounded below."""
  if (mi_cfg.enabled and mi_cfg.get('objective', 'reference') == 'reference'
      and mi_cfg.divergence == 'kl'):
    logging.warning(
        "mi.divergence='kl' with the reference signs is unbounded below: the loss goes to "
        "-inf by scaling the features (use only for experiments; shipped configs use a "
        "bounded objective).")
    return True
  return False


def mi_ramp(mi_cfg, step):
  """r(step): 0 before mi.warmup_steps, then a linear ramp to 1 over mi.ramp_steps."""
  warmup = float(mi_cfg.get('warmup_steps', 0))
  ramp = float(mi_cfg.get('ramp_steps', 0))
  if step is None:
    return jnp.float32(1.0)
  s = jnp.asarray(step, jnp.float32)
  if ramp <= 0:
    return jnp.where(s >= warmup, 1.0, 0.0).astype(jnp.float32)
  return jnp.clip((s - warmup) / ramp, 0.0, 1.0).astype(jnp.float32)


def club_inputs(aux, mask, mi_cfg=None):
  """(u, n, weights): the vCLUB samples, standardised for the 'variational' objective."""
  u, n, weights = mi.club_samples(aux['useful'], aux['noisy'], mask)
  if mi_cfg is not None and mi_cfg.get('objective', 'reference') == 'variational':
    u, n = mi.standardize(u, weights), mi.standardize(n, weights)
  return u, n, weights


def variational_terms(heatmaps, aux, batch, mi_cfg, club_variables=None):
  """The 'variational' objective's terms {'I_un_club', 'I_un_gauss', 'L_uy', 'I_mu_nce'}."""
  del heatmaps  # No term pushes on the final heatmaps.
  mask = batch.get('mask')
  terms = {}
  u, n, weights = club_inputs(aux, mask, mi_cfg)
  if float(mi_cfg.w_un) > 0:
    if club_variables is None:
      raise ValueError('objective: mi.objective=variational with mi.w_un > 0 needs '
                       'club_variables')
    club = mi.club_from_variables(club_variables)
    (mu, logvar), _ = club.apply(jax.lax.stop_gradient(club_variables), u, train=False)
    terms['I_un_club'] = jnp.maximum(mi.club_bound(mu, logvar, n, weights), 0.0)
  terms['I_un_gauss'] = jax.lax.stop_gradient(mi.gaussian_mi(u, n, weights))
  if float(mi_cfg.w_uy) > 0:
    if 'useful_task_heatmaps' not in aux:
      raise ValueError('mi.objective=variational with mi.w_uy > 0 needs the auxiliary '
                       'heatmap head on M_u: set model.useful_head=True')
    terms['L_uy'] = heatmap_loss(aux['useful_task_heatmaps'], batch['target'],
                                 batch['target_weight'], mask)
  if float(mi_cfg.w_mu) > 0:
    t, _, _ = mi.club_samples(aux['motion'], aux['noisy'], mask)
    u_raw, _, _ = mi.club_samples(aux['useful'], aux['noisy'], mask)
    terms['I_mu_nce'] = mi.info_nce(jax.lax.stop_gradient(t), u_raw,
                                    tau=float(mi_cfg.get('nce_tau', 0.1)), weights=weights)
  return terms


def _club_bound(club_variables, aux, mask):
  """vCLUB bound with the CLUB params frozen: gradient goes to M_u and M_n only."""
  club = mi.club_from_variables(club_variables)
  u, n, weights = mi.club_samples(aux['useful'], aux['noisy'], mask)
  (mu, logvar), _ = club.apply(jax.lax.stop_gradient(club_variables), u, train=False)
  return mi.club_bound(mu, logvar, n, weights)


def mi_terms(heatmaps, aux, mi_cfg, mask=None):
  """The seven divergence terms {'I_un': scalar, ...} with their gradient stops."""
  maps = dict(aux, heatmaps=heatmaps)
  terms = {}
  for name, a_key, b_key, grad_to_a in TERMS:
    a = maps[a_key] if grad_to_a else jax.lax.stop_gradient(maps[a_key])
    v = mi.divergence(a, maps[b_key], tau=mi_cfg.tau, kind=mi_cfg.divergence)
    terms[name] = _masked_mean(v, mask)
  return terms


def objective(heatmaps, aux, batch, mi_cfg, club_variables=None, step=None,
              backbone_trainable=False):
  """Total loss of the main model and its metrics (see the module docstring).

  heatmaps [B, h, w, K]; aux as in CONTRACTS.md; batch with 'target', 'target_weight'
  and optionally 'mask'; mi_cfg = `config.mi`; club_variables = the CLUB network's
  variables, required when `uses_club(mi_cfg)`; step = the train step (for the MI
  warm-up, None: no warm-up); backbone_trainable: add L_H of the backbone's own key-frame
  heatmaps, so that H(.) (its final conv, used by I_uy and I_ay) is a trained head rather
  than a random one when the backbone is trained jointly. Returns (loss, metrics), metrics
  a flat dict of float32 scalars. An aux without the MI tensors (arch='single_frame') or
  mi_cfg.enabled=False gives L_H alone, with metrics 'loss' and 'heatmap_loss' only.
  """
  heatmaps, aux = _f32((heatmaps, dict(aux)))
  mask = batch.get('mask')
  l_h = heatmap_loss(heatmaps, batch['target'], batch['target_weight'], mask)
  metrics = {'heatmap_loss': l_h}
  present = [k for k in MI_AUX_KEYS if k in aux]
  if not mi_cfg.enabled or not present:
    metrics['loss'] = l_h
    return l_h, metrics
  if len(present) != len(MI_AUX_KEYS):
    missing = sorted(set(MI_AUX_KEYS) - set(present))
    raise ValueError(f'objective: model aux has some MI tensors but lacks {missing}')
  _check_mi_cfg(mi_cfg)
  ramp = mi_ramp(mi_cfg, step)
  metrics['mi/ramp'] = ramp
  if backbone_trainable and 'backbone_heatmaps' in aux:
    metrics['backbone_heatmap_loss'] = heatmap_loss(
        aux['backbone_heatmaps'], batch['target'], batch['target_weight'], mask)
    l_h = l_h + metrics['backbone_heatmap_loss']

  if mi_cfg.get('objective', 'reference') == 'variational':
    terms = variational_terms(heatmaps, aux, batch, mi_cfg, club_variables)
    l_mi = (float(mi_cfg.w_un) * terms.get('I_un_club', 0.0)
            + float(mi_cfg.w_uy) * terms.get('L_uy', 0.0)
            - float(mi_cfg.w_mu) * terms.get('I_mu_nce', 0.0))
    loss = l_h + ramp * l_mi
    metrics.update({f'mi/{k}': v for k, v in terms.items()})
    metrics.update({'mi/L_mi': l_mi, 'loss': loss})
    metrics.update(_contributions(l_h, ramp, {
        'club': (float(mi_cfg.w_un), terms.get('I_un_club')),
        'uy': (float(mi_cfg.w_uy), terms.get('L_uy')),
        'nce': (-float(mi_cfg.w_mu), terms.get('I_mu_nce'))}))
    return loss, metrics

  terms = mi_terms(heatmaps, aux, mi_cfg, mask)
  i_un = terms['I_un']
  if mi_cfg.estimator == 'club':
    if club_variables is None:
      raise ValueError("objective: mi.estimator='club' needs club_variables")
    bound = _club_bound(club_variables, aux, mask)
    metrics['mi/club_bound'] = bound
    terms['I_un'] = jax.lax.stop_gradient(i_un)  # Logged only.
    i_un = bound

  l_motion = 2.0 * i_un - terms['I_mu']
  l_mm = terms['I_ua'] - terms['I_uf'] - terms['I_af']
  l_reg = terms['I_uy'] - terms['I_uf'] + terms['I_ay'] - terms['I_af']
  loss = l_h + ramp * (mi_cfg.alpha * l_motion + mi_cfg.beta * l_mm + mi_cfg.gamma * l_reg)
  metrics.update({f'mi/{k}': v for k, v in terms.items()})
  metrics.update({'mi/L_motion': l_motion, 'mi/L_mm': l_mm, 'mi/L_reg': l_reg,
                  'loss': loss})
  metrics.update(_contributions(l_h, ramp, {
      'motion': (float(mi_cfg.alpha), l_motion), 'mm': (float(mi_cfg.beta), l_mm),
      'reg': (float(mi_cfg.gamma), l_reg)}))
  return loss, metrics


CONTRIB_PREFIX = 'contrib/'


def _contributions(l_h, ramp, parts):
  """{'contrib/<part>': its weighted share of the loss}; the shares sum to the loss.

  parts: {name: (weight, term or None)}. The train step differentiates each share on its
  own to log per-term gradient norms (`grad_norm/<part>`); parts with weight 0 or no term
  are left out.
  """
  out = {CONTRIB_PREFIX + 'heatmap': l_h}
  for name, (weight, term) in parts.items():
    if weight and term is not None:
      out[CONTRIB_PREFIX + name] = ramp * weight * term
  return out


def club_learning_loss(club_variables, aux, mask=None, mi_cfg=None):
  """The CLUB network's loss: -log q(M_n | M_u) on stop-gradient (M_u, M_n).

  Differentiate w.r.t. club_variables['params'] only; no gradient reaches the model.
  `mask` [B] optionally drops padded examples; `mi_cfg` selects the samples the bound
  sees (standardised for mi.objective='variational').
  """
  aux = _f32({k: jax.lax.stop_gradient(aux[k]) for k in ('useful', 'noisy')})
  club = mi.club_from_variables(club_variables)
  u, n, weights = club_inputs(aux, mask, mi_cfg)
  (mu, logvar), _ = club.apply(club_variables, u, train=False)
  return mi.gaussian_nll(mu, logvar, n, weights)
