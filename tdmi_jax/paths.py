"""Paths on local disks and on object stores (`gs://`, `s3://`), all through etils.epath.

Every file the project reads or writes (workdir, checkpoints, logs, predictions, datasets)
goes through `path()`: a local path is expanded and made absolute, a URI is kept as it is
(`os.path.abspath('gs://b/run')` would be `<cwd>/gs:/b/run`, silently local). Object
stores have no rename and no locks; `write_text`/`write_bytes` are atomic on both (a
temporary file and a rename locally, a single object upload on a store).

`gs://` needs a filesystem client that epath can use: gcsfs (`pip install -r
requirements-gcs.txt`, which also brings google-cloud-storage for orbax) or TensorFlow's
gfile; without one, `path()` raises an ImportError that says so.
"""

import importlib.util
import os
import shutil

from etils import epath

# What a URI scheme needs: epath's filesystem (gcsfs, s3fs; TensorFlow's gfile also does)
# and, for gs://, the client orbax looks buckets up with.
_CLIENTS = {'gs': ('gcsfs', 'google.cloud.storage'), 's3': ('s3fs',)}
_GFILE_REPLACES = ('gcsfs', 's3fs')
REQUIREMENTS = {'gs': 'requirements-gcs.txt'}


def is_uri(p):
  """True for `scheme://...` (an object store); False for a local path."""
  return '://' in os.fspath(p)


def scheme(p):
  return os.fspath(p).split('://', 1)[0] if is_uri(p) else ''


def _installed(module):
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def check_client(p):
  """Raises ImportError naming the extra to install when `p`'s store has no client here."""
  s = scheme(p)
  if not s:
    return
  gfile = _installed('tensorflow')
  missing = [m for m in _CLIENTS.get(s, ())
             if not _installed(m) and not (gfile and m in _GFILE_REPLACES)]
  if missing:
    extra = REQUIREMENTS.get(s)
    how = f'pip install -r {extra}' if extra else f'pip install {" ".join(missing)}'
    raise ImportError(
        f'{os.fspath(p)}: {s}:// paths need {", ".join(missing)} (not installed): {how} '
        '(TensorFlow\'s gfile can stand in for gcsfs/s3fs).')


def path(p):
  """`p` as an epath.Path: URIs untouched, local paths expanded and absolute."""
  if isinstance(p, epath.Path) and is_uri(p):
    return p
  text = os.fspath(p)
  if is_uri(text):
    check_client(text)
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_bytes(p, data):
  """`p` ends up holding either its old or its new content, never a torn file."""
  p = path(p)
  if is_uri(p):
    p.write_bytes(data)  # One object upload: atomic on GCS and S3.
    return
  tmp = p.parent / f'{p.name}.tmp'
  tmp.write_bytes(data)
  os.replace(tmp, p)


def write_text(p, text):
  write_bytes(p, text.encode())


def move(src, dst):
  """Moves a file or folder; object stores have no rename, so there it is copy + delete."""
  src, dst = path(src), path(dst)
  if not is_uri(src) and not is_uri(dst):
    os.replace(src, dst)
    return
  if not src.is_dir():
    copy_file(src, dst)
    src.unlink()
    return
  copy_tree(src, dst)
  src.rmtree()


def writable_dir(p):
  """True when a file can be created (and removed) under `p`, which is created if needed."""
  try:
    p = path(p)
    p.mkdir(parents=True, exist_ok=True)
    probe = p / f'.write_probe_{os.getpid()}'
    probe.write_text('ok')
    probe.unlink()
    return True
  except (OSError, ImportError, ValueError):
    return False


def copy_tree(src, dst):
  """Copies every file under `src` to the same relative path under `dst` (either side may
  be local or a URI). Returns the number of files."""
  src, dst = path(src), path(dst)
  rels = files_under(src)
  for rel in rels:
    copy_file(src / rel, dst / rel)
  return len(rels)


def files_under(root):
  """Sorted relative paths of every file under `root` (epath has no recursive glob on
  object stores: there, one listing per folder)."""
  root = path(root)
  if not is_uri(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)
  out = []

  def visit(folder, rel):
    for p in folder.iterdir():
      r = f'{rel}/{p.name}' if rel else p.name
      if p.is_dir():
        visit(p, r)
      else:
        out.append(r)

  visit(root, '')
  return sorted(out)


def copy_file(src, dst):
  """Copies one file between any two places (epath's copy does not cross filesystems)."""
  src, dst = path(src), path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open('rb') as a, dst.open('wb') as b:
    shutil.copyfileobj(a, b, 1 << 20)
