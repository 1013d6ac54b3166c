r"""PoseTrack17: the full TDMI recipe (HRNet-W48 frozen, 384x288, Adam 1e-3, 20 epochs).

Command (PoseTrack17 in the official or DCPose layout, see the error text for the layout;
COCO HRNet-W48 converted with `python -m tdmi_jax.convert_torch`):

  python launch.py --config=configs/posetrack17.py --workdir=runs/pt17 \
    --config.data.manual_dir=/data/PoseTrack17 --config.init_from=/ckpt/hrnet_w48_coco

Variants: `:variant=hrnet_w48|hrnet_w32|tiny`, and `runlocal` (tiny model, small crops,
a few steps).

Expected result: the paper reports 85.9 val mAP (Total) on PoseTrack17 (per joint: Head
90.6, Shou 91.0, Elb 87.2, Wri 81.5, Hip 85.2, Knee 84.5, Ankl 78.7; SPEC §9). This project
has not measured it yet.
"""

from configs import posetrack18


def get_config(arg=None):
  return posetrack18.recipe('posetrack17', arg)
