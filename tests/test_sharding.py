"""Mesh and placement helpers (2 simulated CPU devices from conftest)."""

import jax
import numpy as np
import pytest

from tdmi_jax import sharding


def test_mesh_and_batch_split_over_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == jax.device_count() == 2
  batch = {'x': np.arange(4 * 3, dtype=np.float32).reshape(4, 3), 'm': np.ones(4, np.float32)}
  out = sharding.shard_batch(batch, mesh, keys=['x'])
  assert set(out) == {'x'} and out['x'].shape == (4, 3)
  rows = {s.device: np.asarray(s.data) for s in out['x'].addressable_shards}
  assert sorted(len(r) for r in rows.values()) == [2, 2]  # each device holds its half
  np.testing.assert_array_equal(sharding.local_rows(out['x']), batch['x'])
  np.testing.assert_array_equal(sharding.to_host(out)['x'], batch['x'])


def test_replicated_state_lives_whole_on_every_device():
  mesh = sharding.make_mesh()
  tree = sharding.replicate({'w': np.ones((3,), np.float32)}, mesh)
  assert tree['w'].sharding.is_fully_replicated
  assert len(tree['w'].addressable_shards) == 2
  assert all(s.data.shape == (3,) for s in tree['w'].addressable_shards)


def test_batch_size_must_divide_over_devices():
  mesh = sharding.make_mesh()
  assert sharding.check_batch_size(4, mesh) == 4  # one process: the whole batch is local
  with pytest.raises(ValueError, match=r'config.batch_size=3 .* devices \(2\)'):
    sharding.check_batch_size(3, mesh)
  with pytest.raises(ValueError, match='eval_batch_size=5'):
    sharding.check_batch_size(5, mesh, 'eval_batch_size')


def test_distributed_init_only_when_asked(monkeypatch):
  monkeypatch.delenv('TDMI_DISTRIBUTED', raising=False)
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(1))
  assert not sharding.maybe_initialize_distributed(False) and not calls
  assert sharding.maybe_initialize_distributed(True) and calls == [1]
  monkeypatch.setenv('TDMI_DISTRIBUTED', '1')
  assert sharding.maybe_initialize_distributed(False) and calls == [1, 1]
  assert sharding.is_writer()
