r"""The synthetic-pretrained single-frame backbone (COCO-HRNet's role, on synthetic people).

Command (from the repository root), then the export that writes the shipped file:

  python launch.py --config=configs/synthetic_backbone.py --workdir=runs/synthetic_backbone
  python -m tdmi_jax.shipped --export runs/synthetic_backbone --name synthetic_small

Trains the `small` HRNet row (583,201 parameters) as a single-frame pose estimator
(arch='single_frame', BatchNorm live, scale/rotation/half-body augmentation, no flip) on
its own synthetic dataset: 96 videos (72 train) drawn with generator seed 1000, so the
backbone never sees the val split of the quick start (seed 0) or of any other seed the
user picks. 1,500 steps of batch 32 (~18 epochs), Adam 1e-3, x0.1 at steps 1050 and 1350.

Expected result (measured 2026-12-01 on the 2-core CPU shared with other jobs, ~48 min
wall; the run was stopped once at step 558 and resumed, which is bit-exact): val mAP Total
72.1 on its own val split (432 frames): clean key frames 82.0, degraded 49.9; val PCK
89.6 %. Smoke test: `:runlocal` (tiny dataset and model, a few steps).
"""

from configs import common
from configs import synthetic


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='small', steps=1500, videos=96, runlocal=False)
  config = synthetic.get_config(f'variant={arg.variant}').unlock()
  config.model.arch = 'single_frame'
  config.init_from = ''
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
  config.eval_every_steps = 500
  config.checkpoint.every_steps = 500
  config.eval.num_overlays = 8
  if arg.runlocal:
    config.model.variant = 'tiny'
    config.synthetic = dict(videos=2, frames=8, image_size=(96, 128), seed=1000)
    common.apply_runlocal(config)
    config.optim.decay_steps = ()
  return config.lock()
