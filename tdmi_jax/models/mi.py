"""Mutual-information estimators for the TDMI objective (SPEC §6).

Two families:

* Divergences between spatial distributions, `divergence(a, b, tau, kind)`: every channel
  of a map [B, H, W, C] becomes a distribution over its H*W pixels by a softmax with
  temperature tau; V(A -> B) compares q = softmax(B / tau) with p = softmax(A / tau).
* vCLUB (Cheng et al., ICML 2020), an upper bound on I(M_u; M_n) with a small variational
  Gaussian q(M_n | M_u), the `Club` module. Its samples are the C-dim feature vectors of
  M_u and M_n average-pooled over CLUB_POOL x CLUB_POOL cells (96x72 heatmaps give 12x9
  cells, so a batch of B gives B*108 pairs): the network stays a cheap per-vector MLP, and
  the bound sees many more pairs than a global pool would.

Gradient isolation (who trains what) lives in `tdmi_jax/losses.py`; the functions here
are plain differentiable maths.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# Side of the average-pool cells that turn maps into CLUB samples. A constant rather
# than a config field so that `losses.club_learning_loss(club_variables, aux)` and the
# bound in `losses.objective` cannot disagree about it.
CLUB_POOL = 8
# The log-variance head is soft-clamped to (-LOGVAR_LIMIT, LOGVAR_LIMIT): wide enough for
# feature maps of any sensible scale, narrow enough that exp() never overflows.
LOGVAR_LIMIT = 10.0


# --- Divergences between spatial softmaxes ------------------------------------------


def _spatial_log_softmax(x, tau):
  """[B, H, W, C] -> [B, H*W, C] log-probabilities of each channel over its pixels."""
  b, h, w, c = x.shape
  return jax.nn.log_softmax(x.reshape(b, h * w, c).astype(jnp.float32) / tau, axis=1)


def divergence(a, b, *, tau, kind):
  """Per-example V(A -> B), shape [B]; no gradient stop here (the caller decides).

  p = softmax(A / tau), q = softmax(B / tau), per channel over the H*W pixels.

  * kind='kl': KL(q || p) = sum over pixels of q (log q - log p), computed for every
    (example, channel) pair, then averaged over the C channels. So the batch mean of
    this is "KL per (example, channel) summed over H*W, then mean over examples and
    channels". It is >= 0 and exactly 0 when A == B.
  * kind='reference': the reference's literal surrogate q (log q - p) (p where a
    log-probability belongs), averaged over H, W and C. The batch mean of this is the
    reference's "mean over all elements".
  """
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f'divergence needs two [B, H, W, C] maps of one shape, got '
                     f'{a.shape} and {b.shape}')
  log_p = _spatial_log_softmax(a, tau)
  log_q = _spatial_log_softmax(b, tau)
  q = jnp.exp(log_q)
  if kind == 'kl':
    return jnp.mean(jnp.sum(q * (log_q - log_p), axis=1), axis=1)
  if kind == 'reference':
    return jnp.mean(q * (log_q - jnp.exp(log_p)), axis=(1, 2))
  raise ValueError(f"mi.divergence must be 'kl' or 'reference', got {kind!r}")


# --- vCLUB ---------------------------------------------------------------------------


class Club(nn.Module):
  """Variational Gaussian q(n | u) = N(mu(u), diag(exp(logvar(u)))) for vCLUB.

  Two separate MLP heads (Dense -> ReLU -> Dense) on the C-dim vector u. The output
  width equals the input width (M_u and M_n have the same channels).
  """
  hidden: int = 64

  @nn.compact
  def __call__(self, x, *, train):
    """x: [N, C] samples of u. Returns ((mu, logvar), aux), each [N, C]; aux is empty.

    `train` is unused (no dropout or BatchNorm); kept for the module convention.
    """
    del train
    x = x.astype(jnp.float32)
    c = x.shape[-1]
    mu = nn.Dense(self.hidden, name='mu_hidden')(x)
    mu = nn.Dense(c, name='mu_out')(nn.relu(mu))
    logvar = nn.Dense(self.hidden, name='logvar_hidden')(x)
    logvar = nn.Dense(c, name='logvar_out')(nn.relu(logvar))
    logvar = LOGVAR_LIMIT * jnp.tanh(logvar / LOGVAR_LIMIT)
    return (mu, logvar), {}


def build_club(mi_cfg):
  """The CLUB network described by `config.mi.club`."""
  return Club(hidden=mi_cfg.club.hidden, name='club')


def init_club(rng, mi_cfg, num_channels):
  """Fresh CLUB variables ({'params': ...}) for C = num_channels feature channels."""
  return build_club(mi_cfg).init(rng, jnp.zeros((1, num_channels), jnp.float32),
                                 train=False)


def club_from_variables(club_variables):
  """Rebuilds the Club module whose variables these are (the width is read off them)."""
  params = club_variables['params']
  try:
    hidden = params['mu_hidden']['kernel'].shape[1]
  except (KeyError, TypeError) as e:
    raise ValueError('club_variables are not variables of tdmi_jax.models.mi.Club '
                     "(expected {'params': {'mu_hidden': {'kernel': ...}, ...}})") from e
  return Club(hidden=hidden, name='club')


def club_samples(useful, noisy, mask=None):
  """Pools M_u, M_n [B, h, w, C] into CLUB samples u, n [N, C] and weights [N].

  Cells are CLUB_POOL x CLUB_POOL (clamped to the map size for tiny maps), without
  padding: a remainder strip narrower than a cell is dropped. `mask` [B] (0 for padded
  examples) becomes a per-sample weight.
  """
  if useful.shape != noisy.shape or useful.ndim != 4:
    raise ValueError(f'CLUB needs useful/noisy maps [B, h, w, C] of one shape, got '
                     f'{useful.shape} and {noisy.shape}')
  b, h, w, c = useful.shape
  window = (min(CLUB_POOL, h), min(CLUB_POOL, w))

  def pool(x):
    x = nn.avg_pool(x.astype(jnp.float32), window, strides=window, padding='VALID')
    return x.reshape(b, -1, c)

  u, n = pool(useful), pool(noisy)
  cells = u.shape[1]
  weights = jnp.ones((b,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  weights = jnp.repeat(weights, cells)
  return u.reshape(b * cells, c), n.reshape(b * cells, c), weights


def _weighted_mean(x, weights):
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def gaussian_nll(mu, logvar, n, weights=None):
  """Mean over samples of -log q(n | u), summed over the C dims (CLUB's learning loss)."""
  per_sample = 0.5 * jnp.sum(
      (n - mu) ** 2 * jnp.exp(-logvar) + logvar + jnp.log(2 * jnp.pi), axis=-1)
  if weights is None:
    return jnp.mean(per_sample)
  return _weighted_mean(per_sample, weights)


def club_bound(mu, logvar, n, weights=None):
  """vCLUB estimate of I(u; n), the mean-over-all-pairs form, in O(N C).

  I = E_i[log q(n_i | u_i)] - E_i E_j[log q(n_j | u_i)]. The normalisers cancel, and
  because log q is quadratic in n, E_j (n_j - mu_i)^2 = Var(n) + (E n - mu_i)^2 per dim,
  so the N x N pair matrix is never formed and no random shuffling is needed.
  Summed over the C dims (the MI of the vectors), averaged over samples.
  """
  if weights is None:
    weights = jnp.ones(n.shape[:1], jnp.float32)
  total = jnp.maximum(jnp.sum(weights), 1e-8)
  n_mean = jnp.sum(n * weights[:, None], axis=0) / total
  n_var = jnp.sum((n - n_mean) ** 2 * weights[:, None], axis=0) / total
  inv_var = jnp.exp(-logvar)
  negative = (n_var + (n_mean - mu) ** 2) * inv_var   # E_j of the squared error.
  positive = (n - mu) ** 2 * inv_var
  per_sample = 0.5 * jnp.sum(negative - positive, axis=-1)
  return _weighted_mean(per_sample, weights)


# --- Estimators of the 'variational' objective ---------------------------------------


def standardize(x, weights=None, eps=1e-5):
  """Per-dimension z-scores of samples x [N, C] with gradient-stopped statistics.

  Stopping the gradient through the mean and std keeps the estimate invariant to the
  feature scale (the attack that drives unnormalised bounds to -inf) without letting the
  model lower it by moving the statistics themselves.
  """
  if weights is None:
    weights = jnp.ones(x.shape[:1], jnp.float32)
  w = weights[:, None] / jnp.maximum(jnp.sum(weights), 1e-8)
  mean = jnp.sum(x * w, axis=0)
  std = jnp.sqrt(jnp.sum((x - mean) ** 2 * w, axis=0) + eps)
  return (x - jax.lax.stop_gradient(mean)) / jax.lax.stop_gradient(std)


def gaussian_mi(u, n, weights=None, eps=1e-4):
  """I(u; n) of jointly Gaussian vectors with the samples' covariance, in nats.

  -1/2 log det(Sigma_joint) + 1/2 log det Sigma_u + 1/2 log det Sigma_n, i.e.
  -1/2 sum_i log(1 - rho_i^2) over the canonical correlations rho_i. Exact for Gaussian
  data; for other data a deterministic cross-check of the learned bounds, logged and
  never optimised.
  """
  if weights is None:
    weights = jnp.ones(u.shape[:1], jnp.float32)
  z = jnp.concatenate([u, n], axis=-1).astype(jnp.float32)
  w = weights[:, None] / jnp.maximum(jnp.sum(weights), 1e-8)
  z = z - jnp.sum(z * w, axis=0)
  cov = (z * w).T @ z
  d = cov.shape[0]
  cov = cov + eps * jnp.trace(cov) / d * jnp.eye(d)
  c = u.shape[-1]
  logdet = lambda m: jnp.linalg.slogdet(m)[1]
  return 0.5 * (logdet(cov[:c, :c]) + logdet(cov[c:, c:]) - logdet(cov))


def info_nce(a, b, *, tau=0.1, weights=None):
  """InfoNCE lower bound on I(a; b) from N paired samples [N, C], in nats.

  Critic: cosine similarity / tau. log N - CE(matching a_i to b_i among all b_j); never
  above log N, so as a maximised term it cannot push the loss to -inf.
  """
  norm = lambda x: x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-8)
  logits = norm(a.astype(jnp.float32)) @ norm(b.astype(jnp.float32)).T / tau
  n = a.shape[0]
  if weights is None:
    weights = jnp.ones((n,), jnp.float32)
  # Padded samples are neither positives nor negatives.
  logits = jnp.where(weights[None, :] > 0, logits, -1e9)
  ce = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
  count = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.log(count) - _weighted_mean(ce, weights)
