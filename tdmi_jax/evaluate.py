"""`python -m tdmi_jax.evaluate`: alias of `tdmi_jax.evaluation.evaluate`, kept for one release.

Imported, this name is the moved module itself, so old imports see the same functions.
"""

import sys

from tdmi_jax.evaluation import evaluate as _moved

if __name__ == '__main__':
  sys.exit(_moved.main())
else:
  sys.modules[__name__] = _moved
