"""Device mesh and array placement for data-parallel training.

One mesh axis, 'data': the batch is split along it and everything else (parameters,
BatchNorm statistics, optimizer state) is replicated. This works unchanged for one CPU,
several simulated CPU devices, a GPU box and a multi-host TPU pod: each process only ever
holds the rows of the global batch that belong to its own devices.

Multi-process runs: `maybe_initialize_distributed` starts them, `sync(name)` is a barrier
that every process reaches under the same name, and `abort(error)` ends all of them when
one fails, so that none waits forever in a collective.
"""

import atexit
import os
import sys
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


# --- Multi-process start, barriers and failure ---------------------------------------

# The environment a by-hand multi-host launch sets on every process (README).
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
_FAILURE_KEY = 'tdmi_jax/failure'


def _int_env(environ, name):
  try:
    return int(environ[name])
  except ValueError:
    raise ValueError(f'{name}={environ[name]!r} is not an integer') from None


def _cluster_detected(environ, on_cloud_tpu):
  """A launcher that JAX discovers by itself started this process as one of several."""
  def count(name):
    try:
      return int(environ.get(name, '1'))
    except ValueError:
      return 1
  slurm = 'SLURM_JOB_ID' in environ and 'SLURM_PROCID' in environ and count('SLURM_NTASKS') > 1
  mpi = count('OMPI_COMM_WORLD_SIZE') > 1
  # On a Cloud TPU VM JAX reads the slice's workers from the metadata server (one host:
  # a single process, which initialize() handles too).
  return slurm or mpi or on_cloud_tpu


def distributed_arguments(requested, environ, on_cloud_tpu=False):
  """None (single process) or the keyword arguments of jax.distributed.initialize()."""
  by_hand = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if n in environ]
  flag = environ.get('TDMI_DISTRIBUTED', '').lower() in ('1', 'true', 'yes')
  if not (requested or flag or by_hand or _cluster_detected(environ, on_cloud_tpu)):
    return None
  kwargs = {}
  if ENV_COORDINATOR in environ:
    kwargs['coordinator_address'] = environ[ENV_COORDINATOR]
  if ENV_NUM_PROCESSES in environ:
    kwargs['num_processes'] = _int_env(environ, ENV_NUM_PROCESSES)
  if ENV_PROCESS_ID in environ:
    kwargs['process_id'] = _int_env(environ, ENV_PROCESS_ID)
  return kwargs


def maybe_initialize_distributed(requested=False, environ=None):
  """Calls jax.distributed.initialize() when asked to by the config or the environment.

  By hand: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax itself
  reads only the first); on Cloud TPU VMs, under SLURM and Open MPI JAX discovers them.
  Then starts the failure watchdog (`abort`). Returns True when it initialised.
  """
  environ = os.environ if environ is None else environ
  kwargs = distributed_arguments(requested, environ, _on_cloud_tpu())
  if kwargs is None:
    return False
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    raise ValueError(
        f'jax.distributed.initialize({kwargs}) failed: {e} Outside Cloud TPU, SLURM and '
        f'Open MPI set all three of {ENV_COORDINATOR}=HOST:PORT (process 0), '
        f'{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}.') from None
  _Watchdog.start()
  return True


def _on_cloud_tpu():
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


class _Watchdog:
  """Ends this process when another one reports a failure (see `abort`).

  Without it, the survivors of a failed process wait forever in the next collective or
  barrier. A daemon thread polls the coordination service's key-value store; the blocking
  get releases the GIL, so training is not slowed.
  """
  _thread = None
  _stop = None

  @classmethod
  def start(cls):
    if cls._thread is not None or _client() is None:
      return
    cls._stop = threading.Event()
    cls._thread = threading.Thread(target=cls._run, name='tdmi-failure-watchdog',
                                   daemon=True)
    cls._thread.start()
    # Before jax's own atexit shutdown: a thread blocked in the client during its
    # shutdown aborts the process.
    atexit.register(cls.stop)

  @classmethod
  def _run(cls):
    client = _client()
    while not cls._stop.is_set():
      try:
        message = client.blocking_key_value_get(_FAILURE_KEY, 1000)
      except Exception:  # pylint: disable=broad-except  (a timeout: nothing reported)
        continue
      if cls._stop.is_set():
        return
      try:  # Lets a failing process 0 (the coordinator) know it may now exit.
        client.key_value_set(f'{_FAILURE_KEY}/seen/{jax.process_index()}', '1')
      except Exception:  # pylint: disable=broad-except
        pass
      _exit_now(f'ERROR: {message}; process {jax.process_index()} stops too.', 1)

  @classmethod
  def stop(cls):
    if cls._thread is not None:
      cls._stop.set()
      cls._thread.join(timeout=5)
      cls._thread = None


def _exit_now(line, code):
  print(line, file=sys.stderr, flush=True)
  logging.error(line)
  logging.get_absl_handler().flush()
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access  (skips the shutdown barrier)


def abort(error, code=1):
  """Stops this process and, in a multi-process run, every other one, naming `error`.

  A process that failed must not reach jax's exit barrier (the others never will), and the
  others must learn why: the message goes to the coordination service, where their
  watchdogs read it. With one process this is a plain sys.exit(code).
  """
  text = error if isinstance(error, str) else f'{type(error).__name__}: {error}'
  client = _client() if jax.process_count() > 1 else None
  if client is None:
    print(f'ERROR: {text}', file=sys.stderr)
    sys.exit(code)
  _Watchdog.stop()
  try:
    client.key_value_set(_FAILURE_KEY, f'process {jax.process_index()} failed: {text}')
  except Exception:  # pylint: disable=broad-except  (another process reported first)
    pass
  if jax.process_index() == 0:
    # Process 0 serves the coordination service: it waits (at most ~10 s) until the others
    # have read the message, which would otherwise die with it.
    for i in range(1, jax.process_count()):
      try:
        client.blocking_key_value_get(f'{_FAILURE_KEY}/seen/{i}', 10_000)
      except Exception:  # pylint: disable=broad-except  (gone already, or too slow)
        break
  _exit_now(f'ERROR: {text}', code)


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


def setup_compilation_cache(cache_dir):
  """Turns on JAX's persistent compilation cache in `cache_dir` (local or `gs://`), so a
  restarted or resumed run loads its compiled steps instead of compiling them again.

  JAX_COMPILATION_CACHE_DIR, when set, wins (a cache chosen per machine); '' turns it off;
  a folder that cannot be written turns it off with a warning. Returns the folder in use
  (None when off). Call it before the first compilation.
  """
  from tdmi_jax import paths  # pylint: disable=g-import-not-at-top
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  if not cache_dir:
    return None
  cache_dir = paths.path(cache_dir)
  if not paths.writable_dir(cache_dir):
    logging.warning('The compilation cache %s cannot be written: compiling without a '
                    'persistent cache (set config.compilation_cache_dir).', cache_dir)
    return None
  jax.config.update('jax_compilation_cache_dir', os.fspath(cache_dir))
  logging.info('Persistent compilation cache: %s', cache_dir)
  return os.fspath(cache_dir)
