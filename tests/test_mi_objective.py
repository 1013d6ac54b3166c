"""The bounded MI objectives: estimators against known answers, attacks, scale, warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tdmi_jax import losses
from tdmi_jax import optim
from tdmi_jax.models import mi
from tdmi_jax.models import tdmi
from tests import test_tdmi


def _gaussian_pair(n, rho, dims, seed=0):
  """u, v [n, dims] with corr(u_i, v_i) = rho: I(u; v) = -dims/2 log(1 - rho^2)."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(n, dims))
  v = rho * u + np.sqrt(1 - rho ** 2) * rng.normal(size=(n, dims))
  return jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), -dims / 2 * np.log(1 - rho ** 2)


# --- Estimators against a known answer ---------------------------------------------------


@pytest.mark.parametrize('rho', [0.0, 0.5, 0.9])
def test_gaussian_mi_recovers_the_true_value(rho):
  u, v, truth = _gaussian_pair(20000, rho, 3)
  assert float(mi.gaussian_mi(u, v)) == pytest.approx(truth, abs=0.02 + 0.02 * truth)


@pytest.mark.parametrize('rho', [0.5, 0.9])
def test_club_is_an_upper_bound_with_the_true_conditional(rho):
  # vCLUB with q(v|u) = the true conditional N(rho u, 1 - rho^2) is >= I(u; v).
  u, v, truth = _gaussian_pair(20000, rho, 3)
  mu = rho * u
  logvar = jnp.full_like(u, np.log(1 - rho ** 2))
  bound = float(mi.club_bound(mu, logvar, v))
  assert bound >= truth - 0.02
  # Its exact value here: per dim 1/2 (E_j (v_j - rho u_i)^2 - E (v - rho u)^2) / (1 - rho^2)
  # = rho^2 / (1 - rho^2).
  assert bound == pytest.approx(3 * rho ** 2 / (1 - rho ** 2), rel=0.03)


@pytest.mark.parametrize('rho', [0.0, 0.5, 0.9])
def test_info_nce_is_a_lower_bound(rho):
  u, v, truth = _gaussian_pair(512, rho, 3)
  nce = float(mi.info_nce(u, v, tau=0.1))
  assert nce <= truth + 0.05
  assert nce <= np.log(512) + 1e-5
  if rho == 0.9:
    assert nce > 0.3   # It does see the dependence.


def test_standardize_removes_scale_and_offset_without_gradient_through_stats():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
  np.testing.assert_allclose(mi.standardize(1000 * x + 7), mi.standardize(x), atol=1e-3)
  g = jax.grad(lambda x: jnp.sum(mi.standardize(x)[:, 0]))(x)
  # Statistics are constants: d/dx_i0 of sum_i (x_i0 - m) / s is 1/s for every i.
  np.testing.assert_allclose(g[:, 0], g[0, 0], rtol=1e-5)


# --- The objective: bounded below, whatever the features do ------------------------------

B, H, W, C, K = 4, 16, 12, 8, 3


def _fake(seed=0, h=H, w=W):
  rng = np.random.default_rng(seed)
  r = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  motion = r(B, h, w, C)
  gate = jax.nn.sigmoid(r(B, 1, 1, C))
  aux = {'motion': motion, 'useful': gate * motion, 'noisy': (1 - gate) * motion,
         'appearance': r(B, h, w, C), 'fused': r(B, h, w, C),
         'backbone_heatmaps': r(B, h, w, K), 'useful_heatmaps': r(B, h, w, K),
         'appearance_heatmaps': r(B, h, w, K), 'useful_task_heatmaps': r(B, h, w, K)}
  batch = {'target': jnp.asarray(rng.uniform(size=(B, h, w, K)), jnp.float32),
           'target_weight': jnp.ones((B, K), jnp.float32),
           'mask': jnp.ones((B,), jnp.float32)}
  return r(B, h, w, K), aux, batch


def _cfg(**kw):
  cfg = common.mi_config()
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _club_vars(cfg):
  return mi.init_club(jax.random.key(0), cfg, C)


ATTACKS = {
    'scale10': lambda x: 10 * x, 'scale100': lambda x: 100 * x, 'scale1000': lambda x: 1000 * x,
    'sharpen': lambda x: jnp.where(x == jnp.max(x, axis=(1, 2), keepdims=True), 1e4, -1e4),
    'flatten': lambda x: 0 * x,
}


@pytest.mark.parametrize('attack', sorted(ATTACKS))
@pytest.mark.parametrize('objective', ['reference', 'variational'])
def test_shipped_objectives_are_bounded_below(objective, attack):
  cfg = _cfg(objective=objective, divergence='reference', w_mu=1.0)
  heatmaps, aux, batch = _fake()
  f = ATTACKS[attack]
  attacked = {k: f(v) for k, v in aux.items()}
  loss, m = losses.objective(f(heatmaps), attacked, batch, cfg, club_variables=_club_vars(cfg))
  if objective == 'reference':
    # Every V term lies in [-(1 + log N)/N, 0] (SPEC §6); 10 signed terms in all.
    n = H * W
    bound = -10 * (1 + np.log(n)) / n
  else:
    # vCLUB clamped at 0, MSE >= 0, InfoNCE <= log(#samples).
    samples = B * (H // min(mi.CLUB_POOL, H)) * (W // min(mi.CLUB_POOL, W))
    bound = -np.log(samples)
  assert np.isfinite(float(loss))
  assert float(loss) >= bound - 1e-5, (objective, attack, float(loss), bound)


def test_kl_with_reference_signs_is_unbounded_and_warns(caplog):
  cfg = _cfg(objective='reference', divergence='kl')
  heatmaps, aux, batch = _fake()
  values = []
  for s in (1.0, 10.0, 100.0):
    # M_u = a M_t scaled: the minus-signed KL terms reward it.
    scaled = dict(aux, useful=s * aux['useful'], fused=s * aux['fused'])
    values.append(float(losses.objective(heatmaps, scaled, batch, cfg)[0]))
  assert values[2] < values[1] < values[0]
  assert values[2] < -10
  assert losses.warn_if_unbounded(cfg)
  assert not losses.warn_if_unbounded(_cfg(objective='variational'))
  assert not losses.warn_if_unbounded(_cfg(divergence='reference'))


def test_shipped_configs_use_a_bounded_objective():
  from configs import posetrack17, posetrack18, posetrack21, synthetic  # pylint: disable=g-import-not-at-top
  for mod in (posetrack17, posetrack18, posetrack21, synthetic):
    cfg = mod.get_config()
    assert not losses.warn_if_unbounded(cfg.mi), mod.__name__
    if cfg.mi.enabled and cfg.mi.objective == 'variational' and cfg.mi.w_uy > 0:
      assert cfg.model.useful_head, mod.__name__


def test_variational_terms_metrics_and_no_push_on_final_heatmaps():
  cfg = _cfg(objective='variational', w_un=0.5, w_uy=2.0, w_mu=0.1)
  heatmaps, aux, batch = _fake()
  cv = _club_vars(cfg)
  loss, m = losses.objective(heatmaps, aux, batch, cfg, club_variables=cv)
  for k in ('mi/I_un_club', 'mi/I_un_gauss', 'mi/L_uy', 'mi/I_mu_nce', 'mi/L_mi', 'mi/ramp'):
    assert k in m and np.isfinite(float(m[k])), k
  want = (m['heatmap_loss'] + 0.5 * m['mi/I_un_club'] + 2.0 * m['mi/L_uy']
          - 0.1 * m['mi/I_mu_nce'])
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  # Gradient w.r.t. the final heatmaps is L_H's alone.
  g_full = jax.grad(lambda h: losses.objective(h, aux, batch, cfg, club_variables=cv)[0])(heatmaps)
  g_lh = jax.grad(lambda h: losses.heatmap_loss(h, batch['target'], batch['target_weight']))(heatmaps)
  np.testing.assert_allclose(g_full, g_lh, rtol=1e-5, atol=1e-9)
  # A missing auxiliary head is named.
  no_head = {k: v for k, v in aux.items() if k != 'useful_task_heatmaps'}
  with pytest.raises(ValueError, match='useful_head'):
    losses.objective(heatmaps, no_head, batch, cfg, club_variables=cv)
  with pytest.raises(ValueError, match='objective'):
    losses.objective(heatmaps, aux, batch, _cfg(objective='mine'))


def test_warmup_ramp_scales_every_mi_term():
  cfg = _cfg(objective='variational', warmup_steps=10, ramp_steps=20)
  ramp = [float(losses.mi_ramp(cfg, s)) for s in (0, 9, 10, 20, 30, 100)]
  assert ramp == pytest.approx([0, 0, 0, 0.5, 1, 1])
  heatmaps, aux, batch = _fake()
  cv = _club_vars(cfg)
  l0, m0 = losses.objective(heatmaps, aux, batch, cfg, club_variables=cv, step=0)
  assert float(l0) == pytest.approx(float(m0['heatmap_loss']))
  l1, m1 = losses.objective(heatmaps, aux, batch, cfg, club_variables=cv, step=20)
  assert float(l1) == pytest.approx(float(m1['heatmap_loss'] + 0.5 * m1['mi/L_mi']), rel=1e-5)
  ref = _cfg(divergence='reference', warmup_steps=5)
  l_ref, m_ref = losses.objective(heatmaps, aux, batch, ref, step=0)
  assert float(l_ref) == pytest.approx(float(m_ref['heatmap_loss']))


def test_club_critic_learns_on_standardised_samples():
  cfg = _cfg(objective='variational')
  _, aux, _ = _fake()
  u, n, _ = losses.club_inputs(aux, None, cfg)
  # Standardised: zero mean, unit variance per channel.
  np.testing.assert_allclose(jnp.mean(u, 0), 0, atol=1e-4)
  np.testing.assert_allclose(jnp.std(n, 0), 1, atol=1e-2)
  # The critic's loss sees the scale-free samples: scaling the maps changes nothing.
  cv = _club_vars(cfg)
  a = losses.club_learning_loss(cv, aux, None, cfg)
  b = losses.club_learning_loss(cv, {k: 100 * v for k, v in aux.items()}, None, cfg)
  assert float(a) == pytest.approx(float(b), rel=1e-2)


# --- Model options -------------------------------------------------------------------------


# The tiny model config with dotted overrides: the same helper as the model tests'.
_model_cfg = test_tdmi._cfg  # pylint: disable=protected-access
# The driver's init key kind (state.create_state): the init compiles several times faster
# than with threefry keys.
_INIT_KEY = jax.random.key(0, impl='unsafe_rbg')


def _init(cfg, hw=(64, 32)):
  """(model, variables, frames, apply): `apply(variables, frames)` is the jitted eval call
  (eager calls of the whole model cost a minute each on 2 cores)."""
  model = tdmi.build_model(cfg)
  frames = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, *hw, 3)), jnp.float32)
  variables = jax.jit(lambda r, f: model.init(r, f, train=False))(_INIT_KEY, frames)
  apply = jax.jit(lambda v, f: model.apply(v, f, train=False))
  return model, variables, frames, apply


def test_rdm_complement_splits_the_motion_exactly():
  _, variables, frames, apply = _init(_model_cfg(rdm_noisy='complement', useful_head=True))
  _, aux = apply(variables, frames)
  np.testing.assert_allclose(aux['useful'] + aux['noisy'], aux['motion'], atol=1e-5)
  assert 'noisy_fc1' not in variables['params']['rdm']
  assert aux['useful_task_heatmaps'].shape == aux['backbone_heatmaps'].shape
  with pytest.raises(ValueError, match='rdm_noisy'):
    tdmi.build_model(_model_cfg(rdm_noisy='half'))


def test_motion_none_keeps_motion_out_of_the_prediction():
  _, variables, frames, apply = _init(_model_cfg(motion='none'))
  base, _ = apply(variables, frames)
  params = jax.tree.map(lambda x: x + 0.5, variables['params']['tde'])
  changed, _ = apply(dict(variables, params=dict(variables['params'], tde=params)), frames)
  np.testing.assert_array_equal(base, changed)
  with pytest.raises(ValueError, match='model.motion'):
    tdmi.build_model(_model_cfg(motion='flow'))


def test_window_residual_mixes_the_frames_backbone_heatmaps():
  cfg = _model_cfg(head_residual=True, residual_base='window')
  model, variables, frames, apply = _init(cfg)
  # Silence the fusion head's own correction so the output is the mixture alone.
  params = jax.tree.map(lambda x: x, variables['params'])
  params['head']['final'] = jax.tree.map(jnp.zeros_like, params['head']['final'])
  variables = dict(variables, params=params)
  heat, aux = apply(variables, frames)
  w = aux['frame_weights']
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  # Starts near the key frame alone: softmax of (0, 0, KEY_LOGIT, 0, 0).
  key_w = np.exp(tdmi.KEY_LOGIT) / (np.exp(tdmi.KEY_LOGIT) + 4)
  np.testing.assert_allclose(w[..., 2], key_w, atol=1e-3)
  # The mixture is of the five frames' own backbone heatmaps (plus the head's correction).
  backbone = tdmi.backbone_apply(model, variables, frames.reshape(-1, *frames.shape[2:]))[0]
  window = backbone.reshape(frames.shape[0], 5, *backbone.shape[1:])
  mixed = np.einsum('bhwt,bthwk->bhwk', w, window)
  np.testing.assert_allclose(heat, mixed, rtol=1e-4, atol=1e-6 * float(jnp.abs(window).max()))
  assert not np.allclose(mixed, window[:, 2], rtol=1e-3, atol=0)
  # The weights train: the loss reaches the 1x1 conv that predicts them.
  target = jnp.asarray(np.random.default_rng(2).uniform(size=heat.shape), jnp.float32)

  def loss(params):
    h, _ = apply(dict(variables, params=params), frames)
    return jnp.mean((h - target) ** 2)

  g = jax.jit(jax.grad(loss))(variables['params'])
  assert float(jnp.abs(g['frame_weights']['bias']).max()) > 0
  with pytest.raises(ValueError, match='residual_base'):
    tdmi.build_model(_model_cfg(head_residual=True, residual_base='average'))


def test_trainable_backbone_head_gets_a_gradient():
  # H(.) of I_uy / I_ay is the backbone's final conv: with a jointly trained backbone it
  # must be supervised, or it stays a random head (it got exactly zero gradient before).
  cfg = _model_cfg(**{'backbone.frozen': False, 'backbone.bn': 'live'})
  model, variables, frames, _ = _init(cfg)
  rng = np.random.default_rng(1)
  heat_shape = (2, 16, 8, 17)
  batch = {'target': jnp.asarray(rng.uniform(size=heat_shape), jnp.float32),
           'target_weight': jnp.ones((2, 17), jnp.float32)}
  mi_cfg = _cfg(divergence='reference')

  def loss(params, trainable_backbone):
    (h, aux), _ = model.apply(dict(variables, params=params), frames, train=True,
                              mutable=['batch_stats'])
    return losses.objective(h, aux, batch, mi_cfg, backbone_trainable=trainable_backbone)[0]

  both = jax.jit(lambda p: {f: jax.grad(loss)(p, f) for f in (False, True)})(
      variables['params'])
  for flag, nonzero in ((False, False), (True, True)):
    norm = float(jnp.linalg.norm(both[flag]['backbone']['final_layer']['kernel']))
    assert (norm > 0) == nonzero, (flag, norm)


# --- Scale: the shipped default means the same at 32x24 and 96x72 heatmaps -----------------


def _mi_to_lh_ratios(image_hw, sigma):
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  cfg = synthetic.get_config().unlock()
  cfg.model.variant = 'tiny'
  # The objective that --config.mi.enabled=True turns on in the quick start.
  cfg.mi.enabled = True
  cfg.model.useful_head = True
  model = tdmi.build_model(cfg.model)
  h, w = image_hw
  rng = np.random.default_rng(0)
  hh, ww = h // 4, w // 4
  # The backbone is frozen and only its outputs matter: random stage features at the right
  # size stand in for it (running it on 384x288 crops costs minutes on 2 cores).
  c = tdmi.hrnet.get_spec('tiny').width
  outputs = (jnp.asarray(rng.normal(size=(2, 5, hh, ww, 17)) * 0.1, jnp.float32),
             tuple(jnp.asarray(rng.normal(size=(2, 5, hh, ww, c)), jnp.float32)
                   for _ in range(4)))
  frames = jnp.zeros((1, 5, 64, 32, 3), jnp.float32)
  variables = jax.jit(lambda r, f: model.init(r, f, train=False))(_INIT_KEY, frames)
  yy, xx = np.mgrid[:hh, :ww]
  cy, cx = rng.uniform(0.3, 0.7, size=(2, 17)) * hh, rng.uniform(0.3, 0.7, size=(2, 17)) * ww
  target = np.exp(-((yy[None, :, :, None] - cy[:, None, None]) ** 2
                    + (xx[None, :, :, None] - cx[:, None, None]) ** 2) / (2 * sigma ** 2))
  batch = {'target': jnp.asarray(target, jnp.float32),
           'target_weight': jnp.ones((2, 17), jnp.float32), 'mask': jnp.ones((2,))}
  mask = tdmi.trainable_mask(variables['params'], cfg.model)
  trainable, frozen = optim.split_params(variables['params'], mask)
  cv = mi.init_club(jax.random.key(1), cfg.mi, 8)

  def parts(trainable):
    params = optim.merge_params(trainable, frozen)
    hm, aux = model.apply(dict(variables, params=params), None, train=False,
                          backbone_outputs=outputs)
    total, m = losses.objective(hm, aux, batch, cfg.mi, club_variables=cv)
    return m['heatmap_loss'], total - m['heatmap_loss']

  norm = lambda g: jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))

  @jax.jit
  def ratios(trainable):
    l_h, l_mi = parts(trainable)
    g_h = jax.grad(lambda p: parts(p)[0])(trainable)
    g_mi = jax.grad(lambda p: parts(p)[1])(trainable)
    return l_mi / l_h, norm(g_mi) / norm(g_h)

  value, grad = ratios(trainable)
  return float(value), float(grad)


def test_default_objective_transfers_across_heatmap_sizes():
  small_v, small_g = _mi_to_lh_ratios((128, 96), sigma=1.0)
  large_v, large_g = _mi_to_lh_ratios((384, 288), sigma=3.0)
  for a, b in ((small_v, large_v), (small_g, large_g)):
    assert a > 0 and b > 0
    assert 0.5 < a / b < 2.0, (small_v, large_v, small_g, large_g)
