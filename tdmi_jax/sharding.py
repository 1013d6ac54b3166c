"""Device mesh and array placement for data-parallel training.

One mesh axis, 'data': the batch is split along it and everything else (parameters,
BatchNorm statistics, optimizer state) is replicated. This works unchanged for one CPU,
several simulated CPU devices, a GPU box and a multi-host TPU pod: each process only ever
holds the rows of the global batch that belong to its own devices.
"""

import os

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def maybe_initialize_distributed(requested=False):
  """Calls jax.distributed.initialize() when asked to by the config or the environment.

  On Cloud TPU and under SLURM/Open MPI, JAX discovers the coordinator by itself; elsewhere
  set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by JAX).
  Returns True when it initialised.
  """
  env = os.environ.get('TDMI_DISTRIBUTED', '').lower() in ('1', 'true', 'yes')
  env = env or 'JAX_COORDINATOR_ADDRESS' in os.environ
  if not (requested or env):
    return False
  jax.distributed.initialize()
  return True


def make_mesh(devices=None):
  """A 1-D mesh over all (global) devices, axis 'data'."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def data_sharded(mesh):
  """Leading (batch) dimension split over 'data', the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size, mesh=None, what='batch_size', *, device_count=None,
                     process_count=None):
  """This process's share of a global batch that must split evenly over devices and
  processes (counts default to the mesh's devices and jax.process_count()).

  The one check of batch sizes: the driver calls it on the config before any work starts,
  the input pipeline again for the topology it is given.
  """
  n = mesh.devices.size if device_count is None else device_count
  p = jax.process_count() if process_count is None else process_count
  if not isinstance(global_batch_size, int) or global_batch_size <= 0:
    raise ValueError(f'config.{what}={global_batch_size!r}: must be a positive integer '
                     f'(a multiple of the device count {n}).')
  if global_batch_size % n:
    raise ValueError(
        f'config.{what}={global_batch_size} is not divisible by the number of devices '
        f'({n}); choose a multiple of {n}.')
  if global_batch_size % p:
    raise ValueError(
        f'config.{what}={global_batch_size} is not divisible by the number of processes '
        f'({p}).')
  return global_batch_size // p


def shard_batch(local_batch, mesh, keys=None):
  """Host-local numpy batch -> global jax.Arrays sharded over 'data'.

  Each process passes only its own rows (local batch = global / process_count); with a
  single process this is simply the whole batch split over the local devices.
  """
  sharding = data_sharded(mesh)
  keys = local_batch.keys() if keys is None else keys
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
      for k in keys
  }


def replicate(tree, mesh):
  """Places a host pytree replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree):
  """Fully replicated (or fully addressable) jax.Arrays -> numpy, on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


def is_writer():
  """Only process 0 writes logs, configs and other plain files."""
  return jax.process_index() == 0


def sync(name):
  """Barrier across processes (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_rows(local):
  """Concatenates every process's host rows (a dict of numpy arrays) in process order.

  int64 columns (PoseTrack image ids exceed int32) travel as two int32 halves, since jax
  arrays are 32-bit unless x64 is enabled.
  """
  if jax.process_count() == 1:
    return local
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.dtype == np.int64:
      hi, lo = (v >> 31).astype(np.int32), (v & (2**31 - 1)).astype(np.int32)
      hi, lo = (np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in (hi, lo))
      out[k] = (hi.astype(np.int64) << 31) | lo.astype(np.int64)
    else:
      out[k] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
  return out


def local_rows(x):
  """This process's rows of a batch-sharded array, as numpy (in global row order)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # Replicas along other mesh axes hold the same rows.
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)
