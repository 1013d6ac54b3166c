"""Workdir and dataset on `gs://`, offline: the driver and batch evaluation against a fake GCS.

tests/fake_gcs.py serves the GCS JSON API on localhost; the real clients talk to it
(TensorStore for orbax's arrays, gcsfs behind etils.epath for every other file,
google-cloud-storage for orbax's bucket look-up). The runs start in an empty working
directory: every artefact must be in the bucket and nothing under that directory.
"""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

# Before gcsfs is imported: its zonal-bucket detection speaks gRPC, which the fake lacks.
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'
pytest.importorskip('gcsfs', reason='gs:// needs requirements-gcs.txt')
pytest.importorskip('google.cloud.storage', reason='gs:// needs requirements-gcs.txt')

import fake_gcs  # noqa: E402  (tests/ is on sys.path under pytest)

from tdmi_jax import paths  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNLOCAL = f'--config={ROOT / "configs" / "synthetic.py"}:runlocal'
WORKDIR = 'gs://bucket/runs/synthetic'


@pytest.fixture(scope='module')
def server():
  s = fake_gcs.Server(buckets=('bucket',)).start()
  yield s
  s.stop()


@pytest.fixture(scope='module')
def gcs_env(env, server, tmp_path_factory):
  e = dict(env, **fake_gcs.environ(server.url))
  # This host's copy of the dataset build published in the bucket.
  e['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('host_cache'))
  return e


@pytest.fixture
def in_process_gcs(server, monkeypatch):
  import fsspec  # pylint: disable=g-import-not-at-top
  for k, v in fake_gcs.environ(server.url).items():
    monkeypatch.setenv(k, v)
  # fsspec read FSSPEC_GCS_TOKEN when it was imported, maybe before this test.
  monkeypatch.setitem(fsspec.config.conf, 'gcs', {'token': 'anon'})


def _run(gcs_env, cwd, *args):
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=gcs_env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


@pytest.fixture(scope='module')
def runs(gcs_env, server, tmp_path_factory):
  """Train 4 steps, resume to 6 + eval, then batch-evaluate the first checkpoint."""
  cwd = tmp_path_factory.mktemp('cwd')
  launch = str(ROOT / 'launch.py')
  first = _run(gcs_env, cwd, launch, RUNLOCAL, f'--workdir={WORKDIR}', '--mode=train')
  after_first = server.store.names('bucket')
  second = _run(gcs_env, cwd, launch, RUNLOCAL, f'--workdir={WORKDIR}',
                '--config.num_train_steps=6')
  batch = _run(gcs_env, cwd, '-m', 'tdmi_jax.batch_eval', RUNLOCAL, f'--workdir={WORKDIR}',
               '--steps=2')
  return {'cwd': cwd, 'first': first, 'second': second, 'batch': batch,
          'after_first': after_first, 'names': server.store.names('bucket')}


def _read(server, name):
  return server.store.objects[('bucket', name)].data


def test_every_artefact_is_in_the_bucket_and_nothing_local(runs, server, gcs_env):
  names = set(runs['names'])
  run = 'runs/synthetic/'
  for must in ('config.json', 'metrics.jsonl', 'eval_results.json', 'eval_results_2.json',
               'eval_results_6.json', 'batch_eval/map_per_step.csv',
               'batch_eval/map_per_step.md', 'batch_eval/map_over_steps.png'):
    assert run + must in names, must
  for prefix in ('checkpoints/2/state/', 'checkpoints/4/state/', 'checkpoints/6/state/',
                 'predictions/2/', 'predictions/6/', 'overlays/6/', 'tb/events.out.tfevents',
                 'data/synthetic/images/val/', 'data/synthetic/annotations/val/',
                 'data/synthetic/detections/val_boxes_coco.json', 'data/tfds/posetrack/'):
    assert any(n.startswith(run + prefix) for n in names), prefix
  assert any(n.endswith('.array_record-00000-of-00001') for n in names)  # published build
  assert not (run + '.lock') in names  # The lease is released at the end.
  assert os.listdir(runs['cwd']) == []  # No 'gs:' folder or anything else written here.
  # This host's cache holds the downloaded build, not the working directory.
  assert (pathlib.Path(gcs_env['XDG_CACHE_HOME']) / 'tdmi_jax' / 'tfds').is_dir()
  rows = [json.loads(l) for l in _read(server, run + 'metrics.jsonl').decode().splitlines()]
  train = [r['step'] for r in rows if r['split'] == 'train']
  assert train == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [6]
  png = _read(server, next(n for n in names if n.startswith(run + 'overlays/6/')))
  assert png[:8] == b'\x89PNG\r\n\x1a\n'


def test_rerun_resumed_from_the_bucket(runs):
  err = runs['second'].stderr
  assert f'Resumed from {WORKDIR}/checkpoints at step 4.' in err
  assert 'holding a lease' in err  # The object-store lock, logged.
  assert any(n.startswith('runs/synthetic/checkpoints/4/') for n in runs['after_first'])


def test_batch_eval_reads_the_bucket_and_writes_its_tables_there(runs, server):
  table = list(csv.DictReader(io.StringIO(
      _read(server, 'runs/synthetic/batch_eval/map_per_step.csv').decode())))
  assert [int(r['step']) for r in table] == [2]
  result = json.loads(_read(server, 'runs/synthetic/eval_results_2.json'))
  assert result['step'] == 2 and float(table[0]['Total']) == result['summary']['Total']
  assert '| 2 |' in runs['batch'].stdout


def test_lease_refuses_a_second_run_and_is_released(in_process_gcs):
  from tdmi_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = 'gs://bucket/lease_test'
  lease = workdir_lock.acquire(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirInUseError, match='in use by another run'):
      workdir_lock.acquire(workdir)
  finally:
    workdir_lock.release(lease)
  assert not paths.path(workdir + '/.lock').exists()
  # A lease not renewed for longer than the TTL (its run was killed) is taken over.
  paths.path(workdir + '/.lock').write_text(json.dumps({'holder': 'PID 1 on gone',
                                                        'time': 0}))
  workdir_lock.release(workdir_lock.acquire(workdir))


def test_missing_gcs_client_is_an_import_error_naming_the_extra(monkeypatch):
  monkeypatch.setattr(paths, '_installed', lambda module: False)
  with pytest.raises(ImportError, match='pip install -r requirements-gcs.txt'):
    paths.path('gs://bucket/run')
  assert str(paths.path('/tmp/x')) == '/tmp/x'  # Local paths need nothing.


def test_uris_are_never_made_absolute():
  assert os.fspath(paths.path('gs://bucket/a/b')) == 'gs://bucket/a/b'
  assert os.fspath(paths.path('rel/dir')) == os.path.abspath('rel/dir')
