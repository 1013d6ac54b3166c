"""The training and evaluation driver: `train_and_evaluate(config, workdir, mode)`.

One linear function, in sections: workdir and data, model and state, resume, the loop
(progress bar, logs, periodic eval, checkpoints, signals, NaN guard), the end.

The workdir (and config.data's folders) may be local or on an object store (`gs://`):
every path goes through etils.epath (tdmi_jax/paths.py).

Workdir layout:
  config.json          the resolved config, written at the first start (process 0).
  metrics.jsonl        one JSON object per log/eval event: {"step", "split", metrics...}.
  tb/                  TensorBoard event files (tensorboardX).
  checkpoints/<step>/  orbax: the train state and the data position.
  checkpoints.corrupt/ checkpoints that failed to restore, set aside on resume.
  .lock                held (flock; a lease on object stores) by the run using the workdir.
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
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
import tqdm

from tdmi_jax import checkpointing
from tdmi_jax import fileio
from tdmi_jax import optim
from tdmi_jax import paths
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
  """One process: SIGTERM/SIGINT set a flag; the loop checkpoints at the next step
  boundary and exits.

  Several processes: SIGTERM belongs to jax's preemption notifier (installed by
  jax.distributed.initialize), through which every process stops at the same step
  (`Checkpoints.reached_preemption`); a Ctrl-C here is forwarded to it as a SIGTERM, since
  a local flag would stop this process alone and leave the others in a collective.
  """

  def __init__(self, multiprocess=False):
    self.signum = None
    self.multiprocess = multiprocess
    self._previous = {}

  def __enter__(self):
    signals = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
    for s in signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C means now.
    self.signum = signum
    if self.multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)

  @property
  def local_stop(self):
    """A signal this process acts on alone (single-process runs)."""
    return self.signum is not None and not self.multiprocess

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
  path = paths.path(path)
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
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
    paths.write_text(path, ''.join(keep))


class _ObjectRecordWriter:
  """A TensorBoard event file on an object store, which cannot append: the whole file is
  uploaded again at each flush (a run's scalars are small)."""

  def __init__(self, path):
    self.path = paths.path(path)
    self.data = bytearray()

  def write(self, data):
    self.data += data

  def flush(self):
    self.path.write_bytes(bytes(self.data))

  def close(self):
    self.flush()


class _ObjectRecordWriterFactory:

  def open(self, path):
    return _ObjectRecordWriter(path)

  def directory_check(self, path):
    del path  # Object stores have no folders to create.


def _summary_writer(logdir, purge_step):
  """tensorboardX's writer; on an object store its event file goes through epath."""
  if paths.is_uri(logdir):
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    record_writer.register_writer_factory(paths.scheme(logdir), _ObjectRecordWriterFactory())
  return tensorboardX.SummaryWriter(os.fspath(logdir), purge_step=purge_step)


class _Log:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir, rewind_to=None):
    self.on = sharding.is_writer()
    if self.on:
      self.path = paths.path(workdir) / 'metrics.jsonl'
      if rewind_to is not None:
        _rewind_metrics(self.path, rewind_to)
      # Object stores cannot append: the file is kept here and uploaded whole per write.
      self.text = None
      if paths.is_uri(self.path):
        self.text = self.path.read_text() if self.path.exists() else ''
        self.jsonl = None
      else:
        self.jsonl = open(self.path, 'a')
      # purge_step hides TensorBoard events of the steps that the resumed run repeats.
      self.tb = _summary_writer(paths.path(workdir) / 'tb',
                                None if rewind_to is None else rewind_to + 1)

  def write(self, step, split, metrics):
    if not self.on:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: float(v) for k, v in metrics.items()})
    if self.jsonl is None:
      self.text += json.dumps(row) + '\n'
      paths.write_text(self.path, self.text)
    else:
      self.jsonl.write(json.dumps(row) + '\n')
      self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(f'{split}/{k}', float(v), int(step))
    self.tb.flush()

  def close(self):
    if self.on:
      if self.jsonl is not None:
        self.jsonl.close()
      self.tb.close()


@jax.jit
def _add(sums, metrics):
  return jax.tree.map(jnp.add, sums, metrics)


@jax.jit
def _watch_nonfinite(watch, metrics, step):
  """{'step': the first step whose loss is NaN/Inf (-1: none yet), its metrics}."""
  if watch is None:
    watch = {'step': jnp.int32(-1)} | {k: jnp.zeros_like(v) for k, v in metrics.items()}
  hit = (watch['step'] < 0) & ~jnp.isfinite(metrics['loss'])
  out = {'step': jnp.where(hit, step, watch['step'])}
  return out | {k: jnp.where(hit, v, watch[k]) for k, v in metrics.items()}


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
  workdir = paths.path(workdir)
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
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f'--workdir={workdir} is an existing file, not a directory')
  if paths.is_uri(workdir):
    workdir.mkdir(parents=True, exist_ok=True)  # Object stores: no local permission bits.
    return
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
  sharding.setup_compilation_cache(config.compilation_cache_dir)
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
  ckpts = checkpointing.Checkpoints(workdir / 'checkpoints', config.checkpoint)
  start_step = 0
  if ckpts.latest_step() is not None:
    state, position = ckpts.restore_latest_good(state)
    start_step = checkpointing.check_data_position(position, config)
    logging.info('Resumed from %s at step %d.', ckpts.directory, start_step)
  elif mode == 'eval' and not config.init_from:
    raise FileNotFoundError(f'--mode=eval: no checkpoint under {ckpts.directory} and no '
                            'config.init_from to evaluate.')
  if sharding.is_writer() and not (workdir / 'config.json').exists():
    fileio.write_json(workdir / 'config.json',
                      json.loads(config.to_json_best_effort()), sort_keys=True)

  eval_step = train_step_lib.make_eval_step(model=model, mesh=mesh)
  log = _Log(workdir, rewind_to=None if mode == 'eval' else start_step)
  results = {}
  batches = None
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
    term_grad_norms = None
    if config.get('log_term_grad_norms', True) and config.model.arch == 'tdmi' and (
        config.mi.enabled):
      term_grad_norms = train_step_lib.make_term_grad_norms(
          model=model, config=config, mask=mask, mesh=mesh)
    batches = train_data.iterator(start_step)
    bar = tqdm.tqdm(total=num_steps, initial=start_step, desc='train', dynamic_ncols=True,
                    disable=not sharding.is_writer())
    # Metrics stay on the devices (sums since the last log, and the first non-finite
    # loss): the host reads them at log steps and before each save only, so the loop
    # never waits on a step it does not need to.
    sums, watch, term_norms, acc_n = None, None, {}, 0
    wait_s, t_log = 0.0, time.perf_counter()
    step = start_step

    def next_batch():
      nonlocal wait_s
      t0 = time.perf_counter()
      out = sharding.shard_batch(next(batches), mesh, train_step_lib.TRAIN_KEYS)
      wait_s += time.perf_counter() - t0
      return out

    batch = next_batch() if step < num_steps else None
    with _StopRequest(multiprocess=jax.process_count() > 1) as stop:
      while step < num_steps:
        log_due = (step + 1) % config.log_every_steps == 0 or step + 1 == num_steps
        if term_grad_norms is not None and log_due:
          term_norms = term_grad_norms(state, batch)  # Before the step donates the state.
        previous = None if sums is None else sums['loss']
        state, metrics = train_step(state, batch)
        step += 1
        sums = metrics if sums is None else _add(sums, metrics)
        watch = _watch_nonfinite(watch, metrics, np.int32(step))
        acc_n += 1
        # The next batch goes to the devices while this step runs; then wait for the
        # previous step, so that at most two steps (and batches) are in flight.
        if step < num_steps:
          batch = next_batch()
        if previous is not None:
          jax.block_until_ready(previous)
        bar.update(1)
        preempted = ckpts.reached_preemption(step)
        save_due = (ckpts.interval_due(step) or step == num_steps or preempted
                    or stop.local_stop)
        if log_due or save_due:
          host = jax.device_get({'sums': sums, 'watch': watch, 'terms': term_norms})
          if host['watch']['step'] >= 0:
            bad = host['watch']
            raise NonFiniteLossError(
                f'Loss is {bad["loss"]} at step {bad["step"]} (metrics: '
                f'{ {k: float(v) for k, v in bad.items() if k != "step"} }). Stopping '
                f'without saving; the last good checkpoint is step {ckpts.latest_step()} in '
                f'{ckpts.directory}. Lower config.optim.learning_rate or set '
                'config.optim.grad_clip_norm.')
        if log_due:
          now = time.perf_counter()
          means = {k: float(v) / acc_n for k, v in host['sums'].items()}
          means |= {k: float(v) for k, v in host['terms'].items()}  # Log steps only: no mean.
          means['examples_per_sec'] = acc_n * config.batch_size / max(now - t_log, 1e-9)
          means['input_wait_s'] = wait_s / acc_n
          means['epoch'] = step / steps_per_epoch
          log.write(step, 'train', means)
          bar.set_postfix({short: f'{means[k]:.4g}' for k, short in BAR_KEYS if k in means}
                          | {'ex/s': f'{means["examples_per_sec"]:.1f}'})
          results['train'] = means
          sums, acc_n, wait_s, t_log = None, 0, 0.0, time.perf_counter()
        if mode == 'train_and_eval' and config.eval_every_steps > 0 and (
            step % config.eval_every_steps == 0) and step < num_steps:
          results['eval'] = _val_metrics(config, workdir, step, state, eval_step, eval_data, mesh)
          log.write(step, 'eval', results['eval'])
          bar.write(f'eval @ {step}: ' + ', '.join(
              f'{k}={v:.4g}' for k, v in results['eval'].items()))
          t_log = time.perf_counter()
        # The manager decides (every config.checkpoint.every_steps steps, and the step at
        # which every process reaches the preemption sync point); the last step always.
        # Every save above is preceded by the non-finite check.
        position = checkpointing.data_position(step, config)
        ckpts.save(state, position, force=step == num_steps)
        if preempted or stop.local_stop:
          ckpts.save(state, position, force=True)  # No-op if saved just above.
          ckpts.wait()
          why = 'Preemption (SIGTERM to a process)' if preempted else f'Signal {stop.signum}'
          bar.write(f'{why}: checkpoint written at step {step}; exiting.')
          logging.warning('%s: stopped at step %d (checkpoint written).', why, step)
          results['stopped_at'] = step
          return results
    bar.close()
    batch = None  # Before the workers stop: see the `finally` below.
    batches.close()
    ckpts.wait()

    # --- Final evaluation --------------------------------------------------------------
    if mode == 'train_and_eval':
      results['eval'] = _val_metrics(config, workdir, step, state, eval_step, eval_data, mesh)
      log.write(step, 'eval', results['eval'])
      logging.info('eval at step %d: %s', step, results['eval'])
      if sharding.is_writer():
        print(f'eval @ {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in results['eval'].items()))
      if config.eval.compare_backbone and config.eval.map and config.model.arch == 'tdmi':
        results['backbone_baseline'] = map_eval.backbone_baseline(
            config, workdir, step, state, mesh)
      if sharding.is_writer() and config.eval.map:
        print(f'Predictions: {os.path.join(workdir, "predictions", str(step))}/ '
              f'(PoseTrack18 JSON per video); results: {workdir}/eval_results.json')
        if config.eval.num_overlays:
          print(f'Overlays: {os.path.join(workdir, "overlays", str(step))}/*.png')
    return results
  finally:
    # However the loop ends (done, preempted, an error): the last batch may still view a
    # worker's shared-memory block (CPU arrays alias host memory). Released before the
    # workers stop, grain unlinks it; else Python's resource tracker finds it leaked at exit.
    batch = None
    if batches is not None:
      batches.close()
    log.close()
    ckpts.close()
