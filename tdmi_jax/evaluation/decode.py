"""Heatmaps -> image keypoints (SPEC §8): argmax + quarter-pixel shift or DARK, flip test,
inverse crop transform, joint score = heatmap max x box score, optional OKS-NMS.

Heatmaps are NHWC numpy arrays [B, h, w, K]. Heatmap coordinates are pixel centres (the
target of a crop point p sits at p / stride, see transforms.heatmap_targets), and the crop
is the `transforms.affine_matrix` box of a batch's center / scale / rotation (CONTRACTS.md
"Data"), so the heatmap grid maps back to the image through the same matrix built for the
heatmap size.
"""

import numpy as np

from tdmi_jax import keypoints
from tdmi_jax.data import transforms

# COCO keypoint OKS sigmas; PoseTrack's slots 1 and 2 (head bottom/top) sit where COCO's
# eyes are, as in the PoseTrack evaluation code bases.
OKS_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
                       .87, .87, .89, .89]) / 10.0


def argmax_coords(heatmaps):
  """Integer peak (x, y) float [B, K, 2] and peak value [B, K]; non-positive peaks -> (0, 0)."""
  hm = np.asarray(heatmaps, np.float32)
  b, h, w, k = hm.shape
  flat = hm.transpose(0, 3, 1, 2).reshape(b, k, h * w)
  idx = np.argmax(flat, axis=-1)
  maxvals = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
  coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float64)
  coords *= (maxvals > 0)[..., None]
  return coords, maxvals


def _sample(hm_bk, xs, ys):
  """hm_bk [B, K, h, w] at integer (xs, ys) [B, K] (clipped)."""
  h, w = hm_bk.shape[2:]
  xs = np.clip(xs, 0, w - 1)
  ys = np.clip(ys, 0, h - 1)
  b, k = np.indices(xs.shape)
  return hm_bk[b, k, ys, xs]


def quarter_offset(heatmaps, coords):
  """Moves each peak a quarter pixel toward its larger neighbour, per axis (HRNet default).

  Peaks on the outermost two rows/columns are left as they are.
  """
  hm = np.asarray(heatmaps, np.float32).transpose(0, 3, 1, 2)
  h, w = hm.shape[2:]
  px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
  py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
  inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
  dx = _sample(hm, px + 1, py) - _sample(hm, px - 1, py)
  dy = _sample(hm, px, py + 1) - _sample(hm, px, py - 1)
  shift = np.stack([np.sign(dx), np.sign(dy)], -1) * 0.25 * inside[..., None]
  return coords + shift


def gaussian_blur(heatmaps, kernel=11):
  """Per-map Gaussian blur (sigma of an OpenCV kernel of that size, zero border) that keeps
  each map's maximum (DARK's modulation step)."""
  hm = np.asarray(heatmaps, np.float64)
  sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
  r = kernel // 2
  t = np.arange(-r, r + 1)
  g = np.exp(-t ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  pad = np.pad(hm, ((0, 0), (r, r), (r, r), (0, 0)))
  # Separable convolution over H then W, as sums of shifted slices.
  h, w = hm.shape[1:3]
  tmp = sum(g[i] * pad[:, i:i + h] for i in range(kernel))
  out = sum(g[i] * tmp[:, :, i:i + w] for i in range(kernel))
  peak = hm.max(axis=(1, 2), keepdims=True)
  new_peak = out.max(axis=(1, 2), keepdims=True)
  return out * np.where(new_peak > 0, peak / np.where(new_peak > 0, new_peak, 1), 0)


def dark_offset(heatmaps, coords, kernel=11):
  """DARK (Zhang et al., CVPR 2020): second-order Taylor expansion of the log of the
  blurred heatmap at the integer peak; the Newton step is the sub-pixel offset."""
  hm = np.log(np.clip(gaussian_blur(heatmaps, kernel), 1e-10, 50)).transpose(0, 3, 1, 2)
  h, w = hm.shape[2:]
  px = coords[..., 0].astype(np.int64)
  py = coords[..., 1].astype(np.int64)
  inside = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
  at = lambda dx, dy: _sample(hm, px + dx, py + dy)  # noqa: E731
  c = at(0, 0)
  gx = 0.5 * (at(1, 0) - at(-1, 0))
  gy = 0.5 * (at(0, 1) - at(0, -1))
  hxx = 0.25 * (at(2, 0) - 2 * c + at(-2, 0))
  hyy = 0.25 * (at(0, 2) - 2 * c + at(0, -2))
  hxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
  det = hxx * hyy - hxy ** 2
  ok = inside & (det != 0)
  safe = np.where(ok, det, 1.0)
  # offset = -H^{-1} g with H = [[hxx, hxy], [hxy, hyy]].
  ox = -(hyy * gx - hxy * gy) / safe
  oy = -(-hxy * gx + hxx * gy) / safe
  return coords + np.stack([ox, oy], -1) * ok[..., None]


def heatmap_coords(heatmaps, method='quarter'):
  """Sub-pixel peaks in heatmap pixels [B, K, 2] and peak values [B, K]."""
  coords, maxvals = argmax_coords(heatmaps)
  if method == 'quarter':
    coords = quarter_offset(heatmaps, coords)
  elif method == 'dark':
    coords = dark_offset(heatmaps, coords)
  elif method != 'argmax':
    raise ValueError(f"decode method must be 'quarter', 'dark' or 'argmax', got {method!r}")
  return coords, maxvals


# --- Flip test --------------------------------------------------------------------------


def flip_images(frames):
  """Mirrors NHWC images (any leading axes) left-right: the flip test's second input."""
  return np.asarray(frames)[..., ::-1, :]


def flip_back(heatmaps, flip_pairs=keypoints.FLIP_PAIRS):
  """Heatmaps of the mirrored input -> heatmaps in the original frame (mirror W, swap pairs)."""
  hm = np.asarray(heatmaps)[:, :, ::-1, :].copy()
  idx = np.arange(hm.shape[-1])
  for a, b in flip_pairs:
    idx[a], idx[b] = b, a
  return hm[..., idx]


def fuse_flip(heatmaps, flipped_heatmaps, flip_pairs=keypoints.FLIP_PAIRS, shift=True):
  """Average of the heatmaps and the flipped-back heatmaps of the mirrored input.

  With `shift`, the flipped-back maps move one pixel right first (HRNet's flip test): the
  mirrored crop's heatmap grid is offset from the original one.
  """
  back = flip_back(flipped_heatmaps, flip_pairs)
  if shift:
    back[:, :, 1:] = back[:, :, :-1].copy()
  return 0.5 * (np.asarray(heatmaps, np.float32) + back)


# --- Back to the image -------------------------------------------------------------------


def to_image(coords, center, scale, rotation, heatmap_size):
  """Heatmap coordinates [B, K, 2] -> image pixels, undoing each crop (heatmap_size (h, w))."""
  hh, hw = heatmap_size
  out = np.empty(np.shape(coords), np.float64)
  for i in range(len(out)):
    m = transforms.affine_matrix(center[i], scale[i], rotation[i], (hw, hh), inverse=True)
    out[i] = transforms.transform_points(coords[i], m)
  return out


def decode(heatmaps, center, scale, rotation=None, box_score=None, method='quarter'):
  """Image keypoints float [B, K, 3] = (x, y, heatmap max x box score)."""
  heatmaps = np.asarray(heatmaps, np.float32)
  b, h, w, _ = heatmaps.shape
  coords, maxvals = heatmap_coords(heatmaps, method)
  rotation = np.zeros(b) if rotation is None else np.asarray(rotation)
  box_score = np.ones(b) if box_score is None else np.asarray(box_score)
  xy = to_image(coords, np.asarray(center), np.asarray(scale), rotation, (h, w))
  return np.concatenate([xy, (maxvals * box_score[:, None])[..., None]], -1)


def person_score(people_kp, box_score, threshold=0.2):
  """HRNet's re-scoring: box score x mean heatmap max of joints above `threshold`."""
  box_score = np.asarray(box_score, np.float64)
  safe_box = np.where(box_score > 0, box_score, 1.0)
  conf = np.asarray(people_kp)[..., 2] / safe_box[..., None]
  above = conf > threshold
  mean = np.where(above.any(-1), (conf * above).sum(-1) / np.maximum(above.sum(-1), 1), 0)
  return box_score * mean


def batch_predictions(batch, heatmaps, method='quarter'):
  """A decoded eval batch as the writer's {image_id: [{'keypoints', 'score', 'track_id'}]}.

  Padding rows (mask 0) are dropped; track ids are None: people are linked across frames
  by the writer's tracker, which sees a whole video.
  """
  kp = decode(heatmaps, batch['center'], batch['scale'], batch.get('rotation'),
              batch.get('box_score'), method)
  scores = person_score(kp, batch.get('box_score', np.ones(len(kp))))
  mask = np.asarray(batch.get('mask', np.ones(len(kp))))
  out = {}
  for i in np.flatnonzero(mask > 0):
    people = out.setdefault(int(batch['image_id'][i]), [])
    people.append({'keypoints': kp[i].astype(np.float32), 'score': float(scores[i]),
                   'track_id': None})
  return out


# --- OKS-NMS -------------------------------------------------------------------------------


def oks(kp_a, kp_b, area_a, area_b, sigmas=OKS_SIGMAS):
  """OKS between one pose [K, 3] and poses [N, K, 3] (scale: the mean of the two areas)."""
  d2 = ((np.asarray(kp_b)[..., :2] - np.asarray(kp_a)[:, :2]) ** 2).sum(-1)
  var = (2 * sigmas) ** 2
  area = 0.5 * (area_a + np.asarray(area_b, np.float64))[..., None]
  e = d2 / var / (area + np.spacing(1)) / 2
  return np.exp(-e).mean(-1)


def oks_nms(people_kp, scores, areas, threshold=0.9, sigmas=OKS_SIGMAS):
  """Indices of the poses kept by greedy OKS non-maximum suppression (highest score first)."""
  people_kp = np.asarray(people_kp, np.float64)
  order = np.argsort(-np.asarray(scores, np.float64), kind='stable')
  keep = []
  while order.size:
    i = order[0]
    keep.append(int(i))
    rest = order[1:]
    if rest.size:
      o = oks(people_kp[i], people_kp[rest], float(areas[i]), np.asarray(areas)[rest],
              sigmas)
      rest = rest[o <= threshold]
    order = rest
  return keep
