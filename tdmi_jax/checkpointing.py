"""Orbax checkpoints of the train state plus the data position, and `config.init_from`.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the TrainState pytree
(StandardSave), `data` a small JSON with where the input pipeline stands. The pipeline is a
pure function of (seed, step), so that position is the step, the seed and the global batch
size; restoring checks the latter two still match, so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from tdmi_jax import shipped


class Checkpoints:
  """A CheckpointManager with the keep-policy of `config.checkpoint`."""

  def __init__(self, directory, ckpt_cfg):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.max_to_keep,
        keep_period=ckpt_cfg.keep_period or None,
        create=True,
        # Leftovers of a save cut short by a kill; safe, the workdir lock (workdir_lock.py)
        # guarantees no other run is saving here.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state, data_position, *, force=False):
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_position)),
        force=force)

  def restore(self, abstract_state, step=None):
    """Returns (state, data_position) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      data=ocp.args.JsonRestore()))
    return out.state, dict(out.data)

  def restore_latest_good(self, abstract_state):
    """(state, data_position) of the newest checkpoint that restores.

    A committed checkpoint whose files were truncated or deleted afterwards fails to
    restore: it is skipped with a warning and moved to `<directory>.corrupt/<step>` (kept
    for inspection; left in place, orbax would neither overwrite it nor save that step
    again). If no checkpoint restores, nothing is moved and the error names every step's
    failure (a changed model or config fails on all of them).
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint step %d in %s does not restore (%s: %s); trying the '
                        'previous one.', step, self.directory, type(e).__name__, e)
        failed.append((step, f'{type(e).__name__}: {e}'))
        continue
      if failed:
        self._set_aside([s for s, _ in failed])
      return restored
    details = '; '.join(f'step {s}: {msg[:300]}' for s, msg in failed)
    raise ValueError(f'No checkpoint in {self.directory} can be restored ({details}). '
                     'If the model or config changed, use a new workdir.')

  def _set_aside(self, steps):
    aside = self.directory + '.corrupt'
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dst = os.path.join(aside, str(step))
        n = 1
        while os.path.exists(dst):
          dst, n = os.path.join(aside, f'{step}_{n}'), n + 1
        os.replace(os.path.join(self.directory, str(step)), dst)
        logging.warning('Moved the unreadable checkpoint step %d to %s.', step, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoints_set_aside')
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def data_position(step, config):
  return {'step': int(step), 'seed': int(config.seed),
          'global_batch_size': int(config.batch_size)}


def check_data_position(position, config):
  """The restored position must describe the same batch sequence as this config."""
  for key, now in (('seed', config.seed), ('global_batch_size', config.batch_size)):
    if key in position and int(position[key]) != int(now):
      raise ValueError(
          f'The checkpoint was written with {key}={position[key]} but the config now has '
          f'{now}: resuming would not see the batches of the original run. Use a new '
          'workdir (or config.init_from) to start a different run.')
  return int(position['step'])


# --- config.init_from ----------------------------------------------------------------


def _find_state_dir(path):
  """Accepts a workdir, its checkpoints/ folder, one <step>/ folder or a pytree folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.init_from={path!r} does not exist')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  steps = [int(d) for d in os.listdir(path)
           if d.isdigit() and os.path.isdir(os.path.join(path, d))]
  if steps:
    path = os.path.join(path, str(max(steps)))
  if os.path.isdir(os.path.join(path, 'state')):
    path = os.path.join(path, 'state')
  return path


def load_pretrained(path):
  """Raw {'params', 'batch_stats'?} numpy trees of a checkpoint written by this project
  (a training workdir) or by `tdmi_jax.convert_torch` (a plain pytree), or shipped weights
  ('shipped:NAME', see tdmi_jax/shipped.py; hash-checked)."""
  if str(path).startswith(shipped.PREFIX):
    return shipped.load(str(path)[len(shipped.PREFIX):])
  state_dir = _find_state_dir(path)
  try:
    raw = ocp.StandardCheckpointer().restore(state_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'config.init_from: {state_dir} is not a readable orbax checkpoint: '
                     f'{e}') from e
  if not isinstance(raw, dict) or 'params' not in raw:
    raise ValueError(f"config.init_from: {state_dir} holds no 'params' entry "
                     f"(found {sorted(raw) if isinstance(raw, dict) else type(raw)})")
  return {'params': raw['params'], 'batch_stats': raw.get('batch_stats') or {}}


def _graft(dst, src, where):
  """dst with every leaf replaced by src's; the two trees must match exactly."""
  dst_flat = dict(jax.tree_util.tree_flatten_with_path(dst)[0])
  src_flat = dict(jax.tree_util.tree_flatten_with_path(src)[0])
  missing = sorted(jax.tree_util.keystr(k) for k in set(dst_flat) - set(src_flat))
  unused = sorted(jax.tree_util.keystr(k) for k in set(src_flat) - set(dst_flat))
  bad = [f'{jax.tree_util.keystr(k)}: {np.shape(src_flat[k])} vs {np.shape(v)}'
         for k, v in dst_flat.items() if k in src_flat and np.shape(src_flat[k]) != np.shape(v)]
  if missing or unused or bad:
    raise ValueError(f'config.init_from does not fit the model at {where}: missing '
                     f'{missing[:8]}, unused {unused[:8]}, shape mismatches {bad[:8]}')
  return jax.tree_util.tree_map(
      lambda d, s: np.asarray(s, dtype=np.asarray(d).dtype) if hasattr(d, 'dtype') else s,
      dst, src)


def apply_pretrained(variables, pretrained, kind):
  """Copies pretrained weights into model variables.

  kind='full': every param and BatchNorm statistic. kind='backbone': only the 'backbone'
  subtree; the pretrained tree may be a whole TDMI (its 'backbone' entry is used) or a bare
  HRNet (its top level is the backbone).
  """
  params = dict(variables['params'])
  stats = dict(variables.get('batch_stats', {}))
  if kind == 'full':
    params = _graft(params, pretrained['params'], 'params')
    if stats:
      stats = _graft(stats, pretrained['batch_stats'], 'batch_stats')
  elif kind == 'backbone':
    src_p = pretrained['params'].get('backbone', pretrained['params'])
    params['backbone'] = _graft(params['backbone'], src_p, "params['backbone']")
    if 'backbone' in stats:
      src_s = pretrained['batch_stats'].get('backbone', pretrained['batch_stats'])
      stats['backbone'] = _graft(stats['backbone'], src_s, "batch_stats['backbone']")
  else:
    raise ValueError(f"config.init_from_kind={kind!r}; expected 'backbone' or 'full'")
  logging.info('Initialised %s weights from a pretrained checkpoint.', kind)
  return {'params': params, 'batch_stats': stats}
