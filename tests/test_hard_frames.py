"""tdmi_jax.experiments.hard_frames: statistics, protocol, feature cache, a real --quick run."""

import json
import math
import os

import jax
import numpy as np
import pytest

from tdmi_jax import sharding
from tdmi_jax import state as state_lib
from tdmi_jax import train_step as train_step_lib
from tdmi_jax.data import input_pipeline
from tdmi_jax.experiments import hard_frames
from tdmi_jax.models import tdmi

COLUMNS = ['Head', 'Shou', 'Elb', 'Wri', 'Hip', 'Knee', 'Ankl', 'Total']


# --- Statistics on made-up numbers -------------------------------------------------------


def test_mean_ci_matches_the_t_interval():
  mean, half = hard_frames.mean_ci([1.0, 2.0, 3.0])
  # s = 1, n = 3, t(0.975, 2) = 4.303.
  assert mean == pytest.approx(2.0)
  assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
  assert hard_frames.mean_ci([5.0]) == (5.0, 0.0)


def test_paired_difference_against_a_deterministic_baseline():
  per_seed = {0: {'clean': 70.0, 'degraded': 50.0}, 1: {'clean': 71.0, 'degraded': 54.0},
              2: {'clean': 69.0, 'degraded': 52.0}}
  base = {0: {'clean': 70.0, 'degraded': 45.0}}   # One evaluation stands for every seed.
  d = hard_frames.paired_difference(per_seed, base, 'degraded')
  assert d['per_seed'] == {'0': 5.0, '1': 9.0, '2': 7.0}
  assert d['mean'] == pytest.approx(7.0)
  half = 4.303 * 2.0 / math.sqrt(3)
  assert d['ci95'] == pytest.approx([7.0 - half, 7.0 + half])
  # Paired by seed when the baseline has every seed.
  base3 = {s: {'clean': 70.0, 'degraded': 45.0 + s} for s in range(3)}
  assert hard_frames.paired_difference(per_seed, base3, 'degraded')['per_seed'] == {
      '0': 5.0, '1': 8.0, '2': 5.0}


def _run(variant, seed, clean, degraded, status='ok'):
  r = {'variant': variant, 'seed': seed, 'status': status, 'wall_s': 1.0, 'train': {}}
  r['clean'] = {c: clean for c in COLUMNS}
  r['degraded'] = {c: degraded for c in COLUMNS}
  r['all'] = {c: (2 * clean + degraded) / 3 for c in COLUMNS}
  return r


def test_aggregate_schema_and_outputs(tmp_path):
  runs = [_run('single_frame', 0, 70.0, 45.0)]
  runs += [_run('tdmi_no_mi', s, 70.0 + s, 50.0 + 2 * s) for s in range(3)]
  runs += [_run('tdmi_variational', s, 71.0, 55.0 + s) for s in range(3)]
  doc = hard_frames.aggregate(runs, 'tdmi_variational')
  assert doc['default_variant'] == 'tdmi_variational'
  assert list(doc['variants']) == ['single_frame', 'tdmi_no_mi', 'tdmi_variational']
  for name, e in doc['variants'].items():
    assert isinstance(e['mi_enabled'], bool)
    for subset in ('clean', 'degraded'):
      assert list(e[subset]) == COLUMNS
    assert all(set(v) == {'clean', 'degraded'} for v in e['per_seed'].values())
  assert doc['variants']['single_frame']['mi_enabled'] is False
  assert doc['variants']['tdmi_no_mi']['mi_enabled'] is False
  assert doc['variants']['tdmi_variational']['mi_enabled'] is True
  assert doc['variants']['tdmi_no_mi']['degraded']['Total'] == pytest.approx(52.0)
  assert doc['variants']['tdmi_variational']['vs_single_frame']['degraded']['mean'] == (
      pytest.approx(11.0))
  hard_frames.write_outputs(str(tmp_path), doc, 'cmd', 60.0, out_dir=str(tmp_path / 'out'))
  for name in ('results.json', 'results.md', 'results.png'):
    assert (tmp_path / 'out' / name).stat().st_size > 0
  md = (tmp_path / 'results.md').read_text()
  assert '| tdmi_variational | 3 |' in md and '+11.0' in md
  assert json.loads((tmp_path / 'results.json').read_text()) == json.loads(json.dumps(doc))


# --- Protocol ------------------------------------------------------------------------------


def test_every_variant_starts_from_the_shipped_frozen_backbone(tmp_path):
  data_root = str(tmp_path)
  default = hard_frames.default_variant_name()
  base = hard_frames.make_config(default, 0, 10, data_root, quick=False)
  assert base.init_from == 'shipped:synthetic_small'
  for name, (overrides, _) in hard_frames.VARIANTS.items():
    c = hard_frames.make_config(name, 1, 10, data_root, quick=False)
    assert c.model.backbone.frozen and c.model.backbone.bn == 'frozen'
    assert c.init_from == base.init_from and c.seed == 1 and c.num_train_steps == 10
    assert c.data.manual_dir == os.path.join(data_root, 'synthetic')
    if overrides is None:
      assert c.model.arch == 'single_frame'
    else:
      assert c.model.arch == 'tdmi'
      for k, v in overrides.items():
        node = c
        for part in k.split('.'):
          node = node[part]
        assert node == v, (name, k)
  assert hard_frames.make_config('tdmi_motion_only', 0, 1, data_root, False).model.appearance == (
      'key_frame')
  assert hard_frames.make_config('tdmi_appearance_only', 0, 1, data_root, False).model.motion == (
      'none')


def test_cached_step_gives_the_uncached_loss(tmp_path):
  config = hard_frames.make_config('tdmi_variational', 0, 2, str(tmp_path), quick=True)
  config.init_from = ''  # Random frozen backbone: the cache must reproduce it all the same.
  input_pipeline.prepare_data(config, str(tmp_path))
  mesh = sharding.make_mesh()
  model = tdmi.build_model(config.model)
  _, state, mask, tx, schedule, club_tx = state_lib.create_state(config, mesh, 4)
  step = train_step_lib.make_train_step(model=model, config=config, tx=tx, schedule=schedule,
                                        mask=mask, mesh=mesh, club_tx=club_tx)
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  cache = hard_frames.cache_features(config, model, variables, 2 * config.batch_size,
                                     config.batch_size)
  data = input_pipeline.TrainData(config.data, config.batch_size, config.seed)
  plain = sharding.shard_batch(data.batch(1), mesh, train_step_lib.TRAIN_KEYS)
  cached = sharding.shard_batch(hard_frames.cached_batch(cache, 1, config.batch_size), mesh)
  state2 = jax.tree.map(lambda x: x.copy(), state)  # The step donates its input state.
  _, m_plain = step(state, plain)
  _, m_cached = step(state2, cached)
  for k in ('loss', 'heatmap_loss', 'mi/L_uy'):
    np.testing.assert_allclose(float(m_cached[k]), float(m_plain[k]), rtol=2e-4, err_msg=k)


# --- A real run ------------------------------------------------------------------------------


def test_every_variant_traces_its_model_and_objective(tmp_path):
  # Shape-level run of every variant (no compile: the suite cannot afford one per
  # variant); the real --quick run below trains three of them end to end.
  from tdmi_jax import losses  # pylint: disable=g-import-not-at-top
  from tdmi_jax.models import mi  # pylint: disable=g-import-not-at-top
  for name in hard_frames.VARIANTS:
    config = hard_frames.make_config(name, 0, 2, str(tmp_path), quick=True)
    model = tdmi.build_model(config.model)
    h, w = config.data.image_size
    frames = jax.ShapeDtypeStruct((2, 5, h, w, 3), np.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), frames)
    hm, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, frames)
    hh, ww = config.data.heatmap_size
    assert hm.shape == (2, hh, ww, 17), name
    batch = {'target': jax.ShapeDtypeStruct(hm.shape, np.float32),
             'target_weight': jax.ShapeDtypeStruct((2, 17), np.float32),
             'mask': jax.ShapeDtypeStruct((2,), np.float32)}
    cv = None
    if losses.uses_club(config.mi) and 'useful' in aux:
      cv = jax.eval_shape(lambda: mi.init_club(jax.random.key(0), config.mi,
                                               aux['useful'].shape[-1]))
    loss, _ = jax.eval_shape(
        lambda h_, a, b, c: losses.objective(h_, a, b, config.mi, club_variables=c),
        hm, aux, batch, cv)
    assert loss.shape == (), name


def test_quick_real_run(tmp_path):
  # The backbone alone and the default; every other variant's model and objective are
  # traced by the test above (one more trained variant here costs a compile and a run).
  variants = ['single_frame', 'tdmi_no_mi']
  doc = hard_frames.main(['--workdir', str(tmp_path), '--quick', '--variants', ','.join(variants)])
  assert list(doc['variants']) == variants
  assert doc['default_variant'] in doc['variants']
  for name, e in doc['variants'].items():
    assert e['status'] == ['ok'], name
    for subset in ('clean', 'degraded'):
      assert all(math.isfinite(e[subset][c]) and 0 <= e[subset][c] <= 100 for c in COLUMNS)
  for name in ('results.json', 'results.md', 'results.png'):
    assert (tmp_path / name).is_file()
  # A finished run is not repeated: a second call only reads the result files.
  before = {p: p.stat().st_mtime for p in (tmp_path / 'runs').glob('*/result.json')}
  hard_frames.main(['--workdir', str(tmp_path), '--quick', '--variants', 'tdmi_no_mi'])
  after = {p: p.stat().st_mtime for p in (tmp_path / 'runs').glob('*/result.json')}
  assert before == after


def test_window_oracle_rules_and_cli(tmp_path):
  from tdmi_jax.experiments import window_oracle  # pylint: disable=g-import-not-at-top
  h = np.random.default_rng(0).uniform(size=(2, 5, 4, 3, 17)).astype(np.float32)
  h[:, 2] += 100.0  # The key frame: only rules that read it see this.
  np.testing.assert_allclose(window_oracle.RULES['neighbours'](h), (h[:, 1] + h[:, 3]) / 2)
  np.testing.assert_allclose(window_oracle.RULES['key'](h), h[:, 2])
  assert window_oracle.RULES['max5'](h).min() >= 100.0
  out = window_oracle.main(['--workdir', str(tmp_path), '--config_arg', 'runlocal',
                            '--rules', 'key,neighbours'])
  assert set(out) == {'key', 'neighbours'}
  for row in out.values():
    assert 0.0 <= row['all'] <= 100.0
  assert json.loads((tmp_path / 'oracle.json').read_text()) == out
  assert out['key'] != out['neighbours']
  with pytest.raises(SystemExit):
    window_oracle.main(['--workdir', str(tmp_path), '--rules', 'median'])
