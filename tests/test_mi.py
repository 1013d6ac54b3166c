"""tdmi_jax.models.mi: spatial-softmax divergences and the vCLUB estimator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tdmi_jax.models import mi


def _np_divergence(a, b, tau, kind):
  """Independent numpy V(A -> B) per example, written from SPEC §6 with explicit loops."""
  bsz, h, w, c = a.shape
  out = np.zeros(bsz)
  for i in range(bsz):
    per_channel = []
    for ch in range(c):
      pa = np.exp(a[i, :, :, ch].ravel() / tau)
      pa /= pa.sum()
      qb = np.exp(b[i, :, :, ch].ravel() / tau)
      qb /= qb.sum()
      if kind == 'kl':
        per_channel.append(np.sum(qb * (np.log(qb) - np.log(pa))))
      else:
        per_channel.append(np.mean(qb * (np.log(qb) - pa)))
    out[i] = np.mean(per_channel)
  return out


# --- divergences ---------------------------------------------------------------------


def test_divergence_hand_computed_two_pixels():
  # Two pixels, one channel. A flat -> p = (1/2, 1/2); B/tau = (log 3, 0) -> q = (3/4, 1/4).
  tau = 0.05
  a = jnp.zeros((1, 1, 2, 1))
  b = jnp.array([tau * math.log(3.0), 0.0]).reshape(1, 1, 2, 1)
  # KL(q||p) = 3/4 log(3/2) + 1/4 log(1/2).
  kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
  assert kl == pytest.approx(0.1308120, abs=1e-6)
  # Reference surrogate: mean over the 2 elements of q (log q - p).
  ref = (0.75 * (math.log(0.75) - 0.5) + 0.25 * (math.log(0.25) - 0.5)) / 2
  assert ref == pytest.approx(-0.5311680, abs=1e-6)
  np.testing.assert_allclose(mi.divergence(a, b, tau=tau, kind='kl'), [kl], rtol=1e-5)
  np.testing.assert_allclose(mi.divergence(a, b, tau=tau, kind='reference'), [ref],
                             rtol=1e-5)


@pytest.mark.parametrize('kind', ['kl', 'reference'])
def test_divergence_matches_numpy_loops(kind):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 3, 2, 4)).astype(np.float32) * 0.1
  b = rng.normal(size=(2, 3, 2, 4)).astype(np.float32) * 0.1
  got = mi.divergence(jnp.asarray(a), jnp.asarray(b), tau=0.05, kind=kind)
  np.testing.assert_allclose(got, _np_divergence(a, b, 0.05, kind), rtol=1e-4, atol=1e-6)


def test_kl_zero_for_identical_maps_and_positive_otherwise():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(3, 4, 3, 5)), jnp.float32)
  np.testing.assert_allclose(mi.divergence(a, a, tau=0.05, kind='kl'), 0.0, atol=1e-6)
  # Shifting a whole channel by a constant leaves its softmax unchanged.
  np.testing.assert_allclose(mi.divergence(a, a + 7.0, tau=0.05, kind='kl'), 0.0,
                             atol=1e-5)
  b = a + 0.05 * jnp.asarray(rng.normal(size=a.shape), jnp.float32)
  assert np.all(np.asarray(mi.divergence(a, b, tau=0.05, kind='kl')) > 1e-4)


def test_divergence_rejects_bad_input():
  with pytest.raises(ValueError, match='one shape'):
    mi.divergence(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 4)), tau=0.05, kind='kl')
  with pytest.raises(ValueError, match='mi.divergence'):
    mi.divergence(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), tau=0.05, kind='js')


# --- CLUB pieces ---------------------------------------------------------------------


def test_club_module_shapes_and_rebuild_from_variables():
  cfg = common.mi_config()
  cfg.club.hidden = 12
  variables = mi.init_club(jax.random.key(0), cfg, num_channels=5)
  club = mi.club_from_variables(variables)
  assert club.hidden == 12
  (mu, logvar), aux = club.apply(variables, jnp.ones((7, 5)), train=True)
  assert mu.shape == logvar.shape == (7, 5) and aux == {}
  assert np.all(np.abs(np.asarray(logvar)) < mi.LOGVAR_LIMIT)
  with pytest.raises(ValueError, match='Club'):
    mi.club_from_variables({'params': {'other': {}}})


def test_club_samples_pool_cells_and_mask():
  rng = np.random.default_rng(2)
  u = rng.normal(size=(2, 16, 12, 3)).astype(np.float32)
  n = rng.normal(size=(2, 16, 12, 3)).astype(np.float32)
  su, sn, weights = mi.club_samples(jnp.asarray(u), jnp.asarray(n),
                                    jnp.array([1.0, 0.0]))
  # 8x8 cells over 16x12: 2 x 1 cells per example (the 4-wide remainder is dropped).
  assert su.shape == sn.shape == (4, 3)
  np.testing.assert_allclose(su[0], u[0, :8, :8].mean(axis=(0, 1)), rtol=1e-5)
  np.testing.assert_allclose(sn[3], n[1, 8:16, :8].mean(axis=(0, 1)), rtol=1e-5)
  np.testing.assert_array_equal(weights, [1, 1, 0, 0])
  # Maps smaller than a cell are pooled whole.
  su, _, _ = mi.club_samples(jnp.asarray(u[:, :4, :3]), jnp.asarray(n[:, :4, :3]))
  np.testing.assert_allclose(su, u[:, :4, :3].mean(axis=(1, 2)), rtol=1e-5)


def test_club_bound_closed_form_equals_all_pairs():
  rng = np.random.default_rng(3)
  mu, logvar, n = (rng.normal(size=(6, 3)) for _ in range(3))
  weights = np.array([1, 1, 0, 1, 1, 1], np.float64)

  def log_q(j, i):  # log q(n_j | u_i) with the normaliser, which must cancel anyway.
    var = np.exp(logvar[i])
    return np.sum(-0.5 * np.log(2 * np.pi * var) - (n[j] - mu[i]) ** 2 / (2 * var))

  keep = np.flatnonzero(weights)
  positive = np.mean([log_q(i, i) for i in keep])
  negative = np.mean([log_q(j, i) for i in keep for j in keep])
  got = mi.club_bound(*(jnp.asarray(x, jnp.float32) for x in (mu, logvar, n)),
                      jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(got, positive - negative, rtol=1e-4)
  nll = np.mean([-log_q(i, i) for i in keep])
  got = mi.gaussian_nll(*(jnp.asarray(x, jnp.float32) for x in (mu, logvar, n)),
                        jnp.asarray(weights, jnp.float32))
  np.testing.assert_allclose(got, nll, rtol=1e-5)


def _gaussian_pair(rng, rho, num, dim):
  u = rng.standard_normal((num, dim))
  n = rho * u + math.sqrt(1 - rho ** 2) * rng.standard_normal((num, dim))
  return jnp.asarray(u, jnp.float32), jnp.asarray(n, jnp.float32)


def _fit_club(u, n, steps=300):
  club = mi.Club(hidden=32)
  params = club.init(jax.random.key(0), u, train=False)['params']
  opt = optax.adam(1e-2)

  def loss_fn(p):
    (mu, logvar), _ = club.apply({'params': p}, u, train=False)
    return mi.gaussian_nll(mu, logvar, n)

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(p, updates), state, loss

  state = opt.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return club, params, losses


def test_club_learns_and_its_bound_tracks_gaussian_mi():
  """u ~ N(0, I_d), n = rho u + sqrt(1 - rho^2) eps: I(u; n) = -d/2 log(1 - rho^2).

  With the exact conditional q = p(n|u) the vCLUB bound is analytic:
  E_indep[(n - rho u)^2] = 1 + rho^2 and E_joint = 1 - rho^2 per dim, so
  bound = d rho^2 / (1 - rho^2) >= the true MI. The learned bound must match it and so
  be ~0 at rho = 0, increase with rho, and stay above the truth.
  """
  dim = 2
  rng = np.random.default_rng(0)
  bounds = []
  for rho in (0.0, 0.5, 0.9):
    u, n = _gaussian_pair(rng, rho, 2048, dim)
    club, params, losses = _fit_club(u, n)
    # The NLL falls to the entropy of the true conditional, d/2 (log(2 pi (1-rho^2)) + 1).
    optimum = dim / 2 * (math.log(2 * math.pi * (1 - rho ** 2)) + 1)
    assert losses[-1] < losses[0] - 0.2
    assert losses[-1] == pytest.approx(optimum, abs=0.1)
    u_test, n_test = _gaussian_pair(rng, rho, 4096, dim)
    (mu, logvar), _ = club.apply({'params': params}, u_test, train=False)
    bound = float(mi.club_bound(mu, logvar, n_test))
    true_mi = -dim / 2 * math.log(1 - rho ** 2)
    analytic = dim * rho ** 2 / (1 - rho ** 2)
    assert bound == pytest.approx(analytic, rel=0.15, abs=0.05), rho
    assert bound >= true_mi - 0.05, rho
    bounds.append(bound)
  assert bounds[0] < bounds[1] < bounds[2]
