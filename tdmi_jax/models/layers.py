"""Convolution, BatchNorm and residual blocks shared by the backbone and the TDMI modules.

Submodule names follow the PyTorch HRNet code (`conv1`, `bn1`, `downsample_0`, ...) so the
backbone's parameter tree maps onto a PyTorch state_dict name by name (see
`hrnet.torch_key`). Initialisation is the reference's: convs N(0, 0.001), biases 0,
BatchNorm scale 1 and bias 0.
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


class BasicBlock(nn.Module):
  """ResNet basic block (expansion 1); a 1x1 conv + BN projects the skip when shapes change."""
  features: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    bn = dict(train=train, frozen=self.frozen_bn, dtype=self.dtype)
    y = conv(self.features, 3, stride=self.stride, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(batch_norm(**bn, name='bn1')(y))
    y = conv(self.features, 3, dtype=self.dtype, name='conv2')(y)
    y = batch_norm(**bn, name='bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, stride=self.stride, dtype=self.dtype, name='downsample_0')(x)
      x = batch_norm(**bn, name='downsample_1')(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """ResNet bottleneck block: 1x1 -> 3x3 -> 1x1 with `planes * 4` output channels."""
  planes: int
  stride: int = 1
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    bn = dict(train=train, frozen=self.frozen_bn, dtype=self.dtype)
    out = self.planes * self.expansion
    y = conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(batch_norm(**bn, name='bn1')(y))
    y = conv(self.planes, 3, stride=self.stride, dtype=self.dtype, name='conv2')(y)
    y = nn.relu(batch_norm(**bn, name='bn2')(y))
    y = conv(out, 1, dtype=self.dtype, name='conv3')(y)
    y = batch_norm(**bn, name='bn3')(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = conv(out, 1, stride=self.stride, dtype=self.dtype, name='downsample_0')(x)
      x = batch_norm(**bn, name='downsample_1')(x)
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
