"""Orbax checkpoints of the train state plus the data position, and `config.init_from`.

Layout: `<workdir>/checkpoints/<step>/{state,data}`: `state` is the TrainState pytree
(StandardSave), `data` a small JSON with where the input pipeline stands. The pipeline is a
pure function of (seed, step), so that position is the step, the seed and the global batch
size; restoring checks the latter two still match, so a resumed run sees exactly the
batches an uninterrupted one would have.

The manager decides when to save: every `config.checkpoint.every_steps` steps and at the
step where every process reaches the preemption sync point after a SIGTERM to any of them
(`reached_preemption`; jax's coordination service agrees on that step). Paths go through
etils.epath, so the directory may be local or `gs://`.
"""

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from tdmi_jax import paths
from tdmi_jax import shipped


class Checkpoints:
  """A CheckpointManager with the save interval and keep-policy of `config.checkpoint`.

  `read_only=True` (batch evaluation) lists and restores but never saves, deletes or cleans
  up: a training run may still be writing the directory.
  """

  def __init__(self, directory, ckpt_cfg=None, *, read_only=False):
    self.directory = paths.path(directory)
    self.every_steps = (ckpt_cfg.get('every_steps') or 1) if ckpt_cfg is not None else 1
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=ckpt_cfg.max_to_keep,
          keep_period=ckpt_cfg.keep_period or None,
          # The interval and preemption policies only: orbax's default set would also
          # save the very first step of every fresh run.
          save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
              ocp.checkpoint_managers.FixedIntervalPolicy(ckpt_cfg.get('every_steps') or 1),
              ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]),
          create=True,
          # Leftovers of a save cut short by a kill; safe, the workdir lock
          # (workdir_lock.py) guarantees no other run is saving here.
          cleanup_tmp_directories=True,
          enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def interval_due(self, step):
    """Whether the interval policy saves at `step` (the driver checks the state first)."""
    return int(step) % self.every_steps == 0

  def reached_preemption(self, step):
    """True on every process at the same step once any of them got SIGTERM (multi-process
    runs; jax's preemption sync manager). Must be called at every step."""
    return self.manager.reached_preemption(int(step))

  def save(self, state, data_position, *, force=False):
    """Saves when the manager's policy says so (interval, preemption) or `force`; call it
    at every step. Returns whether a save started."""
    step = int(data_position['step']) if 'step' in data_position else int(
        jax.device_get(state.step))
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
    aside = self.directory.parent / f'{self.directory.name}.corrupt'
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dst = aside / str(step)
        n = 1
        while dst.exists():
          dst, n = aside / f'{step}_{n}', n + 1
        paths.move(self.directory / str(step), dst)
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
  path = paths.path(path)
  if not path.exists():
    raise FileNotFoundError(f'config.init_from={os.fspath(path)!r} does not exist')
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  steps = [int(d.name) for d in path.iterdir() if d.name.isdigit() and d.is_dir()]
  if steps:
    path = path / str(max(steps))
  if (path / 'state').is_dir():
    path = path / 'state'
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
