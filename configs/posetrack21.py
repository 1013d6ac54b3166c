r"""PoseTrack21: the full TDMI recipe (HRNet-W48 frozen, 384x288, Adam 1e-3, 20 epochs).

Command (PoseTrack21 download with `images/` and `posetrack_data/`; COCO HRNet-W48
converted with `python -m tdmi_jax.convert_torch`):

  python launch.py --config=configs/posetrack21.py --workdir=runs/pt21 \
    --config.data.manual_dir=/data/PoseTrack21 --config.init_from=/ckpt/hrnet_w48_coco

Variants: `:variant=hrnet_w48|hrnet_w32|tiny`, and `runlocal` (tiny model, small crops,
a few steps).

Expected result: the paper's number as quoted by later work is 83.8 val mAP (Total) on
PoseTrack21 (SPEC §9). This project has not measured it yet.
"""

from configs import posetrack18


def get_config(arg=None):
  return posetrack18.recipe('posetrack21', arg)
