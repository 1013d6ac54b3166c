"""tdmi_jax.experiments.hard_frames: protocol, output schema, and a real --quick run."""

import json
import math
import os

from tdmi_jax import train
from tdmi_jax.experiments import hard_frames

COLUMNS = ['Head', 'Shou', 'Elb', 'Wri', 'Hip', 'Knee', 'Ankl', 'Total']
VARIANTS = ['single_frame', 'tdmi_no_mi', 'tdmi_kl', 'tdmi_reference', 'tdmi_club']


def _check_schema(path, variants):
  with open(path) as f:
    results = json.load(f)
  assert list(results) == variants
  for v in variants:
    assert sorted(results[v]) == ['clean', 'degraded']
    for subset in ('clean', 'degraded'):
      assert list(results[v][subset]) == COLUMNS
      for c in COLUMNS:
        x = results[v][subset][c]
        assert isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 100
  return results


def test_protocol_and_outputs(tmp_path, monkeypatch):
  """Every variant gets the protocol's config; outputs hold seed means and std."""
  calls = []

  def fake_train(config, workdir, mode):
    calls.append((config, workdir, mode))
    # A score that depends on variant and seed, so means and stds are checkable.
    name = os.path.basename(workdir)
    base = 10.0 * hard_frames.VARIANTS.index(name.rsplit('_s', 1)[0]) + config.seed
    ev = {f'map_{s}/{c}': base + (5.0 if s == 'clean' else 0.0)
          for s in ('clean', 'degraded') for c in COLUMNS}
    ev.update({f'map/{c}': base for c in COLUMNS})
    return {'train': {'loss': 0.5, 'heatmap_loss': 0.5}, 'eval': ev}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(hard_frames, '_decay_at', lambda config, steps, data_root: None)
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '7', '--seeds', '0,1'])

  assert len(calls) == 10
  by_name = {os.path.basename(w): c for c, w, _ in calls}
  for seed in (0, 1):
    sf = by_name[f'single_frame_s{seed}']
    assert sf.model.arch == 'single_frame' and not sf.model.backbone.frozen
    assert sf.model.backbone.bn == 'live' and not sf.init_from
    for v in VARIANTS[1:]:
      c = by_name[f'{v}_s{seed}']
      assert c.model.arch == 'tdmi' and c.model.backbone.frozen
      assert c.model.backbone.bn == 'frozen' and c.init_from_kind == 'backbone'
      assert c.init_from == os.path.join(str(tmp_path), 'runs', f'single_frame_s{seed}')
      # One dataset, one budget for all.
      assert c.data.manual_dir == sf.data.manual_dir and c.data.data_dir == sf.data.data_dir
      for key in ('seed', 'num_train_steps', 'batch_size'):
        assert c[key] == sf[key]
      assert c.optim.to_dict() == sf.optim.to_dict()
    mi = {v: by_name[f'{v}_s{seed}'].mi for v in VARIANTS[1:]}
    assert not mi['tdmi_no_mi'].enabled
    assert (mi['tdmi_kl'].enabled, mi['tdmi_kl'].divergence, mi['tdmi_kl'].estimator) == (
        True, 'kl', 'divergence')
    assert mi['tdmi_reference'].divergence == 'reference'
    assert mi['tdmi_reference'].estimator == 'divergence'
    assert mi['tdmi_club'].estimator == 'club' and mi['tdmi_club'].divergence == 'kl'
  assert {c.num_train_steps for c, _, _ in calls} == {7}

  results = _check_schema(tmp_path / 'results.json', VARIANTS)
  # Means over seeds 0 and 1: base + 0.5.
  assert results['tdmi_kl']['degraded']['Total'] == 20.5
  assert results['tdmi_kl']['clean']['Head'] == 25.5
  md = (tmp_path / 'results.md').read_text()
  assert '| tdmi_kl | 2 | 25.5 ± 0.7 |' in md   # std (ddof=1) of 25 and 26.
  assert (tmp_path / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # Finished runs are cached: a rerun trains nothing and gives the same table.
  calls.clear()
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '7', '--seeds', '0,1'])
  assert not calls
  assert _check_schema(tmp_path / 'results.json', VARIANTS) == results


def test_diverged_run_is_reported(tmp_path, monkeypatch):
  def fake_train(config, workdir, mode):
    del workdir, mode
    if config.model.arch == 'tdmi' and config.mi.divergence == 'kl' and config.mi.enabled:
      raise train.NonFiniteLossError('Loss is nan at step 3')
    ev = {f'map_{s}/{c}': 40.0 for s in ('clean', 'degraded') for c in COLUMNS}
    return {'train': {'loss': 0.1}, 'eval': ev}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(hard_frames, '_decay_at', lambda config, steps, data_root: None)
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '3', '--seeds', '0'])
  results = _check_schema(tmp_path / 'results.json', VARIANTS)
  assert results['tdmi_kl']['degraded']['Total'] == 0.0
  assert results['tdmi_reference']['degraded']['Total'] == 40.0
  md = (tmp_path / 'results.md').read_text()
  assert '| tdmi_kl s0 | diverged |' in md and '| tdmi_club s0 | diverged |' in md


def test_quick_real_run(tmp_path):
  """The real pipeline end to end (synthesis, training, PoseTrack mAP) on the baseline.

  One variant only: each TDMI variant costs a ~1 minute XLA compile on a 2-core CPU; the
  protocol of the other variants is covered by test_protocol_and_outputs.
  """
  hard_frames.main(['--workdir', str(tmp_path), '--quick', '--steps', '2',
                    '--variants', 'single_frame'])
  _check_schema(tmp_path / 'results.json', ['single_frame'])
  run = json.loads((tmp_path / 'runs' / 'single_frame_s0' / 'result.json').read_text())
  assert run['status'] == 'ok' and run['steps'] == 2
  assert math.isfinite(run['train']['loss'])
  assert (tmp_path / 'results.png').exists() and (tmp_path / 'results.md').exists()
  assert os.path.isdir(tmp_path / 'data' / 'synthetic' / 'annotations' / 'val')


def test_signal_stopped_run_is_not_cached(tmp_path, monkeypatch):
  """A run stopped by SIGTERM exits non-zero and is retrained (resumed) by the rerun."""
  def stopped(config, workdir, mode):
    del config, workdir, mode
    return {'stopped_at': 2}

  monkeypatch.setattr(train, 'train_and_evaluate', stopped)
  monkeypatch.setattr(hard_frames, '_decay_at', lambda config, steps, data_root: None)
  try:
    hard_frames.main(['--workdir', str(tmp_path), '--steps', '3', '--seeds', '0'])
  except SystemExit as e:
    assert 'single_frame seed 0 stopped' in str(e)
  else:
    raise AssertionError('a stopped run must not look finished')
  assert not (tmp_path / 'runs' / 'single_frame_s0' / 'result.json').exists()


def test_report_only_tabulates_finished_runs(tmp_path, monkeypatch):
  def fake_train(config, workdir, mode):
    del workdir, mode
    ev = {f'map_{s}/{c}': 30.0 + config.seed for s in ('clean', 'degraded') for c in COLUMNS}
    return {'train': {'loss': 0.1}, 'eval': ev}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(hard_frames, '_decay_at', lambda config, steps, data_root: None)
  # Two seeds run as two separate invocations, then gathered without training.
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '3', '--seeds', '0'])
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '3', '--seeds', '1'])
  monkeypatch.setattr(train, 'train_and_evaluate', None)  # Any training call would fail.
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '3', '--seeds', '0,1',
                    '--report_only'])
  results = _check_schema(tmp_path / 'results.json', VARIANTS)
  assert results['tdmi_club']['clean']['Total'] == 30.5
  assert '| tdmi_club | 2 | 30.5 ± 0.7 |' in (tmp_path / 'results.md').read_text()


def test_mi_weight_scales_only_mi_variants(tmp_path, monkeypatch):
  calls = []

  def fake_train(config, workdir, mode):
    del workdir, mode
    calls.append(config)
    return {'train': {}, 'eval': {}}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(hard_frames, '_decay_at', lambda config, steps, data_root: None)
  hard_frames.main(['--workdir', str(tmp_path), '--steps', '3', '--seeds', '0',
                    '--mi_weight', '0.01', '--variants', 'tdmi_reference'])
  assert [c.model.arch for c in calls] == ['single_frame', 'tdmi']
  mi = calls[1].mi
  assert (mi.alpha, mi.beta, mi.gamma, mi.divergence) == (0.01, 0.01, 0.01, 'reference')
  assert list(json.loads((tmp_path / 'results.json').read_text())) == ['tdmi_reference']
