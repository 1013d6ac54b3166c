"""Killed runs, corrupt checkpoints, two runs on one workdir, half-written predictions.

The end-to-end part is one chain of launch.py runs on one workdir (subprocesses sharing an
XLA compilation cache): a run hangs between checkpoints, a second launch on the same
workdir is refused, the first is SIGKILLed, its latest checkpoint is damaged, and a rerun
falls back to the previous checkpoint and finishes. The unit tests cover the undamaged
case (the newest checkpoint restores; an uncommitted orbax temporary folder is ignored).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdmi_jax import checkpointing
from tdmi_jax import train
from tdmi_jax import workdir_lock
from tdmi_jax.evaluation import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = '--config=configs/synthetic.py:runlocal'

# --- The workdir lock ---------------------------------------------------------------------

_HOLD = r'''
import sys, time
from tdmi_jax import workdir_lock
lock = workdir_lock.acquire(sys.argv[1])  # Held while the file object lives.
print('locked', flush=True)
time.sleep(600)
'''


def test_lock_refuses_second_holder_and_names_the_pid(tmp_path):
  f = workdir_lock.acquire(str(tmp_path))
  try:
    with pytest.raises(workdir_lock.WorkdirInUseError) as e:
      workdir_lock.acquire(str(tmp_path))  # Another open file: flock conflicts even here.
    assert str(tmp_path) in str(e.value) and f'PID {os.getpid()}' in str(e.value)
  finally:
    workdir_lock.release(f)
  workdir_lock.release(workdir_lock.acquire(str(tmp_path)))  # Free again after release.


def test_lock_is_dropped_when_the_holder_is_sigkilled(tmp_path):
  proc = subprocess.Popen([sys.executable, '-c', _HOLD, str(tmp_path)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
  try:
    assert proc.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f'PID {proc.pid} '):
      workdir_lock.acquire(str(tmp_path))
  finally:
    proc.kill()
    proc.wait()
  # The stale .lock file (still naming the dead PID) does not block the next run.
  assert f'PID {proc.pid}' in (tmp_path / '.lock').read_text()
  workdir_lock.release(workdir_lock.acquire(str(tmp_path)))


# --- Checkpoints: fallback past a corrupt latest step ----------------------------------


@flax.struct.dataclass
class _State:
  step: jax.Array
  w: jax.Array


def _ckpts(directory):
  cfg = ml_collections.ConfigDict({'max_to_keep': 5, 'keep_period': 0})
  return checkpointing.Checkpoints(str(directory), cfg)


def _state(step):
  return _State(step=jnp.asarray(step, jnp.int32),
                w=jnp.arange(4096, dtype=jnp.float32) + step)


def _corrupt(step_dir, how):
  """Damages a committed checkpoint the way a full disk or a bad copy would."""
  state_dir = step_dir / 'state'
  if how == 'truncate':
    data = [p for p in state_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
    assert data
    for p in data:
      os.truncate(p, p.stat().st_size // 2)
  else:
    (state_dir / 'manifest.ocdbt').unlink()


@pytest.mark.parametrize('how', ['truncate', 'delete'])
def test_corrupt_latest_checkpoint_is_skipped_and_set_aside(tmp_path, how, caplog):
  directory = tmp_path / 'checkpoints'
  ckpts = _ckpts(directory)
  for step in (2, 4):
    ckpts.save(_state(step), {'step': step})
  ckpts.close()
  _corrupt(directory / '4', how)
  # What a SIGKILL during an async save leaves behind: an uncommitted temporary folder.
  (directory / '6.orbax-checkpoint-tmp-1700000000').mkdir()

  ckpts = _ckpts(directory)
  assert ckpts.latest_step() == 4  # orbax cannot tell the damage from the directory.
  with caplog.at_level('WARNING'):
    state, position = ckpts.restore_latest_good(_state(0))
  assert int(state.step) == 2 and position == {'step': 2}
  np.testing.assert_array_equal(np.asarray(state.w), np.asarray(_state(2).w))
  assert 'Checkpoint step 4' in caplog.text and 'does not restore' in caplog.text
  assert ckpts.latest_step() == 2
  assert (tmp_path / 'checkpoints.corrupt' / '4' / 'state').is_dir()  # Kept, not deleted.
  # Step 4 can be written again by the resumed run.
  assert ckpts.save(_state(4), {'step': 4})
  ckpts.close()
  assert sorted(os.listdir(directory)) == ['2', '4']  # The temporary leftover is gone.
  state, _ = _ckpts(directory).restore_latest_good(_state(0))
  assert int(state.step) == 4


def test_no_restorable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path):
  directory = tmp_path / 'checkpoints'
  ckpts = _ckpts(directory)
  for step in (2, 4):
    ckpts.save(_state(step), {'step': step})
  ckpts.close()
  _corrupt(directory / '2', 'truncate')
  _corrupt(directory / '4', 'delete')
  with pytest.raises(ValueError, match='No checkpoint in .*checkpoints can be restored') as e:
    _ckpts(directory).restore_latest_good(_state(0))
  assert 'step 4:' in str(e.value) and 'step 2:' in str(e.value)
  assert sorted(os.listdir(directory)) == ['2', '4']
  assert not (tmp_path / 'checkpoints.corrupt').exists()


def test_rewind_metrics_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': s, 'split': 'train', 'loss': float(s)} for s in range(1, 6)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 6, "spl')
  train._rewind_metrics(str(path), 4)  # pylint: disable=protected-access
  assert [json.loads(l) for l in path.read_text().splitlines()] == rows[:4]


# --- Evaluation of a half-written predictions folder --------------------------------------


def test_evaluate_interrupted_predictions_dir_names_the_videos(poseval_golden, tmp_path,
                                                               capsys):
  gt = poseval_golden / 'case3' / 'gt'
  pred = tmp_path / 'pred'
  shutil.copytree(poseval_golden / 'case3' / 'pred', pred)
  # An interrupted writer: one video never written, one left as its temporary file.
  (pred / '000103_mpiinew_test.json').unlink()
  os.replace(pred / '000102_mpii_test.json', pred / '000102_mpii_test.json.tmp')
  rc = evaluate.main(['--gt_dir', str(gt), '--pred_dir', str(pred)])
  err = capsys.readouterr().err
  assert rc == 1 and 'Traceback' not in err
  assert 'missing prediction files for 2 of 3' in err
  assert '000102_mpii_test.json' in err and '000103_mpiinew_test.json' in err

  # A file cut off mid-write, empty, or zero-filled (a crash before the data reached the
  # disk) is named as malformed, not a traceback.
  shutil.copy(poseval_golden / 'case3' / 'pred' / '000103_mpiinew_test.json', pred)
  text = (poseval_golden / 'case3' / 'pred' / '000102_mpii_test.json').read_text()
  for cut in (text[:len(text) // 2], '', '\0' * 64):
    (pred / '000102_mpii_test.json').write_text(cut)
    rc = evaluate.main(['--gt_dir', str(gt), '--pred_dir', str(pred)])
    err = capsys.readouterr().err
    assert rc == 1 and 'Traceback' not in err
    assert '000102_mpii_test.json' in err and 'malformed JSON' in err

  # The same through the real command line (exit status, no traceback).
  proc = subprocess.run(
      [sys.executable, '-m', 'tdmi_jax.evaluate', '--gt_dir', str(gt), '--pred_dir',
       str(pred)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert '000102_mpii_test.json' in proc.stderr


# --- End to end: hang, refused second launch, SIGKILL, resume, corrupt, fall back --------

# launch.py with a train step that hangs (sleeps) on the given call: the process is then
# between checkpoints, its last rows logged, until the test SIGKILLs it.
_WRAPPER = r'''
import os, runpy, sys, time
hang_at = int(sys.argv[1])
sys.argv = ['launch.py'] + sys.argv[2:]
from tdmi_jax import train_step as ts
make = ts.make_train_step
def wrapped_make(**kw):
  step_fn, n = make(**kw), [0]
  def step(state, batch):
    n[0] += 1
    if n[0] == hang_at:
      time.sleep(600)
    return step_fn(state, batch)
  return step
ts.make_train_step = wrapped_make
runpy.run_path('launch.py', run_name='__main__')
'''
FLAGS = ('--mode=train', '--config.checkpoint.every_steps=2')


def _cmd(workdir, *flags, hang_at=-1):
  return [sys.executable, '-c', _WRAPPER, str(hang_at), RUNLOCAL, f'--workdir={workdir}',
          *FLAGS, *flags]


def _run(env, workdir, *flags):
  proc = subprocess.run(_cmd(workdir, *flags), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _rows(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.endswith('\n')]


def _steps(workdir):
  if not (workdir / 'checkpoints').is_dir():
    return []
  return sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())


def _snapshot(workdir):
  """What a second run must not touch (checkpoint 6 may still be finalising)."""
  paths = [*(workdir / 'checkpoints' / '2').rglob('*'),
           *(workdir / 'checkpoints' / '4').rglob('*'),
           workdir / 'metrics.jsonl', workdir / 'config.json']
  return {p: (os.path.getmtime(p), os.path.getsize(p)) for p in paths}


@pytest.fixture(scope='module')
def killed(env, tmp_path_factory):
  """A run (8 steps, checkpoints every 2) hanging in step 8, after checkpoint 6 and the
  row of step 7; a second launch on its workdir meanwhile; then the first gets SIGKILL."""
  workdir = tmp_path_factory.mktemp('killed')
  first = subprocess.Popen(_cmd(workdir, '--config.num_train_steps=8', hang_at=8), cwd=ROOT,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 900
    while not (6 in _steps(workdir) and [r['step'] for r in _rows(workdir)][-1:] == [7]):
      assert first.poll() is None, 'the first run ended before hanging'
      assert time.time() < deadline, 'the first run did not reach step 7 in time'
      time.sleep(1)
    lock_text = (workdir / '.lock').read_text()
    before = _snapshot(workdir)
    second = subprocess.run(_cmd(workdir, '--config.num_train_steps=8'), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    after = _snapshot(workdir)
    assert first.poll() is None, 'the first run must still hold the workdir'
    rows_before_kill = _rows(workdir)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  return {'workdir': workdir, 'pid': first.pid, 'lock_text': lock_text, 'second': second,
          'untouched': before == after, 'rows': rows_before_kill,
          'steps': _steps(workdir)}


def test_second_launch_on_a_busy_workdir_refuses(killed):
  second = killed['second']
  assert f'PID {killed["pid"]} ' in killed['lock_text']
  assert second.returncode == 1
  assert 'ERROR: The workdir' in second.stderr and 'is in use by another run' in second.stderr
  assert str(killed['workdir']) in second.stderr and f'PID {killed["pid"]}' in second.stderr
  assert 'Traceback' not in second.stderr
  assert killed['untouched']  # It wrote nothing into the checkpoints or the logs.


def test_rerun_after_sigkill_skips_the_corrupt_latest_checkpoint_and_finishes(env, killed):
  """SIGKILL after checkpoint 6 (step 7 logged), then checkpoint 6 damaged on disk: the
  rerun warns, resumes from 4, redoes steps 5-8 exactly and leaves a consistent workdir."""
  workdir = killed['workdir']
  assert killed['steps'] == [2, 4, 6]
  assert [r['step'] for r in killed['rows']] == list(range(1, 8))
  _corrupt(workdir / 'checkpoints' / '6', 'truncate')
  proc = _run(env, workdir, '--config.num_train_steps=8')
  assert 'Checkpoint step 6' in proc.stderr and 'does not restore' in proc.stderr
  assert 'Resumed from' in proc.stderr and 'at step 4.' in proc.stderr
  assert _steps(workdir) == [4, 6, 8]
  assert (workdir / 'checkpoints.corrupt' / '6' / 'state').is_dir()  # Kept for inspection.
  rows = _rows(workdir)
  # Steps 5-7 were logged by the killed run and again by the resumed one: the log keeps
  # each step once, and the redone steps have the same losses (same state, same batches).
  assert [r['step'] for r in rows] == list(range(1, 9))
  assert [r['loss'] for r in rows[:7]] == [r['loss'] for r in killed['rows']]
  assert all(np.isfinite(r['loss']) for r in rows)
  state = checkpointing.ocp.StandardCheckpointer().restore(
      str(workdir / 'checkpoints' / '8' / 'state'))
  assert int(state['step']) == 8
  assert not (workdir / '.lock').read_text()  # Released (emptied) at the end.
