"""End to end through launch.py (subprocesses): runlocal, resume after SIGTERM, bad input.

All runs share one persistent XLA compilation cache, so only the first one compiles.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = '--config=configs/synthetic.py:runlocal'

# Runs launch.py in this process after wrapping the train step so that the process sends
# itself SIGTERM (or poisons the loss) after a given number of steps: the real signal
# handler and NaN guard then do their work at an exactly known step.
_WRAPPER = r'''
import math, os, runpy, signal, sys
kill_at, nan_at = int(sys.argv[1]), int(sys.argv[2])
sys.argv = ['launch.py'] + sys.argv[3:]
from tdmi_jax import train_step as ts
make = ts.make_train_step
def wrapped_make(**kw):
  step_fn, n = make(**kw), [0]
  def step(state, batch):
    state, metrics = step_fn(state, batch)
    n[0] += 1
    if n[0] == nan_at:
      metrics = dict(metrics, loss=metrics['loss'] * math.nan)
    if n[0] == kill_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return state, metrics
  return step
ts.make_train_step = wrapped_make
runpy.run_path('launch.py', run_name='__main__')
'''


def _launch(env, workdir, *flags, kill_at=-1, nan_at=-1, config=RUNLOCAL):
  cmd = [sys.executable, '-c', _WRAPPER, str(kill_at), str(nan_at), config,
         f'--workdir={workdir}', *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _rows(workdir, split='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step),
                                                         'state'))


def _assert_trees_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def six_steps(runlocal_six_steps):
  """configs/synthetic.py:runlocal run for 6 steps without interruption (conftest)."""
  return runlocal_six_steps


def test_runlocal_end_to_end_writes_checkpoints_logs_config(six_steps):
  workdir, proc = six_steps
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps == [2, 4, 6]  # every_steps=2 and the end, max_to_keep=3.
  state = _state(workdir, 6)
  assert int(state['step']) == 6 and 'backbone' in state['params']
  rows = _rows(workdir)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ('loss', 'heatmap_loss', 'lr', 'grad_norm', 'examples_per_sec', 'input_wait_s',
              'mi/L_mi',
              'mi/I_un_club', 'mi/L_uy', 'club/learning_loss', 'grad_norm/heatmap',
              'grad_norm/uy', 'grad_norm/club'):
    assert all(np.isfinite(r[key]) for r in rows), key
  # Every step is a log step in runlocal: the per-term norms are real values, not the
  # zeros of a skipped step.
  assert all(r['grad_norm/heatmap'] > 0 and r['grad_norm/uy'] > 0 for r in rows)
  (ev,) = _rows(workdir, 'eval')
  assert ev['step'] == 6 and ev['num_boxes'] > 0 and 0.0 <= ev['pck'] <= 1.0
  assert ev['heatmap_loss'] > 0
  config = json.loads((workdir / 'config.json').read_text())
  assert config['num_train_steps'] == 6 and config['model']['variant'] == 'tiny'
  assert config['data']['manual_dir'].startswith(str(workdir))  # synthesised here
  assert list((workdir / 'tb').glob('events.out.tfevents.*'))
  assert 'eval @ 6' in proc.stdout + proc.stderr


def test_sigterm_then_resume_equals_uninterrupted_bit_for_bit(env, six_steps, tmp_path):
  ref, _ = six_steps
  workdir = tmp_path / 'resumed'
  flags = ('--config.num_train_steps=6', '--config.checkpoint.every_steps=100')
  first = _ok(_launch(env, workdir, *flags, kill_at=3))
  assert 'checkpoint written at step 3' in first.stdout + first.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  assert [r['step'] for r in _rows(workdir)] == [1, 2, 3]
  _ok(_launch(env, workdir, *flags))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  _assert_trees_equal(_state(ref, 6), _state(workdir, 6))
  # The resumed run saw the same batches: its per-step losses are the reference's.
  assert [r['loss'] for r in _rows(workdir)] == [r['loss'] for r in _rows(ref)]


def test_metrics_are_summed_on_device_and_read_at_log_steps(env, six_steps, tmp_path):
  ref, _ = six_steps
  workdir = tmp_path / 'every3'
  # With grain worker processes (the reference reads in a thread): the same batches, and
  # every shared-memory block they came in is released by the end of the run.
  proc = _ok(_launch(env, workdir, '--config.num_train_steps=6', '--config.log_every_steps=3',
                     '--config.log_term_grad_norms=True', '--config.data.num_workers=2'))
  assert 'leaked shared_memory' not in proc.stderr, proc.stderr[-2000:]
  rows, ref_rows = _rows(workdir), _rows(ref)
  assert [r['step'] for r in rows] == [3, 6]
  for row, part in zip(rows, (ref_rows[:3], ref_rows[3:])):
    for key in ('loss', 'heatmap_loss', 'grad_norm'):
      np.testing.assert_allclose(row[key], np.mean([r[key] for r in part]), rtol=1e-5,
                                 err_msg=key)
    assert row['input_wait_s'] >= 0 and row['examples_per_sec'] > 0
  # Per-term norms are computed on the log step itself, never averaged.
  np.testing.assert_allclose(rows[1]['grad_norm/heatmap'], ref_rows[5]['grad_norm/heatmap'],
                             rtol=1e-5)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(env, tmp_path):
  workdir = tmp_path / 'nan'
  # Logging every 5 steps: the NaN of step 3 is read from the device before the save at
  # step 4, which must not happen.
  proc = _launch(env, workdir, '--config.num_train_steps=6', '--config.log_every_steps=5',
                 nan_at=3)
  assert proc.returncode != 0
  assert 'Loss is nan at step 3' in proc.stderr
  assert 'last good checkpoint is step 2' in proc.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  assert int(_state(workdir, 2)['step']) == 2


def test_eval_mode_and_init_from_reproduce_the_final_eval(env, six_steps, tmp_path):
  ref, _ = six_steps
  (ref_eval,) = _rows(ref, 'eval')
  workdir = tmp_path / 'init_from'
  _ok(_launch(env, workdir, '--mode=eval', f'--config.init_from={ref}',
              '--config.init_from_kind=full'))
  (ev,) = _rows(workdir, 'eval')
  assert ev['heatmap_loss'] == ref_eval['heatmap_loss'] and ev['pck'] == ref_eval['pck']


def test_misspelt_override_fails_clearly(env, tmp_path):
  proc = subprocess.run(
      [sys.executable, 'launch.py', RUNLOCAL, f'--workdir={tmp_path}',
       '--config.optim.learnin_rate=0.1'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'Did you mean "learning_rate"' in proc.stderr
  assert 'Traceback' not in proc.stderr  # One clear line, not a stack dump.
  assert not (tmp_path / 'checkpoints').exists()
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/synthetic.py:runloca',
       f'--workdir={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2 and "Unknown config argument 'runloca'" in proc.stderr


def test_missing_dataset_names_the_download_instructions(env, tmp_path):
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/posetrack18.py:runlocal',
       f'--workdir={tmp_path}', f'--config.data.manual_dir={tmp_path / "no_such_dir"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'no_such_dir' in proc.stderr and 'Download PoseTrack' in proc.stderr
  assert 'manual_dir' in proc.stderr
