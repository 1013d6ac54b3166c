"""Test setup: several simulated CPU devices, repo root on sys.path, fixture paths."""

import os
import pathlib
import sys

# Must be set before jax is imported anywhere: sharded tests need >1 CPU device.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

SHARED = ROOT.parent / 'shared'


@pytest.fixture(scope='session')
def env(tmp_path_factory):
  """Environment for launch.py subprocesses: repo on the path, one persistent XLA cache so
  the tiny model compiles once for all of them."""
  e = dict(os.environ)
  e['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('xla_cache'))
  e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  e['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  e['PYTHONPATH'] = str(ROOT)
  return e


@pytest.fixture(scope='session')
def runlocal_six_steps(env, tmp_path_factory):
  """(workdir, process) of `launch.py --config=configs/synthetic.py:runlocal` for 6 steps,
  uninterrupted: the reference of the resume tests (tests/test_train.py) and of the
  2-process run (tests/test_multihost.py)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('six')
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/synthetic.py:runlocal',
       f'--workdir={workdir}', '--config.num_train_steps=6'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


@pytest.fixture(scope='session')
def shared_dir():
  if not SHARED.is_dir():
    pytest.fail(f'{SHARED} (the shared fixtures folder) is missing beside the repo')
  return SHARED


@pytest.fixture(scope='session')
def pt18_real(shared_dir):
  return shared_dir / 'fixtures' / 'posetrack18_real'


@pytest.fixture(scope='session')
def poseval_golden(shared_dir):
  return shared_dir / 'fixtures' / 'poseval_golden'


@pytest.fixture(scope='session')
def synthetic(tmp_path_factory):
  """The synthetic generator's tiny preset (read-only: tests build into their own tmp dirs)."""
  from tdmi_jax.data import synthesize  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('synth')
  synthesize.generate(str(root), **synthesize.PRESETS['tiny'])
  return root
