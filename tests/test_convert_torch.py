"""PyTorch HRNet import: numerics against a PyTorch pose_hrnet, W48 key coverage, bad input, CLI.

`TorchPoseHRNet` below rebuilds the module tree of the official `pose_hrnet` (module
names, Sequential/ModuleList nesting, None placeholders) for any `hrnet.HRNetSpec`, so its
state_dict keys and shapes are those of the published checkpoints.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tdmi_jax import checkpointing
from tdmi_jax import convert_torch
from tdmi_jax import pretrained
from tdmi_jax.models import hrnet
from tdmi_jax.models import tdmi

torch = pytest.importorskip('torch')
tnn = torch.nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sum(p.numel()) of the official pose_hrnet W48 with 17 joints (HRNet README: 63.6 M).
W48_PARAMS = 63_595_745


# --- A PyTorch pose_hrnet with the official module names ----------------------------


def _conv(cin, cout, k, stride=1):
  return tnn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


def _conv_bn(cin, cout, k, stride=1, relu=True):
  mods = [_conv(cin, cout, k, stride), tnn.BatchNorm2d(cout)]
  return tnn.Sequential(*mods, *([tnn.ReLU()] if relu else []))


class TorchBasic(tnn.Module):
  expansion = 1

  def __init__(self, cin, planes):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, planes, 3), tnn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), tnn.BatchNorm2d(planes)
    self.downsample = _conv_bn(cin, planes, 1, relu=False) if cin != planes else None

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, cin, planes):
    super().__init__()
    out = planes * 4
    self.conv1, self.bn1 = _conv(cin, planes, 1), tnn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), tnn.BatchNorm2d(planes)
    self.conv3, self.bn3 = _conv(planes, out, 1), tnn.BatchNorm2d(out)
    self.downsample = _conv_bn(cin, out, 1, relu=False) if cin != out else None

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


BLOCKS = {'BASIC': TorchBasic, 'BOTTLENECK': TorchBottleneck}


def _layer(block, cin, planes, n):
  mods = []
  for _ in range(n):
    mods.append(block(cin, planes))
    cin = planes * block.expansion
  return tnn.Sequential(*mods)


class TorchHRModule(tnn.Module):

  def __init__(self, st, widths, multi):
    super().__init__()
    block = BLOCKS[st.block]
    n = st.num_branches
    self.branches = tnn.ModuleList(
        [_layer(block, widths[i], st.num_channels[i], st.num_blocks[i]) for i in range(n)])
    self.fuse_layers = tnn.ModuleList()
    for i in range(n if multi else 1):
      row = tnn.ModuleList()
      for j in range(n):
        if j > i:
          row.append(tnn.Sequential(_conv(widths[j], widths[i], 1), tnn.BatchNorm2d(widths[i]),
                                    tnn.Upsample(scale_factor=2 ** (j - i), mode='nearest')))
        elif j == i:
          row.append(None)
        else:
          row.append(tnn.Sequential(*[
              _conv_bn(widths[j], widths[i] if k == i - j - 1 else widths[j], 3, 2,
                       relu=k != i - j - 1) for k in range(i - j)]))
      self.fuse_layers.append(row)

  def forward(self, xs):
    xs = [branch(x) for branch, x in zip(self.branches, xs)]
    return [torch.relu(sum(xs[j] if j == i else row[j](xs[j]) for j in range(len(xs))))
            for i, row in enumerate(self.fuse_layers)]


class TorchPoseHRNet(tnn.Module):

  def __init__(self, spec, num_joints=17):
    super().__init__()
    c = spec.stem_channels
    self.conv1, self.bn1 = _conv(3, c, 3, 2), tnn.BatchNorm2d(c)
    self.conv2, self.bn2 = _conv(c, c, 3, 2), tnn.BatchNorm2d(c)
    s1 = spec.stage1
    self.layer1 = _layer(BLOCKS[s1.block], c, s1.num_channels[0], s1.num_blocks[0])
    pre = [s1.num_channels[0] * BLOCKS[s1.block].expansion]
    for t, st in enumerate((spec.stage2, spec.stage3, spec.stage4), start=1):
      cur = [ch * BLOCKS[st.block].expansion for ch in st.num_channels]
      trans = tnn.ModuleList()
      for i, ch in enumerate(cur):
        if i < len(pre):
          trans.append(_conv_bn(pre[i], ch, 3) if ch != pre[i] else None)
        else:
          trans.append(tnn.Sequential(*[
              _conv_bn(pre[-1], ch if j == i - len(pre) else pre[-1], 3, 2)
              for j in range(i + 1 - len(pre))]))
      setattr(self, f'transition{t}', trans)
      setattr(self, f'stage{t + 1}', tnn.Sequential(*[
          TorchHRModule(st, cur, multi=not (t == 3 and m == st.num_modules - 1))
          for m in range(st.num_modules)]))
      pre = cur
    k = spec.final_conv_kernel
    self.final_layer = tnn.Conv2d(pre[0], num_joints, k, 1, k // 2)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = torch.relu(self.bn2(self.conv2(x)))
    ys = [self.layer1(x)]
    for t in (1, 2, 3):
      trans = getattr(self, f'transition{t}')
      xs = [ys[i] if m is None else m(ys[min(i, len(ys) - 1)]) for i, m in enumerate(trans)]
      ys = getattr(self, f'stage{t + 1}')(xs)
    return self.final_layer(ys[0])


def _randomise(model, seed=0):
  """Random weights and BatchNorm statistics, so a swapped or untransposed tensor shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        m.num_batches_tracked.fill_(1234)
      elif isinstance(m, tnn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return model.eval()


@pytest.fixture(scope='module')
def tiny_torch():
  return _randomise(TorchPoseHRNet(hrnet.VARIANTS['tiny']))


@pytest.fixture(scope='module')
def tiny_sd(tiny_torch):
  return tiny_torch.state_dict()


def _meta_state_dict(variant, num_joints=17):
  with torch.device('meta'):
    return TorchPoseHRNet(hrnet.VARIANTS[variant], num_joints).state_dict()


# --- (1) numerics ---------------------------------------------------------------------


def test_tiny_heatmaps_equal_pytorch(tiny_torch, tiny_sd):
  x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = tiny_torch(x).permute(0, 2, 3, 1).numpy()
  params, stats = convert_torch.convert_state_dict(tiny_sd, 'tiny')
  model = hrnet.HRNet(hrnet.VARIANTS['tiny'], num_joints=17)
  got, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {'params': params, 'batch_stats': stats}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  assert got.shape == want.shape == (2, 16, 24, 17)
  assert np.std(want) > 0.1  # The comparison is not between two near-zero maps.
  # float32 rounding only (measured 9e-7 of the range); a wrong layout or statistic is O(1).
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)
  # The BN-folded network (what eval and the frozen-backbone step run) on the imported
  # weights, folded once.
  folded = hrnet.fold_batch_norm({'params': params, 'batch_stats': stats})
  folded_model = hrnet.HRNet(hrnet.VARIANTS['tiny'], num_joints=17, bn_folded=True)
  got_folded, _ = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))(
      folded, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  np.testing.assert_allclose(np.asarray(got_folded), want, atol=1e-5 * np.abs(want).max(),
                             rtol=0)


def test_values_land_transposed(tiny_sd):
  params, stats = convert_torch.convert_state_dict(tiny_sd, 'tiny')
  w = tiny_sd['stage3.0.fuse_layers.2.0.1.0.weight'].numpy()  # [O, I, 3, 3]
  got = params['stage3_0']['fuse_layers_2_0_1_0']['kernel']
  np.testing.assert_array_equal(got, w.transpose(2, 3, 1, 0))
  bn = params['layer1_0']['downsample_1']
  np.testing.assert_array_equal(bn['scale'], tiny_sd['layer1.0.downsample.1.weight'].numpy())
  np.testing.assert_array_equal(stats['layer1_0']['downsample_1']['var'],
                                tiny_sd['layer1.0.downsample.1.running_var'].numpy())
  np.testing.assert_array_equal(params['final_layer']['bias'], tiny_sd['final_layer.bias'])


def test_load_torch_hrnet_any_stage_configuration(tmp_path):
  """MODEL.EXTRA of a configuration outside the variant table, read from a .pth file."""
  extra = {
      'PRETRAINED_LAYERS': ['*'], 'FINAL_CONV_KERNEL': 3,
      'STAGE2': {'NUM_MODULES': 1, 'NUM_BRANCHES': 2, 'BLOCK': 'BASIC', 'NUM_BLOCKS': [1, 2],
                 'NUM_CHANNELS': [8, 16], 'FUSE_METHOD': 'SUM'},
      'STAGE3': {'NUM_MODULES': 2, 'NUM_BRANCHES': 3, 'BLOCK': 'BASIC', 'NUM_BLOCKS': [1, 1, 1],
                 'NUM_CHANNELS': [8, 16, 24], 'FUSE_METHOD': 'SUM'},
      'STAGE4': {'NUM_MODULES': 1, 'NUM_BRANCHES': 4, 'BLOCK': 'BASIC',
                 'NUM_BLOCKS': [1, 1, 1, 1], 'NUM_CHANNELS': [8, 16, 24, 32],
                 'FUSE_METHOD': 'SUM'},
  }
  # What pose_hrnet builds from it: stem 64 and layer1 of 4 Bottlenecks (64 planes).
  spec = hrnet.HRNetSpec(
      64, hrnet.StageSpec(1, 1, 'BOTTLENECK', (4,), (64,)),
      hrnet.StageSpec(1, 2, 'BASIC', (1, 2), (8, 16)),
      hrnet.StageSpec(2, 3, 'BASIC', (1, 1, 1), (8, 16, 24)),
      hrnet.StageSpec(1, 4, 'BASIC', (1, 1, 1, 1), (8, 16, 24, 32)), final_conv_kernel=3)
  assert dataclasses.replace(convert_torch.spec_from_extra(extra), offset_groups=12) == spec
  net = _randomise(TorchPoseHRNet(spec, num_joints=15), seed=5)
  path = tmp_path / 'custom.pth'
  torch.save({'state_dict': net.state_dict()}, path)
  model, variables = pretrained.load_torch_hrnet(str(path), extra, num_joints=15)
  x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = net(x).permute(0, 2, 3, 1).numpy()
  got, _ = model.apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), train=False)
  assert got.shape == (1, 16, 16, 15) and np.std(want) > 0.1
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)
  bad = dict(extra, STAGE3=dict(extra['STAGE3'], NUM_CHANNELS=[8, 16]))
  with pytest.raises(ValueError, match='MODEL.EXTRA.STAGE3: NUM_BLOCKS'):
    convert_torch.spec_from_extra(bad)
  with pytest.raises(ValueError, match='MODEL.EXTRA.STAGE4 lacks NUM_BLOCKS'):
    convert_torch.spec_from_extra(
        dict(extra, STAGE4={k: v for k, v in extra['STAGE4'].items() if k != 'NUM_BLOCKS'}))


# --- (2) W48 naming coverage ------------------------------------------------------------


def test_w48_expected_leaves_map_one_to_one():
  expected = convert_torch.expected_shapes('hrnet_w48')
  keys = {hrnet.torch_key(path, coll): (coll, path) for coll, path in expected}
  assert len(keys) == len(expected)
  for key, target in keys.items():
    assert hrnet.flax_path(key) == target
    assert hrnet.flax_path('module.' + key) == target


def test_w48_pytorch_state_dict_fits(tmp_path):
  sd = _meta_state_dict('hrnet_w48')
  assert sum(v.numel() for k, v in sd.items()
             if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))) == W48_PARAMS
  shapes = {k: tuple(v.shape) for k, v in sd.items()}
  mapping = convert_torch.check_state_dict(shapes, 'hrnet_w48')
  assert set(mapping.values()) == set(convert_torch.expected_shapes('hrnet_w48'))
  assert len(mapping) == len(sd) - sum(k.endswith('num_batches_tracked') for k in sd)


# --- (3) bad input ----------------------------------------------------------------------


def test_wrong_variant_names_the_right_one(tiny_sd):
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.convert_state_dict(tiny_sd, 'hrnet_w32')
  msg = str(e.value)
  assert 'mis-shaped' in msg and 'missing' in msg and '--variant tiny' in msg
  shapes = {k: tuple(v.shape) for k, v in _meta_state_dict('hrnet_w32').items()}
  with pytest.raises(convert_torch.ConversionError, match='--variant hrnet_w32'):
    convert_torch.check_state_dict(shapes, 'hrnet_w48')


def test_missing_and_unexpected_keys_are_listed(tiny_sd):
  sd = dict(tiny_sd)
  del sd['stage2.0.fuse_layers.0.1.1.running_var']
  sd['head.extra.weight'] = torch.zeros(3, 3)
  sd['stage2.0.fuse_layers.0.1.1.weird'] = torch.zeros(3)
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.convert_state_dict(sd, 'tiny')
  msg = str(e.value)
  assert '1 missing: stage2.0.fuse_layers.0.1.1.running_var' in msg
  assert '2 unexpected' in msg and 'head.extra.weight' in msg and '.weird' in msg
  assert '--skip_final_layer' not in msg


def test_other_joint_count_needs_skip_final_layer(tiny_sd):
  mpii = _randomise(TorchPoseHRNet(hrnet.VARIANTS['tiny'], num_joints=16), seed=3).state_dict()
  with pytest.raises(convert_torch.ConversionError) as e:
    convert_torch.convert_state_dict(mpii, 'tiny')
  assert 'predicts 16 joints' in str(e.value) and '--skip_final_layer' in str(e.value)
  params, _ = convert_torch.convert_state_dict(mpii, 'tiny', skip_final_layer=True)
  assert params['final_layer']['kernel'].shape == (1, 1, 8, 17)
  assert not np.any(params['final_layer']['bias'])
  assert 0 < np.std(params['final_layer']['kernel']) < 0.01  # The reference's N(0, 0.001).
  np.testing.assert_array_equal(params['conv1']['kernel'],
                                mpii['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  params16, _ = convert_torch.convert_state_dict(mpii, 'tiny', num_joints=16)
  np.testing.assert_array_equal(params16['final_layer']['bias'], mpii['final_layer.bias'])


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError.
  src = tmp_path / 'x.pth'
  src.write_bytes(b'')
  code, err = _run_main(['--checkpoint', str(src), '--variant', 'tiny',
                         '--out', str(tmp_path / 'o')], capsys)
  assert code == 1 and 'pip install -r requirements-torch.txt' in err


def _run_main(argv, capsys):
  code = convert_torch.main(argv)
  return code, capsys.readouterr().err


def test_bad_files_and_out_dirs(tmp_path, tiny_sd, capsys):
  out = tmp_path / 'out'
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_bytes(b'PK\x03\x04 not really a zip file' * 10)
  code, err = _run_main(['--checkpoint', str(corrupt), '--variant', 'tiny', '--out', str(out)],
                        capsys)
  assert code == 1 and 'corrupt.pth is not a readable PyTorch checkpoint' in err
  code, err = _run_main(['--src', str(tmp_path / 'none.pth'), '--arch', 'tiny',
                         '--dst', str(out)], capsys)
  assert code == 1 and 'none.pth' in err and 'does not exist' in err
  not_sd = tmp_path / 'not_sd.pth'
  torch.save({'epoch': 3, 'state_dict': [1, 2]}, not_sd)
  code, err = _run_main(['--checkpoint', str(not_sd), '--variant', 'tiny', '--out', str(out)],
                        capsys)
  assert code == 1 and "entry 'epoch'" in err and 'not a plain state_dict' in err
  code, err = _run_main(['--checkpoint', str(not_sd), '--variant', 'w99', '--out', str(out)],
                        capsys)
  assert code == 1 and "Unknown HRNet variant 'w99'" in err
  assert not out.exists()

  good = tmp_path / 'tiny.pth'
  torch.save(tiny_sd, good)
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('keep me')
  for extra in ([], ['--overwrite']):
    code, err = _run_main(['--checkpoint', str(good), '--variant', 'tiny', '--out', str(busy),
                           *extra], capsys)
    assert code == 1 and 'busy' in err
  assert os.listdir(busy) == ['notes.txt'] and (busy / 'notes.txt').read_text() == 'keep me'

  # An empty folder is fine; rewriting our own output needs --overwrite and replaces it.
  out.mkdir()
  argv = ['--checkpoint', str(good), '--variant', 'tiny', '--out', str(out)]
  assert _run_main(argv, capsys)[0] == 0
  code, err = _run_main(argv, capsys)
  assert code == 1 and '--overwrite' in err
  sd2 = {k: v + 1 if k == 'final_layer.bias' else v for k, v in tiny_sd.items()}
  torch.save(sd2, good)
  assert _run_main(argv + ['--overwrite'], capsys)[0] == 0
  restored = checkpointing.load_pretrained(str(out))
  np.testing.assert_allclose(restored['params']['final_layer']['bias'],
                             tiny_sd['final_layer.bias'].numpy() + 1)
  assert sorted(os.listdir(tmp_path)) == ['busy', 'corrupt.pth', 'not_sd.pth', 'out', 'tiny.pth']


# --- (4) CLI -> config.init_from ---------------------------------------------------------


def test_cli_output_loads_as_init_from_backbone(tmp_path, tiny_sd):
  wrapped = {'state_dict': {'module.' + k: v for k, v in tiny_sd.items()}, 'epoch': 140}
  src = tmp_path / 'pose_hrnet_tiny.pth'
  torch.save(wrapped, src)
  out = tmp_path / 'hrnet_tiny_coco'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'tdmi_jax.convert_torch', '--checkpoint', str(src),
       '--variant', 'tiny', '--out', str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert 'init_from_kind=backbone' in proc.stdout

  model = tdmi.build_model(common.model_config('tiny'))
  frames = jnp.zeros((1, 5, 64, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(1, impl='unsafe_rbg'), x,
                                           train=False))(frames)
  loaded = checkpointing.apply_pretrained(
      variables, checkpointing.load_pretrained(str(out)), 'backbone')
  backbone = loaded['params']['backbone']
  np.testing.assert_array_equal(
      backbone['stage4_1']['fuse_layers_0_3_0']['kernel'],
      tiny_sd['stage4.1.fuse_layers.0.3.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded['batch_stats']['backbone']['bn2']['mean'],
                                tiny_sd['bn2.running_mean'].numpy())
  # The rest of TDMI keeps its own initialisation.
  same = jax.tree_util.tree_map(np.array_equal, loaded['params']['tde'], variables['params']['tde'])
  assert all(jax.tree_util.tree_leaves(same))
