"""One run per workdir: an exclusive `flock` on `<workdir>/.lock` held for the whole run.

Two runs writing the same checkpoints/ and metrics.jsonl would interleave their steps and
corrupt both. The lock belongs to the open file, so the OS drops it when the holder exits
in any way (SIGKILL included): a stale .lock file never blocks a later run. The file holds
the holder's PID and host, for the error message only.

Object stores (a `gs://` workdir) have no locks. There the run holds a lease instead:
`<workdir>/.lock` is a JSON object {holder, time}, rewritten every LEASE_RENEW_S seconds
by a background thread and deleted at the end. A second run that finds a lease renewed
within LEASE_TTL_S refuses to start; an older one (its holder was killed) is taken over
with a warning. It is weaker than flock: two runs started within the same second can both
take it. Which mechanism is used is logged.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time

from absl import logging

from tdmi_jax import paths

LOCK_NAME = '.lock'
LEASE_RENEW_S = 30.0
LEASE_TTL_S = 120.0


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir."""


def _holder(f):
  f.seek(0)
  text = f.read().strip()
  return text or 'a process that has not written its PID yet'


def acquire(workdir):
  """Locks `workdir` (created if missing); returns the open lock file (a `_Lease` on an
  object store), which holds the lock until `release` or until it is garbage collected.
  Never blocks."""
  if paths.is_uri(workdir):
    return _Lease(paths.path(workdir))
  workdir = os.fspath(paths.path(workdir))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  # 'a+': opening must not erase the holder's PID before we know we own the lock.
  f = open(path, 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(f)
    f.close()
    raise WorkdirInUseError(
        f'The workdir {workdir} is in use by another run ({holder} holds {path}). '
        'Wait for it to finish or stop it, or use another --workdir.') from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      f.close()
      raise
    # Some network filesystems have no flock: run unprotected rather than not at all.
    logging.warning('Cannot lock %s (%s): nothing stops a second run on this workdir.',
                    path, e)
  f.seek(0)
  f.truncate()
  f.write(f'PID {os.getpid()} on {socket.gethostname()}\n')
  f.flush()
  return f


class _Lease:
  """The object-store lock: a lease file renewed by a daemon thread (module docstring)."""

  def __init__(self, workdir):
    self.path = workdir / LOCK_NAME
    self.holder = f'PID {os.getpid()} on {socket.gethostname()}'
    logging.warning('%s is on an object store, which has no file locks: holding a lease '
                    '(%s, renewed every %.0f s) instead of flock.', workdir, self.path,
                    LEASE_RENEW_S)
    lease = self._read()
    if lease is not None:
      age = time.time() - float(lease.get('time', 0))
      if age < LEASE_TTL_S:
        raise WorkdirInUseError(
            f'The workdir {workdir} is in use by another run ({lease.get("holder")} holds '
            f'the lease {self.path}, renewed {age:.0f} s ago). Wait for it to finish or '
            'stop it, or use another --workdir.')
      logging.warning('Taking over the lease %s of %s, not renewed for %.0f s (its run '
                      'was killed).', self.path, lease.get('holder'), age)
    self._write()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, name='workdir-lease', daemon=True)
    self._thread.start()

  def _read(self):
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def _write(self):
    self.path.write_text(json.dumps({'holder': self.holder, 'time': time.time()}))

  def _renew(self):
    while not self._stop.wait(LEASE_RENEW_S):
      try:
        self._write()
      except Exception as e:  # pylint: disable=broad-except  (retried at the next renewal)
        logging.warning('Could not renew the lease %s: %s', self.path, e)

  def release(self):
    self._stop.set()
    self._thread.join()
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass


def release(f):
  if isinstance(f, _Lease):
    f.release()
    return
  f.seek(0)
  f.truncate()
  f.flush()
  f.close()  # Closing the last descriptor drops the flock.


@contextlib.contextmanager
def hold(workdir, enabled=True):
  """`with hold(workdir):` the run; `enabled=False` (non-writer processes) does nothing."""
  if not enabled:
    yield
    return
  f = acquire(workdir)
  try:
    yield
  finally:
    release(f)
