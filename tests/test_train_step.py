"""Train step: sharding equivalence, frozen backbone, BatchNorm policy, CLUB, optimizer."""

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.models import layers

K = 17
H, W = 32, 24  # Crop; heatmaps are 8x6.


class StandInTDMI(nn.Module):
  """Tiny module with the TDMI apply contract (backbone + BN, MI aux, heatmaps)."""
  channels: int = 8

  @nn.compact
  def __call__(self, frames, *, train):
    b, t = frames.shape[:2]
    x = frames.reshape((b * t,) + frames.shape[2:])
    backbone = _Backbone(self.channels, name='backbone')
    feats, bb_heat = backbone(x, train=train)
    feats = feats.reshape((b, t) + feats.shape[1:])
    diff = jnp.concatenate([feats[:, i + 1] - feats[:, i] for i in range(t - 1)], -1)
    motion = nn.Conv(self.channels, (3, 3), name='tde')(diff)
    motion = nn.BatchNorm(use_running_average=not train, name='tde_bn')(motion)
    gate_u = nn.sigmoid(nn.Dense(self.channels, name='gate_u')(motion.mean((1, 2))))
    gate_n = nn.sigmoid(nn.Dense(self.channels, name='gate_n')(motion.mean((1, 2))))
    useful = motion * gate_u[:, None, None]
    noisy = motion * gate_n[:, None, None]
    app = nn.Conv(self.channels, (3, 3), name='app')(feats[:, 2])
    fused = nn.relu(nn.Conv(self.channels, (3, 3), name='fuse')(
        jnp.concatenate([useful, app], -1)))
    heat = nn.Conv(K, (3, 3), name='head')(fused)
    head = lambda z: z @ jax.lax.stop_gradient(backbone.variables['params']['final']['kernel'][0, 0])
    aux = {'motion': motion, 'useful': useful, 'noisy': noisy, 'appearance': app,
           'fused': fused, 'backbone_heatmaps': bb_heat[2::t],
           'useful_heatmaps': head(useful), 'appearance_heatmaps': head(app)}
    return heat, aux


class _Backbone(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(self.channels, (3, 3), strides=(4, 4), name='conv1')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn1')(x))
    return x, nn.Conv(K, (1, 1), name='final')(x)


def _mask(params):
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[0] != 'backbone' for k in flat})


def _config(bn='frozen', estimator='divergence', clip=0.0):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = common.model_config('tiny')
  c.model.backbone.bn = bn
  c.mi = common.mi_config()
  c.mi.estimator = estimator
  c.optim = common.optim_config()
  c.optim.grad_clip_norm = clip
  return c


def _batch(batch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  target = np.zeros((batch_size, H // 4, W // 4, K), np.float32)
  ys, xs = rng.integers(0, H // 4, (batch_size, K)), rng.integers(0, W // 4, (batch_size, K))
  for b in range(batch_size):
    target[b, ys[b], xs[b], np.arange(K)] = 1.0
  return {
      'frames': rng.normal(size=(batch_size, 5, H, W, 3)).astype(np.float32),
      'target': target,
      'target_weight': (rng.random((batch_size, K)) > 0.2).astype(np.float32),
      'mask': np.ones((batch_size,), np.float32),
  }


def _setup(config, mesh, steps_per_epoch=10):
  model = StandInTDMI()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 5, H, W, 3)), train=False)
  mask = _mask(variables['params'])
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch)
  club_tx = club_params = None
  if config.mi.estimator == 'club':
    from tdmi_jax.models import mi  # pylint: disable=g-import-not-at-top
    club_tx = optim.make_club_optimizer(config.mi)
    club_params = mi.init_club(jax.random.key(1), config.mi, 8)['params']
  st = state_lib.create(variables, mask, tx, club_params, club_tx)
  st = sharding.replicate(st, mesh)
  step = train_step_lib.make_train_step(
      model=model, config=config, tx=tx, schedule=schedule, mask=mask, mesh=mesh,
      club_tx=club_tx)
  return model, st, step


def _run(config, mesh, batch, steps):
  _, st, step = _setup(config, mesh)
  losses = []
  for _ in range(steps):
    st, metrics = step(st, sharding.shard_batch(batch, mesh, train_step_lib.TRAIN_KEYS))
    losses.append(float(metrics['loss']))
  return st, losses, metrics


@pytest.mark.parametrize('mi_enabled,steps,atol', [(False, 3, 1e-6), (True, 1, 1e-5)])
def test_two_devices_equal_one_device(mi_enabled, steps, atol):
  assert jax.device_count() >= 2, 'conftest should give 2 CPU devices'
  batch = _batch()
  config = _config(bn='live')
  config.mi.enabled = mi_enabled
  # Adam with its default eps is sign-like on tiny gradient entries: float rounding of
  # the cross-device sum can flip such an entry's whole update. A large eps makes the
  # update linear in the gradient, so what is compared is the sharded computation.
  config.optim.eps = 1.0
  config.optim.learning_rate = 0.1
  st1, losses1, m1 = _run(config, sharding.make_mesh(jax.devices()[:1]), batch, steps)
  st2, losses2, m2 = _run(config, sharding.make_mesh(jax.devices()[:2]), batch, steps)
  np.testing.assert_allclose(losses1, losses2, rtol=1e-5)
  np.testing.assert_allclose(float(m1['grad_norm']), float(m2['grad_norm']), rtol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol),
      (st1.params, st1.batch_stats), (st2.params, st2.batch_stats))
  # The batch really was split over both devices and the state is replicated on both.
  assert len(st2.params['head']['kernel'].sharding.device_set) == 2
  assert st2.params['head']['kernel'].sharding.is_fully_replicated


def test_loss_goes_down_on_a_fixed_batch():
  config = _config()
  config.optim.learning_rate = 3e-3
  config.mi.enabled = False
  _, losses, _ = _run(config, sharding.make_mesh(), _batch(), 25)
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize('bn', ['frozen', 'live'])
def test_frozen_backbone_no_grad_no_state_and_bn_policy(bn):
  mesh = sharding.make_mesh()
  model, st0, _ = _setup(_config(bn=bn), mesh)
  before = jax.tree_util.tree_map(np.asarray, (st0.params, st0.batch_stats))
  st, _, metrics = _run(_config(bn=bn), mesh, _batch(), 2)
  del model
  params, stats = jax.tree_util.tree_map(np.asarray, (st.params, st.batch_stats))
  for a, b in zip(jax.tree_util.tree_leaves(before[0]['backbone']),
                  jax.tree_util.tree_leaves(params['backbone'])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(before[0]['head']['kernel'], params['head']['kernel'])
  # No optimizer state for the backbone: Adam's moments cover the trainable part only.
  opt_leaves = sum(x.size for x in jax.tree_util.tree_leaves(st.opt_state))
  trainable = layers.count_params(params) - layers.count_params(params['backbone'])
  assert opt_leaves == 2 * trainable + 2  # mu, nu, and the Adam and schedule counts.
  bb_before = before[1]['backbone']['bn1']['mean']
  if bn == 'frozen':
    np.testing.assert_array_equal(bb_before, stats['backbone']['bn1']['mean'])
  else:
    assert not np.allclose(bb_before, stats['backbone']['bn1']['mean'])
  # The trainable BN outside the backbone always updates.
  assert not np.allclose(before[1]['tde_bn']['mean'], stats['tde_bn']['mean'])
  for key in ('loss', 'heatmap_loss', 'grad_norm', 'lr', 'mi/I_un'):
    assert np.isfinite(float(metrics[key])), key


def test_club_trained_inside_the_step_with_isolated_gradients():
  config = _config(estimator='club')
  mesh = sharding.make_mesh()
  _, st0, _ = _setup(config, mesh)
  club0 = jax.tree_util.tree_map(np.asarray, st0.club_params)
  st, _, metrics = _run(config, mesh, _batch(), 3)
  assert 'mi/club_bound' in metrics and 'club/learning_loss' in metrics
  moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(club0), jax.tree_util.tree_leaves(st.club_params))]
  assert all(moved)
  # The CLUB learning loss does not move the model: with the main objective's weights
  # all zero and lr 0 for the model, only the CLUB params change.
  config.mi.alpha = config.mi.beta = config.mi.gamma = 0.0
  config.optim.learning_rate = 0.0
  _, st0, _ = _setup(config, mesh)
  p0 = jax.tree_util.tree_map(np.asarray, st0.params)
  st, _, _ = _run(config, mesh, _batch(), 1)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
                         p0, st.params)


def test_schedule_warmup_and_decays():
  cfg = common.optim_config()
  cfg.decay_epochs = (2, 3)
  sched = optim.learning_rate_schedule(cfg, steps_per_epoch=10)
  got = [float(sched(s)) for s in (0, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-5)
  cfg.warmup_epochs = 1.0
  sched = optim.learning_rate_schedule(cfg, steps_per_epoch=10)
  got = [float(sched(s)) for s in (0, 5, 10, 19, 20, 30)]
  np.testing.assert_allclose(got, [0.0, 5e-4, 1e-3, 1e-3, 1e-4, 1e-5], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize('name', ['adam', 'adamw'])
def test_gradient_clipping_bounds_the_update(name):
  cfg = common.optim_config()
  cfg.name = name
  params = {'w': jnp.ones((10,))}
  grads = {'w': jnp.full((10,), 5.0)}
  tx, _ = optim.make_optimizer(cfg, 10)
  free = tx.update(grads, tx.init(params), params)[0]['w']
  cfg.grad_clip_norm = 1e-12  # Clipped gradients fall far below Adam's eps.
  tx, _ = optim.make_optimizer(cfg, 10)
  clipped = tx.update(grads, tx.init(params), params)[0]['w']
  assert float(jnp.abs(free).max()) > 0.9e-3
  assert float(jnp.abs(clipped).max()) < 1e-5


def test_split_merge_round_trip_and_bad_mask():
  params = {'backbone': {'a': jnp.ones(2)}, 'head': {'b': jnp.zeros(3)}}
  mask = {'backbone': {'a': False}, 'head': {'b': True}}
  trainable, frozen = optim.split_params(params, mask)
  assert set(trainable) == {'head'} and set(frozen) == {'backbone'}
  merged = optim.merge_params(trainable, frozen)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
  with pytest.raises(ValueError, match='mask'):
    optim.split_params(params, {'head': {'b': True}})


def test_eval_step_pck_and_masked_loss():
  mesh = sharding.make_mesh()
  config = _config()
  model, st, _ = _setup(config, mesh)
  eval_step = train_step_lib.make_eval_step(model=model, mesh=mesh)
  batch = _batch()
  sums, heat = eval_step(st, sharding.shard_batch(batch, mesh, train_step_lib.TRAIN_KEYS))
  assert heat.shape == (4, H // 4, W // 4, K)
  assert float(sums['num_examples']) == 4
  assert float(sums['pck_total']) == batch['target_weight'].sum()
  # PCK of the target against itself is 1; of a shifted target by 3 cells (> 0.5*w/10) 0.
  t = jnp.asarray(batch['target'])
  c, n = train_step_lib.pck_counts(t, t, batch['target_weight'], batch['mask'])
  assert float(c) == float(n) > 0
  shifted = jnp.roll(t, 3, axis=1)
  c, _ = train_step_lib.pck_counts(shifted, t, batch['target_weight'], batch['mask'])
  assert float(c) < 0.2 * float(n)
  # Padded examples (mask 0) do not count.
  m = np.array([1, 1, 0, 0], np.float32)
  _, n2 = train_step_lib.pck_counts(t, t, batch['target_weight'], m)
  assert float(n2) == batch['target_weight'][:2].sum()


def test_real_tiny_tdmi_frozen_backbone_sharded_equals_single_device():
  """The real model (tiny variant) through the real objective, 1 vs 2 devices."""
  from tdmi_jax.models import tdmi  # pylint: disable=g-import-not-at-top
  config = _config()  # backbone frozen, BN 'frozen' (the recipe's defaults)
  config.optim.eps = 1.0  # See test_two_devices_equal_one_device.
  config.optim.learning_rate = 0.1
  model = tdmi.build_model(config.model)
  hw = 64
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 5, hw, hw, 3)), train=False))(
      jax.random.key(0, impl='unsafe_rbg'))
  variables = jax.tree_util.tree_map(np.asarray, variables)  # The steps donate device copies.
  mask = tdmi.trainable_mask(variables['params'], config.model)
  rng = np.random.default_rng(0)
  batch = {'frames': rng.normal(size=(2, 5, hw, hw, 3)).astype(np.float32),
           'target': rng.random((2, hw // 4, hw // 4, K)).astype(np.float32),
           'target_weight': np.ones((2, K), np.float32), 'mask': np.ones((2,), np.float32)}
  out = {}
  for n in (1, 2):
    mesh = sharding.make_mesh(jax.devices()[:n])
    tx, schedule = optim.make_optimizer(config.optim, 10)
    st = sharding.replicate(state_lib.create(variables, mask, tx), mesh)
    step = train_step_lib.make_train_step(model=model, config=config, tx=tx,
                                          schedule=schedule, mask=mask, mesh=mesh)
    st, metrics = step(st, sharding.shard_batch(batch, mesh, train_step_lib.TRAIN_KEYS))
    out[n] = jax.tree_util.tree_map(np.asarray, (st, metrics))
  (st1, m1), (st2, m2) = out[1], out[2]
  np.testing.assert_allclose(float(m1['loss']), float(m2['loss']), rtol=1e-5)
  assert np.isfinite(float(m2['mi/I_un'])) and np.isfinite(float(m2['grad_norm']))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                         (st1.params, st1.batch_stats), (st2.params, st2.batch_stats))
  # Frozen backbone: weights and BN statistics bit-identical, no optimizer state for it.
  p0 = variables
  jax.tree_util.tree_map(np.testing.assert_array_equal, p0['params']['backbone'],
                         st2.params['backbone'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, p0['batch_stats']['backbone'],
                         st2.batch_stats['backbone'])
  trainable = layers.count_params(st2.params) - layers.count_params(st2.params['backbone'])
  assert layers.count_params(st2.opt_state) == 2 * trainable + 2
  moved = {jax.tree_util.keystr(k): not np.array_equal(a, b) for (k, a), b in zip(
      jax.tree_util.tree_flatten_with_path(p0['params']['head'])[0],
      jax.tree_util.tree_leaves(st2.params['head']))}
  # (BN scales ~1 receive updates below float32 resolution at this lr/eps; kernels move.)
  assert all(v for k, v in moved.items() if k.endswith("['kernel']")), moved


def test_per_term_gradient_norms_match_each_share_on_its_own():
  mesh = sharding.make_mesh(jax.devices()[:1])
  config = _config()
  model, st, _ = _setup(config, mesh)
  batch = _batch()
  sharded = sharding.shard_batch(batch, mesh, train_step_lib.TRAIN_KEYS)
  params = jax.device_get(st.params)
  trainable, frozen = optim.split_params(params, _mask(params))

  def shares(t):
    (heat, aux), _ = model.apply(
        {'params': optim.merge_params(t, frozen), 'batch_stats': st.batch_stats},
        batch['frames'], train=True, mutable=['batch_stats'])
    from tdmi_jax import losses  # pylint: disable=g-import-not-at-top
    return losses.objective(heat, aux, batch, config.mi, step=0)[1]

  ref = shares(trainable)
  parts = sorted(k for k in ref if k.startswith('contrib/'))
  assert parts == ['contrib/heatmap', 'contrib/mm', 'contrib/motion', 'contrib/reg']
  np.testing.assert_allclose(sum(float(ref[k]) for k in parts), float(ref['loss']), rtol=1e-5)
  norms = train_step_lib.make_term_grad_norms(model=model, config=config,
                                              mask=_mask(params), mesh=mesh)(st, sharded)
  assert set(norms) == {'grad_norm/' + k[len('contrib/'):] for k in parts}
  for k in parts:  # Each share differentiated independently of the project's code.
    g = jax.grad(lambda t, k=k: shares(t)[k])(trainable)
    np.testing.assert_allclose(float(norms['grad_norm/' + k[len('contrib/'):]]),
                               float(optax.tree.norm(g)), rtol=1e-4, err_msg=k)
  # The heatmap loss alone has one share: nothing to split.
  config.mi.enabled = False
  assert train_step_lib.make_term_grad_norms(model=model, config=config, mask=_mask(params),
                                             mesh=mesh)(st, sharded) == {}
