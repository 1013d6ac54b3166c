"""Shared pieces of every config: arg parsing and config blocks.

Config files (`configs/<name>.py`) call the `*_config()` builders below and then
override what their recipe changes, so that every field exists in every config and a
misspelt `--config.x.y=` override fails.
"""

import ml_collections

from tdmi_jax import keypoints


def parse_arg(arg, **defaults):
  """Parses 'variant=hrnet_w48,runlocal' into a ConfigDict over `defaults`.

  A bare word (`runlocal`) sets a boolean flag to True. Unknown keys are an error so
  that a typo in the `:args` part of --config does not silently do nothing.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f'Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}')
    if not _:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out


def apply_runlocal(config):
  """What every config's `runlocal` variant shares: tiny batches and a few steps on CPU."""
  config.batch_size = 2
  config.eval_batch_size = 4
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = 0
  config.checkpoint.every_steps = 2
  # A background thread: worker processes start in seconds that a few steps never repay.
  config.data.num_workers = 0
  # Logging every step, the per-term gradient norms would add a forward and a backward per
  # loss share to every step (and a compile): --config.log_term_grad_norms=True for them.
  if 'log_term_grad_norms' in config:
    config.log_term_grad_norms = False
  return config


# --- Config blocks -------------------------------------------------------------------
# Each block is owned by one part of the library; every SPEC [decision] is a field here
# with the SPEC's default.


def model_config(variant='hrnet_w48'):
  """`config.model`: see tdmi_jax/models/tdmi.py for the meaning of each field."""
  c = ml_collections.ConfigDict()
  c.variant = variant            # Row of tdmi_jax.models.hrnet.VARIANTS.
  c.arch = 'tdmi'                # 'tdmi' | 'single_frame' (backbone + its head).
  c.num_joints = keypoints.NUM_JOINTS
  c.dtype = 'float32'            # Compute dtype, 'float32' | 'bfloat16'; params stay f32.
  c.backbone = ml_collections.ConfigDict()
  c.backbone.frozen = True       # No gradient, no optimizer state for the backbone.
  c.backbone.bn = 'frozen'       # 'frozen' (running stats) | 'live' (reference: batch stats).
  c.backbone.fold_bn = True      # Fold BN into the convs where it uses running stats.
  c.tde = ml_collections.ConfigDict()
  c.tde.fuse_blocks = (2, 2, 2, 2)  # BasicBlocks in fuse_j per stage j=1..4.
  c.dcn = ml_collections.ConfigDict()
  c.dcn.offset_groups = 0         # 0: variant default (W48 12 as SPEC, W32 8, tiny 2); divides C.
  c.dcn.mask_activation = 'none'   # 'none' (reference) | 'sigmoid'.
  c.dcn.impl = 'lean'              # 'lean' (one gather, recomputing VJP) | 'gather' (autodiff).
  c.rdm_hidden = 128
  c.rdm_noisy = 'gate'           # 'gate' (reference) | 'complement' (M_n = M_t - M_u).
  c.appearance = 'aligned'       # 'aligned' (FAMI-Pose alignment) | 'key_frame'.
  c.motion = 'tde'               # 'tde' | 'none' (ablation: no motion in the fusion).
  c.head_residual = False        # Predict a correction to the backbone's heatmaps.
  c.residual_base = 'key'        # ... of the key frame | 'window': a learned frame mixture.
  c.useful_head = False          # Heatmaps from M_u alone (mi.objective='variational').
  return c


def data_config(name='synthetic'):
  """`config.data`: see tdmi_jax/data/input_pipeline.py for the meaning of each field."""
  c = ml_collections.ConfigDict()
  c.name = name                  # 'synthetic' | 'posetrack17' | 'posetrack18' | 'posetrack21'.
  c.manual_dir = ''              # Where the user's PoseTrack download (or synthetic data) lives.
  c.data_dir = ''                # TFDS data_dir for the built array_record files.
  c.image_size = (384, 288)      # (H, W) of the crop.
  c.heatmap_size = (96, 72)      # (H, W) of the heatmaps.
  c.sigma = 3.0
  c.window = (-2, -1, 1, 2)      # Supporting frame offsets around the key frame.
  c.aspect_ratio = 0.75          # w / h of the crop.
  c.box_enlarge = 1.25
  c.det_boxes = ''               # Val detector boxes (DCPose list or COCO results format).
  c.det_score_thresh = 0.2
  c.use_gt_boxes_for_val = False
  c.on_bad_input = 'error'       # 'error' | 'skip' (skip and count in the log).
  c.missing_support_frame = 'error'  # 'error' | 'key_frame' (window file absent on disk).
  c.num_workers = 2              # Train: grain worker processes (0: a thread here); eval: threads.
  c.jpeg_draft = True            # Decode JPEGs at 1/2..1/8 size when the crop shrinks that much.
  c.prefetch = 2                 # Training batches each worker prepares ahead.
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.flip_prob = 0.5
  c.augment.half_body_prob = 0.3
  c.augment.half_body_min_joints = 8
  c.augment.scale_factor = 0.35
  c.augment.rotation_factor = 45.0
  c.augment.rotation_prob = 0.6
  return c


def optim_config():
  """`config.optim`: see tdmi_jax/optim.py. SPEC §7 recipe: Adam, lr 1e-3, x0.1 decays."""
  c = ml_collections.ConfigDict()
  c.name = 'adam'                # 'adam' | 'adamw'.
  c.learning_rate = 1e-3
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 1e-4          # AdamW only.
  c.decay_epochs = (8, 12, 16)   # Multiply the lr by decay_factor at these epochs.
  c.decay_steps = ()             # Also decay at these steps (for step-budgeted runs).
  c.decay_factor = 0.1
  c.warmup_epochs = 0.0          # Linear warmup from 0 (fractional epochs allowed).
  c.grad_clip_norm = 0.0         # Global-norm clipping; 0 disables it.
  return c


def checkpoint_config():
  """`config.checkpoint`: see tdmi_jax/checkpointing.py."""
  c = ml_collections.ConfigDict()
  c.every_steps = 1000           # Also written at the end and on SIGTERM/SIGINT.
  c.max_to_keep = 3              # Most recent checkpoints kept; None keeps all.
  c.keep_period = 0              # Also keep every step that is a multiple of this (0: none).
  return c


def mi_config():
  """`config.mi`: the MI terms of the objective, see tdmi_jax/losses.py (SPEC §6)."""
  c = ml_collections.ConfigDict()
  c.enabled = True               # False: the loss is the heatmap MSE alone.
  c.objective = 'reference'      # 'reference' (the seven terms) | 'variational' (losses.py).
  # 'reference' (literal surrogate, bounded) | 'kl' (proper KL(q||p); with the reference
  # signs unbounded below: experiments only, logs a warning).
  c.divergence = 'reference'
  c.estimator = 'divergence'     # 'divergence' | 'club' (vCLUB bound replaces I_un).
  c.alpha = 1.0                  # Weight of L_motion.
  c.beta = 1.0                   # Weight of L_mm (multi-modal).
  c.gamma = 1.0                  # Weight of L_reg (regularisation).
  c.tau = 0.05                   # Temperature of the spatial softmaxes.
  # 'variational' objective weights: vCLUB I(M_u; M_n) (down), the M_u heatmap head's
  # MSE (I(M_u; Y) up), InfoNCE I(M_t; M_u) (up). model.useful_head must be True if w_uy > 0.
  c.w_un = 1.0
  c.w_uy = 1.0
  c.w_mu = 0.0
  c.nce_tau = 0.1
  # MI warm-up: every MI term is multiplied by 0 before warmup_steps, then ramps to 1
  # over ramp_steps (the vCLUB critic trains from step 0).
  c.warmup_steps = 0
  c.ramp_steps = 0
  c.club = ml_collections.ConfigDict()
  c.club.hidden = 64             # Hidden width of each head of mi.Club.
  c.club.learning_rate = 1e-3    # Adam lr of the CLUB network's own optimizer.
  return c
