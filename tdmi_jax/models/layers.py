"""Convolution, BatchNorm and residual blocks shared by the backbone and the TDMI modules.

Submodule names follow the PyTorch HRNet code (`conv1`, `bn1`, `downsample_0`, ...) so the
backbone's parameter tree maps onto a PyTorch state_dict name by name (see
`hrnet.torch_key`). Initialisation is the reference's: convs N(0, 0.001), biases 0,
BatchNorm scale 1 and bias 0.

`bn_folded=True` blocks are the same network with every BatchNorm folded into the conv
before it (`fold_conv_bn`): each conv then carries a bias and no BN module exists. Only
valid where BN runs on running statistics (eval, or frozen BN); `hrnet.fold_batch_norm`
turns the unfolded variables into the folded ones.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# The reference (HRNet, DCPose, FAMI-Pose) draws every conv weight from N(0, 0.001).
conv_init = nn.initializers.normal(stddev=0.001)
# PyTorch's BatchNorm2d momentum 0.1 is flax's 0.9; eps 1e-5 in both.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1,
         use_bias: bool = False, dtype: Dtype = jnp.float32, name: str) -> nn.Conv:
  """A square conv with PyTorch's symmetric padding (dilation*(k-1)/2 on every side).

  flax's 'SAME' pads stride-2 convs asymmetrically, which would shift every feature map
  relative to PyTorch's and break weight porting, hence explicit padding.
  """
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 kernel_dilation=dilation, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_init, name=name)


def batch_norm(*, train: bool, frozen: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm with batch statistics in training unless `frozen` (running stats, no update)."""
  return nn.BatchNorm(use_running_average=(not train) or frozen, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


def fold_conv_bn(kernel: jax.Array, scale: jax.Array, bias: jax.Array, mean: jax.Array,
                 var: jax.Array, conv_bias: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """(kernel', bias') of the conv equal to conv(kernel[, conv_bias]) followed by inference BN.

  BN(y) = (y - mean) * g + bias with g = scale / sqrt(var + eps) per output channel, so
  kernel' = kernel * g (last axis: HWIO's O) and bias' = bias + (conv_bias - mean) * g.
  Computed in float32 whatever the inputs.
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  g = f32(scale) * jax.lax.rsqrt(f32(var) + BN_EPSILON)
  shift = -f32(mean) if conv_bias is None else f32(conv_bias) - f32(mean)
  return f32(kernel) * g, f32(bias) + shift * g


def materialize_vectors(vectors: Sequence[jax.Array]) -> list[jax.Array]:
  """`materialize` of many 1-D arrays (e.g. every folded bias of a network) in one dot:
  zero-padded to the longest, stacked, then sliced back."""
  if jax.default_backend() != 'cpu' or not vectors:
    return list(vectors)
  n = max(v.shape[0] for v in vectors)
  stacked = jnp.stack([jnp.pad(v, (0, n - v.shape[0])) for v in vectors])
  out = materialize(stacked)
  return [out[i, :v.shape[0]] for i, v in enumerate(vectors)]


def materialize(x: jax.Array) -> jax.Array:
  """x, computed once where XLA:CPU would otherwise recompute it in every consumer.

  XLA:CPU fuses an elementwise producer into each of its elementwise consumers, and its
  optimisation barrier does not stop that (it is removed before fusion). Chains of
  residual adds then make every fusion recompute all the blocks before it, per element
  (an HRNet stage's output is consumed by the next stage's convs and, elementwise, by its
  residual adds). Used on HRNet module outputs, on BN-folded biases (computed inside a
  jitted step; `materialize_vectors`) and on the backbone features the TDMI head slices
  per frame. No producer is fused into a dot, so a product with the identity (exact at
  HIGHEST precision) materialises x, for C FLOPs per element. On HRNet-W48 at 384x288
  this makes the elementwise work 0.25x and the forward 0.84x (BENCHMARKS.md, "After
  `layers.materialize`").
  GPU and TPU fusion weighs duplication by cost: there x passes through unchanged.
  """
  if jax.default_backend() != 'cpu':
    return x
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jnp.dot(x, eye, precision=jax.lax.Precision.HIGHEST)


def conv_bn(x: jax.Array, features: int, kernel: int, *, stride: int = 1, train: bool,
            frozen_bn: bool, bn_folded: bool, dtype: Dtype, conv_name: str,
            bn_name: str) -> jax.Array:
  """conv (no bias) then BatchNorm, or with `bn_folded` the folded conv alone (with a bias).

  Must be called inside a parent's `nn.compact` method (both become its children).
  """
  y = conv(features, kernel, stride=stride, use_bias=bn_folded, dtype=dtype, name=conv_name)(x)
  if bn_folded:
    return y
  return batch_norm(train=train, frozen=frozen_bn, dtype=dtype, name=bn_name)(y)


class BasicBlock(nn.Module):
  """ResNet basic block (expansion 1); a 1x1 conv + BN projects the skip when shapes change."""
  features: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32
  bn_folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kw = dict(train=train, frozen_bn=self.frozen_bn, bn_folded=self.bn_folded, dtype=self.dtype)
    y = conv_bn(x, self.features, 3, stride=self.stride, conv_name='conv1', bn_name='bn1', **kw)
    y = conv_bn(nn.relu(y), self.features, 3, conv_name='conv2', bn_name='bn2', **kw)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv_bn(x, self.features, 1, stride=self.stride, conv_name='downsample_0',
                  bn_name='downsample_1', **kw)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """ResNet bottleneck block: 1x1 -> 3x3 -> 1x1 with `planes * 4` output channels."""
  planes: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32
  expansion: int = 4
  bn_folded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kw = dict(train=train, frozen_bn=self.frozen_bn, bn_folded=self.bn_folded, dtype=self.dtype)
    out = self.planes * self.expansion
    y = nn.relu(conv_bn(x, self.planes, 1, conv_name='conv1', bn_name='bn1', **kw))
    y = nn.relu(conv_bn(y, self.planes, 3, stride=self.stride, conv_name='conv2',
                        bn_name='bn2', **kw))
    y = conv_bn(y, out, 1, conv_name='conv3', bn_name='bn3', **kw)
    if self.stride != 1 or x.shape[-1] != out:
      x = conv_bn(x, out, 1, stride=self.stride, conv_name='downsample_0',
                  bn_name='downsample_1', **kw)
    return nn.relu(x + y)


BLOCKS = {'BASIC': BasicBlock, 'BOTTLENECK': Bottleneck}
EXPANSION = {'BASIC': 1, 'BOTTLENECK': 4}


def basic_chain(x: jax.Array, features: int, num_blocks: int, *, train: bool, dtype: Dtype,
                name: str) -> jax.Array:
  """`num_blocks` BasicBlocks named `{name}_0`, `{name}_1`, ...; the first projects to `features`.

  Must be called inside a parent's `nn.compact` method (the blocks become its children).
  """
  for i in range(num_blocks):
    x = BasicBlock(features, dtype=dtype, name=f'{name}_{i}')(x, train=train)
  return x


def apply_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Stride-1 'same' conv of NHWC `x` with an HWIO `kernel` given as an array (not a module)."""
  kh, kw = kernel.shape[:2]
  y = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1, 1),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y if bias is None else y + bias.astype(y.dtype)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def as_tuple(x: int | Sequence[int]) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else tuple(x)
