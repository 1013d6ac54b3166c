"""Reading and writing the project's JSON files: one reader, one atomic writer."""

import json
import math
import os

from tdmi_jax import paths


def load_json(path, error=ValueError):
  """The parsed JSON of `path`; a missing, unreadable or malformed file raises `error`
  (a ValueError subclass of the caller's module) with a message naming the file."""
  try:
    with paths.path(path).open('rb') as f:
      return json.load(f)
  except FileNotFoundError:
    raise error(f'{path}: file not found') from None
  except IsADirectoryError:
    raise error(f'{path}: is a directory, not a JSON file') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f'{path}: malformed JSON ({e})') from None
  except RecursionError:
    raise error(f'{path}: malformed JSON (nested too deeply)') from None
  except OSError as e:
    raise error(f'{path}: unreadable ({e.strerror or e})') from None


def _finite_or_none(x):
  """NaN/Inf become null: JSON has no such numbers and strict readers reject them."""
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path, obj, *, indent=2, sort_keys=False, nan_as_null=True):
  """Writes `obj` so that `path` holds either the old or the new file, never a torn one:
  a temporary file beside it, then an atomic rename. NaN/Inf floats become null unless
  `nan_as_null=False` (large files whose writer has already checked its numbers)."""
  if nan_as_null:
    obj = _finite_or_none(obj)
  paths.write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))
