"""Heatmap decoding: sub-pixel peaks, flip test, inverse crop transform, scores, OKS-NMS."""

import numpy as np
import pytest

from tdmi_jax import keypoints
from tdmi_jax.data import transforms
from tdmi_jax.evaluation import decode

H, W = 32, 24


def _gaussian(points, h=H, w=W, sigma=2.0, peak=1.0):
  """[1, h, w, K] heatmaps with a Gaussian at each (x, y) of points [K, 2]."""
  ys, xs = np.mgrid[0:h, 0:w]
  maps = [peak * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
          for x, y in points]
  return np.stack(maps, -1)[None].astype(np.float32)


def test_subpixel_peak_recovered_dark_beats_quarter():
  rng = np.random.default_rng(0)
  pts = np.stack([rng.uniform(4, W - 5, 40), rng.uniform(4, H - 5, 40)], -1)
  hm = _gaussian(pts)
  err = {}
  for method in ('argmax', 'quarter', 'dark'):
    coords, maxvals = decode.heatmap_coords(hm, method)
    err[method] = np.abs(coords[0] - pts).max(axis=-1)
  assert (err['argmax'] <= 0.5 + 1e-6).all()
  assert err['quarter'].mean() < err['argmax'].mean()
  assert (err['quarter'] <= 0.5 + 1e-6).all()
  assert err['dark'].max() < 0.1          # Taylor step on the (blurred) log-Gaussian
  assert err['dark'].mean() < 0.25 * err['quarter'].mean()


def test_quarter_shift_direction_and_score():
  hm = _gaussian([(10.3, 20.0), (5.0, 7.8)], peak=0.8)
  coords, maxvals = decode.heatmap_coords(hm, 'quarter')
  np.testing.assert_allclose(coords[0], [[10.25, 20.0], [5.0, 7.75]])
  np.testing.assert_allclose(maxvals[0], 0.8 * np.exp(-np.array([0.09, 0.04]) / 8),
                             rtol=1e-5)


def test_non_positive_heatmap_decodes_to_origin_with_zero_score():
  hm = -np.ones((1, H, W, 2), np.float32)
  coords, maxvals = decode.heatmap_coords(hm, 'dark')
  np.testing.assert_array_equal(coords, 0)
  assert (maxvals <= 0).all()


def test_flip_back_is_an_involution_and_swaps_pairs():
  rng = np.random.default_rng(1)
  hm = rng.random((2, H, W, 17)).astype(np.float32)
  np.testing.assert_array_equal(decode.flip_back(decode.flip_back(hm)), hm)
  back = decode.flip_back(hm)
  np.testing.assert_array_equal(back[..., 5], hm[:, :, ::-1, 6])
  np.testing.assert_array_equal(back[..., 0], hm[:, :, ::-1, 0])


def test_flip_test_of_a_mirror_symmetric_model():
  # A model that is exactly flip-equivariant: its heatmaps of the mirrored input are the
  # mirrored (and left/right-swapped) heatmaps. Without shift the fusion changes nothing;
  # with the 1-pixel shift the flipped half moves one pixel right.
  pts = np.array([(7.0 + j % 5, 9.0 + j) for j in range(17)])
  hm = _gaussian(pts)
  mirrored = decode.flip_back(hm)   # what such a model outputs on flip_images(input)
  np.testing.assert_allclose(decode.fuse_flip(hm, mirrored, shift=False), hm, atol=1e-7)
  fused = decode.fuse_flip(hm, mirrored, shift=True)
  shifted = hm.copy()                  # column 0 keeps its value
  shifted[:, :, 1:] = hm[:, :, :-1]
  np.testing.assert_allclose(fused, 0.5 * (hm + shifted), atol=1e-7)
  coords, _ = decode.heatmap_coords(fused, 'dark')
  np.testing.assert_allclose(coords[0, :, 0], pts[:, 0] + 0.5, atol=0.05)
  np.testing.assert_allclose(coords[0, :, 1], pts[:, 1], atol=0.05)
  # flip_images mirrors the W axis of NHWC inputs (with leading window axes).
  frames = np.arange(2 * 5 * 4 * 3 * 3).reshape(2, 5, 4, 3, 3)
  np.testing.assert_array_equal(decode.flip_images(frames)[..., 0, :], frames[..., 2, :])


def test_inverse_crop_transform_round_trip():
  rng = np.random.default_rng(2)
  b, k = 6, 17
  center = rng.uniform(100, 900, (b, 2))
  scale = rng.uniform(0.5, 3, (b, 1)) * np.array([[0.75, 1.0]])
  rotation = rng.uniform(-60, 60, b)
  img_pts = center[:, None] + rng.uniform(-60, 60, (b, k, 2))
  hm_pts = np.stack([
      transforms.transform_points(img_pts[i], transforms.affine_matrix(
          center[i], scale[i], rotation[i], (W, H))) for i in range(b)])
  back = decode.to_image(hm_pts, center, scale, rotation, (H, W))
  np.testing.assert_allclose(back, img_pts, atol=1e-6)


def test_decode_end_to_end_in_image_space_with_box_score():
  center, scale, rot = np.array([[400.0, 300.0]]), np.array([[1.2, 1.6]]), np.array([0.0])
  img_pts = np.array([[380.3, 250.7], [420.9, 330.2]])
  m = transforms.affine_matrix(center[0], scale[0], rot[0], (W, H))
  hm = _gaussian(transforms.transform_points(img_pts, m), peak=0.9)
  kp = decode.decode(hm, center, scale, rot, box_score=np.array([0.5]), method='dark')
  # One heatmap pixel is scale_w * 200 / W = 10 image pixels; DARK is within 0.1 of one.
  np.testing.assert_allclose(kp[0, :, :2], img_pts, atol=1.0)
  np.testing.assert_allclose(kp[0, :, 2], 0.45, atol=0.01)   # max x box score


def test_batch_predictions_drop_padding_and_group_by_image():
  hm = np.concatenate([_gaussian([(8.0, 8.0)] * 17)] * 3)
  batch = {'center': np.full((3, 2), 100.0), 'scale': np.ones((3, 2)),
           'rotation': np.zeros(3), 'box_score': np.array([0.9, 0.8, 0.0]),
           'image_id': np.array([7, 7, 9]), 'mask': np.array([1.0, 1.0, 0.0])}
  preds = decode.batch_predictions(batch, hm)
  assert list(preds) == [7]
  assert [p['track_id'] for p in preds[7]] == [None, None]  # The writer links them.
  assert preds[7][0]['keypoints'].shape == (17, 3)
  assert preds[7][0]['score'] == pytest.approx(0.9)


def test_oks_nms_suppresses_duplicates_only():
  rng = np.random.default_rng(3)
  a = np.concatenate([rng.uniform(0, 100, (17, 2)), np.ones((17, 1))], -1)
  near = a + np.array([0.5, 0.5, 0])
  far = a + np.array([300.0, 0, 0])
  keep = decode.oks_nms(np.stack([near, a, far]), [0.8, 0.9, 0.7],
                        areas=[1e4, 1e4, 1e4], threshold=0.9)
  assert keep == [1, 2]
  assert decode.oks_nms(np.stack([near, a]), [0.8, 0.9], [1e4, 1e4], threshold=1.0) == [1, 0]
  assert len(keypoints.FLIP_PAIRS) == 7
