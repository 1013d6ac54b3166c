"""The driver as 2 processes x 1 CPU device on localhost, launched as a user would.

`launch.py --config=configs/synthetic.py:runlocal` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set: the first run is preempted (SIGTERM to process 1
only) and both processes save the same step and exit 0; the rerun resumes, finishes,
checkpoints and evaluates (mAP of the gathered predictions); its losses and final state
equal an uninterrupted 1-process, 2-device run. A failure on one process ends both, with
the error named, instead of leaving the other waiting in a collective. Subprocesses share
the suite's persistent compilation cache.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tdmi_jax import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = '--config=configs/synthetic.py:runlocal'
FLAGS = ('--config.num_train_steps=6', '--config.checkpoint.every_steps=100')

# launch.py with two test hooks on the process whose JAX_PROCESS_ID is given: SIGTERM to
# itself after its n-th train step (what a preemption notice does), or an error raised in
# its n-th train step (what a bad file that only it reads does).
_WRAPPER = r'''
import os, runpy, signal, sys
who, term_at, fail_at = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.argv = ['launch.py'] + sys.argv[4:]
from tdmi_jax import train_step as ts
make = ts.make_train_step
def wrapped_make(**kw):
  step_fn, n = make(**kw), [0]
  me = int(os.environ.get('JAX_PROCESS_ID', '0')) == who
  def step(state, batch):
    n[0] += 1
    if me and n[0] == fail_at:
      raise FileNotFoundError('/data/images/val/000042/000007.jpg: image not found '
                              '(injected on one process)')
    out = step_fn(state, batch)
    if me and n[0] == term_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  return step
ts.make_train_step = wrapped_make
runpy.run_path('launch.py', run_name='__main__')
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch_two(env, workdir, *flags, who=1, term_at=-1, fail_at=-1, timeout=900):
  """Both processes of one run; returns [(returncode, stdout + stderr, exit time)]."""
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    e = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
             JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, '-c', _WRAPPER, str(who), str(term_at), str(fail_at), RUNLOCAL,
           f'--workdir={workdir}', *flags]
    logs.append(tempfile.TemporaryFile('w+'))
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=logs[-1],
                                  stderr=subprocess.STDOUT, text=True))
  deadline, ended = time.time() + timeout, [None, None]
  while None in ended:
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time()
    if time.time() > deadline:
      for p in procs:
        p.kill()
      raise AssertionError(f'the 2-process run hung (> {timeout} s)')
    time.sleep(0.2)
  out = []
  for p, log, t in zip(procs, logs, ended):
    log.seek(0)
    out.append((p.returncode, log.read(), t))
    log.close()
  return out


def _rows(workdir, split='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())


def _state(workdir, step):
  """A checkpoint's arrays on this process's first device, whatever topology wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  path = workdir / 'checkpoints' / str(step) / 'state'
  ckptr = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ckptr.metadata(path).item_metadata)
  return ckptr.restore(path, target)


@pytest.fixture(scope='module')
def reference(runlocal_six_steps):
  """The same config as 1 process with 2 devices, uninterrupted (conftest)."""
  return runlocal_six_steps[0]


@pytest.fixture(scope='module')
def two_processes(env, tmp_path_factory):
  """Run 1 gets SIGTERM on process 1 after its 2nd step; run 2 is the same command."""
  workdir = tmp_path_factory.mktemp('two_processes')
  first = _launch_two(env, workdir, *FLAGS, who=1, term_at=2)
  first_steps, first_rows = _steps(workdir), _rows(workdir)
  second = _launch_two(env, workdir, *FLAGS)
  return {'workdir': workdir, 'first': first, 'second': second,
          'first_steps': first_steps, 'first_rows': first_rows}


def test_sigterm_to_one_process_stops_both_at_the_same_step(two_processes):
  (rc0, out0, _), (rc1, out1, _) = two_processes['first']
  assert rc0 == 0 and rc1 == 0, (out0[-3000:], out1[-3000:])
  saved = two_processes['first_steps']
  assert len(saved) == 1 and 2 <= saved[0] < 6, saved  # every_steps=100: only this save.
  k = saved[0]
  for out in (out0, out1):
    assert f'Preemption (SIGTERM to a process): checkpoint written at step {k}' in out
  assert [r['step'] for r in two_processes['first_rows']] == list(range(1, k + 1))


def test_rerun_resumes_trains_evaluates_and_equals_one_process(two_processes, reference):
  workdir = two_processes['workdir']
  (rc0, out0, _), (rc1, out1, _) = two_processes['second']
  assert rc0 == 0 and rc1 == 0, (out0[-3000:], out1[-3000:])
  k = two_processes['first_steps'][0]
  assert f'at step {k}.' in out0 and 'Resumed from' in out0
  assert _steps(workdir) == [k, 6]
  # Process 0 wrote the logs and the mAP of every process's predictions (12 val boxes,
  # 4 frames); process 1 wrote nothing of its own.
  assert 'PoseTrack mAP at step 6 (4 frames)' in out0
  assert 'PoseTrack mAP' not in out1
  (ev,) = _rows(workdir, 'eval')
  (ref_ev,) = _rows(reference, 'eval')
  assert ev['step'] == 6 and ev['num_boxes'] == ref_ev['num_boxes'] == 12
  results = json.loads((workdir / 'eval_results.json').read_text())
  assert results['step'] == 6 and results['num_frames'] == 4
  assert sorted(os.listdir(workdir / 'predictions' / '6')) == sorted(
      os.listdir(reference / 'predictions' / '6'))
  # The same batches and the same updates as one process with two devices.
  rows, ref_rows = _rows(workdir), _rows(reference)
  assert [r['step'] for r in rows] == [r['step'] for r in ref_rows] == list(range(1, 7))
  np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in ref_rows],
                             rtol=1e-6)
  got, want = _state(workdir, 6), _state(reference, 6)
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ev['heatmap_loss'], ref_ev['heatmap_loss'], rtol=1e-5)


@pytest.mark.parametrize('who', [1, 0])
def test_failure_on_one_process_ends_both_with_the_error_named(env, two_processes, tmp_path,
                                                               who):
  # A copy of the finished workdir, trained 2 steps further: process `who` fails in its
  # first step while the other waits in that step's collective. (Process 0 also serves
  # the coordination service, so its failure must still reach the other.)
  workdir = tmp_path / 'fails'
  shutil.copytree(two_processes['workdir'], workdir)
  shutil.rmtree(workdir / 'data' / 'tfds')
  out = _launch_two(env, workdir, '--config.num_train_steps=8', who=who, fail_at=1,
                    timeout=600)
  (rc_bad, out_bad, t_bad), (rc_ok, out_ok, t_ok) = out[who], out[1 - who]
  assert rc_bad != 0 and 'image not found (injected on one process)' in out_bad
  assert rc_ok != 0, out_ok[-3000:]
  assert f'process {who} failed: ' in out_ok and '000007.jpg: image not found' in out_ok
  assert f'process {1 - who} stops too' in out_ok
  assert abs(t_ok - t_bad) < 30  # Promptly, not after JAX's 100 s heartbeat timeout.
  assert _steps(workdir) == [two_processes['first_steps'][0], 6]  # Nothing saved after.


# --- Starting: which environment makes a process join a multi-process run --------------


def test_distributed_arguments_from_the_environment():
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1234', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3'}
  assert sharding.distributed_arguments(False, env) == {
      'coordinator_address': '10.0.0.2:1234', 'num_processes': 4, 'process_id': 3}
  assert sharding.distributed_arguments(False, {}) is None
  assert sharding.distributed_arguments(True, {}) == {}  # JAX discovers the cluster.
  assert sharding.distributed_arguments(False, {'TDMI_DISTRIBUTED': '1'}) == {}
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '8'}
  assert sharding.distributed_arguments(False, slurm) == {}
  assert sharding.distributed_arguments(False, dict(slurm, SLURM_NTASKS='1')) is None
  assert sharding.distributed_arguments(False, {}, on_cloud_tpu=True) == {}
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    sharding.distributed_arguments(False, {'JAX_NUM_PROCESSES': 'two'})


def test_partial_by_hand_environment_fails_naming_the_variables(env, tmp_path):
  e = dict(env, JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}')
  proc = subprocess.run([sys.executable, 'launch.py', RUNLOCAL, f'--workdir={tmp_path}'],
                        cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'JAX_NUM_PROCESSES' in proc.stderr and 'JAX_PROCESS_ID' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_ctrl_c_in_a_multiprocess_run_becomes_the_preemption_signal():
  """Ctrl-C on one process is forwarded as SIGTERM, which jax's preemption notifier turns
  into a stop of every process at one step (the test above); alone it stops locally."""
  import signal  # pylint: disable=g-import-not-at-top
  from tdmi_jax import train  # pylint: disable=g-import-not-at-top
  got = []
  previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # Stands in for jax's.
  try:
    with train._StopRequest(multiprocess=True) as stop:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert got == [signal.SIGTERM] and not stop.local_stop
    with train._StopRequest(multiprocess=False) as stop:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert stop.local_stop and got == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
