"""`python -m tdmi_jax.infer`: alias of `tdmi_jax.inference.infer`, kept for one release.

Imported, this name is the moved module itself, so old imports see the same functions.
"""

import sys

from absl import app

from tdmi_jax.inference import infer as _moved

if __name__ == '__main__':
  __doc__ = _moved.__doc__  # absl prints the __main__ module's docstring as --help.
  app.run(_moved.main)
else:
  sys.modules[__name__] = _moved
