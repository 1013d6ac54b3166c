"""One run per workdir: an exclusive `flock` on `<workdir>/.lock` held for the whole run.

Two runs writing the same checkpoints/ and metrics.jsonl would interleave their steps and
corrupt both. The lock belongs to the open file, so the OS drops it when the holder exits
in any way (SIGKILL included): a stale .lock file never blocks a later run. The file holds
the holder's PID and host, for the error message only.
"""

import contextlib
import errno
import fcntl
import os
import socket

from absl import logging

LOCK_NAME = '.lock'


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir."""


def _holder(f):
  f.seek(0)
  text = f.read().strip()
  return text or 'a process that has not written its PID yet'


def acquire(workdir):
  """Locks `workdir` (created if missing); returns the open lock file, which holds the
  lock until `release` or until it is garbage collected. Never blocks."""
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


def release(f):
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
