r"""Imports an official PyTorch HRNet pose checkpoint as an orbax backbone checkpoint.

  python -m tdmi_jax.convert_torch --checkpoint pose_hrnet_w48_384x288.pth \
    --variant hrnet_w48 --out /ckpt/hrnet_w48_coco [--skip_final_layer] [--overwrite]

(`--src`, `--dst` and `--arch` are the same flags under the names of the issue.)

The checkpoint is a PyTorch `state_dict` of `pose_hrnet` as the HRNet repository
(deep-high-resolution-net.pytorch) publishes it, optionally wrapped as
{'state_dict': ...} and/or with the 'module.' prefix of DataParallel. Every tensor must land
on a leaf of the flax backbone of `--variant` (`tdmi_jax.models.hrnet`) with the right
shape: conv weights go from PyTorch's OIHW to flax's HWIO, BatchNorm weight/bias/
running_mean/running_var become scale/bias/mean/var, `num_batches_tracked` is dropped.
Missing, unexpected or mis-shaped entries are an error that lists them.

The output folder is a plain orbax pytree {'params', 'batch_stats'} of the bare backbone,
which `config.init_from=DIR` with `config.init_from_kind='backbone'` loads
(`checkpointing.load_pretrained` + `apply_pretrained`).

`--skip_final_layer` is for checkpoints trained on another joint set (MPII has 16 joints,
COCO and PoseTrack 17): the checkpoint's `final_layer` is dropped and the written one is
freshly initialised (the reference's N(0, 0.001) kernel, zero bias) for `--num_joints`.
Train it (`config.model.backbone.frozen=False`) before trusting the backbone's heatmaps.
"""

import argparse
from collections.abc import Mapping
import functools
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from tdmi_jax import keypoints
from tdmi_jax.models import hrnet
from tdmi_jax.models import layers

_SHOW = 12  # Entries of each problem list quoted in an error message.


class ConversionError(ValueError):
  """The checkpoint does not fit the requested backbone (or is not a checkpoint at all)."""


# --- Reading -------------------------------------------------------------------------


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Importing PyTorch checkpoints needs PyTorch: '
                      'pip install -r requirements-torch.txt') from e
  return torch


def unwrap_state_dict(obj: Any, where: str = 'the checkpoint') -> dict[str, Any]:
  """The flat {name: tensor} of a state_dict, a {'state_dict': ...} wrapper, 'module.' keys."""
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(f'{where} is not a PyTorch state_dict (a dict of tensors), '
                          f'got {type(obj).__name__}')
  out = {}
  for key, value in obj.items():
    if not isinstance(key, str) or not hasattr(value, 'shape'):
      raise ConversionError(f'{where}: entry {key!r} is a {type(value).__name__}, '
                            'not a tensor; this is not a plain state_dict')
    out[key[len('module.'):] if key.startswith('module.') else key] = value
  return out


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a .pth on CPU with `weights_only=True` (no pickled code runs)."""
  torch = _torch()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'PyTorch checkpoint {path!r} does not exist')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'{path} is not a readable PyTorch checkpoint: '
                          f'{type(e).__name__}: {str(e)[:300]}') from e
  return unwrap_state_dict(obj, path)


# --- Checking against the flax backbone ---------------------------------------------


Variant = str | hrnet.HRNetSpec  # A row name of hrnet.VARIANTS, or any spec.


def _spec(variant: Variant) -> hrnet.HRNetSpec:
  return variant if isinstance(variant, hrnet.HRNetSpec) else hrnet.get_spec(variant)


def _name(variant: Variant) -> str:
  return repr(variant) if isinstance(variant, str) else 'the given HRNet configuration'


@functools.lru_cache(maxsize=8)
def expected_shapes(variant: Variant, num_joints: int = keypoints.NUM_JOINTS):
  """{(collection, flax path): shape} of the backbone, from eval_shape (no compute)."""
  model = hrnet.HRNet(_spec(variant), num_joints=num_joints)
  tree = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return {(coll, path): tuple(leaf.shape)
          for coll in ('params', 'batch_stats')
          for path, leaf in flax.traverse_util.flatten_dict(tree.get(coll, {})).items()}


def _flax_shape(path: tuple[str, ...], torch_shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == 'kernel' and len(torch_shape) == 4:
    o, i, h, w = torch_shape
    return (h, w, i, o)
  return tuple(torch_shape)


def _guess_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
  """The table row whose width C matches the checkpoint's transition1 branch 0."""
  shape = shapes.get('transition1.0.0.weight')
  if not shape:
    return None
  names = [n for n, s in hrnet.VARIANTS.items() if s.width == shape[0]]
  return names[0] if names else None


def check_state_dict(shapes: Mapping[str, tuple[int, ...]], variant: Variant, *,
                     num_joints: int = keypoints.NUM_JOINTS, skip_final_layer: bool = False
                     ) -> dict[str, tuple[str, tuple[str, ...]]]:
  """{torch key: (collection, flax path)} for every tensor, or ConversionError listing
  the missing, unexpected and mis-shaped entries (names in the checkpoint's own terms)."""
  expected = expected_shapes(variant, num_joints)
  by_torch = {hrnet.torch_key(path, coll): (coll, path) for coll, path in expected}
  mapping, unexpected, misshaped, final_layer = {}, [], [], []
  for key, shape in shapes.items():
    try:
      target = hrnet.flax_path(key)
    except ValueError:
      target = ('?', ())
    if target is None:  # num_batches_tracked.
      continue
    if key.startswith('final_layer.') and skip_final_layer:
      continue
    if target not in expected:
      unexpected.append(f'{key} {tuple(shape)}')
      continue
    want = expected[target]
    if _flax_shape(target[1], tuple(shape)) != want:
      torch_want = (want[3], want[2], want[0], want[1]) if len(want) == 4 else want
      misshaped.append(f'{key}: checkpoint {tuple(shape)}, expected {torch_want}')
      if key.startswith('final_layer.'):
        final_layer.append(key)
      continue
    mapping[key] = target
  missing = sorted(k for k, target in by_torch.items()
                   if k not in shapes and not (skip_final_layer and k.startswith('final_layer.')))
  if missing or unexpected or misshaped:
    tensors = sum(not k.endswith('num_batches_tracked') for k in shapes)
    lines = [f'The checkpoint does not fit the {_name(variant)} backbone '
             f'({tensors} tensors in the checkpoint, {len(by_torch)} expected).']
    for title, items in (('missing', missing), ('unexpected', sorted(unexpected)),
                         ('mis-shaped', misshaped)):
      if items:
        more = f' (+{len(items) - _SHOW} more)' if len(items) > _SHOW else ''
        lines.append(f'  {len(items)} {title}: ' + '; '.join(items[:_SHOW]) + more)
    guess = _guess_variant(shapes)
    if guess and guess != variant:
      lines.append(f'  Its width matches --variant {guess}.')
    if final_layer and len(final_layer) == len(misshaped) and not (missing or unexpected):
      joints = shapes['final_layer.weight'][0] if 'final_layer.weight' in shapes else '?'
      lines.append(f'  Only final_layer differs: the checkpoint predicts {joints} joints, the '
                   f'model {num_joints}. Pass --skip_final_layer to drop it and start a fresh '
                   'final layer (or --num_joints to match it).')
    raise ConversionError('\n'.join(lines))
  return mapping


# --- Converting ----------------------------------------------------------------------


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _fresh_final_layer(variant: Variant, num_joints: int, seed: int) -> dict[str, np.ndarray]:
  shapes = expected_shapes(variant, num_joints)
  kernel_shape = shapes[('params', ('final_layer', 'kernel'))]
  kernel = layers.conv_init(jax.random.key(seed), kernel_shape, jnp.float32)
  return {'kernel': np.asarray(kernel), 'bias': np.zeros((num_joints,), np.float32)}


def convert_state_dict(state_dict: Mapping[str, Any], variant: Variant, *,
                       num_joints: int = keypoints.NUM_JOINTS, skip_final_layer: bool = False,
                       seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
  """PyTorch pose_hrnet state_dict -> (params, batch_stats) of `hrnet.HRNet(variant)`.

  `variant` is a row name of `hrnet.VARIANTS` or an `hrnet.HRNetSpec` (see `spec_from_extra`).

  Values may be torch tensors or numpy arrays; the results are float32 numpy trees.
  Raises ConversionError when the keys or shapes do not fit the variant exactly.
  """
  state_dict = unwrap_state_dict(state_dict)
  shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
  mapping = check_state_dict(shapes, variant, num_joints=num_joints,
                             skip_final_layer=skip_final_layer)
  flat = {'params': {}, 'batch_stats': {}}
  for key, (coll, path) in mapping.items():
    value = _to_numpy(state_dict[key])
    if path[-1] == 'kernel' and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    flat[coll][path] = np.ascontiguousarray(value)
  if skip_final_layer:
    for leaf, value in _fresh_final_layer(variant, num_joints, seed).items():
      flat['params'][('final_layer', leaf)] = value
  return (flax.traverse_util.unflatten_dict(flat['params']),
          flax.traverse_util.unflatten_dict(flat['batch_stats']))


_STAGE_FIELDS = ('NUM_MODULES', 'NUM_BRANCHES', 'BLOCK', 'NUM_BLOCKS', 'NUM_CHANNELS')


def spec_from_extra(extra: Mapping[str, Any]) -> hrnet.HRNetSpec:
  """An `hrnet.HRNetSpec` from the official yaml's `MODEL.EXTRA` (keys as in the yaml).

  STAGE2..STAGE4 are required; pose_hrnet hard-codes its stem (64 channels) and layer1
  (4 Bottlenecks of 64 planes), which an optional STAGE1 block overrides.
  """
  def stage(name):
    block = extra.get(name)
    if not isinstance(block, Mapping):
      raise ValueError(f'MODEL.EXTRA.{name} is missing or not a mapping')
    absent = [f for f in _STAGE_FIELDS if f not in block]
    if absent:
      raise ValueError(f'MODEL.EXTRA.{name} lacks {", ".join(absent)}')
    n = int(block['NUM_BRANCHES'])
    blocks, channels = tuple(block['NUM_BLOCKS']), tuple(block['NUM_CHANNELS'])
    if len(blocks) != n or len(channels) != n:
      raise ValueError(f'MODEL.EXTRA.{name}: NUM_BLOCKS {list(blocks)} and NUM_CHANNELS '
                       f'{list(channels)} need NUM_BRANCHES={n} entries')
    if block['BLOCK'] not in ('BASIC', 'BOTTLENECK'):
      raise ValueError(f"MODEL.EXTRA.{name}.BLOCK={block['BLOCK']!r}; expected BASIC or "
                       'BOTTLENECK')
    return hrnet.StageSpec(int(block['NUM_MODULES']), n, str(block['BLOCK']),
                           tuple(int(b) for b in blocks), tuple(int(c) for c in channels),
                           str(block.get('FUSE_METHOD', 'SUM')))

  stage1 = (stage('STAGE1') if 'STAGE1' in extra
            else hrnet.StageSpec(1, 1, 'BOTTLENECK', (4,), (64,)))
  if stage1.num_branches != 1:
    raise ValueError('MODEL.EXTRA.STAGE1 (pose_hrnet layer1) must have NUM_BRANCHES=1')
  s2, s3, s4 = stage('STAGE2'), stage('STAGE3'), stage('STAGE4')
  for prev, cur, name in ((stage1, s2, 'STAGE2'), (s2, s3, 'STAGE3'), (s3, s4, 'STAGE4')):
    if cur.num_branches < prev.num_branches:
      raise ValueError(f'MODEL.EXTRA.{name}: NUM_BRANCHES may not decrease')
  width = s2.num_channels[0] * layers.EXPANSION[s2.block]
  return hrnet.HRNetSpec(64, stage1, s2, s3, s4,
                         final_conv_kernel=int(extra.get('FINAL_CONV_KERNEL', 1)),
                         offset_groups=math.gcd(12, width))


def load_torch_hrnet(path_or_state_dict, extra, num_joints: int = keypoints.NUM_JOINTS):
  """(model, variables) of an HRNet pose checkpoint of any stage configuration.

  `extra` is the official yaml's `MODEL.EXTRA` as a dict (or a row name of
  `hrnet.VARIANTS`). `model.apply(variables, images_nhwc, train=False)` returns
  `(heatmaps_nhwc, aux)`, the PyTorch network's eval-mode output up to float32 rounding.
  """
  spec = hrnet.get_spec(extra) if isinstance(extra, str) else spec_from_extra(extra)
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    state_dict = load_state_dict(os.fspath(path_or_state_dict))
  else:
    state_dict = path_or_state_dict
  params, batch_stats = convert_state_dict(state_dict, spec, num_joints=num_joints)
  return (hrnet.HRNet(spec, num_joints=num_joints),
          {'params': params, 'batch_stats': batch_stats})


# --- Writing -------------------------------------------------------------------------


def _is_orbax_checkpoint(path: str) -> bool:
  names = set(os.listdir(path))
  return bool(names & {'_CHECKPOINT_METADATA', '_METADATA'})


def save(out_dir: str, params, batch_stats, *, overwrite: bool = False) -> str:
  """Writes {'params', 'batch_stats'} with ocp.StandardCheckpointer to `out_dir`.

  A non-empty `out_dir` is refused unless `overwrite`, and even then only when it is an
  orbax checkpoint (never a folder of other files). The new checkpoint is complete before
  the old one is removed.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  replace = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'--out {out_dir} exists and is not a folder')
  if replace and not overwrite:
    raise FileExistsError(f'--out {out_dir} is not empty; pass --overwrite to replace it')
  if replace and not _is_orbax_checkpoint(out_dir):
    raise FileExistsError(f'--out {out_dir} is not empty and is not an orbax checkpoint; '
                          'refusing to delete it even with --overwrite')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + '.tmp-', dir=parent)
  staged = os.path.join(tmp, 'ckpt')
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(staged, {'params': params, 'batch_stats': batch_stats})
    ckptr.wait_until_finished()
    ckptr.close()
    if replace:
      old = os.path.join(tmp, 'old')
      os.rename(out_dir, old)
    elif os.path.isdir(out_dir):
      os.rmdir(out_dir)  # Empty.
    os.rename(staged, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# --- Command line --------------------------------------------------------------------


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m tdmi_jax.convert_torch',
      description='Convert an official PyTorch HRNet pose checkpoint into an orbax '
                  'checkpoint of the backbone for config.init_from (init_from_kind=backbone).')
  parser.add_argument('--checkpoint', '--src', dest='checkpoint', required=True,
                      help='PyTorch .pth (state_dict, {"state_dict": ...}, "module." keys)')
  parser.add_argument('--variant', '--arch', dest='variant', default='hrnet_w48',
                      help=f'row of hrnet.VARIANTS: {", ".join(hrnet.VARIANTS)}')
  parser.add_argument('--out', '--dst', dest='out', required=True, help='output folder')
  parser.add_argument('--num_joints', type=int, default=keypoints.NUM_JOINTS,
                      help='joints of the model the weights are for (config.model.num_joints)')
  parser.add_argument('--skip_final_layer', action='store_true',
                      help="drop the checkpoint's final_layer (other joint set); write a "
                           'freshly initialised one')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the fresh final layer with --skip_final_layer')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing orbax checkpoint in --out')
  args = parser.parse_args(argv)
  try:
    hrnet.get_spec(args.variant)
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
      # Checked before the (slow) conversion as well as at writing time.
      raise FileExistsError(f'--out {out} is not empty; pass --overwrite to replace it')
    state_dict = load_state_dict(args.checkpoint)
    params, batch_stats = convert_state_dict(
        state_dict, args.variant, num_joints=args.num_joints,
        skip_final_layer=args.skip_final_layer, seed=args.seed)
    save(out, params, batch_stats, overwrite=args.overwrite)
  except (ImportError, OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  n = layers.count_params(params)
  note = ' (final_layer freshly initialised)' if args.skip_final_layer else ''
  print(f'Wrote {args.variant} backbone ({n:,} parameters{note}) from {args.checkpoint} '
        f'to {out}; use --config.init_from={out} --config.init_from_kind=backbone')
  return 0


if __name__ == '__main__':
  sys.exit(main())
