"""TDMI (Feng et al., CVPR 2023): the full multi-frame pose model, and its builder.

`build_model(config.model)` returns a linen module called as
`(heatmaps, aux) = model.apply(variables, frames, train=...)` with frames [B, 5, H, W, 3]
(window t-2..t+2, key frame at index 2). See CONTRACTS.md for the aux keys.

Fields of `config.model` (`configs/common.py:model_config`):
  variant          row of `hrnet.VARIANTS` ('hrnet_w48', 'hrnet_w32', 'tiny'); fixes the
                   feature width C (branch 0 of the backbone: 48, 32, 8).
  arch             'tdmi' | 'single_frame' (backbone + its own head on the key frame only:
                   the baseline; set backbone.frozen=False to train it).
  num_joints       K.
  dtype            compute dtype 'float32' | 'bfloat16'; parameters are always float32 and
                   heatmaps/aux are returned in float32.
  backbone.frozen  no gradient reaches the backbone (its outputs are gradient-stopped) and
                   `trainable_mask` marks its leaves False for the optimizer.
  backbone.bn      'frozen' (running statistics, never updated) | 'live' (batch statistics
                   and running-stat updates in training, as the reference).
  backbone.fold_bn  run the backbone with every BatchNorm folded into its conv
                   (`hrnet.fold_batch_norm`, same outputs up to float rounding) wherever BN
                   uses running statistics: in eval, and in training when the backbone is
                   frozen with bn='frozen'. Variables keep the unfolded layout; the fold is
                   computed inside the jitted apply (one elementwise pass over the kernels).
                   With bn='live' training keeps the unfolded network.
  tde.fuse_blocks  BasicBlocks in the TDE's fuse_j for stages j = 1..4.
  dcn.offset_groups  offset groups of every DCN; 0 = the variant's default (12 for W48,
                   8 for W32, 2 for tiny). Must divide C, else build_model raises.
  dcn.mask_activation  'none' (reference) | 'sigmoid'.
  dcn.impl         how the deformable convs compute (same values, see models/deform_conv.py):
                   'lean' (one gather of each tap's 2x2 neighbourhood, a VJP that
                   recomputes the sampling and accumulates the input gradient in float32) |
                   'gather' (four gathers, plain autodiff: the earlier form).
  rdm_hidden       hidden width of the RDM gates.
  rdm_noisy        'gate' (reference: M_n = a_n * M_t, an independent gate) | 'complement'
                   (M_n = M_t - M_u), see models/rdm.py.
  motion           'tde' | 'none' (ablation: the fusion sees zeros instead of M_u, so only
                   the appearance branch uses the supporting frames).
  head_residual    the fusion head predicts a correction added to the frozen backbone's own
                   key-frame heatmaps (gradient-stopped) instead of the heatmaps themselves:
                   TDMI then starts from the single-frame estimate and learns what the
                   neighbouring frames change (a departure from the paper, see docs/design.md).
  residual_base    what head_residual corrects: 'key' (the key frame's backbone heatmaps) |
                   'window' (a per-pixel softmax mixture of the five frames' backbone
                   heatmaps, its weights a 1x1 conv of F~, starting near the key frame;
                   aux 'frame_weights' [B, h, w, 5]).
  useful_head      also predict heatmaps from M_u alone with a 3x3 conv (aux
                   'useful_task_heatmaps'): the task term of mi.objective='variational'.
  appearance       'aligned' (FAMI-Pose alignment, F_app) | 'key_frame' (F_app = F_t).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tdmi_jax.models import appearance as appearance_lib
from tdmi_jax.models import deform_conv
from tdmi_jax.models import head as head_lib
from tdmi_jax.models import hrnet
from tdmi_jax.models import layers
from tdmi_jax.models import rdm as rdm_lib
from tdmi_jax.models import tde as tde_lib

Dtype = Any
NUM_FRAMES = 5
# residual_base='window': initial logit of the key frame (the others 0), so the mixture
# starts at 93% key frame, 1.7% each neighbour: near the single-frame estimate, with a
# softmax gradient (w(1 - w) = 0.07) large enough to learn from in a few hundred steps.
KEY_LOGIT = 4.0
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TDMI(nn.Module):
  spec: hrnet.HRNetSpec
  arch: str = 'tdmi'
  num_joints: int = 17
  dtype: Dtype = jnp.float32
  backbone_frozen: bool = True
  backbone_bn: str = 'frozen'
  backbone_fold_bn: bool = True
  fuse_blocks: Sequence[int] = (2, 2, 2, 2)
  offset_groups: int = 12
  mask_activation: str = 'none'
  dcn_impl: str = 'lean'
  rdm_hidden: int = 128
  rdm_noisy: str = 'gate'
  appearance: str = 'aligned'
  motion: str = 'tde'
  head_residual: bool = False
  residual_base: str = 'key'
  useful_head: bool = False

  @nn.compact
  def __call__(self, frames: jax.Array | None, *, train: bool,
               backbone_outputs: tuple[jax.Array, Sequence[jax.Array]] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """frames [B, 5, H, W, 3] -> (heatmaps [B, H/4, W/4, K], aux).

    `backbone_outputs=(heatmaps [B, 5, h, w, K], four stage features [B, 5, h, w, C])`
    replaces the backbone pass (frames is then ignored and may be None): streaming
    inference computes each frame's backbone outputs once and reuses them in every window
    that contains the frame (`backbone_apply` computes them).
    """
    if backbone_outputs is None and (frames.ndim != 5 or frames.shape[1] != NUM_FRAMES):
      raise ValueError(f'TDMI expects frames [B, {NUM_FRAMES}, H, W, 3], got {frames.shape}')
    key = NUM_FRAMES // 2
    frozen = self.backbone_frozen
    maybe_stop = jax.lax.stop_gradient if frozen else (lambda x: x)
    backbone = self._backbone(train)
    if self.arch == 'single_frame':
      heatmaps, _ = backbone(frames[:, key], train=train)
      heatmaps = maybe_stop(heatmaps)
      return heatmaps, {'backbone_heatmaps': heatmaps}

    if backbone_outputs is None:
      # One backbone pass over all B*T frames.
      b, t, h, w, _ = frames.shape
      all_heatmaps, baux = backbone(frames.reshape(b * t, h, w, -1), train=train)
      split = lambda x: maybe_stop(x.reshape(b, t, *x.shape[1:]))
      stage_features = [split(f) for f in baux['features']]
      window_heatmaps = split(all_heatmaps)
    else:
      all_heatmaps, stage_features = backbone_outputs
      stage_features = [maybe_stop(f) for f in stage_features]
      window_heatmaps = maybe_stop(all_heatmaps)
    backbone_heatmaps = window_heatmaps[:, key]

    c = self.spec.width
    motion = tde_lib.TemporalDifferenceEncoder(
        c, fuse_blocks=tuple(self.fuse_blocks), offset_groups=self.offset_groups,
        mask_activation=self.mask_activation, impl=self.dcn_impl, dtype=self.dtype,
        name='tde')(stage_features, train=train)
    useful, noisy = rdm_lib.RepresentationDisentanglement(
        self.rdm_hidden, noisy=self.rdm_noisy, dtype=self.dtype, name='rdm')(motion)
    if self.appearance == 'aligned':
      app = appearance_lib.AppearanceAlignment(
          c, offset_groups=self.offset_groups, mask_activation=self.mask_activation,
          dcn_impl=self.dcn_impl, dtype=self.dtype, name='appearance')(
              stage_features[-1], train=train)
    else:
      app = stage_features[-1][:, key]
    fusion_motion = useful if self.motion == 'tde' else jnp.zeros_like(useful)
    heatmaps, fused = head_lib.FusionHead(c, self.num_joints, dtype=self.dtype, name='head')(
        fusion_motion, app, train=train)
    extra = {}
    if self.head_residual:
      if self.residual_base == 'key':
        base = jax.lax.stop_gradient(backbone_heatmaps)
      else:
        # 'window': per pixel, a softmax over the five frames' own backbone heatmaps,
        # weighted from the fused TDMI feature F~ (motion and aligned appearance). It
        # starts near the key frame alone (bias KEY_LOGIT on the key) and learns where a
        # neighbour is the better witness, e.g. when the key frame is blurred or occluded.
        bias = jnp.zeros((NUM_FRAMES,), jnp.float32).at[key].set(KEY_LOGIT)
        logits = nn.Conv(NUM_FRAMES, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=layers.conv_init, bias_init=lambda *_: bias,
                         name='frame_weights')(fused)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        base = jnp.einsum('bhwt,bthwk->bhwk', weights,
                          jax.lax.stop_gradient(window_heatmaps).astype(jnp.float32))
        extra['frame_weights'] = weights
      heatmaps = heatmaps + base.astype(heatmaps.dtype)

    # H(X): the backbone's final conv with its weights gradient-stopped, for the MI terms.
    final = self.variables['params']['backbone']['final_layer']
    kernel = jax.lax.stop_gradient(final['kernel']).astype(self.dtype)
    bias = jax.lax.stop_gradient(final['bias']).astype(self.dtype)
    backbone_head = lambda x: layers.apply_conv(x.astype(self.dtype), kernel, bias)
    f32 = lambda x: x.astype(jnp.float32)
    aux = {
        'motion': f32(motion), 'useful': f32(useful), 'noisy': f32(noisy),
        'appearance': f32(app), 'fused': f32(fused),
        'backbone_heatmaps': f32(backbone_heatmaps),
        'useful_heatmaps': f32(backbone_head(useful)),
        'appearance_heatmaps': f32(backbone_head(app)),
    }
    aux.update(extra)
    if self.useful_head:
      aux['useful_task_heatmaps'] = f32(layers.conv(
          self.num_joints, 3, use_bias=True, dtype=self.dtype, name='useful_head')(useful))
    return heatmaps, aux

  def _backbone(self, train: bool) -> nn.Module:
    """The 'backbone' child: HRNet, or the BN-folded HRNet seeing folded variables.

    Folded only where BN runs on running statistics and no gradient reaches the backbone
    (eval; training with a frozen backbone and bn='frozen'), and never at init, so the
    stored variables always have the unfolded layout of checkpoints and PyTorch imports.
    """
    fold = (self.backbone_fold_bn and not self.is_initializing()
            and (not train or (self.backbone_frozen and self.backbone_bn == 'frozen')))
    kw = dict(num_joints=self.num_joints, frozen_bn=self.backbone_bn == 'frozen',
              dtype=self.dtype, name='backbone')
    if is_folded(self.variables.get('params', {}).get('backbone', {})):
      return hrnet.HRNet(self.spec, bn_folded=True, **kw)  # `fold_backbone` did it already.
    if not fold:
      return hrnet.HRNet(self.spec, **kw)
    folded_hrnet = nn.map_variables(hrnet.HRNet, ['params', 'batch_stats'],
                                    trans_in_fn=hrnet.fold_batch_norm)
    return folded_hrnet(self.spec, bn_folded=True, **kw)


def is_folded(backbone_params: Mapping[str, Any]) -> bool:
  """Whether backbone params have the BN-folded layout (the stem conv has a bias)."""
  return 'bias' in backbone_params.get('conv1', {})


def fold_backbone(model: TDMI, variables: Mapping[str, Any]) -> dict[str, Any]:
  """`variables` with the backbone's BatchNorms folded into its convs, once, for eval.

  For callers that apply the model many times with the same weights (video inference):
  the model then skips its per-call fold. Only for eval (and frozen-BN) applies; the
  result is not a checkpoint layout. Returns `variables` unchanged when
  model.backbone_fold_bn is False or the backbone is folded already.
  """
  params, stats = variables['params'], variables.get('batch_stats', {})
  if not model.backbone_fold_bn or is_folded(params['backbone']):
    return dict(variables)
  folded = jax.jit(hrnet.fold_batch_norm)(
      {'params': params['backbone'], 'batch_stats': stats['backbone']})['params']
  return {**variables, 'params': {**params, 'backbone': folded},
          'batch_stats': {k: v for k, v in stats.items() if k != 'backbone'}}


def backbone_apply(model: TDMI, variables: Mapping[str, Any], images: jax.Array
                   ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The backbone alone in eval mode on single frames [N, H, W, 3].

  Returns (heatmaps [N, h, w, K], the four stage features [N, h, w, C]): what
  `TDMI.__call__(None, backbone_outputs=...)` takes once stacked into windows. With
  model.backbone_fold_bn it runs the BN-folded network (on `fold_backbone`'s variables
  as they are, else folding inside this call).
  """
  sub = {c: v['backbone'] for c, v in variables.items() if 'backbone' in v}
  folded = is_folded(sub['params'])
  if model.backbone_fold_bn and not folded:
    sub, folded = hrnet.fold_batch_norm(sub), True
  backbone = hrnet.HRNet(model.spec, num_joints=model.num_joints,
                         frozen_bn=model.backbone_bn == 'frozen', dtype=model.dtype,
                         bn_folded=folded)
  heatmaps, aux = backbone.apply(sub, images, train=False)
  return heatmaps, tuple(aux['features'])


def _choice(cfg_value, field, options):
  if cfg_value not in options:
    raise ValueError(f'model.{field}={cfg_value!r}; expected one of {sorted(options)}')
  return cfg_value


def _flag(cfg_value, field):
  if not isinstance(cfg_value, bool):
    raise ValueError(f'model.{field}={cfg_value!r}; expected True or False')
  return cfg_value


def resolve_offset_groups(model_cfg: ml_collections.ConfigDict) -> int:
  """`model.dcn.offset_groups`, with 0 meaning the variant's default; must divide C."""
  spec = hrnet.get_spec(model_cfg.variant)
  groups = int(model_cfg.dcn.offset_groups) or spec.offset_groups
  if groups < 0 or spec.width % groups:
    raise ValueError(
        f'model.dcn.offset_groups={model_cfg.dcn.offset_groups} gives {groups} offset groups, '
        f'which must divide the feature width C={spec.width} of variant '
        f'{model_cfg.variant!r} (0 selects the variant default {spec.offset_groups})')
  return groups


def build_model(model_cfg: ml_collections.ConfigDict) -> TDMI:
  """The model described by `config.model`, with every field checked."""
  spec = hrnet.get_spec(model_cfg.variant)
  fuse_blocks = tuple(int(n) for n in model_cfg.tde.fuse_blocks)
  if len(fuse_blocks) != 4 or min(fuse_blocks) < 1:
    raise ValueError(f'model.tde.fuse_blocks={model_cfg.tde.fuse_blocks}: need 4 counts >= 1')
  if int(model_cfg.rdm_hidden) < 1:
    raise ValueError(f'model.rdm_hidden={model_cfg.rdm_hidden} must be >= 1')
  if int(model_cfg.num_joints) < 1:
    raise ValueError(f'model.num_joints={model_cfg.num_joints} must be >= 1')
  return TDMI(
      spec=spec,
      arch=_choice(model_cfg.arch, 'arch', ('tdmi', 'single_frame')),
      num_joints=int(model_cfg.num_joints),
      dtype=_DTYPES[_choice(model_cfg.dtype, 'dtype', _DTYPES)],
      backbone_frozen=bool(model_cfg.backbone.frozen),
      backbone_bn=_choice(model_cfg.backbone.bn, 'backbone.bn', ('frozen', 'live')),
      backbone_fold_bn=_flag(model_cfg.backbone.get('fold_bn', True), 'backbone.fold_bn'),
      fuse_blocks=fuse_blocks,
      offset_groups=resolve_offset_groups(model_cfg),
      mask_activation=_choice(model_cfg.dcn.mask_activation, 'dcn.mask_activation',
                              ('none', 'sigmoid')),
      dcn_impl=_choice(model_cfg.dcn.get('impl', 'lean'), 'dcn.impl',
                       deform_conv.IMPLS),
      rdm_hidden=int(model_cfg.rdm_hidden),
      rdm_noisy=_choice(model_cfg.get('rdm_noisy', 'gate'), 'rdm_noisy',
                        ('gate', 'complement')),
      appearance=_choice(model_cfg.appearance, 'appearance', ('aligned', 'key_frame')),
      motion=_choice(model_cfg.get('motion', 'tde'), 'motion', ('tde', 'none')),
      head_residual=bool(model_cfg.get('head_residual', False)),
      residual_base=_choice(model_cfg.get('residual_base', 'key'), 'residual_base',
                            ('key', 'window')),
      useful_head=bool(model_cfg.get('useful_head', False)),
  )


def trainable_mask(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict) -> Any:
  """Pytree of bools over `params`: False on every backbone leaf when the backbone is frozen.

  Use it to label the optimizer (e.g. optax.multi_transform with set_to_zero for False)
  so frozen leaves get no update and no optimizer state.
  """
  frozen = bool(model_cfg.backbone.frozen)

  def label(name, subtree):
    trainable = not (frozen and name == 'backbone')
    return jax.tree_util.tree_map(lambda _: trainable, subtree)

  return {name: label(name, subtree) for name, subtree in params.items()}
