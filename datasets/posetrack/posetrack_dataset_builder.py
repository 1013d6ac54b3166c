"""The `posetrack` TFDS builder where TFDS's command line looks for it.

  tfds build datasets/posetrack --config=posetrack2018 --manual_dir=/data/PoseTrack18

The builder itself is `tdmi_jax.data.records.Builder` (the input pipeline builds it on first
use). This folder is not a Python package and is not installed: an installed top-level
`datasets` would shadow Hugging Face's package of that name.
"""

from tdmi_jax.data import records


# skip_registration: `posetrack` is already registered by tdmi_jax.data.records; TFDS's
# command line finds this class through the module it was defined in.
class Builder(records.Builder, skip_registration=True):
  """`tdmi_jax.data.records.Builder` (configs posetrack2017/2018/21, synthetic)."""
