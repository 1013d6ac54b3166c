"""Pretrained weights: the public entry points.

`load_torch_hrnet(path_or_state_dict, extra, num_joints=17) -> (model, variables)` builds the
flax HRNet for any official stage configuration (`extra` = the yaml's `MODEL.EXTRA` as a dict,
or a row name of `tdmi_jax.models.hrnet.VARIANTS`) and loads a PyTorch pose checkpoint into it;
`model.apply(variables, images_nhwc, train=False)` returns `(heatmaps_nhwc, aux)` equal to the
PyTorch network's eval-mode output. Needs the torch extra (`requirements-torch.txt`).

To start training from such a checkpoint, convert it once with
`python -m tdmi_jax.convert_torch --src FILE.pth --dst DIR --arch hrnet_w48` and pass
`--config.init_from=DIR` (`config.init_from_kind='backbone'`).
"""

from tdmi_jax import convert_torch

load_torch_hrnet = convert_torch.load_torch_hrnet
convert_state_dict = convert_torch.convert_state_dict
