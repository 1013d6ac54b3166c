"""Crop geometry, augmentation and heatmap targets for person crops (pure numpy + PIL).

Conventions (those of the HRNet / DCPose code bases, so that decoded coordinates agree):
- Image coordinates: pixel i has its centre at i (cv2 convention). A flip maps x -> W - 1 - x.
- A crop is given by a centre (x, y) in pixels, a scale (w, h) in units of `pixel_std`, and a
  rotation in degrees; `affine_matrix` maps image points into the crop (a 2x3 matrix), the
  inverse maps crop or heatmap points back to the image.
- Keypoints are [K, 3] arrays (x, y, visibility); visibility > 0 means annotated.
"""

import numpy as np
from PIL import Image

from tdmi_jax import keypoints


# --- Boxes and affine transforms ---------------------------------------------------------


def box_to_center_scale(box, aspect_ratio=0.75, enlarge=1.25, pixel_std=keypoints.PIXEL_STD):
  """(x, y, w, h) box -> centre [2] and scale [2] (w, h / pixel_std) at the crop's aspect."""
  x, y, w, h = (float(v) for v in box)
  center = np.array([x + 0.5 * w, y + 0.5 * h], np.float32)
  if w > aspect_ratio * h:
    h = w / aspect_ratio
  else:
    w = h * aspect_ratio
  scale = np.array([w, h], np.float32) / pixel_std * enlarge
  return center, scale


def affine_matrix(center, scale, rotation, output_size, pixel_std=keypoints.PIXEL_STD,
                  inverse=False):
  """2x3 similarity taking image points to crop points (`output_size` = (w, h)).

  The source width scale[0] * pixel_std maps onto the output width, the crop is rotated by
  `rotation` degrees about its centre (positive = the person appears rotated clockwise, as in
  HRNet's get_affine_transform), and `center` lands on the output centre.
  """
  src_w = float(scale[0]) * pixel_std
  s = float(output_size[0]) / src_w
  theta = np.deg2rad(float(rotation))
  cs, sn = np.cos(theta), np.sin(theta)
  # dst = out_c + s * R(-theta) (src - center)
  rot = s * np.array([[cs, sn], [-sn, cs]])
  out_c = np.array([output_size[0] * 0.5, output_size[1] * 0.5])
  m = np.concatenate([rot, (out_c - rot @ np.asarray(center, np.float64))[:, None]], axis=1)
  return invert_affine(m) if inverse else m


def invert_affine(m):
  a = np.asarray(m, np.float64)[:, :2]
  inv = np.linalg.inv(a)
  return np.concatenate([inv, -(inv @ np.asarray(m, np.float64)[:, 2])[:, None]], axis=1)


def compose_affine(outer, inner):
  """The 2x3 matrix of `outer(inner(p))`."""
  o = np.vstack([np.asarray(outer, np.float64), [0, 0, 1]])
  i = np.vstack([np.asarray(inner, np.float64), [0, 0, 1]])
  return (o @ i)[:2]


def flip_matrix(width):
  """Horizontal flip of an image `width` pixels wide: x -> width - 1 - x."""
  return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def transform_points(points, m):
  """Applies a 2x3 affine to points [..., 2] (extra trailing columns are kept)."""
  points = np.asarray(points, np.float64)
  xy = points[..., :2] @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]
  return np.concatenate([xy, points[..., 2:]], axis=-1)


# --- Flip and half-body ------------------------------------------------------------------


def swap_joint_pairs(arr, flip_pairs=keypoints.FLIP_PAIRS):
  """Swaps left/right joint slots along axis 0 ([K, ...] arrays) of a copy."""
  out = np.array(arr, copy=True)
  for a, b in flip_pairs:
    out[a], out[b] = arr[b], arr[a]
  return out


def flip_joints(joints, width, flip_pairs=keypoints.FLIP_PAIRS):
  """Mirrors [K, 3] keypoints in an image `width` wide and swaps left/right slots."""
  out = np.array(joints, np.float64, copy=True)
  out[:, 0] = width - 1.0 - out[:, 0]
  return swap_joint_pairs(out, flip_pairs)


def half_body_center_scale(joints, rng, aspect_ratio=0.75, pixel_std=keypoints.PIXEL_STD,
                           upper_ids=keypoints.UPPER_BODY_JOINTS, enlarge=1.5):
  """Centre/scale of a box around the upper or lower body's annotated joints, or None.

  Upper with probability 1/2 when it has > 2 annotated joints, else lower when it has > 2,
  else upper; None when fewer than 2 joints are selected (HRNet's half_body_transform).
  """
  vis = joints[:, 2] > 0
  upper = [k for k in range(len(joints)) if vis[k] and k in upper_ids]
  lower = [k for k in range(len(joints)) if vis[k] and k not in upper_ids]
  if rng.random() < 0.5 and len(upper) > 2:
    chosen = upper
  else:
    chosen = lower if len(lower) > 2 else upper
  if len(chosen) < 2:
    return None
  pts = joints[chosen, :2]
  center = pts.mean(axis=0)
  left_top, right_bottom = pts.min(axis=0), pts.max(axis=0)
  w, h = right_bottom - left_top
  if w > aspect_ratio * h:
    h = w / aspect_ratio
  elif w < aspect_ratio * h:
    w = h * aspect_ratio
  scale = np.array([w, h], np.float32) / pixel_std * enlarge
  return center.astype(np.float32), scale, np.array(chosen)


def sample_augmentation(rng, aug_cfg, joints, center, scale, image_width,
                        aspect_ratio=0.75, pixel_std=keypoints.PIXEL_STD):
  """Draws SPEC §7's training augmentation for one person.

  Returns (center, scale, rotation, flip, joints): the crop parameters in the (possibly
  flipped) image and the keypoints in that image. The flip is applied by the caller as part
  of the single affine transform (`crop_matrix`).
  """
  center = np.array(center, np.float32)
  scale = np.array(scale, np.float32)
  joints = np.array(joints, np.float64)
  if (aug_cfg.half_body_prob > 0 and (joints[:, 2] > 0).sum() > aug_cfg.half_body_min_joints
      and rng.random() < aug_cfg.half_body_prob):
    hb = half_body_center_scale(joints, rng, aspect_ratio, pixel_std)
    if hb is not None:
      center, scale, _ = hb
  sf, rf = aug_cfg.scale_factor, aug_cfg.rotation_factor
  scale = scale * np.clip(rng.normal() * sf + 1.0, 1.0 - sf, 1.0 + sf)
  rotation = 0.0
  if rng.random() < aug_cfg.rotation_prob:
    rotation = float(np.clip(rng.normal() * rf, -2.0 * rf, 2.0 * rf))
  flip = bool(rng.random() < aug_cfg.flip_prob)
  if flip:
    joints = flip_joints(joints, image_width)
    center = center.copy()
    center[0] = image_width - 1.0 - center[0]
  return center, scale.astype(np.float32), rotation, flip, joints


def crop_matrix(center, scale, rotation, output_size, flip=False, image_width=None,
                pixel_std=keypoints.PIXEL_STD):
  """Image -> crop affine, with an optional horizontal flip applied first."""
  m = affine_matrix(center, scale, rotation, output_size, pixel_std)
  if flip:
    m = compose_affine(m, flip_matrix(image_width))
  return m


# --- Pixels ------------------------------------------------------------------------------


def warp_image(image, m, output_size, resample=Image.BILINEAR, image_scale=(1.0, 1.0)):
  """Crops a PIL image with the 2x3 image->crop affine `m`; returns uint8 [h, w, 3].

  `image_scale` is (sx, sy) = original size / `image` size, for images decoded at reduced
  size (JPEG draft mode); `m` is always expressed in original-image pixels.
  """
  inv = invert_affine(m)  # crop -> original image, pixel centres at integers.
  # PIL samples output pixel (u, v) at its centre (u + .5, v + .5) in continuous coordinates
  # where input pixel i spans [i, i + 1); shift both sides by half a pixel.
  shift_in = np.array([[1, 0, 0.5], [0, 1, 0.5]])
  shift_out = np.array([[1, 0, -0.5], [0, 1, -0.5]])
  pil = compose_affine(shift_in, compose_affine(inv, shift_out))
  pil /= np.asarray(image_scale, np.float64)[:, None]
  out = image.transform(tuple(int(s) for s in output_size), Image.AFFINE,
                        data=tuple(pil.reshape(-1)), resample=resample)
  return np.asarray(out.convert('RGB'), np.uint8)


def normalize(frames_uint8):
  """uint8 RGB -> float32 with ImageNet mean/std."""
  inv_std = 1.0 / (np.asarray(keypoints.IMAGENET_STD, np.float32) * 255.0)
  shift = np.asarray(keypoints.IMAGENET_MEAN, np.float32) * 255.0 * inv_std
  out = frames_uint8.astype(np.float32)
  out *= inv_std  # in place: this runs on every frame of every example
  out -= shift
  return out


# --- Targets -----------------------------------------------------------------------------


def heatmap_targets(joints, image_size, heatmap_size, sigma=3.0):
  """Gaussian targets and weights from crop-space keypoints.

  joints: [K, 3] in crop pixels (x, y, vis). image_size / heatmap_size: (h, w).
  Returns target float32 [hh, hw, K] (peak 1 at the integer-rounded centre) and weight
  float32 [K]: 0 for unannotated joints and for joints whose centre falls outside the grid.
  """
  hh, hw = heatmap_size
  stride = np.array([image_size[1] / hw, image_size[0] / hh])
  k = len(joints)
  target = np.zeros((hh, hw, k), np.float32)
  weight = (np.asarray(joints)[:, 2] > 0).astype(np.float32)
  ys = np.arange(hh, dtype=np.float32)[:, None]
  xs = np.arange(hw, dtype=np.float32)[None, :]
  radius = int(3 * sigma)
  for j in range(k):
    if weight[j] == 0:
      continue
    if not np.isfinite(joints[j, :2]).all():
      weight[j] = 0.0
      continue
    mx = int(np.floor(joints[j, 0] / stride[0] + 0.5))
    my = int(np.floor(joints[j, 1] / stride[1] + 0.5))
    if not (0 <= mx < hw and 0 <= my < hh):
      weight[j] = 0.0
      continue
    g = np.exp(-((xs - mx) ** 2 + (ys - my) ** 2) / (2 * sigma ** 2))
    # Truncated at 3 sigma like HRNet's patch.
    g[(np.abs(xs - mx) > radius) | (np.abs(ys - my) > radius)] = 0.0
    target[:, :, j] = g
  return target, weight
