"""HRNet backbone: exact parameter counts, shapes, PyTorch naming, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdmi_jax.models import hrnet
from tdmi_jax.models import layers

# What the official pose_hrnet (17 joints, FINAL_CONV_KERNEL 1) reports as
# sum(p.numel() for p in model.parameters()): conv weights, BN weight and bias, and the
# final layer's bias. README of HRNet: W32 28.5 M, W48 63.6 M.
OFFICIAL_PARAMS = {'hrnet_w32': 28_536_113, 'hrnet_w48': 63_595_745}


def _shapes(variant, size=(64, 64)):
  model = hrnet.HRNet(hrnet.VARIANTS[variant])
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3)), train=False))


def _init(model, x):
  # unsafe_rbg and jit: threefry-initialising ~100 layers op by op takes ~15 s on 2 cores.
  return jax.jit(lambda x: model.init(jax.random.key(0, impl='unsafe_rbg'), x, train=False))(x)


def _count_by_formula(spec, joints=17):
  """Parameter count of pose_hrnet from its construction rules, without building modules."""
  conv = lambda cin, cout, k: cin * cout * k * k
  bn = lambda c: 2 * c
  n = conv(3, spec.stem_channels, 3) + conv(spec.stem_channels, spec.stem_channels, 3)
  n += 2 * bn(spec.stem_channels)
  inplanes, planes = spec.stem_channels, spec.stage1.num_channels[0]
  for _ in range(spec.stage1.num_blocks[0]):
    n += conv(inplanes, planes, 1) + conv(planes, planes, 3) + conv(planes, 4 * planes, 1)
    n += 2 * bn(planes) + bn(4 * planes)
    if inplanes != 4 * planes:
      n += conv(inplanes, 4 * planes, 1) + bn(4 * planes)
    inplanes = 4 * planes
  pre = [inplanes]
  stages = (spec.stage2, spec.stage3, spec.stage4)
  for s, st in enumerate(stages):
    cur = list(st.num_channels)
    for i, c in enumerate(cur):
      if i < len(pre):
        n += 0 if c == pre[i] else conv(pre[i], c, 3) + bn(c)
      else:
        for j in range(i + 1 - len(pre)):
          out = c if j == i - len(pre) else pre[-1]
          n += conv(pre[-1], out, 3) + bn(out)
    for m in range(st.num_modules):
      last_single = s == 2 and m == st.num_modules - 1
      for i, c in enumerate(cur):
        n += st.num_blocks[i] * 2 * (conv(c, c, 3) + bn(c))
      for i in range(1 if last_single else len(cur)):
        for j in range(len(cur)):
          if j > i:
            n += conv(cur[j], cur[i], 1) + bn(cur[i])
          for k in range(i - j):
            out = cur[i] if k == i - j - 1 else cur[j]
            n += conv(cur[j], out, 3) + bn(out)
    pre = cur
  return n + pre[0] * joints + joints


@pytest.mark.parametrize('variant', ['hrnet_w32', 'hrnet_w48'])
def test_official_parameter_counts(variant):
  count = layers.count_params(_shapes(variant)['params'])
  assert count == OFFICIAL_PARAMS[variant]
  assert count == _count_by_formula(hrnet.VARIANTS[variant])


def test_tiny_count_matches_formula():
  assert layers.count_params(_shapes('tiny')['params']) == _count_by_formula(hrnet.VARIANTS['tiny'])


@pytest.mark.parametrize('train', [False, True])
def test_tiny_shapes(train):
  spec = hrnet.VARIANTS['tiny']
  model = hrnet.HRNet(spec, num_joints=17)
  x = jax.random.normal(jax.random.key(1), (2, 64, 32, 3))
  variables = _init(model, x)
  if train:
    (heatmaps, aux), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  else:
    heatmaps, aux = model.apply(variables, x, train=False)
  assert heatmaps.shape == (2, 16, 8, 17) and heatmaps.dtype == jnp.float32
  assert len(aux['features']) == 4
  for f in aux['features']:
    assert f.shape == (2, 16, 8, spec.width)
    assert np.all(np.isfinite(f))
  # Stage features are distinct maps (transition1, stage2, stage3, stage4).
  assert not np.allclose(aux['features'][0], aux['features'][3], rtol=1e-3, atol=0)


def test_input_size_must_be_multiple_of_32():
  model = hrnet.HRNet(hrnet.VARIANTS['tiny'])
  with pytest.raises(ValueError, match='multiples of 32'):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 32, 3)), train=False)


def test_torch_names_round_trip_w48():
  shapes = _shapes('hrnet_w48')
  keys = {}
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for path, leaf in flat:
      path = tuple(p.key for p in path)
      key = hrnet.torch_key(path, collection)
      assert hrnet.flax_path(key) == (collection, path)
      keys[key] = leaf.shape
  # Keys the official pose_hrnet_w48 state_dict holds, with their flax shapes.
  assert keys['conv1.weight'] == (3, 3, 3, 64)
  assert keys['bn1.running_var'] == (64,)
  assert keys['layer1.0.downsample.0.weight'] == (1, 1, 64, 256)
  assert keys['layer1.3.bn3.weight'] == (256,)
  assert keys['transition1.0.0.weight'] == (3, 3, 256, 48)
  assert keys['transition1.1.0.0.weight'] == (3, 3, 256, 96)
  assert keys['transition3.3.0.1.running_mean'] == (384,)
  assert keys['stage2.0.branches.1.3.conv2.weight'] == (3, 3, 96, 96)
  assert keys['stage3.3.fuse_layers.0.2.0.weight'] == (1, 1, 192, 48)
  assert keys['stage4.0.fuse_layers.3.0.2.0.weight'] == (3, 3, 48, 384)
  assert keys['stage4.0.fuse_layers.3.0.1.0.weight'] == (3, 3, 48, 48)
  assert keys['stage4.2.fuse_layers.0.3.1.bias'] == (48,)
  assert keys['final_layer.weight'] == (1, 1, 48, 17)
  assert keys['final_layer.bias'] == (17,)
  # The last stage-4 module fuses into branch 0 only; no transition for unchanged widths.
  assert not any(k.startswith('stage4.2.fuse_layers.1.') for k in keys)
  assert not any(k.startswith('transition2.0.') for k in keys)
  assert hrnet.flax_path('stage2.0.branches.0.0.bn1.num_batches_tracked') is None
  assert hrnet.flax_path('module.final_layer.bias') == ('params', ('final_layer', 'bias'))
  assert hrnet.torch_key(('stage2_0', 'branches_0_0', 'conv1', 'kernel')) == (
      'stage2.0.branches.0.0.conv1.weight')
  with pytest.raises(ValueError):
    hrnet.torch_key(('conv1', 'mean'), 'params')


@pytest.mark.parametrize('frozen_bn', [True, False])
def test_batch_norm_modes(frozen_bn):
  model = hrnet.HRNet(hrnet.VARIANTS['tiny'], frozen_bn=frozen_bn)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _init(model, x)
  (out_train, _), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  out_eval, _ = model.apply(variables, x, train=False)
  same_stats = jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: bool(jnp.array_equal(a, b)), variables['batch_stats'],
      updates['batch_stats']))
  assert same_stats == frozen_bn
  assert np.array_equal(out_train, out_eval) == frozen_bn


# --- BatchNorm folding -------------------------------------------------------------------


def _randomise(variables, seed=0):
  """Fan-in scaled kernels and BN parameters/statistics far from the identity.

  At the reference init (N(0, 0.001) kernels, unit BN) the outputs are ~1e-10 and BN is
  nearly the identity, so a wrong fold would not show.
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name == 'kernel':
      scale = np.sqrt(2.0 / np.prod(x.shape[:-1]))
    elif name in ('scale', 'var'):
      return jnp.asarray(0.5 + rng.random(x.shape), x.dtype)
    else:  # BN bias and mean, conv biases.
      scale = 0.2
    return jnp.asarray(scale * rng.normal(size=x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, variables)


def _close(got, want):
  # float32 rounding only; a wrong fold (a missing BN, mean or eps) is O(1) of the range.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                             atol=1e-5 * float(np.abs(want).max()), rtol=0)


def test_folded_network_equals_unfolded():
  spec = hrnet.VARIANTS['tiny']
  x = jax.random.normal(jax.random.key(1), (2, 64, 32, 3))
  model = hrnet.HRNet(spec, frozen_bn=True)
  folded_model = hrnet.HRNet(spec, frozen_bn=True, bn_folded=True)
  variables = _randomise(_init(model, x))
  folded = jax.jit(hrnet.fold_batch_norm)(variables)
  # Exactly the folded module's variables: every conv has a bias, no BN, no batch_stats.
  shapes = jax.eval_shape(lambda: folded_model.init(jax.random.key(0), x, train=False))
  assert set(shapes) == {'params'}
  assert (jax.tree_util.tree_map(lambda s: s.shape, shapes)
          == jax.tree_util.tree_map(lambda a: a.shape, folded))
  assert set(folded['params']['layer1_0']) == {'conv1', 'conv2', 'conv3', 'downsample_0'}
  assert set(folded['params']['stage2_0']['fuse_layers_0_1_0']) == {'kernel', 'bias'}

  run = jax.jit(lambda m, v, x, train: m.apply(v, x, train=train), static_argnums=(0, 3))
  want, want_aux = run(model, variables, x, False)
  assert np.std(want) > 0.1
  for train in (False, True):  # Frozen BN in training is the eval network.
    got, got_aux = run(folded_model, folded, x, train)
    _close(got, want)
    for f, g in zip(got_aux['features'], want_aux['features']):
      _close(f, g)
  with pytest.raises(ValueError, match='bn_folded=True.*frozen_bn=True'):
    hrnet.HRNet(spec, bn_folded=True).apply(folded, x, train=True)


def test_fold_conv_bn_formula_and_bad_trees():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 6, 5, 4)), jnp.float32)
  kernel, conv_bias = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 3, 4, 7), (7,)))
  scale, bias, mean = (jnp.asarray(rng.normal(size=7), jnp.float32) for _ in range(3))
  var = jnp.asarray(rng.random(7) + 0.1, jnp.float32)
  y = layers.apply_conv(x, kernel, conv_bias)
  want = (y - mean) / np.sqrt(var + layers.BN_EPSILON) * scale + bias
  k2, b2 = layers.fold_conv_bn(kernel, scale, bias, mean, var, conv_bias)
  _close(layers.apply_conv(x, k2, b2), want)

  shapes = _shapes('tiny')
  variables = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  no_conv = {'params': {**variables['params'], 'layer1_0': {
      k: v for k, v in variables['params']['layer1_0'].items() if k != 'conv2'}},
             'batch_stats': variables['batch_stats']}
  with pytest.raises(ValueError, match='without a conv.*layer1_0/bn2'):
    hrnet.fold_batch_norm(no_conv)
  with pytest.raises(ValueError, match='no batch_stats for bn1'):
    hrnet.fold_batch_norm({'params': variables['params'], 'batch_stats': {}})


def _max_fusion_operands(compiled_text, prefix):
  """Most operands of any fusion whose name starts with `prefix` in compiled HLO text."""
  counts = [line.split(' fusion(', 1)[1].split('), kind=')[0].count('%')
            for line in compiled_text.splitlines()
            if line.lstrip().startswith(f'%{prefix}') and ' fusion(' in line]
  assert counts, f'no {prefix}* fusion in the compiled program'
  return max(counts)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_materialize_is_exact_and_stops_xla_cpu_recomputing_a_residual_chain(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 8)) * 1e3, dtype)
  np.testing.assert_array_equal(jax.jit(layers.materialize)(x), x)
  vectors = [jnp.asarray(rng.normal(size=n), dtype) for n in (3, 7, 1)]
  for got, want in zip(jax.jit(layers.materialize_vectors)(vectors), vectors):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)

  # Residual blocks then per-frame differences (what the TDE does with a stage's output):
  # without it, each difference's fusion recomputes every block's add and ReLU from the
  # conv outputs (one operand per block); with it, each reads the one materialised copy.
  ws = [jnp.asarray(rng.normal(size=(3, 3, 8, 8)) * 0.1, jnp.float32) for _ in range(6)]

  def frame_differences(x, how):
    for w in ws:
      x = jax.nn.relu(layers.apply_conv(x, w) + 0.1 + x)
    x = {'none': lambda x: x, 'materialize': layers.materialize,
         'barrier': jax.lax.optimization_barrier}[how](x)
    return [x[i + 1] - x[i] for i in range(x.shape[0] - 1)]

  x = jnp.asarray(rng.normal(size=(5, 12, 10, 8)), jnp.float32)
  operands = {m: _max_fusion_operands(
      jax.jit(frame_differences, static_argnums=1).lower(x, m).compile().as_text(),
      'subtract') for m in ('none', 'barrier', 'materialize')}
  # The behaviour materialize exists for, which XLA:CPU's optimisation barrier leaves as is.
  assert operands['none'] >= len(ws) and operands['barrier'] >= len(ws), operands
  assert operands['materialize'] == 1, operands
  np.testing.assert_allclose(jax.jit(frame_differences, static_argnums=1)(x, 'materialize'),
                             jax.jit(frame_differences, static_argnums=1)(x, 'none'),
                             rtol=1e-6, atol=1e-6)
