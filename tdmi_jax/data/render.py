"""Drawing for the synthetic PoseTrack dataset: figures, backgrounds, degradations.

Everything is drawn at `SS`x supersampling and box-downsampled, so a point at image
coordinate x (pixel centres at integers, as in PoseTrack) is drawn at `SS*x + (SS-1)/2`.
Joint arrays are float [17, 2] in PoseTrack slot order (`tdmi_jax/keypoints.py`).
"""

import dataclasses
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter

SS = 2  # Supersampling factor.

# Body proportions as fractions of the figure's nominal height h.
HEAD_LEN = 0.14      # head_bottom (chin) to head_top.
HEAD_WIDTH = 0.105
TORSO = 0.31         # hip centre to head_bottom.
SHOULDER_DROP = 0.045
SHOULDER_HALF = 0.11
HIP_HALF = 0.075
UPPER_ARM = 0.17
FOREARM = 0.155
THIGH = 0.245
SHIN = 0.235
ARM_THICK = 0.05
LEG_THICK = 0.065
# Figures keep this much room (fraction of h, plus 2 px) between joints and the border
# so that heads and limb strokes are fully visible.
MARGIN = 0.075

DEGRADATIONS = ('none', 'motion_blur', 'occlusion', 'defocus')


def _dir(angle):
  """Unit vector at `angle` radians from straight down, positive towards image right."""
  return np.array([math.sin(angle), math.cos(angle)])


@dataclasses.dataclass
class PoseParams:
  """One frame of a figure. Angles in radians from straight down (+ = image right).

  The figure faces the camera, so its left side is on the image right.
  """
  cx: float
  cy: float            # Hip centre.
  h: float             # Nominal height in pixels.
  yaw: float = 0.0     # Turn about the vertical axis; narrows shoulders, moves the nose.
  lean: float = 0.0    # Torso tilt.
  tilt: float = 0.0    # Head tilt relative to the torso.
  arm_l: float = 0.15
  arm_r: float = -0.15
  fore_l: float = 0.2
  fore_r: float = -0.2
  thigh_l: float = 0.08
  thigh_r: float = -0.08
  shin_l: float = 0.06
  shin_r: float = -0.06


def joints(p):
  """Joint positions [17, 2] (ears included; the dataset leaves them unannotated)."""
  h = p.h
  hip_c = np.array([p.cx, p.cy])
  up = np.array([math.sin(p.lean), -math.cos(p.lean)])
  side = np.array([math.cos(p.lean), math.sin(p.lean)])
  turn = 0.55 + 0.45 * math.cos(p.yaw)
  neck = hip_c + TORSO * h * up
  head_up = np.array([math.sin(p.lean + p.tilt), -math.cos(p.lean + p.tilt)])
  head_side = np.array([math.cos(p.lean + p.tilt), math.sin(p.lean + p.tilt)])
  head_top = neck + HEAD_LEN * h * head_up
  head_c = neck + 0.5 * HEAD_LEN * h * head_up
  half_w = 0.5 * HEAD_WIDTH * h
  nose = neck + 0.4 * HEAD_LEN * h * head_up + 0.6 * math.sin(p.yaw) * half_w * head_side
  ear_l = head_c + (math.cos(p.yaw) - 0.3 * math.sin(p.yaw)) * half_w * head_side
  ear_r = head_c - (math.cos(p.yaw) + 0.3 * math.sin(p.yaw)) * half_w * head_side
  sh_l = neck - SHOULDER_DROP * h * up + SHOULDER_HALF * h * turn * side
  sh_r = neck - SHOULDER_DROP * h * up - SHOULDER_HALF * h * turn * side
  hip_l = hip_c + HIP_HALF * h * turn * side
  hip_r = hip_c - HIP_HALF * h * turn * side
  elb_l = sh_l + UPPER_ARM * h * _dir(p.arm_l)
  elb_r = sh_r + UPPER_ARM * h * _dir(p.arm_r)
  wri_l = elb_l + FOREARM * h * _dir(p.fore_l)
  wri_r = elb_r + FOREARM * h * _dir(p.fore_r)
  knee_l = hip_l + THIGH * h * _dir(p.thigh_l)
  knee_r = hip_r + THIGH * h * _dir(p.thigh_r)
  ank_l = knee_l + SHIN * h * _dir(p.shin_l)
  ank_r = knee_r + SHIN * h * _dir(p.shin_r)
  return np.stack([nose, neck, head_top, ear_l, ear_r, sh_l, sh_r, elb_l, elb_r,
                   wri_l, wri_r, hip_l, hip_r, knee_l, knee_r, ank_l, ank_r])


def head_polygon(j, h, n=20):
  """Outline [n, 2] of the head ellipse spanning head_bottom (j[1]) to head_top (j[2])."""
  centre = 0.5 * (j[1] + j[2])
  axis = j[2] - j[1]
  length = float(np.linalg.norm(axis))
  up = axis / max(length, 1e-6)
  side = np.array([-up[1], up[0]])
  t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
  return (centre + np.outer(np.sin(t) * 0.5 * length, up)
          + np.outer(np.cos(t) * 0.5 * HEAD_WIDTH * h, side))


def head_box(j, h):
  """Integer [x, y, w, h] head box containing the head ellipse (and so its joints)."""
  poly = np.concatenate([head_polygon(j, h, 32), j[:3]])
  x0, y0 = np.floor(poly.min(0))
  x1, y1 = np.ceil(poly.max(0))
  return [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]


@dataclasses.dataclass
class Style:
  """Colours of one figure (RGB tuples)."""
  shirt: tuple
  pants: tuple
  skin: tuple
  hair: tuple
  shoes: tuple


def random_style(rng):
  return Style(shirt=random_colour(rng), pants=random_colour(rng, vmax=0.6),
               skin=_hsv(rng.uniform(0.03, 0.09), rng.uniform(0.25, 0.5),
                         rng.uniform(0.45, 0.95)),
               hair=_hsv(rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.55),
                         rng.uniform(0.1, 0.45)),
               shoes=_hsv(rng.uniform(0, 1), 0.2, rng.uniform(0.1, 0.3)))


def _hsv(hue, sat, val):
  img = Image.new('HSV', (1, 1), (int(hue * 255) % 256, int(sat * 255), int(val * 255)))
  return tuple(int(c) for c in img.convert('RGB').getpixel((0, 0)))


def random_colour(rng, smax=0.55, vmin=0.25, vmax=0.9):
  # Saturation stays <= 0.55 everywhere so that fully saturated test markers are unique.
  return _hsv(rng.uniform(0, 1), rng.uniform(0.1, smax), rng.uniform(vmin, vmax))


def _shade(colour, f):
  return tuple(int(min(255, max(0, c * f))) for c in colour)


def _ss(pt):
  return (SS * float(pt[0]) + (SS - 1) / 2, SS * float(pt[1]) + (SS - 1) / 2)


def _limb(draw, a, b, width, colour):
  """A thick stroke with a lit stripe and round caps, drawn like a shaded cylinder."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  w = SS * width
  d = b - a
  n = np.array([-d[1], d[0]]) / max(float(np.linalg.norm(d)), 1e-6)
  if n[1] > 0:  # Light from above: the lit stripe is on the upper side.
    n = -n
  dark = _shade(colour, 0.65)
  for p in (a, b):
    x, y = _ss(p)
    draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=dark)
  draw.line([_ss(a), _ss(b)], fill=dark, width=max(1, round(w)))
  off = 0.18 * width * n
  draw.line([_ss(a + off), _ss(b + off)], fill=colour, width=max(1, round(0.55 * w)))
  off = 0.3 * width * n
  draw.line([_ss(a + off), _ss(b + off)], fill=_shade(colour, 1.3),
            width=max(1, round(0.18 * w)))


def _polygon(draw, pts, colour):
  draw.polygon([_ss(p) for p in pts], fill=colour)


def draw_figure(draw, j, h, yaw, style, brightness=1.0):
  """Draws one figure given its joints [17, 2], height and yaw onto a supersampled canvas."""
  st = Style(*(_shade(c, brightness) for c in dataclasses.astuple(style)))
  arm_w, leg_w = ARM_THICK * h, LEG_THICK * h
  # Turned away side (yaw > 0 turns the figure's left away) is darker and drawn first.
  far_left = yaw > 0
  side_f = {True: 0.8, False: 1.0}

  def arm(left):
    s, e, w = (5, 7, 9) if left else (6, 8, 10)
    f = side_f[left == far_left]
    _limb(draw, j[s], j[e], arm_w, _shade(st.shirt, f * (1.1 if left else 1.0)))
    _limb(draw, j[e], j[w], 0.85 * arm_w, _shade(st.skin, f))
    x, y = _ss(j[w])
    r = SS * 0.6 * arm_w
    draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(st.skin, 0.9 * f))

  def leg(left):
    hp, k, a = (11, 13, 15) if left else (12, 14, 16)
    f = side_f[left == far_left]
    _limb(draw, j[hp], j[k], leg_w, _shade(st.pants, f * (1.1 if left else 1.0)))
    _limb(draw, j[k], j[a], 0.85 * leg_w, _shade(st.pants, 0.9 * f))
    x, y = _ss(j[a])
    r = SS * 0.55 * leg_w
    draw.ellipse([x - r, y - 0.6 * r, x + r, y + 0.6 * r], fill=st.shoes)

  arm(far_left)
  leg(far_left)
  leg(not far_left)
  # Torso: shoulders to hips, with a lit inner panel.
  torso = np.stack([j[5], j[6], j[12], j[11]])
  c = torso.mean(0)
  pad = 0.25 * arm_w * (torso - c) / np.maximum(
      np.linalg.norm(torso - c, axis=1, keepdims=True), 1e-6)
  _polygon(draw, torso + pad, _shade(st.shirt, 0.75))
  _polygon(draw, c + 0.7 * (torso - c) - np.array([0.1 * arm_w, 0.15 * arm_w]), st.shirt)
  _limb(draw, j[1], 0.5 * (j[5] + j[6]), 0.7 * arm_w, st.skin)
  arm(not far_left)
  # Head: skin ellipse, hair cap on the top, eyes and a nose that follow the yaw.
  poly = head_polygon(j, h)
  _polygon(draw, poly, _shade(st.skin, 0.7))
  centre = 0.5 * (j[1] + j[2])
  _polygon(draw, centre + 0.88 * (poly - centre), st.skin)
  top = np.dot(poly - centre, j[2] - j[1]) > 0.15 * float(np.sum((j[2] - j[1]) ** 2))
  _polygon(draw, np.concatenate([poly[top], centre[None] + 0.15 * (j[2] - j[1])]), st.hair)
  up = (j[2] - j[1]) / max(float(np.linalg.norm(j[2] - j[1])), 1e-6)
  side = np.array([-up[1], up[0]])
  half_w = 0.5 * HEAD_WIDTH * h
  for s in (-1, 1):
    eye = j[0] + 0.22 * HEAD_LEN * h * up + (s * 0.45 * math.cos(yaw)) * half_w * side
    x, y = _ss(eye)
    r = SS * max(0.5, 0.08 * half_w * 2)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(25, 20, 20))
  x, y = _ss(j[0])
  r = SS * max(0.7, 0.16 * half_w)
  draw.ellipse([x - r, y - r, x + r, y + r], fill=_shade(st.skin, 0.5))


def draw_marker(draw, pt, colour, radius=1.6):
  """A disc of `radius` image pixels centred on the image point `pt`."""
  x, y = _ss(pt)
  r = SS * radius
  draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


# --- Backgrounds ---------------------------------------------------------------------


def background_texture(rng, height, width):
  """A uint8 [height, width, 3] texture: smooth colour fields, blocks, blobs, grain."""
  palette = np.array([random_colour(rng, smax=0.45, vmin=0.2, vmax=0.85)
                      for _ in range(4)], np.float32)
  out = np.zeros((height, width, 3), np.float32)
  for cell, amp in ((48, 1.0), (12, 0.35)):
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    weights = rng.dirichlet(np.ones(len(palette)) * 0.7, size=(gh, gw)).astype(np.float32)
    field = weights @ palette
    field = np.asarray(Image.fromarray(field.clip(0, 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC), np.float32)
    out = field if amp == 1.0 else (1 - amp) * out + amp * field
  img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  area = height * width
  for _ in range(int(rng.integers(10, 20) * area / (640 * 540))):
    kind = rng.integers(3)
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    w, hh = rng.uniform(0.03, 0.25) * width, rng.uniform(0.03, 0.3) * height
    colour = random_colour(rng, smax=0.45, vmin=0.15, vmax=0.85)
    if kind == 0:
      draw.rectangle([x, y, x + w, y + hh], fill=colour)
      for k in range(int(rng.integers(0, 5))):  # Windows / bricks.
        xx = x + rng.uniform(0, w)
        draw.rectangle([xx, y, xx + 0.1 * w, y + hh], fill=_shade(colour, 0.8))
    elif kind == 1:
      draw.ellipse([x, y, x + w, y + hh], fill=colour)
    else:
      draw.line([x, y, x + w, y + rng.uniform(-1, 1) * hh], fill=colour,
                width=int(rng.integers(2, 10)))
  arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.int16)
  arr = arr + rng.integers(-10, 11, size=(height, width, 1), dtype=np.int16)
  return arr.clip(0, 255).astype(np.uint8)


# --- Degradations ---------------------------------------------------------------------


def motion_blur(img, length, angle):
  """Averages `img` along a line of `length` pixels at `angle` (camera/body motion)."""
  arr = np.asarray(img, np.float32)
  taps = max(3, int(round(length)))
  pad = int(math.ceil(length / 2)) + 1
  padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode='edge')
  acc = np.zeros_like(arr)
  hh, ww = arr.shape[:2]
  for k in range(taps):
    t = (k / (taps - 1) - 0.5) * length
    dx, dy = int(round(t * math.cos(angle))), int(round(t * math.sin(angle)))
    acc += padded[pad + dy:pad + dy + hh, pad + dx:pad + dx + ww]
  return Image.fromarray((acc / taps + 0.5).clip(0, 255).astype(np.uint8))


def defocus(img, radius):
  return img.filter(ImageFilter.GaussianBlur(radius))


def draw_occluder(draw, rng, box):
  """A textured rectangle or ellipse over `box` (x0, y0, x1, y1, image pixels)."""
  x0, y0 = _ss(box[:2])
  x1, y1 = _ss(box[2:])
  colour = random_colour(rng, vmin=0.2, vmax=0.8)
  shape = draw.rectangle if rng.uniform() < 0.5 else draw.ellipse
  shape([x0, y0, x1, y1], fill=colour, outline=_shade(colour, 0.6), width=2 * SS)
  n = int(rng.integers(2, 5))
  for k in range(n):  # Stripes, so the occluder has texture of its own.
    t = (k + 1) / (n + 1)
    draw.line([x0, y0 + t * (y1 - y0), x1, y0 + t * (y1 - y0) + rng.uniform(-4, 4) * SS],
              fill=_shade(colour, 0.75), width=2 * SS)
