"""The shipped synthetic-pretrained backbone: present, hash-checked, and it fits its config."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from tdmi_jax import checkpointing
from tdmi_jax import shipped
from tdmi_jax.models import layers
from tdmi_jax.models import tdmi


def test_shipped_backbone_hash_and_fit():
  entry = shipped.SHIPPED['synthetic_small']
  file = shipped.path('synthetic_small')
  assert file.stat().st_size < 4 * 2 ** 20          # "A few MB at most."
  assert shipped.sha256(file) == entry['sha256']
  raw = checkpointing.load_pretrained('shipped:synthetic_small')
  assert layers.count_params(raw['params']) == 583201        # The `small` HRNet row.
  cfg = synthetic.get_config()
  assert cfg.init_from == 'shipped:synthetic_small' and cfg.model.variant == entry['variant']
  model = tdmi.build_model(cfg.model)
  h, w = cfg.data.image_size
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, h, w, 3)), train=False))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  merged = checkpointing.apply_pretrained(variables, raw, 'backbone')
  np.testing.assert_array_equal(
      merged['params']['backbone']['final_layer']['kernel'],
      raw['params']['final_layer']['kernel'])


def test_altered_or_missing_weights_are_named(tmp_path, monkeypatch):
  copy = tmp_path / 'weights'
  copy.mkdir()
  shutil.copy(shipped.path('synthetic_small'), copy)
  monkeypatch.setattr(shipped, 'WEIGHTS_DIR', copy)
  data = bytearray((copy / 'synthetic_small.msgpack').read_bytes())
  data[-1] ^= 0xFF
  (copy / 'synthetic_small.msgpack').write_bytes(bytes(data))
  with pytest.raises(shipped.WeightsError, match='synthetic_small.msgpack: sha256'):
    shipped.load('synthetic_small')
  (copy / 'synthetic_small.msgpack').unlink()
  with pytest.raises(shipped.WeightsError, match='missing'):
    shipped.load('synthetic_small')
  with pytest.raises(shipped.WeightsError, match='known'):
    checkpointing.load_pretrained('shipped:nope')
