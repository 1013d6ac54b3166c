r"""The synthetic-pretrained single-frame backbone (plays COCO-HRNet's role on synthetic data).

  python launch.py --config=configs/synthetic_backbone.py --workdir=runs/synthetic_backbone
"""

from configs import common
from configs import synthetic


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='small', steps=1500, videos=96, runlocal=False)
  config = synthetic.get_config(f'variant={arg.variant}').unlock()
  config.model.arch = 'single_frame'
  config.model.backbone.frozen = False
  config.model.backbone.bn = 'live'
  config.mi.enabled = False
  config.data.augment.enabled = True
  config.data.augment.rotation_factor = 30.0
  config.data.augment.scale_factor = 0.25
  # Its own dataset (another generator seed, more videos): the backbone never sees the
  # quick start's val split of any seed.
  config.synthetic = dict(videos=arg.videos, frames=36, image_size=(240, 320), seed=1000)
  config.batch_size = 32
  config.num_train_steps = arg.steps
  config.optim.decay_epochs = ()
  config.optim.decay_steps = (int(arg.steps * 0.7), int(arg.steps * 0.9))
  config.optim.grad_clip_norm = 0.0
  config.log_every_steps = 25
  config.eval_every_steps = 1000
  config.checkpoint.every_steps = 500
  config.eval.num_overlays = 8
  return config.lock()
