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
  sharding.maybe_initialize_distributed(config.distributed)
  logging.info("Process %d of %d", jax.process_index(), jax.process_count())
  try:
    train.train_and_evaluate(config, _WORKDIR.value, _MODE.value)
  except workdir_lock.WorkdirInUseError as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)
  except (train.NonFiniteLossError, FileNotFoundError, ValueError) as e:
    # Clear error, non-zero exit; the traceback stays in the log for debugging.
    logging.exception('Run failed')
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
