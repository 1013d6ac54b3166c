"""HRNet pose network (Sun et al., CVPR 2019) as data, named like the PyTorch `pose_hrnet`.

The stage structure is a row of `VARIANTS`, whose fields mean what the official HRNet
`MODEL.EXTRA` yaml fields mean (NUM_MODULES, NUM_BRANCHES, BLOCK, NUM_BLOCKS,
NUM_CHANNELS, FUSE_METHOD), plus the stem width. STAGE1 is the `layer1` of pose_hrnet.

Parameter naming scheme (flax path <-> PyTorch state_dict key): every PyTorch module path
component that is a `Sequential`/`ModuleList` index is glued to the component before it
with '_' to form one flax module name. So

  ('stage2_0', 'branches_0_0', 'conv1', 'kernel')  <->  'stage2.0.branches.0.0.conv1.weight'
  ('transition1_1_0_0', 'kernel')                  <->  'transition1.1.0.0.weight'
  ('stage2_0', 'fuse_layers_1_0_0_1', 'scale')     <->  'stage2.0.fuse_layers.1.0.0.1.weight'

and back by turning every '_' followed by a digit into '.'. Leaves: conv 'kernel' <->
'weight' (flax HWIO, PyTorch OIHW: the importer transposes), 'bias' <-> 'bias', BatchNorm
'scale' <-> 'weight'; batch_stats 'mean'/'var' <-> 'running_mean'/'running_var'.
See `torch_key` and `flax_path`.
"""

from collections.abc import Mapping
import dataclasses
import re
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from tdmi_jax import keypoints
from tdmi_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One HRNet stage, as the official yaml's STAGEi block."""
  num_modules: int
  num_branches: int
  block: str                      # 'BASIC' | 'BOTTLENECK'.
  num_blocks: tuple[int, ...]
  num_channels: tuple[int, ...]
  fuse_method: str = 'SUM'


@dataclasses.dataclass(frozen=True)
class HRNetSpec:
  stem_channels: int
  stage1: StageSpec               # pose_hrnet's `layer1` (one branch, no fusion).
  stage2: StageSpec
  stage3: StageSpec
  stage4: StageSpec
  final_conv_kernel: int = 1
  # TDMI's DCN offset groups when `model.dcn.offset_groups` is 0; must divide the width C
  # of branch 0 (the reference uses 12 with C = 48).
  offset_groups: int = 12

  @property
  def width(self) -> int:
    """C: the channel count of the stage features TDMI consumes (branch 0)."""
    return self.stage2.num_channels[0]


def _stages(widths, blocks=4, modules=(1, 4, 3)):
  return tuple(
      StageSpec(num_modules=m, num_branches=n, block='BASIC', num_blocks=(blocks,) * n,
                num_channels=tuple(widths[:n]))
      for m, n in zip(modules, (2, 3, 4)))


_STAGE1 = StageSpec(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(4,),
                    num_channels=(64,))

VARIANTS = {
    'hrnet_w48': HRNetSpec(64, _STAGE1, *_stages((48, 96, 192, 384)), offset_groups=12),
    'hrnet_w32': HRNetSpec(64, _STAGE1, *_stages((32, 64, 128, 256)), offset_groups=8),
    # Test-only: every structural feature (bottleneck layer1 with projection, new-branch
    # transitions, up/down fusion chains, a multi-module stage 4 whose last module keeps
    # one output) at a fraction of the cost.
    'tiny': HRNetSpec(
        16,
        StageSpec(1, 1, 'BOTTLENECK', (1,), (8,)),
        *_stages((8, 16, 32, 64), blocks=1, modules=(1, 1, 2)),
        offset_groups=2),
    # The shipped synthetic-data backbone (configs/synthetic_backbone.py): twice tiny's
    # high-resolution width, two blocks per branch; 583k parameters, CPU-sized.
    'small': HRNetSpec(
        32,
        StageSpec(1, 1, 'BOTTLENECK', (2,), (16,)),
        *_stages((16, 32, 48, 64), blocks=2, modules=(1, 1, 1)),
        offset_groups=4),
}


def get_spec(variant: str) -> HRNetSpec:
  if variant not in VARIANTS:
    raise ValueError(
        f'Unknown HRNet variant {variant!r} (model.variant); known: {sorted(VARIANTS)}')
  return VARIANTS[variant]


def _conv_bn(x, features, *, kernel, stride, relu, train, frozen_bn, bn_folded, dtype, name):
  """PyTorch `Sequential(conv, BN[, ReLU])` named `{name}_0`, `{name}_1`."""
  x = layers.conv_bn(x, features, kernel, stride=stride, train=train, frozen_bn=frozen_bn,
                     bn_folded=bn_folded, dtype=dtype, conv_name=f'{name}_0',
                     bn_name=f'{name}_1')
  return nn.relu(x) if relu else x


class HighResolutionModule(nn.Module):
  """Parallel branches of blocks followed by all-to-all sum fusion."""
  stage: StageSpec
  multi_scale_output: bool = True
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32
  bn_folded: bool = False

  @nn.compact
  def __call__(self, xs: list[jax.Array], *, train: bool) -> list[jax.Array]:
    s = self.stage
    if len(xs) != s.num_branches:
      raise ValueError(f'{self.name}: {len(xs)} inputs for {s.num_branches} branches')
    if s.fuse_method != 'SUM':
      raise ValueError(f'{self.name}: unsupported FUSE_METHOD {s.fuse_method!r}')
    kw = dict(train=train, frozen_bn=self.frozen_bn, bn_folded=self.bn_folded, dtype=self.dtype)
    block = layers.BLOCKS[s.block]
    width = [c * layers.EXPANSION[s.block] for c in s.num_channels]
    xs = list(xs)
    for i in range(s.num_branches):
      for k in range(s.num_blocks[i]):
        xs[i] = block(s.num_channels[i], frozen_bn=self.frozen_bn, dtype=self.dtype,
                      bn_folded=self.bn_folded, name=f'branches_{i}_{k}')(xs[i], train=train)
    if s.num_branches == 1:
      return xs
    outs = []
    for i in range(s.num_branches if self.multi_scale_output else 1):
      y = None
      for j in range(s.num_branches):
        z = xs[j]
        if j > i:  # Lower resolution: 1x1 conv + BN, then nearest upsampling.
          z = _conv_bn(z, width[i], kernel=1, stride=1, relu=False,
                       name=f'fuse_layers_{i}_{j}', **kw)
          z = jnp.repeat(jnp.repeat(z, 2 ** (j - i), axis=1), 2 ** (j - i), axis=2)
        elif j < i:  # Higher resolution: (i - j) stride-2 3x3 convs; ReLU on all but the last.
          for k in range(i - j):
            last = k == i - j - 1
            z = _conv_bn(z, width[i] if last else width[j], kernel=3, stride=2, relu=not last,
                         name=f'fuse_layers_{i}_{j}_{k}', **kw)
        y = z if y is None else y + z
      # Materialised: XLA:CPU would otherwise recompute this sum into every later block.
      outs.append(layers.materialize(nn.relu(y)))
    return outs


def normalize_pixels(x: jax.Array) -> jax.Array:
  """uint8 RGB -> float32 ImageNet-normalised, on the device: the input pipeline ships
  uint8 frames (a quarter of the host->device bytes). Same arithmetic as
  data.transforms.normalize; float inputs are taken as already normalised."""
  inv_std = 1.0 / (jnp.asarray(keypoints.IMAGENET_STD, jnp.float32) * 255.0)
  shift = jnp.asarray(keypoints.IMAGENET_MEAN, jnp.float32) * 255.0 * inv_std
  return x.astype(jnp.float32) * inv_std - shift


class HRNet(nn.Module):
  """Top-down HRNet pose network.

  `__call__(x [N, H, W, 3], *, train)` returns `(heatmaps [N, H/4, W/4, num_joints],
  aux)` with aux['features'] the four stage features of SPEC §1, each [N, H/4, W/4, C]:
  transition1's branch 0, then the branch-0 outputs of stages 2, 3 and 4.
  H and W must be multiples of 32 (the fusion upsampling must land on the same grid).

  `bn_folded=True` is the same network with every BatchNorm folded into its conv: its
  variables are `fold_batch_norm` of the unfolded ones (params only: each conv has a bias,
  no BN module, no batch_stats). It computes what the unfolded network computes on running
  statistics, so it needs train=False or frozen_bn=True.
  """
  spec: HRNetSpec
  num_joints: int = 17
  frozen_bn: bool = False         # BatchNorm on running statistics even in training.
  dtype: Dtype = jnp.float32
  bn_folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, Any]]:
    if x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(f'HRNet input height and width must be multiples of 32, got {x.shape[1:3]}')
    if self.bn_folded and train and not self.frozen_bn:
      raise ValueError(
          'HRNet(bn_folded=True) has no batch statistics to train with: folding BatchNorm '
          "needs train=False or frozen_bn=True (config: model.backbone.bn='frozen')")
    sp = self.spec
    kw = dict(train=train, frozen_bn=self.frozen_bn, bn_folded=self.bn_folded, dtype=self.dtype)
    if x.dtype == jnp.uint8:
      x = normalize_pixels(x)
    x = x.astype(self.dtype)
    x = nn.relu(layers.conv_bn(x, sp.stem_channels, 3, stride=2, conv_name='conv1',
                               bn_name='bn1', **kw))
    x = nn.relu(layers.conv_bn(x, sp.stem_channels, 3, stride=2, conv_name='conv2',
                               bn_name='bn2', **kw))
    s1 = sp.stage1
    for k in range(s1.num_blocks[0]):
      x = layers.BLOCKS[s1.block](s1.num_channels[0], frozen_bn=self.frozen_bn, dtype=self.dtype,
                                  bn_folded=self.bn_folded, name=f'layer1_{k}')(x, train=train)

    features = []
    ys = [x]
    pre = [s1.num_channels[0] * layers.EXPANSION[s1.block]]
    for t, stage in enumerate((sp.stage2, sp.stage3, sp.stage4), start=1):
      cur = [c * layers.EXPANSION[stage.block] for c in stage.num_channels]
      xs = []
      for i, c in enumerate(cur):
        if i < len(pre):  # Existing branch: a 3x3 conv only if its width changes.
          z = ys[i]
          if c != pre[i]:
            z = _conv_bn(z, c, kernel=3, stride=1, relu=True, name=f'transition{t}_{i}', **kw)
        else:  # New branch: stride-2 convs from the lowest-resolution previous branch.
          z = ys[-1]
          for j in range(i + 1 - len(pre)):
            out = c if j == i - len(pre) else pre[-1]
            z = _conv_bn(z, out, kernel=3, stride=2, relu=True, name=f'transition{t}_{i}_{j}',
                         **kw)
        xs.append(z)
      if t == 1:  # The other features are module outputs, materialised already.
        features.append(layers.materialize(xs[0]))
      for m in range(stage.num_modules):
        # pose_hrnet builds stage 4 with multi_scale_output=False: its last module fuses
        # into branch 0 only.
        multi = not (t == 3 and m == stage.num_modules - 1)
        xs = HighResolutionModule(stage, multi_scale_output=multi, frozen_bn=self.frozen_bn,
                                  dtype=self.dtype, bn_folded=self.bn_folded,
                                  name=f'stage{t + 1}_{m}')(xs, train=train)
      ys, pre = xs, cur
      features.append(ys[0])

    heatmaps = nn.Conv(self.num_joints, (sp.final_conv_kernel,) * 2,
                       padding=sp.final_conv_kernel // 2, use_bias=True, dtype=self.dtype,
                       param_dtype=jnp.float32, kernel_init=layers.conv_init,
                       name='final_layer')(ys[0])
    # Every feature is materialised (layers.materialize): TDMI's head reads them per frame.
    return heatmaps.astype(jnp.float32), {'features': tuple(features)}


# --- BatchNorm folding --------------------------------------------------------------------


def _bn_of_conv(conv_name: str) -> str | None:
  """Name of the BatchNorm that follows conv `conv_name` (naming scheme above), if any.

  `convK` -> `bnK` (blocks, stem); `X_0` -> `X_1` (index 0 and 1 of a PyTorch
  `Sequential(conv, BN[, ReLU])`: downsample, transitions, fuse layers).
  """
  if re.fullmatch(r'conv\d+', conv_name):
    return 'bn' + conv_name[len('conv'):]
  if conv_name.endswith('_0'):
    return conv_name[:-1] + '1'
  return None


def fold_batch_norm(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Variables of `HRNet(bn_folded=True)` from those of the unfolded `HRNet`.

  `variables` holds 'params' and 'batch_stats' of one HRNet (e.g. TDMI's 'backbone'
  subtree, a checkpoint or a PyTorch import: the stored layout never changes). Every
  conv followed by a BatchNorm gets kernel * g and bias beta - mean * g with
  g = gamma / sqrt(var + eps) (`layers.fold_conv_bn`); the BN modules disappear. A pure
  jnp function: jit it (or call it inside a jitted step, where it costs one elementwise
  pass over the conv kernels) to fold once.
  """
  params = variables['params']
  stats = variables.get('batch_stats', {})

  def walk(p, s, where):
    out = {}
    used = set()
    for name, child in p.items():
      if 'kernel' in child:  # A conv.
        bn = _bn_of_conv(name)
        if bn is None or bn not in p:
          out[name] = dict(child)
          continue
        if bn not in s or 'mean' not in s[bn]:
          raise ValueError(f'fold_batch_norm: no batch_stats for {"/".join(where + (bn,))}')
        kernel, bias = layers.fold_conv_bn(child['kernel'], p[bn]['scale'], p[bn]['bias'],
                                           s[bn]['mean'], s[bn]['var'], child.get('bias'))
        out[name] = {'kernel': kernel, 'bias': bias}
        used.add(bn)
      elif 'scale' not in child:  # A container module (block, stage, ...).
        out[name] = walk(child, s.get(name, {}), where + (name,))
    orphans = sorted(n for n, c in p.items() if 'scale' in c and n not in used)
    if orphans:
      raise ValueError(f'fold_batch_norm: BatchNorm without a conv before it: '
                       f'{["/".join(where + (n,)) for n in orphans]}')
    return out

  folded = walk(params, stats, ())
  # The folded biases, computed once (layers.materialize): inside a jitted step XLA:CPU
  # would otherwise re-derive each of them per element in every fusion that reads it.
  flat = traverse_util.flatten_dict(folded)
  biases = [k for k in flat if k[-1] == 'bias']
  flat.update(zip(biases, layers.materialize_vectors([flat[k] for k in biases])))
  return {'params': traverse_util.unflatten_dict(flat)}


# --- flax path <-> PyTorch state_dict key ----------------------------------------------

_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
                  'mean': 'running_mean', 'var': 'running_var'}


def _is_batch_norm(module: str) -> bool:
  """BatchNorms are `bn*` or index 1 of a PyTorch `Sequential(conv, BN[, ReLU])`."""
  return module.startswith('bn') or re.search(r'_1$', module) is not None


def torch_key(path: tuple[str, ...], collection: str = 'params') -> str:
  """Flax path inside the backbone's params/batch_stats -> PyTorch state_dict key."""
  *modules, leaf = path
  if not modules or leaf not in _LEAF_TO_TORCH:
    raise ValueError(f'Not a backbone leaf path: {path!r}')
  expected = 'batch_stats' if leaf in ('mean', 'var') else 'params'
  if collection != expected:
    raise ValueError(f'Leaf {leaf!r} of {path!r} belongs to {expected!r}, not {collection!r}')
  return '.'.join(re.sub(r'_(?=\d)', '.', m) for m in modules) + '.' + _LEAF_TO_TORCH[leaf]


def flax_path(key: str) -> tuple[str, tuple[str, ...]] | None:
  """PyTorch state_dict key -> (collection, flax path); None for `num_batches_tracked`.

  Accepts and drops the 'module.' prefix that DataParallel checkpoints carry.
  """
  parts = key.split('.')
  if parts[0] == 'module':
    parts = parts[1:]
  *torch_modules, leaf = parts
  if leaf == 'num_batches_tracked':
    return None
  modules = []
  for p in torch_modules:
    if p.isdigit():
      if not modules:
        raise ValueError(f'Cannot map PyTorch key {key!r}')
      modules[-1] += '_' + p
    else:
      modules.append(p)
  if not modules:
    raise ValueError(f'Cannot map PyTorch key {key!r}')
  bn = _is_batch_norm(modules[-1])
  if leaf == 'running_mean':
    return 'batch_stats', (*modules, 'mean')
  if leaf == 'running_var':
    return 'batch_stats', (*modules, 'var')
  if leaf == 'weight':
    return 'params', (*modules, 'scale' if bn else 'kernel')
  if leaf == 'bias':
    return 'params', (*modules, 'bias')
  raise ValueError(f'Cannot map PyTorch key {key!r}: unknown leaf {leaf!r}')
