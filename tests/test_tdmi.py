"""The full TDMI model on the tiny variant: shapes, aux, options, frozen-backbone training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tdmi_jax.models import hrnet
from tdmi_jax.models import layers
from tdmi_jax.models import tdmi

AUX_KEYS = {'motion', 'useful', 'noisy', 'appearance', 'fused', 'backbone_heatmaps',
            'useful_heatmaps', 'appearance_heatmaps'}
B, H, W = 2, 64, 32
C = hrnet.VARIANTS['tiny'].width
# Non-backbone parameters of TDMI-W48 with the default config (TDE 1,656,912 + RDM 24,928
# + appearance 1,016,496 + fusion/head 157,793).
W48_TRAINABLE = 2_856_129


def _cfg(**overrides):
  cfg = common.model_config('tiny')
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope='module')
def frames():
  return jax.random.normal(jax.random.key(0), (B, 5, H, W, 3))


@pytest.fixture(scope='module')
def variables(frames):
  model = tdmi.build_model(_cfg())
  # unsafe_rbg: the default threefry makes this init's compile several times slower.
  return jax.jit(lambda x: model.init(jax.random.key(1, impl='unsafe_rbg'), x, train=False))(
      frames)


@pytest.fixture(scope='module')
def eval_out(variables, frames):
  model = tdmi.build_model(_cfg())
  return jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=True, mutable=['intermediates']))(
          variables, frames)


def test_eval_shapes_of_every_module(variables, eval_out):
  (heatmaps, aux), state = eval_out
  h, w = H // 4, W // 4
  assert heatmaps.shape == (B, h, w, 17) and heatmaps.dtype == jnp.float32
  assert set(aux) == AUX_KEYS
  for key in ('motion', 'useful', 'noisy', 'appearance', 'fused'):
    assert aux[key].shape == (B, h, w, C) and aux[key].dtype == jnp.float32, key
  for key in ('backbone_heatmaps', 'useful_heatmaps', 'appearance_heatmaps'):
    assert aux[key].shape == (B, h, w, 17) and aux[key].dtype == jnp.float32, key
  inter = state['intermediates']
  bb_heatmaps, bb_aux = inter['backbone']['__call__'][0]
  assert bb_heatmaps.shape == (B * 5, h, w, 17)
  assert [f.shape for f in bb_aux['features']] == [(B * 5, h, w, C)] * 4
  assert inter['tde']['__call__'][0].shape == (B, h, w, C)
  assert inter['tde']['dcn1']['__call__'][0].shape == (B, h, w, C)
  assert [x.shape for x in inter['rdm']['__call__'][0]] == [(B, h, w, C)] * 2
  assert inter['appearance']['__call__'][0].shape == (B, h, w, C)
  assert inter['appearance']['warp']['__call__'][0].shape == (B, h, w, C)
  assert [x.shape for x in inter['head']['__call__'][0]] == [(B, h, w, 17), (B, h, w, C)]
  # M_u and M_n are per-channel rescalings of M_t by gates in (0, 1).
  m = np.asarray(aux['motion'], np.float64)
  assert np.abs(m).max() > 0
  for key in ('useful', 'noisy'):
    gate = (np.asarray(aux[key], np.float64) * m).sum((1, 2)) / (m * m).sum((1, 2))
    assert np.all((gate > 0) & (gate < 1)), key
    np.testing.assert_allclose(aux[key], m * gate[:, None, None, :], rtol=1e-5, atol=1e-12)
  # H(X) is the backbone's own final conv.
  final = variables['params']['backbone']['final_layer']
  np.testing.assert_allclose(aux['useful_heatmaps'],
                             layers.apply_conv(aux['useful'], final['kernel'], final['bias']),
                             rtol=1e-5, atol=1e-7)
  for key in AUX_KEYS:
    assert np.all(np.isfinite(aux[key])), key


def test_single_frame_is_the_backbone_on_the_key_frame(variables, frames, eval_out):
  model = tdmi.build_model(_cfg(arch='single_frame', **{'backbone.frozen': False}))
  sub = {'params': {'backbone': variables['params']['backbone']},
         'batch_stats': {'backbone': variables['batch_stats']['backbone']}}
  heatmaps, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(sub, frames)
  assert set(aux) == {'backbone_heatmaps'}
  assert np.array_equal(heatmaps, aux['backbone_heatmaps'])
  (_, full_aux), _ = eval_out
  # Eval-mode BN is per-example, so the B*5-frame pass agrees with the key frame alone.
  np.testing.assert_allclose(heatmaps, full_aux['backbone_heatmaps'], rtol=1e-4, atol=1e-9)


def test_options_train_mode(variables, frames):
  """key_frame appearance, sigmoid mask, live backbone BN and bfloat16 compute in one build."""
  cfg = _cfg(appearance='key_frame', dtype='bfloat16', **{
      'dcn.mask_activation': 'sigmoid', 'backbone.bn': 'live'})
  model = tdmi.build_model(cfg)
  sub = {'params': {k: v for k, v in variables['params'].items() if k != 'appearance'},
         'batch_stats': {k: v for k, v in variables['batch_stats'].items() if k != 'appearance'}}
  (heatmaps, aux), updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats']))(sub, frames)
  assert heatmaps.shape == (B, H // 4, W // 4, 17) and heatmaps.dtype == jnp.float32
  assert set(aux) == AUX_KEYS and all(a.dtype == jnp.float32 for a in aux.values())
  assert np.all(np.isfinite(heatmaps))
  # 'live' BN updates the backbone's running statistics in training.
  before = variables['batch_stats']['backbone']['bn1']['mean']
  assert not np.allclose(updates['batch_stats']['backbone']['bn1']['mean'], before)
  assert 'appearance' not in updates['batch_stats']


def test_frozen_backbone_bn_keeps_running_stats(variables, frames):
  model = tdmi.build_model(_cfg())
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, frames)
  same = jax.tree_util.tree_map(np.array_equal, variables['batch_stats']['backbone'],
                                updates['batch_stats']['backbone'])
  assert all(jax.tree_util.tree_leaves(same))
  assert not np.array_equal(updates['batch_stats']['head']['fusion_0']['bn1']['mean'],
                            variables['batch_stats']['head']['fusion_0']['bn1']['mean'])


def _train_step(model, tx):
  def loss_fn(params, batch_stats, frames, target):
    (heatmaps, aux), updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                           frames, train=True, mutable=['batch_stats'])
    loss = jnp.mean((heatmaps - target) ** 2)
    loss += sum(jnp.mean(aux[k] ** 2) for k in aux if k != 'backbone_heatmaps')
    return loss, updates['batch_stats']

  @jax.jit
  def step(params, batch_stats, opt_state, frames, target):
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, frames, target)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, grads

  return step


@pytest.mark.parametrize('arch,frozen', [('tdmi', True), ('single_frame', False)])
def test_jitted_step_leaves_frozen_backbone_unchanged(variables, frames, arch, frozen):
  # 'live' BN: a randomly initialised backbone on running stats gives features ~1e-10,
  # too small for any update to register; batch statistics give O(1) features.
  cfg = _cfg(arch=arch, **{'backbone.frozen': frozen, 'backbone.bn': 'live'})
  model = tdmi.build_model(cfg)
  names = ('backbone',) if arch == 'single_frame' else tuple(variables['params'])
  params = {k: variables['params'][k] for k in names}
  batch_stats = {k: variables['batch_stats'][k] for k in names if k in variables['batch_stats']}
  mask = tdmi.trainable_mask(params, cfg)
  labels = jax.tree_util.tree_map(lambda t: 'train' if t else 'frozen', mask)
  tx = optax.multi_transform({'train': optax.adam(1e-3), 'frozen': optax.set_to_zero()}, labels)
  opt_state = tx.init(params)
  target = jax.random.uniform(jax.random.key(2), (B, H // 4, W // 4, 17))
  new, _, _, grads = _train_step(model, tx)(params, batch_stats, opt_state, frames, target)

  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), params, new)
  n_trainable = layers.count_params(
      [p for p, t in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)) if t])
  opt_size = layers.count_params([x for x in jax.tree_util.tree_leaves(opt_state)
                                  if hasattr(x, 'shape')])
  if frozen:
    assert not any(jax.tree_util.tree_leaves(changed['backbone']))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads['backbone']))
    assert not any(jax.tree_util.tree_leaves(mask['backbone']))
    for name in ('tde', 'rdm', 'appearance', 'head'):
      leaves = jax.tree_util.tree_leaves(changed[name])
      assert sum(leaves) >= 0.9 * len(leaves), name
    assert n_trainable == layers.count_params(params) - layers.count_params(params['backbone'])
  else:
    leaves = jax.tree_util.tree_leaves(changed['backbone'])
    assert sum(leaves) >= 0.9 * len(leaves)
    assert n_trainable == layers.count_params(params)
  # Adam holds two moments for trainable leaves only (plus step counters).
  assert 2 * n_trainable <= opt_size <= 2 * n_trainable + 8


def test_w48_parameter_counts():
  cfg = common.model_config('hrnet_w48')
  model = tdmi.build_model(cfg)
  assert model.offset_groups == 12 and model.spec.width == 48
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 5, 64, 64, 3)), train=False))
  params = shapes['params']
  mask = tdmi.trainable_mask(params, cfg)
  trainable = layers.count_params(
      [p for p, t in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)) if t])
  assert trainable == W48_TRAINABLE
  assert layers.count_params(params['backbone']) == 63_595_745
  assert shapes['params']['tde']['dcn1']['conv_offset']['kernel'].shape == (3, 3, 48, 216)
  assert shapes['params']['tde']['dcn1']['conv_mask']['kernel'].shape == (3, 3, 48, 108)


@pytest.mark.parametrize('field,value,match', [
    ('dcn.offset_groups', 3, 'offset_groups'),
    ('arch', 'two_frame', 'model.arch'),
    ('backbone.bn', 'sync', 'backbone.bn'),
    ('dcn.mask_activation', 'tanh', 'mask_activation'),
    ('dcn.impl', 'pallas', 'model.dcn.impl'),
    ('appearance', 'none', 'model.appearance'),
    ('dtype', 'float16', 'model.dtype'),
    ('tde.fuse_blocks', (2, 2, 2), 'fuse_blocks'),
    ('variant', 'hrnet_w18', 'model.variant'),
])
def test_bad_config_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    tdmi.build_model(_cfg(**{field: value}))


def test_wrong_frame_count_is_an_error():
  model = tdmi.build_model(_cfg())
  with pytest.raises(ValueError, match='frames'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3, 64, 32, 3)),
                                      train=False))


def _randomise_backbone(variables, seed=0):
  """Fan-in scaled backbone kernels and non-trivial BN: O(1) features, a visible BN."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.asarray(0.5 + rng.random(x.shape), x.dtype)
    scale = np.sqrt(2.0 / np.prod(x.shape[:-1])) if name == 'kernel' else 0.2
    return jnp.asarray(scale * rng.normal(size=x.shape), x.dtype)

  out = {c: dict(v) for c, v in variables.items()}
  for c in out:
    out[c]['backbone'] = jax.tree_util.tree_map_with_path(fill, variables[c]['backbone'])
  return out


def test_folded_backbone_matches_unfolded(variables, frames):
  """fold_bn=True (the default) against fold_bn=False: eval, frozen-backbone training."""
  v = _randomise_backbone(variables)

  def run(model, v, frames):
    eval_out, inter = model.apply(v, frames, train=False, capture_intermediates=True,
                                  mutable=['intermediates'])
    # Frozen backbone with bn='frozen' in training: folded too.
    train_out, updates = model.apply(v, frames, train=True, mutable=['batch_stats'])
    single = tdmi.backbone_apply(model, v, frames[:, 2])
    # Folded once ahead (video inference): backbone_apply takes that layout as it is.
    single_once = tdmi.backbone_apply(model, tdmi.fold_backbone(model, v), frames[:, 2])
    return (eval_out, train_out, updates['batch_stats'], single, single_once,
            inter['intermediates']['backbone']['layer1_0'])

  folded_model = tdmi.build_model(_cfg())
  assert folded_model.backbone_fold_bn
  plain_model = tdmi.build_model(_cfg(**{'backbone.fold_bn': False}))
  *got, modules = jax.jit(lambda v, x: run(folded_model, v, x))(v, frames)
  *want, plain_modules = jax.jit(lambda v, x: run(plain_model, v, x))(v, frames)
  # The folded run really ran the folded network: its blocks have convs and no BN.
  assert 'conv1' in modules and 'bn1' not in modules and 'bn1' in plain_modules
  assert tdmi.is_folded(tdmi.fold_backbone(folded_model, v)['params']['backbone'])
  assert not tdmi.is_folded(tdmi.fold_backbone(plain_model, v)['params']['backbone'])
  assert np.std(got[0][1]['backbone_heatmaps']) > 0.1  # BN far from identity, O(1) maps.
  want[3] = want[4] = want[3]  # Both backbone_apply forms against the unfolded one.
  flat_got, tree_got = jax.tree_util.tree_flatten(got)
  flat_want, tree_want = jax.tree_util.tree_flatten(want)
  assert tree_got == tree_want
  for g, w in zip(flat_got, flat_want):
    # float32 rounding only; a wrong fold changes every backbone output by O(1).
    np.testing.assert_allclose(g, w, atol=1e-5 * float(np.abs(w).max()) + 1e-30, rtol=0)
  # The stored layout is unchanged: the folded training pass left the statistics alone.
  stats = got[2]['backbone']
  same = jax.tree_util.tree_map(np.array_equal, stats, v['batch_stats']['backbone'])
  assert all(jax.tree_util.tree_leaves(same))
