"""Crop geometry, flips, half-body boxes and heatmap targets."""

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from tdmi_jax import keypoints
from tdmi_jax.data import transforms


def _joints(rng, n=17, w=640, h=480):
  j = np.zeros((n, 3))
  j[:, 0] = rng.uniform(50, w - 50, n)
  j[:, 1] = rng.uniform(50, h - 50, n)
  j[:, 2] = 1.0
  j[3:5, 2] = 0.0  # ears, never annotated
  return j


def test_box_to_center_scale_aspect_and_enlarge():
  c, s = transforms.box_to_center_scale([100, 50, 60, 200])
  np.testing.assert_allclose(c, [130, 150])
  # Tall box: width grows to 0.75 * h, then x1.25, in units of 200 px.
  np.testing.assert_allclose(s, [150 * 1.25 / 200, 200 * 1.25 / 200], rtol=1e-6)
  _, s = transforms.box_to_center_scale([0, 0, 300, 100])
  np.testing.assert_allclose(s, [300 * 1.25 / 200, 400 * 1.25 / 200], rtol=1e-6)


@pytest.mark.parametrize('rotation', [0.0, 33.0, -80.0])
@pytest.mark.parametrize('flip', [False, True])
def test_affine_round_trip(rotation, flip):
  rng = np.random.default_rng(0)
  m = transforms.crop_matrix([321.5, 240.2], [1.3, 1.7], rotation, (288, 384), flip=flip,
                             image_width=640)
  pts = rng.uniform(-100, 700, (50, 2))
  back = transforms.transform_points(transforms.transform_points(pts, m),
                                     transforms.invert_affine(m))
  np.testing.assert_allclose(back, pts, atol=1e-3)


def test_affine_maps_center_to_crop_center_and_box_to_width():
  m = transforms.affine_matrix([300, 200], [1.0, 4 / 3], 0.0, (288, 384))
  out = transforms.transform_points(np.array([[300, 200], [400, 200]]), m)
  np.testing.assert_allclose(out[0], [144, 192], atol=1e-9)
  # 200 px of source width fill the 288 px crop width.
  np.testing.assert_allclose(out[1, 0] - out[0, 0], 144, atol=1e-9)
  # Positive rotation turns a point right of the centre upwards in the crop (HRNet's sign).
  m = transforms.affine_matrix([300, 200], [1.0, 4 / 3], 90.0, (288, 384))
  out = transforms.transform_points(np.array([[400, 200]]), m)
  np.testing.assert_allclose(out[0], [144, 192 - 144], atol=1e-6)


def test_flip_flip_is_identity_with_swaps():
  j = _joints(np.random.default_rng(1))
  once = transforms.flip_joints(j, 640)
  # Left slot now holds the mirrored right joint.
  np.testing.assert_allclose(once[5, 0], 639 - j[6, 0])
  np.testing.assert_allclose(once[6, :2], [639 - j[5, 0], j[5, 1]])
  np.testing.assert_allclose(once[0, 0], 639 - j[0, 0])
  np.testing.assert_allclose(transforms.flip_joints(once, 640), j)


def test_flipped_crop_equals_crop_of_flipped_image():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 255, (60, 80, 3), np.uint8)
  pil, pil_flipped = Image.fromarray(img), Image.fromarray(img[:, ::-1].copy())
  c, s = np.array([30.0, 25.0]), np.array([0.2, 0.2 / 0.75])
  c_f = np.array([80 - 1 - c[0], c[1]])  # the crop centre in the flipped image
  a = transforms.warp_image(pil, transforms.crop_matrix(c_f, s, 0.0, (24, 32), True, 80),
                            (24, 32), resample=Image.NEAREST)
  b = transforms.warp_image(pil_flipped, transforms.crop_matrix(c_f, s, 0.0, (24, 32)),
                            (24, 32), resample=Image.NEAREST)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('rotation', [0.0, 30.0])
def test_warp_puts_marker_where_the_matrix_says(rotation):
  img = np.zeros((200, 300, 3), np.uint8)
  img[120:123, 170:173] = 255  # 3x3 marker centred at (171, 121)
  m = transforms.crop_matrix([160, 110], [0.3, 0.4], rotation, (60, 80))
  crop = transforms.warp_image(Image.fromarray(img), m, (60, 80))
  ys, xs = np.nonzero(crop[..., 0] > 0)
  w = crop[ys, xs, 0].astype(float)
  got = [np.sum(xs * w) / w.sum(), np.sum(ys * w) / w.sum()]
  want = transforms.transform_points(np.array([[171.0, 121.0]]), m)[0]
  np.testing.assert_allclose(got, want, atol=0.3)


def test_warp_with_draft_scale_matches_full_resolution():
  img = np.zeros((200, 320, 3), np.uint8)
  img[100:108, 160:168] = 255  # marker centred at (163.5, 103.5)
  m = transforms.crop_matrix([150, 100], [1.2, 1.6], 0.0, (48, 64))
  small = Image.fromarray(img).resize((160, 100), Image.BOX)
  crop = transforms.warp_image(small, m, (48, 64), image_scale=(2.0, 2.0))
  ys, xs = np.nonzero(crop[..., 0] > 0)
  w = crop[ys, xs, 0].astype(float)
  got = [np.sum(xs * w) / w.sum(), np.sum(ys * w) / w.sum()]
  want = transforms.transform_points(np.array([[163.5, 103.5]]), m)[0]
  np.testing.assert_allclose(got, want, atol=0.3)


def test_heatmap_peak_at_joint_and_weights():
  j = np.array([[40.0, 60.0, 1], [5.0, 7.0, 0], [300.0, 10.0, 1], [-9.0, 10.0, 1],
                [284.0, 380.0, 1]])
  t, w = transforms.heatmap_targets(j, (384, 288), (96, 72), sigma=3.0)
  assert t.shape == (96, 72, 5) and t.dtype == np.float32
  np.testing.assert_array_equal(w, [1, 0, 0, 0, 1])
  assert np.unravel_index(np.argmax(t[..., 0]), t.shape[:2]) == (15, 10)
  assert t[15, 10, 0] == 1.0
  np.testing.assert_allclose(t[15, 13, 0], np.exp(-9 / 18), rtol=1e-6)
  assert t[..., 1:4].max() == 0.0
  assert np.unravel_index(np.argmax(t[..., 4]), t.shape[:2]) == (95, 71)


def test_heatmap_rounding_rule():
  # Centre 71.4 rounds to 71 (inside); 71.6 rounds to 72 (outside the 72-wide grid).
  j = np.array([[71.4 * 4, 10.0, 1], [71.6 * 4, 10.0, 1]])
  t, w = transforms.heatmap_targets(j, (384, 288), (96, 72))
  np.testing.assert_array_equal(w, [1, 0])
  assert t[3, 71, 0] == 1.0 and t[..., 1].max() == 0.0


def test_half_body_crop_contains_chosen_joints():
  aug = ml_collections.ConfigDict(dict(half_body_prob=1.0, half_body_min_joints=8,
                                       scale_factor=0.0, rotation_factor=0.0,
                                       rotation_prob=0.0, flip_prob=0.0))
  for seed in range(20):
    rng = np.random.default_rng(seed)
    j = _joints(rng)
    out = transforms.half_body_center_scale(j, np.random.default_rng(seed))
    assert out is not None
    center, scale, chosen = out
    assert set(chosen) <= set(keypoints.UPPER_BODY_JOINTS) or set(chosen) <= set(
        keypoints.LOWER_BODY_JOINTS)
    m = transforms.affine_matrix(center, scale, 0.0, (288, 384))
    pts = transforms.transform_points(j[chosen, :2], m)
    assert (pts >= 0).all() and (pts[:, 0] <= 287).all() and (pts[:, 1] <= 383).all()
    np.testing.assert_allclose(scale[1] / scale[0], 4 / 3, rtol=1e-5)
    # Through the sampler (probability 1, no other jitter) the crop holds one half's joints.
    c2, s2, r2, f2, _ = transforms.sample_augmentation(
        np.random.default_rng(seed), aug, j, [0, 0], [1, 1], 640)
    assert r2 == 0.0 and not f2
    m2 = transforms.affine_matrix(c2, s2, 0.0, (288, 384))
    inside = []
    for half in (keypoints.UPPER_BODY_JOINTS, keypoints.LOWER_BODY_JOINTS):
      ids = [k for k in half if j[k, 2] > 0]
      p = transforms.transform_points(j[ids, :2], m2)
      inside.append(bool((p >= 0).all() and (p[:, 0] <= 287).all() and (p[:, 1] <= 383).all()))
    assert any(inside)
    np.testing.assert_allclose(s2[1] / s2[0], 4 / 3, rtol=1e-5)  # not the [1, 1] passed in


def test_half_body_needs_two_joints():
  j = np.zeros((17, 3))
  j[0] = [10, 10, 1]
  assert transforms.half_body_center_scale(j, np.random.default_rng(0)) is None


def test_sample_augmentation_ranges():
  aug = common.data_config().augment
  scales, rots, flips = [], [], []
  for seed in range(300):
    _, s, r, f, _ = transforms.sample_augmentation(
        np.random.default_rng(seed), aug, np.zeros((17, 3)), [100, 100], [1.0, 1.0], 640)
    scales.append(s[0])
    rots.append(r)
    flips.append(f)
  assert 0.65 - 1e-6 <= min(scales) and max(scales) <= 1.35 + 1e-6
  assert -90 <= min(rots) and max(rots) <= 90
  assert 0.3 < np.mean(np.array(rots) == 0) < 0.5  # rotation with p=0.6
  assert 0.4 < np.mean(flips) < 0.6


def test_normalize():
  x = np.array([[[124, 116, 104]]], np.uint8)
  out = transforms.normalize(x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, 0.0, atol=0.01)


@pytest.mark.parametrize('rotation', [0.0, 25.0, -70.0])
def test_affine_matches_the_three_point_construction(rotation):
  """The HRNet/DCPose convention: crop centre, a point half a width above it, and a third point
  at right angles define the transform (rotating the source direction by `rotation`)."""
  center, scale, out_w, out_h = np.array([400.0, 300.0]), np.array([1.5, 2.0]), 288, 384
  src_w = scale[0] * 200
  r = np.deg2rad(rotation)
  up = np.array([0, -0.5 * src_w])
  src_dir = np.array([up[0] * np.cos(r) - up[1] * np.sin(r),
                      up[0] * np.sin(r) + up[1] * np.cos(r)])
  third = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = np.stack([center, center + src_dir, third(center, center + src_dir)])
  d0 = np.array([out_w * 0.5, out_h * 0.5])
  dst = np.stack([d0, d0 + [0, -0.5 * out_w], third(d0, d0 + [0, -0.5 * out_w])])
  a = np.concatenate([src, np.ones((3, 1))], axis=1)
  want = np.linalg.solve(a, dst).T
  np.testing.assert_allclose(transforms.affine_matrix(center, scale, rotation, (out_w, out_h)),
                             want, atol=1e-9)
