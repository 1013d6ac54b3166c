r"""Batch evaluation: the PoseTrack mAP of every (or the chosen) checkpoint of a workdir.

  python -m tdmi_jax.batch_eval --config=configs/synthetic.py:runlocal --workdir=DIR \
      [--steps=all|last|N,M] [--reuse]

--config must be the training run's config (with the same overrides), so that its
checkpoints fit the model. Each chosen step is restored and evaluated by the training
driver's own mAP evaluation (`map_eval.map_evaluation`: val detector boxes, flip test and
decoding per config.eval), which writes `<workdir>/predictions/<step>/`,
`<workdir>/eval_results_<step>.json` and `<workdir>/eval_results.json` (left holding the
last evaluated step). With --reuse, a step whose eval_results_<step>.json already exists
is read instead of evaluated again. The tables go to `<workdir>/batch_eval/`:

  map_per_step.csv    step, poseval's 15 per-joint APs, Head..Ankl, Total (percent), and
                      with config.eval.track the MOT table's columns: MOTA Head .. MOTA
                      Total, MOTP Total, Prec Total, Rec Total
  map_per_step.md     the same as a markdown table (one decimal)
  map_over_steps.png  Total and the 7 summary columns against the step (with tracking, a
                      second panel: MOTA, MOTP, Prec and Rec totals)
"""

import csv
import io
import json
import math

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tqdm

from tdmi_jax import checkpointing
from tdmi_jax import keypoints
from tdmi_jax import paths
from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.data import input_pipeline
from tdmi_jax.evaluation import map_eval
from tdmi_jax.evaluation import tracking

SUMMARY_COLUMNS = keypoints.SUMMARY_COLUMNS
COLUMNS = ('step',) + keypoints.POSEVAL_JOINT_NAMES + SUMMARY_COLUMNS
# The MOT table's columns, present when the steps were evaluated with config.eval.track.
MOT_COLUMNS = tuple(f'MOTA {c}' for c in SUMMARY_COLUMNS) + (
    'MOTP Total', 'Prec Total', 'Rec Total')
MOT_TOTALS = ('MOTA Total', 'MOTP Total', 'Prec Total', 'Rec Total')
OUT_DIR = 'batch_eval'


class BatchEvalError(ValueError):
  """Bad input to batch evaluation (no checkpoints, unknown step, unreadable results)."""


def open_checkpoints(workdir):
  """The read-only manager of `<workdir>/checkpoints/` (None when there is none)."""
  ckpt_dir = paths.path(workdir) / 'checkpoints'
  if not ckpt_dir.is_dir():
    return None
  return checkpointing.Checkpoints(ckpt_dir, read_only=True)


def available_steps(workdir):
  """Sorted steps of the finished checkpoints under `<workdir>/checkpoints/`."""
  ckpts = open_checkpoints(workdir)
  if ckpts is None:
    return []
  try:
    # The manager skips unfinished saves ('<step>.orbax-checkpoint-tmp-*').
    return ckpts.all_steps()
  finally:
    ckpts.close()


def select_steps(spec, available):
  """'all', 'last' or a comma list of steps, checked against `available`."""
  spec = (spec or 'all').strip()
  if spec == 'all':
    return list(available)
  if spec == 'last':
    return [max(available)]
  try:
    wanted = sorted({int(s) for s in spec.split(',') if s.strip()})
  except ValueError:
    raise BatchEvalError(f"--steps={spec!r}: expected 'all', 'last' or a comma list of "
                         f'steps such as 2,4; available steps: {available}') from None
  if not wanted:
    raise BatchEvalError(f'--steps={spec!r} names no step; available steps: {available}')
  unknown = [s for s in wanted if s not in available]
  if unknown:
    raise BatchEvalError(f'--steps: no checkpoint for step(s) {unknown}; available steps: '
                         f'{available}')
  return wanted


def results_path(workdir, step):
  return paths.path(workdir) / f'eval_results_{int(step)}.json'


def read_row(workdir, step):
  """One table row from `eval_results_<step>.json` (None values, i.e. NaN, become nan)."""
  path = results_path(workdir, step)
  try:
    result = json.loads(path.read_text())
    values = [result['per_joint'][n] for n in keypoints.POSEVAL_JOINT_NAMES]
    values += [result['summary'][c] for c in SUMMARY_COLUMNS]
    mot = result.get('tracking')
    if mot is not None:
      nan = lambda d: {k: math.nan if v is None else v for k, v in d.items()}
      mot = tracking.columns({'per_joint': {n: nan(v) for n, v in mot['per_joint'].items()},
                              'total': nan(mot['total'])})
  except FileNotFoundError:
    raise BatchEvalError(f'{path} was not written (is config.eval.map off?)') from None
  except (ValueError, KeyError, TypeError) as e:
    raise BatchEvalError(f'{path} is not a readable eval_results file: {e!r}') from None
  row = {'step': int(step)}
  row.update({k: math.nan if v is None else float(v) for k, v in zip(COLUMNS[1:], values)})
  if mot is not None:
    row.update({k: float(v) for k, v in mot.items()})
  return row


def columns(rows):
  """The table's columns: the AP ones, plus the MOT ones when some step has them."""
  return COLUMNS + (MOT_COLUMNS if any(MOT_COLUMNS[0] in r for r in rows) else ())


def write_csv(rows, path):
  cols = columns(rows)
  text = io.StringIO(newline='')
  out = csv.writer(text)
  out.writerow(cols)
  for r in rows:
    out.writerow([r['step']] + [repr(r.get(c, math.nan)) for c in cols[1:]])
  paths.write_text(path, text.getvalue())


def format_markdown(rows):
  def cell(v):
    return '-' if math.isnan(v) else f'{v:.1f}'
  cols = columns(rows)
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---:|' * len(cols)]
  for r in rows:
    lines.append('| ' + ' | '.join([str(r['step'])] + [cell(r.get(c, math.nan))
                                                       for c in cols[1:]]) + ' |')
  return '\n'.join(lines) + '\n'


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  steps = [r['step'] for r in rows]
  track = MOT_COLUMNS[0] in columns(rows)
  fig, axes = plt.subplots(1, 2 if track else 1, figsize=(14 if track else 8, 5),
                           squeeze=False)
  ax = axes[0, 0]
  for c in SUMMARY_COLUMNS:
    total = c == 'Total'
    ax.plot(steps, [r[c] for r in rows], marker='o', label=c, linewidth=3 if total else 1.2,
            color='black' if total else None, zorder=3 if total else 2)
  finite = [r[c] for r in rows for c in SUMMARY_COLUMNS if not math.isnan(r[c])]
  ax.set_ylim(0, max(finite + [1.0]) * 1.05)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel('step')
  ax.set_ylabel('PoseTrack AP (%)')
  ax.set_title('mAP over training steps')
  ax.grid(alpha=0.3)
  ax.legend(ncol=4, fontsize='small')
  if track:
    ax = axes[0, 1]
    for c in MOT_TOTALS:
      ax.plot(steps, [r.get(c, math.nan) for r in rows], marker='o', label=c,
              linewidth=3 if c == 'MOTA Total' else 1.2,
              color='black' if c == 'MOTA Total' else None)
    ax.axhline(0, color='grey', linewidth=0.8)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel('step')
    ax.set_ylabel('percent (MOTA can be negative)')
    ax.set_title('tracking (poseval MOT metrics) over training steps')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  paths.write_bytes(path, png.getvalue())


def write_outputs(rows, workdir):
  """map_per_step.csv / .md / map_over_steps.png under <workdir>/batch_eval/."""
  out_dir = paths.path(workdir) / OUT_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  write_csv(rows, out_dir / 'map_per_step.csv')
  paths.write_text(out_dir / 'map_per_step.md', format_markdown(rows))
  plot(rows, out_dir / 'map_over_steps.png')
  return out_dir


def abstract_state(config, mesh):
  """(model, restore target): the driver's own TrainState, as replicated shapes only.

  The same `state.create_state` as training, so its checkpoints fit; traced with
  eval_shape, so nothing is initialised or compiled. The optimizer state is restored too
  (orbax needs the whole tree) and then ignored.
  """
  built = {}

  def build():
    built['model'], state, *_ = state_lib.create_state(config, mesh, 1, mode='eval')
    return state

  shapes = jax.eval_shape(build)
  replicated = sharding.replicated(mesh)
  return built['model'], jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def map_per_step(config, workdir, steps='all', reuse=False):
  """Evaluates the chosen checkpoints of `workdir`; returns the table rows, sorted by step."""
  workdir = paths.path(workdir)
  available = available_steps(workdir)
  if not available:
    raise BatchEvalError(f'No checkpoints under {workdir / "checkpoints"}: '
                         'is --workdir a training workdir (launch.py --workdir)?')
  chosen = select_steps(steps, available)
  todo = [s for s in chosen if not (reuse and results_path(workdir, s).exists())]
  logging.info('Batch eval of steps %s (%s reused).', chosen, sorted(set(chosen) - set(todo)))

  config = config.copy_and_resolve_references()
  config.eval.map = True  # The whole point here.
  config.init_from = ''   # Every weight comes from the restored checkpoint.
  ckpts = eval_step = state = mesh = None
  if todo:
    sharding.setup_compilation_cache(config.compilation_cache_dir)
    input_pipeline.prepare_data(config, workdir)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
    model, state = abstract_state(config, mesh)
    eval_step = train_step_lib.make_eval_step(model=model, mesh=mesh)
    # Read-only: a writing manager would clean up the unfinished saves of a training run
    # that may still be writing this workdir.
    ckpts = open_checkpoints(workdir)
  rows = []
  try:
    for step in tqdm.tqdm(chosen, desc='batch eval', unit='ckpt',
                          disable=not sharding.is_writer()):
      if step in todo:
        try:
          restored, _ = ckpts.restore(state, step)
        except Exception as e:  # pylint: disable=broad-except
          raise BatchEvalError(
              f'Cannot restore {ckpts.directory / str(step) / "state"} into the model of '
              f'this --config ({e}); pass the training run\'s config and overrides '
              f'(see {workdir / "config.json"}).') from e
        map_eval.map_evaluation(config, workdir, step,
                                train_step_lib.make_predict_fn(restored, eval_step, mesh))
        del restored
      rows.append(read_row(workdir, step) if sharding.is_writer() else {'step': step})
  finally:
    if ckpts is not None:
      ckpts.close()
  if sharding.is_writer():
    out_dir = write_outputs(rows, workdir)
    logging.info('Batch eval tables written to %s', out_dir)
  return rows


_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/synthetic.py', 'The training run\'s config file (path[:args]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training workdir.', required=True)
_STEPS = flags.DEFINE_string('steps', 'all', "'all', 'last' or a comma list of steps.")
_REUSE = flags.DEFINE_bool('reuse', False, 'Read steps whose eval_results_<step>.json exists '
                           'instead of evaluating them again.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    sharding.maybe_initialize_distributed(config.distributed)
    rows = map_per_step(config, _WORKDIR.value, _STEPS.value, _REUSE.value)
  except (BatchEvalError, FileNotFoundError, ValueError, ImportError) as e:
    logging.exception('Batch eval failed')
    sharding.abort(str(e))
  if jax.process_index() == 0:
    print(format_markdown(rows), end='')
    print('Written to', paths.path(_WORKDIR.value) / OUT_DIR)


if __name__ == '__main__':
  app.run(main)
