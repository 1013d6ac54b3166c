"""tdmi_jax.losses: heatmap MSE, the MI objective, its gradient stops, CLUB mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tdmi_jax import losses
from tdmi_jax.models import mi

B, H, W, C, K = 2, 8, 6, 4, 3
METRIC_KEYS = {'loss', 'heatmap_loss', 'mi/I_un', 'mi/I_mu', 'mi/I_ua', 'mi/I_uf',
               'mi/I_af', 'mi/I_uy', 'mi/I_ay', 'mi/L_motion', 'mi/L_mm', 'mi/L_reg', 'mi/ramp',
               'contrib/heatmap', 'contrib/motion', 'contrib/mm', 'contrib/reg'}
# V(A -> B) of each term, written out again from SPEC §6 to check the wiring.
SPEC_TERMS = {
    'I_un': ('useful', 'noisy'), 'I_mu': ('motion', 'useful'),
    'I_ua': ('useful', 'appearance'), 'I_uf': ('useful', 'fused'),
    'I_af': ('appearance', 'fused'), 'I_uy': ('useful_heatmaps', 'heatmaps'),
    'I_ay': ('appearance_heatmaps', 'heatmaps'),
}


def _fake(seed=0, batch=B):
  """Random (heatmaps, aux, batch) with the CONTRACTS.md keys and tiny shapes."""
  rng = np.random.default_rng(seed)

  def r(*shape):  # Scaled so the tau=0.05 softmaxes are neither flat nor one-hot.
    return jnp.asarray(0.05 * rng.normal(size=shape), jnp.float32)

  aux = {k: r(batch, H, W, C) for k in ('motion', 'useful', 'noisy', 'appearance', 'fused')}
  aux.update({k: r(batch, H, W, K) for k in
              ('backbone_heatmaps', 'useful_heatmaps', 'appearance_heatmaps')})
  data = {'target': jnp.asarray(rng.uniform(size=(batch, H, W, K)), jnp.float32),
          'target_weight': jnp.asarray(rng.integers(0, 2, size=(batch, K)), jnp.float32),
          'mask': jnp.ones((batch,), jnp.float32)}
  return r(batch, H, W, K), aux, data


def _cfg(**overrides):
  cfg = common.mi_config()
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _nonzero(tree):
  return {k: bool(np.any(np.asarray(v) != 0)) for k, v in tree.items()}


# --- heatmap loss --------------------------------------------------------------------


def test_heatmap_loss_hand_computed_with_weights_and_mask():
  # One 1x2 heatmap, K=2, pred 0. Joint 0: target (1, 0), w=1 -> mean(1, 0) = 0.5.
  # Joint 1: target (2, 2), w=0.5 -> mean(1, 1) = 1. (0.5 + 1) / K = 0.75, no 1/2.
  pred = jnp.zeros((1, 1, 2, 2))
  target = jnp.array([[1.0, 2.0], [0.0, 2.0]]).reshape(1, 1, 2, 2)
  weight = jnp.array([[1.0, 0.5]])
  assert float(losses.heatmap_loss(pred, target, weight)) == pytest.approx(0.75)
  # A zero-weight joint contributes nothing, however wrong.
  assert float(losses.heatmap_loss(pred, target.at[..., 1].set(100.0),
                                   jnp.array([[1.0, 0.0]]))) == pytest.approx(0.25)
  # A padded second example (mask 0) is excluded, not averaged in as a zero.
  pred2 = jnp.concatenate([pred, jnp.full_like(pred, 9.0)])
  target2 = jnp.concatenate([target, target])
  weight2 = jnp.concatenate([weight, weight])
  assert float(losses.heatmap_loss(pred2, target2, weight2, jnp.array([1.0, 0.0]))
               ) == pytest.approx(0.75)
  assert float(losses.heatmap_loss(pred2, target2, weight2, jnp.zeros(2))) == 0.0


def test_heatmap_loss_matches_per_joint_formula():
  heatmaps, _, data = _fake(1, batch=3)
  data['target_weight'] = jnp.array([[1, 0, 1], [1, 1, 0], [0.5, 1, 1]], jnp.float32)
  pred, gt, w = (np.asarray(x, np.float64) for x in
                 (heatmaps, data['target'], data['target_weight']))
  per_joint = [np.mean((w[:, None, None, k] * (pred[..., k] - gt[..., k])) ** 2)
               for k in range(K)]
  got = losses.heatmap_loss(heatmaps, data['target'], data['target_weight'])
  np.testing.assert_allclose(got, sum(per_joint) / K, rtol=1e-5)


# --- objective -----------------------------------------------------------------------


@pytest.mark.parametrize('divergence', ['kl', 'reference'])
def test_objective_terms_groups_and_total(divergence):
  heatmaps, aux, data = _fake()
  cfg = _cfg(divergence=divergence, alpha=0.3, beta=0.7, gamma=1.9)
  loss, m = losses.objective(heatmaps, aux, data, cfg)
  assert set(m) == METRIC_KEYS
  assert all(np.isfinite(float(v)) and jnp.asarray(v).shape == () for v in m.values())
  # The weighted shares (what grad_norm/<part> differentiates) add up to the loss.
  np.testing.assert_allclose(sum(float(v) for k, v in m.items() if k.startswith('contrib/')),
                             float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(m['contrib/mm']), 0.7 * float(m['mi/L_mm']), rtol=1e-5)
  maps = dict(aux, heatmaps=heatmaps)
  for name, (a, b) in SPEC_TERMS.items():
    want = jnp.mean(mi.divergence(maps[a], maps[b], tau=0.05, kind=divergence))
    np.testing.assert_allclose(m[f'mi/{name}'], want, rtol=1e-5, err_msg=name)
  t = {k[5:]: float(v) for k, v in m.items() if k.startswith('mi/I_')}
  assert float(m['mi/L_motion']) == pytest.approx(2 * t['un'] - t['mu'], rel=1e-5)
  assert float(m['mi/L_mm']) == pytest.approx(t['ua'] - t['uf'] - t['af'], rel=1e-5)
  assert float(m['mi/L_reg']) == pytest.approx(
      t['uy'] - t['uf'] + t['ay'] - t['af'], rel=1e-5)
  total = (float(m['heatmap_loss']) + 0.3 * float(m['mi/L_motion'])
           + 0.7 * float(m['mi/L_mm']) + 1.9 * float(m['mi/L_reg']))
  assert float(loss) == pytest.approx(total, rel=1e-5)
  assert float(m['loss']) == float(loss)
  assert float(m['heatmap_loss']) == pytest.approx(
      float(losses.heatmap_loss(heatmaps, data['target'], data['target_weight'])))
  if divergence == 'kl':
    assert all(v > 0 for v in t.values())


def test_objective_is_heatmap_loss_alone_for_single_frame_or_disabled():
  heatmaps, aux, data = _fake()
  l_h = float(losses.heatmap_loss(heatmaps, data['target'], data['target_weight']))
  single = {'backbone_heatmaps': aux['backbone_heatmaps']}
  loss, m = losses.objective(heatmaps, single, data, _cfg())
  assert float(loss) == pytest.approx(l_h) and set(m) == {'loss', 'heatmap_loss'}
  loss, m = losses.objective(heatmaps, aux, data, _cfg(enabled=False))
  assert float(loss) == pytest.approx(l_h) and set(m) == {'loss', 'heatmap_loss'}
  assert abs(float(losses.objective(heatmaps, aux, data, _cfg())[0]) - l_h) > 1e-6


def test_objective_mask_excludes_padded_examples():
  heatmaps, aux, data = _fake(2)
  data['mask'] = jnp.array([1.0, 0.0])
  _, masked = losses.objective(heatmaps, aux, data, _cfg())
  first = lambda x: x[:1]  # noqa: E731
  data1 = {k: first(v) for k, v in data.items()}
  _, alone = losses.objective(first(heatmaps), jax.tree.map(first, aux), data1, _cfg())
  for k in METRIC_KEYS:
    np.testing.assert_allclose(masked[k], alone[k], rtol=1e-5, err_msg=k)


def test_objective_under_jit_equals_eager():
  heatmaps, aux, data = _fake(3)
  cfg = _cfg()
  eager = losses.objective(heatmaps, aux, data, cfg)[1]
  jitted = jax.jit(lambda h, a, b: losses.objective(h, a, b, cfg))(heatmaps, aux, data)[1]
  for k in METRIC_KEYS:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-5, err_msg=k)


def test_objective_rejects_bad_config_and_partial_aux():
  heatmaps, aux, data = _fake()
  with pytest.raises(ValueError, match='mi.divergence'):
    losses.objective(heatmaps, aux, data, _cfg(divergence='KL'))
  with pytest.raises(ValueError, match='mi.estimator'):
    losses.objective(heatmaps, aux, data, _cfg(estimator='mine'))
  with pytest.raises(ValueError, match='club_variables'):
    losses.objective(heatmaps, aux, data, _cfg(estimator='club'))
  partial = {k: v for k, v in aux.items() if k != 'fused'}
  with pytest.raises(ValueError, match='fused'):
    losses.objective(heatmaps, partial, data, _cfg())


# --- gradient stops ------------------------------------------------------------------


@pytest.mark.parametrize('divergence', ['kl', 'reference'])
def test_each_term_sends_gradient_only_where_spec_says(divergence):
  heatmaps, aux, _ = _fake(4)
  cfg = _cfg(divergence=divergence)
  maps = dict(aux, heatmaps=heatmaps)
  for name, (a, b) in SPEC_TERMS.items():
    grads = jax.grad(lambda m: losses.mi_terms(  # noqa: B023
        m['heatmaps'], {k: v for k, v in m.items() if k != 'heatmaps'}, cfg)[name])(maps)
    receives = {k for k, nz in _nonzero(grads).items() if nz}
    # A is gradient-stopped except in I_un, where both maps get gradient.
    assert receives == ({a, b} if name == 'I_un' else {b}), name


def test_objective_gradient_skips_stopped_inputs():
  heatmaps, aux, data = _fake(5)
  grads = jax.grad(lambda a, h: losses.objective(h, a, data, _cfg())[0],
                   argnums=(0, 1))(aux, heatmaps)
  nz = _nonzero(grads[0])
  # M_t only ever appears as A (stopped); the H(.) maps and backbone heatmaps likewise.
  assert not nz['motion'] and not nz['useful_heatmaps']
  assert not nz['appearance_heatmaps'] and not nz['backbone_heatmaps']
  assert nz['useful'] and nz['noisy'] and nz['appearance'] and nz['fused']
  assert np.any(np.asarray(grads[1]) != 0)


# --- CLUB mode -----------------------------------------------------------------------


def _club_setup(seed=6):
  heatmaps, aux, data = _fake(seed)
  cfg = _cfg(estimator='club', alpha=0.5)
  cfg.club.hidden = 8
  club_vars = mi.init_club(jax.random.key(seed), cfg, C)
  return heatmaps, aux, data, cfg, club_vars


def test_club_objective_replaces_i_un_with_the_bound():
  heatmaps, aux, data, cfg, club_vars = _club_setup()
  loss, m = losses.objective(heatmaps, aux, data, cfg, club_vars)
  assert set(m) == METRIC_KEYS | {'mi/club_bound'}
  assert all(np.isfinite(float(v)) for v in m.values())
  assert float(m['mi/L_motion']) == pytest.approx(
      2 * float(m['mi/club_bound']) - float(m['mi/I_mu']), rel=1e-5)
  u, n, w = mi.club_samples(aux['useful'], aux['noisy'], data['mask'])
  (mu, logvar), _ = mi.club_from_variables(club_vars).apply(club_vars, u, train=False)
  np.testing.assert_allclose(m['mi/club_bound'], mi.club_bound(mu, logvar, n, w),
                             rtol=1e-5)
  # I_un is still the divergence (logged), the same as in divergence mode.
  _, m_div = losses.objective(heatmaps, aux, data, _cfg(alpha=0.5))
  np.testing.assert_allclose(m['mi/I_un'], m_div['mi/I_un'], rtol=1e-5)


def test_club_gradients_are_isolated():
  heatmaps, aux, data, cfg, club_vars = _club_setup()
  # The main loss trains the model, not the CLUB net.
  g_club = jax.grad(lambda v: losses.objective(heatmaps, aux, data, cfg, v)[0])(club_vars)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_club))
  # M_n's gradient comes only from the bound (I_un is logged without gradient).
  g_noisy = jax.grad(lambda n: losses.objective(
      heatmaps, dict(aux, noisy=n), data, cfg, club_vars)[0])(aux['noisy'])

  def weighted_bound(n):
    u, s, w = mi.club_samples(aux['useful'], n)
    (mu, logvar), _ = mi.club_from_variables(club_vars).apply(club_vars, u, train=False)
    return 2 * cfg.alpha * mi.club_bound(mu, logvar, s, w)

  np.testing.assert_allclose(g_noisy, jax.grad(weighted_bound)(aux['noisy']),
                             rtol=1e-4, atol=1e-9)
  assert np.any(np.asarray(g_noisy) != 0)
  # The CLUB learning loss trains the CLUB net, not the model.
  g_params, g_aux = jax.grad(losses.club_learning_loss, argnums=(0, 1))(club_vars, aux)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_aux))
  assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(g_params))


def test_club_learning_loss_decreases_on_correlated_maps():
  rng = np.random.default_rng(7)
  useful = rng.normal(size=(4, 16, 16, C))
  noisy = 0.8 * useful + 0.6 * rng.normal(size=useful.shape)
  aux = {'useful': jnp.asarray(useful, jnp.float32), 'noisy': jnp.asarray(noisy, jnp.float32)}
  cfg = common.mi_config()
  club_vars = mi.init_club(jax.random.key(0), cfg, C)
  opt = optax.adam(1e-2)
  state = opt.init(club_vars['params'])

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(
        lambda p: losses.club_learning_loss({'params': p}, aux))(params)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss

  params = club_vars['params']
  first = None
  for _ in range(150):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  assert float(loss) < first - 0.5
  bound = losses.objective(
      jnp.zeros((4, 16, 16, K)), dict(aux, **{k: jnp.zeros((4, 16, 16, C)) for k in
                                              ('motion', 'appearance', 'fused')},
                                      useful_heatmaps=jnp.zeros((4, 16, 16, K)),
                                      appearance_heatmaps=jnp.zeros((4, 16, 16, K))),
      {'target': jnp.zeros((4, 16, 16, K)), 'target_weight': jnp.ones((4, K))},
      _cfg(estimator='club'), {'params': params})[1]['mi/club_bound']
  # Dependent u, n: the learned bound is clearly positive.
  assert float(bound) > 0.1
