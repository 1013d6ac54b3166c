"""Test setup: several simulated CPU devices, repo root on sys.path, fixture paths.

Test data:
* `tests/testdata/`: the project's own data (poseval golden cases on synthetic files,
  expected outputs), always present.
* Real PoseTrack files (a few trimmed PoseTrack18 val videos, a real clip, and the two
  poseval golden cases built on them) are not part of the repository. They are read from
  the folder named by $TDMI_FIXTURES_DIR, else from `../shared/fixtures` beside the
  repository. Without them those tests are skipped with a one-line reason; under CI
  (CI=true) a missing folder is an error, so CI never skips them silently.
"""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

# Must be set before jax is imported anywhere: sharded tests need >1 CPU device.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run: made by the first process that loads
# this file (pytest-xdist's controller, whose environment its workers inherit) and shared
# by every test process and every launch.py subprocess they start: the suite compiles the
# same tiny programs many times over, and compiling is most of its time. Every program is
# cached, however small or fast to compile.
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  _CACHE_DIR = tempfile.mkdtemp(prefix='tdmi_tests_xla_cache_')
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# A size limit makes JAX take a file lock around each cache read and write; without one,
# a process could read an entry another process is still writing.
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(16 << 30))

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

TESTDATA = ROOT / 'tests' / 'testdata'
FIXTURES_ENV = 'TDMI_FIXTURES_DIR'


def real_fixtures_dir():
  return pathlib.Path(os.environ.get(FIXTURES_ENV) or ROOT.parent / 'shared' / 'fixtures')


def _on_ci():
  return os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')


@pytest.fixture(scope='session')
def env():
  """Environment for launch.py subprocesses: repo on the path, and this process's
  persistent XLA cache (above) so the tiny model compiles once for all of them."""
  e = dict(os.environ)
  e['PYTHONPATH'] = str(ROOT)
  return e


@pytest.fixture(scope='session')
def runlocal_six_steps(env, tmp_path_factory):
  """(workdir, process) of `launch.py --config=configs/synthetic.py:runlocal` for 6 steps,
  uninterrupted, with the per-term gradient norms logged: the reference of the resume tests
  (tests/test_train.py) and of the 2-process run (tests/test_multihost.py). Read-only.

  Run once per test run: under pytest-xdist the first worker to ask runs it into the
  run's shared temporary folder while the others wait on a file lock, then read it.
  """
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # This run's folder, above the workers' own (popen-gw0, ...).
  workdir, record = root / 'runlocal_six_steps', root / 'runlocal_six_steps.json'
  with filelock.FileLock(str(root / 'runlocal_six_steps.lock')):
    if not record.exists():
      proc = subprocess.run(
          [sys.executable, 'launch.py', '--config=configs/synthetic.py:runlocal',
           f'--workdir={workdir}', '--config.num_train_steps=6',
           # runlocal leaves them off; tests/test_train.py checks them on this run.
           '--config.log_term_grad_norms=True'],
          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
      record.write_text(json.dumps({'args': proc.args, 'returncode': proc.returncode,
                                    'stdout': proc.stdout, 'stderr': proc.stderr}))
    proc = subprocess.CompletedProcess(**json.loads(record.read_text()))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


def _real(name):
  """A folder of the real-PoseTrack fixtures, or a skip (an error under CI) naming it."""
  path = real_fixtures_dir() / name
  if not path.is_dir():
    message = (f'real PoseTrack fixtures not found: {path} (set {FIXTURES_ENV}=DIR, see '
               'README "Tests")')
    if _on_ci():
      pytest.fail(f'CI=true: {message}', pytrace=False)
    pytest.skip(message)
  return path


@pytest.fixture(scope='session')
def pt18_real():
  return _real('posetrack18_real')


@pytest.fixture(scope='session')
def poseval_golden():
  """The golden cases on synthetic files (case3, case4): part of the repository."""
  return TESTDATA / 'poseval_golden'


@pytest.fixture(scope='session')
def poseval_golden_real():
  """The golden cases on trimmed real PoseTrack18 files (case1, case2)."""
  return _real('poseval_golden')


@pytest.fixture(scope='session')
def synthetic(tmp_path_factory):
  """The synthetic generator's tiny preset (read-only: tests build into their own tmp dirs)."""
  from tdmi_jax.data import synthesize  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('synth')
  synthesize.generate(str(root), **synthesize.PRESETS['tiny'])
  return root
