r"""PoseTrack18: the full TDMI recipe (HRNet-W48 frozen, 384x288, Adam 1e-3, 20 epochs).

Command (after downloading PoseTrack18, see datasets/posetrack/README or the error text,
and converting the COCO HRNet-W48 weights with `python -m tdmi_jax.convert_torch`):

  python launch.py --config=configs/posetrack18.py --workdir=runs/pt18 \
    --config.data.manual_dir=/data/PoseTrack18 --config.init_from=/ckpt/hrnet_w48_coco

Variants: `:variant=hrnet_w48|hrnet_w32|tiny`, and `runlocal` (tiny model, small crops,
a few steps: a smoke test of a real download on CPU).

Expected result: the paper reports 83.6 val mAP (Total) on PoseTrack18 with its MI
objective (SPEC §9; this project has not measured it yet, and ships the MI terms off by
default, see the comment on config.mi below and RESULTS.md). Global batch 32 on 8 accelerators; 20 epochs with the lr
x0.1 at epochs 8, 12, 16. Without config.init_from the backbone is random and frozen, which
trains nothing useful: the run logs a warning.
"""

import ml_collections

from configs import common


def base_config(dataset, variant):
  """Every field of a training config (blocks of configs/common.py + the driver's own)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = common.model_config(variant)
  config.data = common.data_config(dataset)
  config.mi = common.mi_config()
  # Off by default (issue 10's rule: ship an MI objective only if it is not worse than the
  # heatmap loss alone). Measured on the synthetic data (RESULTS.md): the reference
  # surrogate at the SPEC's weight 1 collapsed the paper's head (mAP 0.6 against 28.1), and
  # the bounded 'variational' objective trained worse than no MI on the window head.
  # `--config.mi.enabled=True` restores the reference's seven terms (bounded surrogate).
  config.mi.enabled = False
  config.optim = common.optim_config()
  config.checkpoint = common.checkpoint_config()
  config.batch_size = 32          # Global, over all devices and hosts.
  config.eval_batch_size = 64
  config.num_epochs = 20.0
  config.num_train_steps = -1     # > 0 overrides num_epochs.
  config.log_every_steps = 50
  # grad_norm/<part> of each loss share (heatmap, MI terms) on log steps: one extra
  # forward and backward per share there, nothing on the other steps.
  config.log_term_grad_norms = True
  config.eval_every_steps = 0     # Periodic eval during training; 0: only at the end.
  config.init_from = ''           # Workdir/checkpoint of pretrained weights.
  config.init_from_kind = 'backbone'  # 'backbone' | 'full'.
  config.distributed = False      # jax.distributed.initialize() (also via environment).
  # JAX's persistent compilation cache (local or gs://); '' off. JAX_COMPILATION_CACHE_DIR,
  # when set, wins. A restart loads the compiled steps instead of compiling them again.
  config.compilation_cache_dir = '~/.cache/tdmi_jax/jax_cache'
  # PoseTrack mAP on val (tdmi_jax.evaluation), at every periodic eval and at the end.
  config.eval = ml_collections.ConfigDict()
  config.eval.map = True
  config.eval.flip_test = True      # HRNet/DCPose protocol: average with the mirrored crop.
  config.eval.decode = 'quarter'    # 'quarter' | 'dark' | 'argmax'.
  config.eval.use_gt_boxes = False  # True: GT person boxes instead of detector boxes.
  config.eval.num_overlays = 0      # PNG overlays of val frames under <workdir>/overlays/.
  # After the final eval, also score the frozen backbone alone on the same boxes.
  config.eval.compare_backbone = False
  # poseval's tracking metrics (MOTA, MOTP, Prec, Rec) besides the mAP, in eval_results.json.
  config.eval.track = False
  # The writer's tracker (tdmi_jax/evaluation/tracker.py) links the predicted people.
  config.eval.tracker = ml_collections.ConfigDict()
  config.eval.tracker.similarity = 'oks'      # 'oks' (poses) | 'iou' (boxes around poses).
  config.eval.tracker.min_similarity = 0.3    # Pairs below this start a new track.
  config.eval.tracker.max_age = 2             # Linked frames a track may miss and go on.
  config.eval.tracker.min_joint_score = 0.2   # Joints compared by OKS / spanning the box.
  return config


def recipe(dataset, arg):
  """The PoseTrack recipe shared by posetrack17/18/21.py."""
  arg = common.parse_arg(arg, variant='hrnet_w48', runlocal=False)
  config = base_config(dataset, arg.variant)
  config.data.image_size = (384, 288)
  config.data.heatmap_size = (96, 72)
  config.optim.decay_epochs = (8, 12, 16)
  config.init_from_kind = 'backbone'   # COCO-pretrained HRNet from convert_torch.
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.checkpoint.every_steps = 1000
  if arg.runlocal:
    config.model.variant = 'tiny'
    config.data.image_size = (128, 96)
    config.data.heatmap_size = (32, 24)
    common.apply_runlocal(config)
  return config.lock()


def get_config(arg=None):
  return recipe('posetrack18', arg)
