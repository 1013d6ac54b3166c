"""bf16 training: the tiny TDMI with the MI objective on, a few real train steps in
model.dtype='bfloat16' next to the same steps in float32.

What must hold (issue 12, part 3): the loss goes down; parameters, optimizer state and the
vCLUB critic (and its optimizer state) stay float32; the MI terms and losses are computed
in float32 whatever dtype the features arrive in; the bf16 losses follow the f32 ones
within bf16 rounding; and the model really did compute in bf16 (else the rest is vacuous).
"""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from tdmi_jax import losses
from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.models import hrnet
from tdmi_jax.models import mi
from tdmi_jax.models import tdmi

B, H, W, K = 2, 64, 32, 17  # Crop 64x32 (HRNet needs multiples of 32): heatmaps 16x8.
STEPS = 4


def _config(dtype):
  # The smoke-test config: tiny variant, 'variational' MI objective with the vCLUB critic
  # (its own params and optimizer) and the M_u heatmap head, no warm-up.
  config = synthetic.get_config('runlocal').unlock()
  config.model.dtype = dtype
  config.data.image_size = (H, W)
  config.data.heatmap_size = (H // 4, W // 4)
  # Weights large enough that every MI term moves the loss (InfoNCE included).
  config.mi.w_un = 0.1
  config.mi.w_uy = 1.0
  config.mi.w_mu = 0.1
  config.optim.learning_rate = 1e-3
  # One block per TDE fuse stage: a smaller program to compile twice (f32 and bf16).
  config.model.tde.fuse_blocks = (1, 1, 1, 1)
  return config


def _unit_scale(params):
  """Conv kernels rescaled to std 1/sqrt(fan_in), the regime of a trained network.

  The project's N(0, 0.001) conv init makes a random tiny TDMI's activations and gradients
  ~1e-20 (frozen BN does not renormalise them), where any dtype rounds to noise and Adam
  turns that noise into full-size updates: such a run says nothing about bf16.
  """
  def rescale(x):
    x = np.asarray(x)
    if x.ndim == 4 and x.std() > 0:
      return (x * (1.0 / (x.std() * np.sqrt(np.prod(x.shape[:3]))))).astype(x.dtype)
    return x
  return jax.tree.map(rescale, params)


def _batch():
  rng = np.random.default_rng(0)
  hh, ww = H // 4, W // 4
  yy, xx = np.mgrid[:hh, :ww]
  cy, cx = rng.uniform(0.2, 0.8, (B, K)) * hh, rng.uniform(0.2, 0.8, (B, K)) * ww
  target = np.exp(-((yy[None, :, :, None] - cy[:, None, None]) ** 2
                    + (xx[None, :, :, None] - cx[:, None, None]) ** 2) / 2.0)
  return {'frames': rng.normal(size=(B, 5, H, W, 3)).astype(np.float32),
          'target': target.astype(np.float32),
          'target_weight': np.ones((B, K), np.float32),
          'mask': np.ones((B,), np.float32)}


def _initial_state(config, mesh):
  """The f32 initial state by the driver's own path, conv kernels rescaled (_unit_scale)."""
  _, st, mask, _, _, _ = state_lib.create_state(config, mesh, 10)
  variables = {'params': _unit_scale(jax.device_get(st.params)),
               'batch_stats': jax.device_get(st.batch_stats)}
  return variables, mask, jax.device_get(st.club_params)


def _run(dtype, variables, mask, club_params, mesh):
  config = _config(dtype)
  model = tdmi.build_model(config.model)
  tx, schedule = optim.make_optimizer(config.optim, 10)
  club_tx = optim.make_club_optimizer(config.mi)
  st = sharding.replicate(state_lib.create(variables, mask, tx, club_params, club_tx), mesh)
  step = train_step_lib.make_train_step(model=model, config=config, tx=tx, schedule=schedule,
                                        mask=mask, mesh=mesh, club_tx=club_tx)
  batch = sharding.shard_batch(_batch(), mesh, train_step_lib.TRAIN_KEYS)
  lowered = step.lower(st, batch)
  compiled = lowered.compile()
  history = []
  for _ in range(STEPS):
    st, metrics = compiled(st, batch)
    history.append(jax.device_get(metrics))
  return {'config': config, 'model': model, 'state': st, 'history': history,
          'hlo': lowered.as_text()}


@pytest.fixture(scope='module')
def runs():
  mesh = sharding.make_mesh(jax.devices()[:1])
  # Parameters are float32 whatever the compute dtype: one initial state serves both runs.
  variables, mask, club_params = _initial_state(_config('float32'), mesh)
  out = {dtype: _run(dtype, variables, mask, club_params, mesh)
         for dtype in ('float32', 'bfloat16')}
  out['initial_params'] = variables['params']
  return out


def _float_dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_run_computes_in_bf16(runs):
  # Convolutions of the bf16 program take bf16 operands; the f32 program has none.
  conv_lines = lambda hlo: [l for l in hlo.splitlines() if 'stablehlo.convolution' in l]
  bf16 = [l for l in conv_lines(runs['bfloat16']['hlo']) if 'bf16' in l]
  assert len(bf16) > 10, len(bf16)
  assert not [l for l in conv_lines(runs['float32']['hlo']) if 'bf16' in l]


def test_bf16_loss_decreases(runs):
  losses_bf16 = [float(m['loss']) for m in runs['bfloat16']['history']]
  assert np.all(np.isfinite(losses_bf16)), losses_bf16
  assert losses_bf16[-1] < 0.9 * losses_bf16[0], losses_bf16
  # Every MI term of the objective was computed and is finite.
  last = runs['bfloat16']['history'][-1]
  for key in ('mi/I_un_club', 'mi/L_uy', 'mi/I_mu_nce', 'club/learning_loss'):
    assert np.isfinite(float(last[key])), key


def test_bf16_state_stays_float32(runs):
  st = runs['bfloat16']['state']
  for name in ('params', 'batch_stats', 'opt_state', 'club_params', 'club_opt_state'):
    part = getattr(st, name)
    assert jax.tree.leaves(part), f'{name} is empty: the test would check nothing'
    assert _float_dtypes(part) == {'float32'}, (name, _float_dtypes(part))
  # The trainable parameters moved (the updates were applied, in f32).
  before = runs['initial_params']['head']
  after = jax.device_get(st.params['head'])
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_bf16_losses_follow_f32(runs):
  series = lambda dtype, key: np.array([float(m[key]) for m in runs[dtype]['history']])
  keys = ('loss', 'heatmap_loss', 'mi/L_uy', 'mi/I_mu_nce', 'club/learning_loss')
  # Step 0 sees the same parameters and batch: only the compute dtype differs, so the
  # values agree within bf16 rounding (8 mantissa bits, ~0.4 %; measured <= 1.0 %). InfoNCE
  # on 4 samples is a log-softmax of near-equal similarities, which bf16 features move
  # more (measured 5.9 % once the lean DCN and BatchNorm folding came in).
  for key in keys:
    np.testing.assert_allclose(series('bfloat16', key)[0], series('float32', key)[0],
                               rtol=0.1 if key == 'mi/I_mu_nce' else 2e-2, err_msg=key)
  # Later steps also carry the different updates: this random tiny network's gradient is
  # ill-conditioned (a 0.4 % f32 perturbation of the weights moves single gradient entries
  # by ~40 %, as much as bf16 does), so the trajectories drift apart a little (measured:
  # <= 3 % on the losses, <= 8 % on the critic's) while descending alike. InfoNCE on 4
  # samples drifts by up to 14 %: it is compared at step 0 only.
  for key in ('loss', 'heatmap_loss', 'mi/L_uy', 'club/learning_loss'):
    np.testing.assert_allclose(series('bfloat16', key), series('float32', key),
                               rtol=0.15, err_msg=key)
  drop = lambda dtype: series(dtype, 'loss')[0] - series(dtype, 'loss')[-1]
  assert drop('float32') > 0 and drop('bfloat16') == pytest.approx(drop('float32'), rel=0.25)


def _model_outputs(config):
  """Shapes/dtypes of (heatmaps, aux) of the model in train mode, as the step calls it."""
  model = tdmi.build_model(config.model)
  frames = jnp.zeros((B, 5, H, W, 3), jnp.float32)

  def apply():
    variables = model.init(jax.random.key(0), frames, train=False)
    return model.apply(variables, frames, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(0)})[0]

  return jax.eval_shape(apply)


def test_bf16_model_hands_f32_features_to_the_losses():
  heatmaps, aux = _model_outputs(_config('bfloat16'))
  assert heatmaps.dtype == jnp.float32
  for key in losses.MI_AUX_KEYS + ('useful_task_heatmaps',):
    assert aux[key].dtype == jnp.float32, key


def _objective_and_club_loss(config):
  mi_cfg = config.mi
  club_vars = mi.init_club(jax.random.key(1), mi_cfg, hrnet.get_spec('tiny').width)

  def f(heatmaps, aux, batch):
    loss, metrics = losses.objective(heatmaps, aux, batch, mi_cfg, club_variables=club_vars,
                                     step=jnp.int32(3))
    return loss, metrics, losses.club_learning_loss(club_vars, aux, batch['mask'], mi_cfg)

  return f


def _fake_outputs(config, dtype):
  heatmaps, aux = _model_outputs(config)
  rng = np.random.default_rng(1)
  draw = lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32).astype(dtype)
  batch = {k: jnp.asarray(v) for k, v in _batch().items() if k != 'frames'}
  return draw(heatmaps), jax.tree.map(draw, aux), batch


# Primitives that move or relabel values without arithmetic on them.
_NO_ARITHMETIC = {'convert_element_type', 'stop_gradient', 'broadcast_in_dim', 'reshape',
                  'copy', 'copy_p'}


def test_mi_terms_and_losses_are_computed_in_f32_even_from_bf16_features():
  # Features arriving in bf16 (a model that stopped casting its aux) must still give f32
  # MI terms and losses: the objective's own arithmetic never runs in bf16.
  config = _config('bfloat16')
  f = _objective_and_club_loss(config)
  args = _fake_outputs(config, jnp.bfloat16)
  loss, metrics, club_loss = jax.eval_shape(f, *args)
  assert loss.dtype == jnp.float32 and club_loss.dtype == jnp.float32
  assert {k: v.dtype for k, v in metrics.items()} == {k: jnp.float32 for k in metrics}
  assert {'mi/I_un_club', 'mi/L_uy', 'mi/I_mu_nce', 'mi/I_un_gauss'} <= set(metrics)

  # No equation of the traced objective and critic loss, their gradient included, does
  # arithmetic in bf16: the MI estimators, the heatmap losses, the reductions and the
  # sums of the cotangents of maps that several terms read are all f32.
  def loss_and_grad(heatmaps, aux, batch):
    return jax.value_and_grad(lambda h, a: f(h, a, batch)[0] + f(h, a, batch)[2],
                              argnums=(0, 1))(heatmaps, aux)

  bf16_ops = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if any(getattr(v.aval, 'dtype', None) == jnp.bfloat16 for v in eqn.outvars):
        bf16_ops.add(eqn.primitive.name)
      for sub in jex.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(loss_and_grad)(*args).jaxpr)
  assert 'convert_element_type' in bf16_ops  # The walk did see the bf16 side.
  assert bf16_ops <= _NO_ARITHMETIC, bf16_ops - _NO_ARITHMETIC

  # Hence the same bf16 values give exactly the f32 computation on those values.
  widened = jax.tree.map(lambda x: x.astype(jnp.float32), args[:2]) + (args[2],)
  got, want = jax.jit(f)(*args), jax.jit(f)(*widened)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[2], want[2])
  for key in want[1]:
    np.testing.assert_array_equal(got[1][key], want[1][key], err_msg=key)
