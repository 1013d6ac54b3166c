r"""Trains and/or evaluates TDMI.

  python launch.py --config=configs/synthetic.py --workdir=runs/synthetic
  python launch.py --config=configs/posetrack18.py:variant=hrnet_w48 --workdir=runs/pt18 \
      --config.data.manual_dir=/data/PoseTrack18 [--mode=train|eval|train_and_eval]

Multi-host (TPU pods, SLURM, or by hand): --config.distributed=True, or the environment
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or TDMI_DISTRIBUTED=1),
makes every process call jax.distributed.initialize() before anything else touches JAX.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from tdmi_jax import sharding
from tdmi_jax import train
from tdmi_jax import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/synthetic.py', 'Training config file (path[:args]).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where logs and checkpoints go.',
                               required=True)
_MODE = flags.DEFINE_enum('mode', 'train_and_eval', list(train.MODES), 'What to run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    distributed = config.distributed
  except OSError as e:  # A --config file that does not load is reported lazily, here.
    _fail(e)
  sharding.maybe_initialize_distributed(distributed)
  logging.info("Process %d of %d", jax.process_index(), jax.process_count())
  try:
    train.train_and_evaluate(config, _WORKDIR.value, _MODE.value)
  except workdir_lock.WorkdirInUseError as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)
  except train.ConfigError as e:  # Found before any work: the message says it all.
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(2)
  except (train.NonFiniteLossError, FileNotFoundError, ValueError) as e:
    # Clear error, non-zero exit; the traceback stays in the log for debugging.
    logging.exception('Run failed')
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)


def _fail(e):
  """One or two lines naming the bad flag/field (no traceback), exit status 2."""
  # ml_collections embeds escaped newlines and the config's traceback in its messages;
  # keep the first line and the final exception line.
  text = str(e).replace('\\n', '\n').replace("\\'", "'")
  lines = [l.strip().strip('\'"') for l in text.splitlines() if l.strip().strip('\'"')]
  message = lines[0] if len(lines) < 2 else f'{lines[0]} ... {lines[-1]}'
  print(f'ERROR: bad command-line flag or config ({type(e).__name__}): {message}',
        file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, with a short error for a bad --config file, argument or override."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(e)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
