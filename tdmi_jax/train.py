"""The training and evaluation driver: `train_and_evaluate(config, workdir, mode)`.

One linear function, in sections: workdir and data, model and state, resume, the loop
(progress bar, logs, periodic eval, checkpoints, signals, NaN guard), the end.

Workdir layout:
  config.json          the resolved config, written at the first start (process 0).
  metrics.jsonl        one JSON object per log/eval event: {"step", "split", metrics...}.
  tb/                  TensorBoard event files (tensorboardX).
  checkpoints/<step>/  orbax: the train state and the data position.
  checkpoints.corrupt/ checkpoints that failed to restore, set aside on resume.
  .lock                held (flock) by the run using the workdir; names its PID.
  data/                the synthetic dataset and its TFDS build (configs/synthetic.py only).
"""

import json
import logging as std_logging
import math
import os
import signal
import tempfile
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorboardX
import tqdm

from tdmi_jax import checkpointing
from tdmi_jax import fileio
from tdmi_jax import optim
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax import workdir_lock
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import map_eval
from tdmi_jax.models import layers

MODES = ('train', 'eval', 'train_and_eval')
# Shown in the progress bar (when present), in this order.
BAR_KEYS = (('loss', 'loss'), ('heatmap_loss', 'hm'), ('mi/L_motion', 'Lmot'),
            ('mi/L_mm', 'Lmm'), ('mi/L_reg', 'Lreg'), ('grad_norm', 'gnorm'), ('lr', 'lr'))


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops without writing a checkpoint."""


class ConfigError(ValueError):
  """A bad --mode, --workdir or config value, found before any work starts."""


class _StopRequest:
  """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C means now.
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint) from the log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _rewind_metrics(path, step):
  """Drops the rows after `step` (and a torn last line): a run killed after its last
  checkpoint logged steps that the resumed run repeats."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line if line.endswith('\n') else line + '\n')
    except (ValueError, KeyError, TypeError):
      pass
  if len(keep) != len(lines):
    logging.warning('%s: dropping %d rows logged after step %d (the resumed checkpoint).',
                    path, len(lines) - len(keep), step)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, path)


class _Log:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir, rewind_to=None):
    self.on = sharding.is_writer()
    if self.on:
      path = os.path.join(workdir, 'metrics.jsonl')
      if rewind_to is not None:
        _rewind_metrics(path, rewind_to)
      self.jsonl = open(path, 'a')
      # purge_step hides TensorBoard events of the steps that the resumed run repeats.
      self.tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, 'tb'),
          purge_step=None if rewind_to is None else rewind_to + 1)

  def write(self, step, split, metrics):
    if not self.on:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: float(v) for k, v in metrics.items()})
    self.jsonl.write(json.dumps(row) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(f'{split}/{k}', float(v), int(step))
    self.tb.flush()

  def close(self):
    if self.on:
      self.jsonl.close()
      self.tb.close()


def _val_metrics(config, workdir, step, state, eval_step, eval_data, mesh):
  """Val heatmap loss and PCK on GT person boxes (+ the mAP hook on detector boxes)."""
  totals = None
  for batch in tqdm.tqdm(eval_data, total=eval_data.num_batches, desc='eval', leave=False,
                         disable=not sharding.is_writer()):
    sums, _ = eval_step(state, sharding.shard_batch(batch, mesh, train_step_lib.TRAIN_KEYS))
    sums = jax.device_get(sums)
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  n = max(float(totals['num_examples']), 1.0)
  metrics = {'heatmap_loss': float(totals['heatmap_loss_sum']) / n,
             'pck': float(totals['pck_correct']) / max(float(totals['pck_total']), 1.0),
             'num_boxes': float(totals['num_examples'])}

  metrics.update(map_eval.map_evaluation(
      config, workdir, step, train_step_lib.make_predict_fn(state, eval_step, mesh)))
  return metrics


def _gt_box_eval_data(config):
  """Val crops around the GT persons: they have targets, so loss and PCK are defined."""
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.use_gt_boxes_for_val = True
  return input_pipeline.EvalData(data_cfg, config.eval_batch_size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mode='train_and_eval'):
  """Trains (resuming from `workdir` if it holds checkpoints) and/or evaluates.

  Returns the last metrics: {'train': {...}, 'eval': {...}} (whichever ran). Holds the
  workdir lock throughout: a second run on the same workdir raises WorkdirInUseError.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  # Bad flags and config values are reported before any work (dataset synthesis, TFDS
  # build, the workdir lock) starts.
  if mode not in MODES:
    raise ConfigError(f'--mode={mode!r}; expected one of {MODES}')
  mesh = sharding.make_mesh()
  for field in ('batch_size', 'eval_batch_size'):
    try:
      sharding.check_batch_size(config[field], mesh, field)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  _check_workdir(workdir)
  with workdir_lock.hold(workdir, enabled=sharding.is_writer()):
    return _train_and_evaluate(config, workdir, mode, mesh)


def _check_workdir(workdir):
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is an existing file, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
    if sharding.is_writer():  # os.access is no proof (root, read-only mounts): write.
      with tempfile.TemporaryFile(dir=workdir):
        pass
  except OSError as e:
    raise ConfigError(f'--workdir={workdir} cannot be created or written '
                      f'({e.strerror or e})') from None


def _train_and_evaluate(config, workdir, mode, mesh):
  # --- Workdir, config, data --------------------------------------------------------
  std_logging.getLogger('absl').addFilter(_QuietLibraries())
  config = config.copy_and_resolve_references()
  input_pipeline.prepare_data(config, workdir)
  train_data = None
  if mode != 'eval':
    train_data = input_pipeline.TrainData(config.data, config.batch_size, config.seed)
  eval_data = None
  if mode != 'train':
    eval_data = _gt_box_eval_data(config)
  steps_per_epoch = max(1, train_data.num_examples // config.batch_size) if train_data else 1
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else int(math.ceil(config.num_epochs * steps_per_epoch)))

  # --- Model, optimizer, initial state ----------------------------------------------
  model, state, mask, tx, schedule, club_tx = state_lib.create_state(
      config, mesh, steps_per_epoch, mode)
  logging.info('Parameters: %d total, %d trainable; %d steps (%d per epoch).',
               layers.count_params(state.params),
               layers.count_params(optim.split_params(state.params, mask)[0]),
               num_steps, steps_per_epoch)

  # --- Resume -------------------------------------------------------------------------
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  start_step = 0
  if ckpts.latest_step() is not None:
    state, position = ckpts.restore_latest_good(state)
    start_step = checkpointing.check_data_position(position, config)
    logging.info('Resumed from %s at step %d.', ckpts.directory, start_step)
  elif mode == 'eval' and not config.init_from:
    raise FileNotFoundError(f'--mode=eval: no checkpoint under {ckpts.directory} and no '
                            'config.init_from to evaluate.')
  if sharding.is_writer() and not os.path.exists(os.path.join(workdir, 'config.json')):
    fileio.write_json(os.path.join(workdir, 'config.json'),
                      json.loads(config.to_json_best_effort()), sort_keys=True)

  eval_step = train_step_lib.make_eval_step(model=model, mesh=mesh)
  log = _Log(workdir, rewind_to=None if mode == 'eval' else start_step)
  results = {}
  try:
    # --- Evaluation only --------------------------------------------------------------
    if mode == 'eval':
      results['eval'] = _val_metrics(config, workdir, start_step, state, eval_step, eval_data,
                                     mesh)
      log.write(start_step, 'eval', results['eval'])
      logging.info('eval at step %d: %s', start_step, results['eval'])
      return results

    # --- Training loop ----------------------------------------------------------------
    train_step = train_step_lib.make_train_step(
        model=model, config=config, tx=tx, schedule=schedule, mask=mask, mesh=mesh,
        club_tx=club_tx)
    batches = train_data.iterator(start_step)
    bar = tqdm.tqdm(total=num_steps, initial=start_step, desc='train', dynamic_ncols=True,
                    disable=not sharding.is_writer())
    acc, acc_n, t_log = {}, 0, time.perf_counter()
    step = start_step
    with _StopRequest() as stop:
      while step < num_steps:
        batch = sharding.shard_batch(next(batches), mesh, train_step_lib.TRAIN_KEYS)
        state, metrics = train_step(state, batch)
        # One host sync per step: it lets a NaN stop the run before any bad state is saved.
        metrics = jax.device_get(metrics)
        step += 1
        if not np.isfinite(metrics['loss']):
          raise NonFiniteLossError(
              f'Loss is {metrics["loss"]} at step {step} (metrics: '
              f'{ {k: float(v) for k, v in metrics.items()} }). Stopping without saving; '
              f'the last good checkpoint is step {ckpts.latest_step()} in {ckpts.directory}. '
              'Lower config.optim.learning_rate or set config.optim.grad_clip_norm.')
        for k, v in metrics.items():
          acc[k] = acc.get(k, 0.0) + float(v)
        acc_n += 1
        bar.update(1)
        if step % config.log_every_steps == 0 or step == num_steps:
          now = time.perf_counter()
          means = {k: v / acc_n for k, v in acc.items()}
          means['examples_per_sec'] = acc_n * config.batch_size / max(now - t_log, 1e-9)
          means['epoch'] = step / steps_per_epoch
          log.write(step, 'train', means)
          bar.set_postfix({short: f'{means[k]:.4g}' for k, short in BAR_KEYS if k in means}
                          | {'ex/s': f'{means["examples_per_sec"]:.1f}'})
          results['train'] = means
          acc, acc_n, t_log = {}, 0, time.perf_counter()
        if mode == 'train_and_eval' and config.eval_every_steps > 0 and (
            step % config.eval_every_steps == 0) and step < num_steps:
          results['eval'] = _val_metrics(config, workdir, step, state, eval_step, eval_data, mesh)
          log.write(step, 'eval', results['eval'])
          bar.write(f'eval @ {step}: ' + ', '.join(
              f'{k}={v:.4g}' for k, v in results['eval'].items()))
          t_log = time.perf_counter()
        if step % config.checkpoint.every_steps == 0 or step == num_steps:
          ckpts.save(state, checkpointing.data_position(step, config))
        if stop.signum is not None:
          ckpts.save(state, checkpointing.data_position(step, config))
          ckpts.wait()
          bar.write(f'Signal {stop.signum}: checkpoint written at step {step}; exiting.')
          logging.warning('Stopped by signal %d at step %d (checkpoint written).',
                          stop.signum, step)
          results['stopped_at'] = step
          return results
    bar.close()
    batches.close()
    ckpts.wait()

    # --- Final evaluation --------------------------------------------------------------
    if mode == 'train_and_eval':
      results['eval'] = _val_metrics(config, workdir, step, state, eval_step, eval_data, mesh)
      log.write(step, 'eval', results['eval'])
      logging.info('eval at step %d: %s', step, results['eval'])
      if sharding.is_writer():
        print(f'eval @ {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in results['eval'].items()))
    return results
  finally:
    log.close()
    ckpts.close()
