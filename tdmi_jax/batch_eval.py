"""`python -m tdmi_jax.batch_eval`: alias of `tdmi_jax.evaluation.batch_eval`, kept for one
release.

Imported, this name is the moved module itself, so old imports see the same functions.
"""

import sys

from absl import app

from tdmi_jax.evaluation import batch_eval as _moved

if __name__ == '__main__':
  __doc__ = _moved.__doc__  # absl prints the __main__ module's docstring as --help.
  app.run(_moved.main)
else:
  sys.modules[__name__] = _moved
