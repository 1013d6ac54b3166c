"""poseval's tracking metrics (tdmi_jax.evaluation.tracking): hand-built cases with known
values, golden cases from the official tool, motmetrics' own accumulator, bad input."""

import json
import pathlib

import motmetrics as mm
import numpy as np
import pytest

from tdmi_jax import keypoints
from tdmi_jax.evaluation import posetrack_map
from tdmi_jax.evaluation import tracking
import tracking_cases

GOLDEN = pathlib.Path(__file__).resolve().parent / 'testdata' / 'tracking_golden'
NAMES = keypoints.POSEVAL_JOINT_NAMES


def _evaluate(case, tmp_path, gt_format='2018', pred_format='2018'):
  tracking_cases.write_case(case, tmp_path, gt_format, pred_format)
  return tracking.evaluate_dirs(str(tmp_path / 'gt'), str(tmp_path / 'pred'))


def _every_joint(result, **want):
  for name in NAMES:
    for k, v in want.items():
      assert result['per_joint'][name][k] == pytest.approx(v, abs=1e-9), (name, k)
  for k, v in want.items():
    assert result['total'][k] == pytest.approx(v, abs=1e-9), k


# --- Hand-built cases: the values follow from poseval's rules by hand ---------------------


def test_gt_as_predictions_is_perfect(tmp_path):
  case, gf, pf = tracking_cases.hand_cases()['perfect']
  _every_joint(_evaluate(case, tmp_path, gf, pf), MOTA=100, MOTP=100, Prec=100, Rec=100)


@pytest.mark.parametrize('fmt', ['2018', '2017'])
def test_one_identity_switch(tmp_path, fmt):
  case, _, _ = tracking_cases.hand_cases()['one_switch']
  # 5 frames, the last left out: 2 people x 4 frames = 8 objects per joint, 1 switch.
  _every_joint(_evaluate(case, tmp_path, fmt, fmt), MOTA=100 * (1 - 1 / 8), MOTP=100,
               Prec=100, Rec=100)


@pytest.mark.parametrize('fmt', ['2018', '2017'])
def test_one_missed_person(tmp_path, fmt):
  case, _, _ = tracking_cases.hand_cases()['one_miss']
  _every_joint(_evaluate(case, tmp_path, fmt, fmt), MOTA=100 * 7 / 8, Rec=100 * 7 / 8,
               Prec=100, MOTP=100)


def test_track_that_leaves_and_returns(tmp_path):
  case, gf, pf = tracking_cases.hand_cases()['leave_and_return']
  # Two videos of 8 tracked objects each; only the return under a new id is a switch.
  _every_joint(_evaluate(case, tmp_path, gf, pf), MOTA=100 * (1 - 1 / 16), Rec=100)


def test_missing_track_ids_are_handed_out_by_position(tmp_path):
  case, gf, pf = tracking_cases.hand_cases()['missing_ids']
  # Frame 1: a takes b's id 2 (a switch), b has no joints (a miss). Frame 2: a takes id 2
  # again (kept), b takes the id 8 of a person without joints (a switch). 6 objects.
  _every_joint(_evaluate(case, tmp_path, gf, pf), MOTA=100 * (1 - 3 / 6),
               Rec=100 * 5 / 6, Prec=100)


def test_empty_frames_unlabeled_frames_and_ignore_regions(tmp_path):
  case, gf, pf = tracking_cases.hand_cases()['empty_and_ignore']
  # Frame 1 has no prediction and frame 4 no GT left (ignore region): one stand-in object
  # and false positive each. Frame 2 is unlabeled (dropped), frame 3's region removes b,
  # frame 5 adds a false positive, frame 6 is the last (left out). Objects: 2+1+1+1+2.
  _every_joint(_evaluate(case, tmp_path, gf, pf), MOTA=100 * 2 / 7, Rec=100 * 5 / 7,
               Prec=100 * 5 / 8, MOTP=100)


def test_table_has_poseval_layout(tmp_path):
  case, gf, pf = tracking_cases.hand_cases()['one_switch']
  lines = tracking.format_table(_evaluate(case, tmp_path, gf, pf)).splitlines()
  assert lines[0] == '&' + ' MOTA &' * 8 + ' MOTP & Prec & Rec  \\\\'
  assert lines[1] == ('& Head & Shou & Elb  & Wri  & Hip  & Knee & Ankl & Total& Total& '
                      'Total& Total\\\\')
  assert lines[2] == '& 87.5 & 87.5 & 87.5 & 87.5 & 87.5 & 87.5 & 87.5 & 87.5 &100.0 &100.0 ' \
      '&100.0 \\\\'


def test_video_with_one_labeled_frame_adds_nothing(tmp_path):
  # poseval drops each video's last frame (and stops with an IndexError on such a video).
  case, _, _ = tracking_cases.hand_cases()['one_switch']
  single = {'name': '000009_mpii_test', 'frames': case[0]['frames'][:1]}
  want = _evaluate(case, tmp_path / 'a')
  got = _evaluate(case + [single], tmp_path / 'b')
  assert got == want


# --- Golden cases: the official poseval's numbers --------------------------------------


def _golden_cases():
  return sorted(p.name for p in GOLDEN.iterdir() if (p / 'expected.json').is_file())


@pytest.mark.parametrize('name', _golden_cases())
def test_golden_case_matches_official_poseval(name):
  case = GOLDEN / name
  expected = json.loads((case / 'expected.json').read_text())
  got = tracking.evaluate_dirs(str(case / 'gt'), str(case / 'pred'))
  for joint in NAMES:
    for k in tracking.METRICS:
      want = expected['per_joint'][joint][k]
      assert got['per_joint'][joint][k] == pytest.approx(
          np.nan if want is None else want, abs=1e-6, nan_ok=True), (joint, k)
  for k in tracking.METRICS:
    assert got['total'][k] == pytest.approx(expected['total'][k], abs=1e-6), k


def test_golden_ap_cases_match_official_tracking_numbers(poseval_golden):
  expected = json.loads((GOLDEN / 'shared_poseval_golden.json').read_text())
  assert set(expected) == {'case3', 'case4'}
  for name, want in expected.items():
    got = tracking.evaluate_dirs(str(poseval_golden / name / 'gt'),
                                 str(poseval_golden / name / 'pred'))
    for k in tracking.METRICS:
      assert got['total'][k] == pytest.approx(want['total'][k], abs=1e-6), (name, k)
      for joint in NAMES:
        assert got['per_joint'][joint][k] == pytest.approx(
            want['per_joint'][joint][k], abs=1e-6), (name, joint, k)


# --- The accumulator against motmetrics' own ----------------------------------------------


def _random_stream(rng, num_frames, ids=8, repeats=False):
  """Frames of (object ids, hypothesis ids, distances with NaN) for one joint."""
  frames = []
  for _ in range(num_frames):
    o = rng.choice(ids, int(rng.integers(0, 6)), replace=repeats)
    h = rng.choice(ids + 4, int(rng.integers(0, 7)), replace=False)
    d = np.round(rng.random((len(o), len(h))) * 0.5, int(rng.choice([1, 3])))
    d[rng.random(d.shape) < 0.5] = np.nan
    frames.append((o, h, d))
  return frames


def _motmetrics_counts(frames):
  acc = mm.MOTAccumulator(auto_id=True)
  for o, h, d in frames:
    acc.update(o, h, d)
  m = mm.metrics.create().compute(
      acc, metrics=['num_misses', 'num_switches', 'num_false_positives', 'num_objects',
                    'num_matches'], return_dataframe=False)
  s = acc.events['D'].sum()  # poseval's MOTP sums every event's distance, RAW included.
  return [m['num_objects'], m['num_misses'], m['num_false_positives'], m['num_matches'],
          m['num_switches'], 0.0 if np.isnan(s) else s]


def _our_counts(streams, sequential=False):
  """Runs equally long streams (one per video) through tracking.update at once."""
  ids = 16
  st = tracking._State(1, ids * len(streams) + 1, ids * len(streams) + 1)
  c = tracking.Counts.zeros(1)
  for frame in zip(*streams):
    g = max(len(o) for o, _, _ in frame) or 1
    p = max(len(h) for _, h, _ in frame) or 1
    o_pad = np.full((len(frame), g), ids * len(streams))
    h_pad = np.full((len(frame), p), ids * len(streams))
    gh = np.zeros((len(frame), 1, g), bool)
    ph = np.zeros((len(frame), 1, p), bool)
    d_pad = np.full((len(frame), 1, g, p), np.nan)
    for v, (o, h, d) in enumerate(frame):
      o_pad[v, :len(o)] = o + ids * v
      h_pad[v, :len(h)] = h + ids * v
      gh[v, 0, :len(o)] = True
      ph[v, 0, :len(h)] = True
      d_pad[v, 0, :len(o), :len(h)] = d
    if sequential:
      for v in range(len(frame)):
        tracking._update_sequential(st, c, o_pad[v], h_pad[v], gh[v], ph[v], d_pad[v])
    else:
      tracking.update(st, c, o_pad, h_pad, gh, ph, d_pad)
  return c


@pytest.mark.parametrize('seed', range(4))
def test_update_counts_as_motmetrics(seed):
  rng = np.random.default_rng(seed)
  streams = [_random_stream(rng, 12) for _ in range(3)]
  want = np.sum([_motmetrics_counts(s) for s in streams], axis=0)
  for sequential in (False, True):
    c = _our_counts(streams, sequential)
    got = [c.objects[0], c.misses[0], c.false_positives[0], c.matches[0], c.switches[0],
           c.sum_d[0]]
    np.testing.assert_allclose(got, want, atol=1e-9, err_msg=f'sequential={sequential}')


def test_sequential_update_handles_repeated_object_ids_as_motmetrics():
  rng = np.random.default_rng(7)
  checked = 0
  for _ in range(40):
    stream = _random_stream(rng, 8, ids=4, repeats=True)
    try:
      want = _motmetrics_counts(stream)
    except KeyError:  # motmetrics' own failure on a repeated id; ours is an error too.
      with pytest.raises(posetrack_map.EvalInputError, match='appears twice'):
        _our_counts([stream], sequential=True)
      continue
    c = _our_counts([stream], sequential=True)
    np.testing.assert_allclose(
        [c.objects[0], c.misses[0], c.false_positives[0], c.matches[0], c.switches[0],
         c.sum_d[0]], want, atol=1e-9)
    checked += 1
  assert checked > 10


# --- Bad input ---------------------------------------------------------------------------


def test_2018_person_without_track_id_is_an_error_naming_the_file(tmp_path):
  case, _, _ = tracking_cases.hand_cases()['perfect']
  case[0]['frames'][1]['pred'][0]['track_id'] = None
  with pytest.raises(posetrack_map.EvalInputError, match=r'pred/000001_mpii_test\.json.*'
                     'no track_id'):
    _evaluate(case, tmp_path)


def test_2017_frame_with_too_few_track_ids_is_an_error(tmp_path):
  case, _, _ = tracking_cases.hand_cases()['perfect']
  case[0]['frames'][1]['pred'][1]['track_id'] = None  # The last person has joints.
  with pytest.raises(posetrack_map.EvalInputError, match=r'000001_mpii_test\.json: frame 1 '
                     'has more people with joints than track ids'):
    _evaluate(case, tmp_path, '2017', '2017')


def test_repeated_prediction_track_id_in_a_frame_is_an_error(tmp_path):
  case, _, _ = tracking_cases.hand_cases()['perfect']
  case[0]['frames'][0]['pred'][1]['track_id'] = case[0]['frames'][0]['pred'][0]['track_id']
  with pytest.raises(posetrack_map.EvalInputError, match='track_id 1 twice'):
    _evaluate(case, tmp_path)
