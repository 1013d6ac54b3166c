"""Multi-host data parallelism on localhost: 2 processes x 1 CPU device each equal 1 x 2.

Each process calls jax.distributed.initialize(), feeds only its own rows of the global
batch (sharding.shard_batch -> jax.make_array_from_process_local_data) and runs the same
jitted train step; the losses must equal a single process with 2 devices on the same data.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

_WORKER = r'''
import json, sys
mode, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import jax
if mode == 'multi':
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=pid)
import numpy as np
import test_train_step as t
from tdmi_jax import sharding, train_step as ts
assert jax.device_count() == 2, jax.devices()
config = t._config(bn='live')
config.mi.enabled = False
config.optim.eps = 1.0          # Linear-in-gradient updates (see test_train_step).
config.optim.learning_rate = 0.1
mesh = sharding.make_mesh()
_, state, step = t._setup(config, mesh)
batch = t._batch(batch_size=4)
local = sharding.check_batch_size(4, mesh)
rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
losses = []
for _ in range(3):
  local_batch = {k: v[rows] for k, v in batch.items()}
  state, metrics = step(state, sharding.shard_batch(local_batch, mesh, ts.TRAIN_KEYS))
  losses.append(float(sharding.to_host(metrics)['loss']))
head = sharding.to_host(state.params['head']['kernel'])
print('RESULT ' + json.dumps({'losses': losses, 'writer': sharding.is_writer(),
                              'local_rows': local, 'head_sum': float(np.sum(head))}))
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), str(ROOT / 'tests')])
  return env


def _result(out):
  line = [l for l in out.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def test_two_processes_equal_one_process_with_two_devices():
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, '-c', _WORKER, 'multi', str(port), str(i)],
                            cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  single = subprocess.run([sys.executable, '-c', _WORKER, 'single', '0', '0'], cwd=ROOT,
                          env=_env(2), capture_output=True, text=True, timeout=300)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  multi = [_result(out) for out, _ in outs]
  ref = _result(single.stdout)
  assert [m['writer'] for m in multi] == [True, False]  # Only process 0 writes files.
  assert [m['local_rows'] for m in multi] == [2, 2] and ref['local_rows'] == 4
  for m in multi:
    np.testing.assert_allclose(m['losses'], ref['losses'], rtol=1e-6)
    np.testing.assert_allclose(m['head_sum'], ref['head_sum'], rtol=1e-5)
  assert ref['losses'][-1] < ref['losses'][0]
