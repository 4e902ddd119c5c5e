"""Procedural synthetic faces: the embedded default data set (no download, no real faces).

Generative model
----------------
Every image is a cartoon face built from anti-aliased OpenCV polygons (ellipses are 24-gons) designed in
a canonical 112 x 112 frame whose five keypoints (eye centres, nose tip, left and right mouth corners,
in image order) lie near the ArcFace alignment template. The shapes are mapped into the output image
by a per-image affine pose and drawn there directly (no resampling), over a random background, and the
result is degraded photometrically.

*Identity-specific* (fixed for an identity, a function of ``(seed, identity_id)``):

- geometry: the five canonical keypoints (eye spacing, eye-line height and tilt, nose length, mouth
  height, width and tilt), face outline (width, skull height, chin length, superellipse exponents of the
  upper and lower halves: round / square / pointed jaw, jaw taper), ears, neck;
- feature shapes: eye size, tilt and iris size; brow gap, length, thickness, arch, slope; nose width,
  tip and nostrils; lip thicknesses, cupid's bow, resting mouth curve;
- appearance: skin tone, hair colour (natural or dyed), iris, lip (or lipstick) and brow colours, hair
  style (bald / buzz / short / medium / long; volume, hairline height, recession, parting, strand
  texture), and skin texture: side shading, blush, freckles, moles, a birthmark, wrinkles, nasolabial
  folds; attributes: glasses (shape, colour, frame width), moustache, beard or stubble, earrings,
  eyeshadow.

*Per-image nuisances* (a function of ``(seed, identity_id, image_index)``; strengths in
:class:`SyntheticConfig`):

- pose: an affine map (rotation, isotropic scale, aspect, shear, shift) applied to every shape and,
  with the same matrix, to the keypoints; a small "3-D" yaw / pitch parallax that moves the inner
  features (the nose tip 1.5x more) relative to the face outline;
- expression: smile (mouth corners move out and up), open mouth, brow raise, blink;
- clothing colour; background (smooth random colour field plus random clutter shapes);
- occluders: sunglasses, face mask, cap, or a random blob / bar anywhere in the image;
- photometric: gain, colour cast, a smooth illumination field (gradient + low-frequency bumps), gamma,
  occasional grayscale, Gaussian blur, low resolution (down- then up-sampling) and pixel noise.

Identity lives mostly in shapes, proportions and colours that survive these nuisances, while the
nuisances move, recolour and cover the pixels enough that raw-pixel similarity is a weak identity signal
(``benchmarks/check_synthetic_hardness.py`` measures raw pixels, an untrained and a trained network).

The keypoints returned with an image are the exact positions of the drawn features in that image: the
pupil centres, the centre of the nose-tip highlight and the tips of the lip polygon, after expression,
parallax and pose (pixel centres at integer coordinates, as cv2 draws).

Determinism
-----------
Nothing uses global random state. An identity is a function of ``(seed, identity_id)`` alone and an
image of ``(seed, identity_id, image_index)`` and the config alone (each through its own
``numpy.random.SeedSequence`` with a domain tag), so any image can be re-rendered on its own, in any
order, in any process (safe under ``fork`` and in DataLoader workers), and the same arguments give
identical bytes. The identity cache is only a cache (bounded LRU): evicting an entry never changes an
image. The per-image random stream does not depend on the config, so changing the strength of one
nuisance does not re-draw the others.

Speed: about 1.2-1.6 ms per 112 x 112 image (600-850 images/s) in one process on one CPU core (no per-pixel
Python loops; a new identity costs ~0.2 ms once).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import cv2
import numpy as np

from ..geometry import ARCFACE_TEMPLATE

__all__ = [
    "ARCFACE_TEMPLATE",
    "IdentityParams",
    "SyntheticConfig",
    "SyntheticFaces",
    "generate",
    "raw_pixel_pair_scores",
    "synthetic_pair_indices",
    "synthetic_pairs",
]

CANON = 112  # canonical frame the face is designed in
_SHIFT = 4  # cv2 fixed-point bits: coordinates are drawn with 1/16 px precision
_FP = float(1 << _SHIFT)
_AA = cv2.LINE_AA
_POSE_CENTRE = np.array([56.0, 62.0])  # canonical point the pose rotates and scales about

# Domain tags: keep the identity, image and pair streams disjoint whatever the integers are.
_TAG_IDENTITY = 0x1D_E7
_TAG_IMAGE = 0x1A_6E
_TAG_PAIRS = 0x9A_15

_SKIN_RAMP = np.array(
    [[255, 226, 204], [241, 194, 160], [224, 172, 132], [198, 134, 90], [160, 100, 62], [112, 70, 45], [74, 48, 34]],
    dtype=np.float64,
)
_HAIR = np.array(
    [[28, 24, 22], [52, 36, 28], [92, 62, 40], [140, 100, 62], [205, 170, 110], [150, 68, 34], [150, 148, 146],
     [215, 212, 205]],
    dtype=np.float64,
)
_HAIR_CUM = [0.26, 0.46, 0.62, 0.72, 0.82, 0.88, 0.96]  # cumulative probabilities (last class: the rest)
_IRIS = np.array([[84, 54, 32], [40, 30, 26], [70, 110, 160], [78, 112, 70], [112, 122, 130], [120, 92, 48]],
                 dtype=np.float64)
_IRIS_CUM = [0.35, 0.6, 0.74, 0.82, 0.9]
_DYED = np.array([[40, 60, 170], [205, 60, 140], [60, 150, 90], [150, 60, 200]], dtype=np.float64)
_LIPSTICK = np.array([[190, 30, 40], [220, 90, 130], [120, 30, 60], [230, 100, 80]], dtype=np.float64)
_HAIR_STYLES = ("bald", "buzz", "short", "medium", "long")
_HAIR_STYLE_CUM = [0.07, 0.2, 0.55, 0.8]
_MOLES_CUM = [0.5, 0.8, 0.95]
_MAX_CLUTTER = 8


@dataclass
class SyntheticConfig:
    """Image size and per-image nuisance strengths (0 switches a nuisance off).

    The defaults are tuned so that raw pixels and an untrained network are near chance on verification
    pairs while a small network trained for minutes on CPU separates held-out identities well
    (``benchmarks/check_synthetic_hardness.py``).
    """

    img_size: int = 112
    # pose (affine map of the whole face, keypoints follow exactly)
    max_rotation_deg: float = 18.0
    max_scale: float = 1.15  # isotropic scale log-uniform in [1/max_scale, max_scale]
    max_shift_px: float = 7.0  # in 112-px units
    max_aspect: float = 0.08  # x/y scale ratio in [1-a, 1+a] (yaw/pitch foreshortening)
    max_shear: float = 0.06
    max_yaw_px: float = 3.5  # parallax of the inner features against the outline (nose tip moves 1.5x)
    max_pitch_px: float = 2.5
    # expression
    expression_strength: float = 1.0
    blink_prob: float = 0.1
    # photometric
    illumination_strength: float = 1.0  # gain, gradient and gamma ranges scale with it
    color_jitter: float = 1.0  # per-channel colour cast of up to +-8 % (x this), clothing colour spread
    grayscale_prob: float = 0.05
    blur_prob: float = 0.4
    max_blur_sigma: float = 1.6
    lowres_prob: float = 0.15
    noise_prob: float = 0.6
    max_noise_std: float = 10.0
    # occlusion and background
    occluder_prob: float = 0.25
    max_clutter: int = 4  # random shapes in the background

    def __post_init__(self) -> None:
        if self.img_size < 16:
            raise ValueError(f"img_size must be >= 16, got {self.img_size}")
        if self.max_scale < 1.0:
            raise ValueError(f"max_scale must be >= 1 (scale range is [1/max_scale, max_scale]), got {self.max_scale}")
        if not 0 <= self.max_clutter <= _MAX_CLUTTER:
            raise ValueError(f"max_clutter must be in [0, {_MAX_CLUTTER}], got {self.max_clutter}")
        for name in ("blink_prob", "grayscale_prob", "blur_prob", "lowres_prob", "noise_prob", "occluder_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")

    @classmethod
    def no_nuisance(cls, **overrides) -> SyntheticConfig:
        """Canonical renders: no pose, expression, lighting, blur, noise or occluders (background stays)."""
        base = dict(
            max_rotation_deg=0.0, max_scale=1.0, max_shift_px=0.0, max_aspect=0.0, max_shear=0.0,
            max_yaw_px=0.0, max_pitch_px=0.0, expression_strength=0.0, blink_prob=0.0,
            illumination_strength=0.0, color_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0, lowres_prob=0.0,
            noise_prob=0.0, occluder_prob=0.0, max_clutter=0,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def scaled(cls, nuisance: float, **overrides) -> SyntheticConfig:
        """The default nuisances at strength ``nuisance`` (1 = the defaults, 0 = :meth:`no_nuisance` but for the
        background clutter, which is rounded): every range (rotation, log-scale, shift, aspect, shear, parallax,
        expression, illumination, colour cast, blur sigma, noise) and every probability scaled by it. The identity
        parameters never change, so one population is compared across strengths."""
        if not 0.0 <= nuisance <= 1.0:
            raise ValueError(f"nuisance must be in [0, 1], got {nuisance}")
        d = cls()
        base = {f.name: getattr(d, f.name) * nuisance for f in fields(cls)
                if f.name not in ("img_size", "max_scale", "max_clutter")}
        base["max_scale"] = d.max_scale ** nuisance  # log-uniform range: scale the log
        base["max_clutter"] = int(round(d.max_clutter * nuisance))
        base.update(overrides)
        return cls(**base)


@dataclass
class IdentityParams:
    """Everything identity-specific, in canonical 112 x 112 coordinates (x, y). Treat as read-only."""

    identity: int
    keypoints: np.ndarray  # (5, 2) neutral-expression canonical keypoints
    skin: np.ndarray  # (3,) RGB
    hair: np.ndarray
    iris: np.ndarray
    lip: np.ndarray
    brow: np.ndarray
    hair_style: str
    outline: np.ndarray  # (N, 2) face outline polygon
    face_centre: np.ndarray  # (2,)
    face_half_width: float
    chin_y: float
    top_y: float
    hair_back: np.ndarray | None  # polygon behind the face (medium and long hair)
    hair_front: np.ndarray | None  # fringe polygon over the forehead
    ear_axes: np.ndarray  # (2,)
    ear_dy: float
    neck_half_width: float
    eye_half_w: float
    eye_half_h: float
    eye_tilt_deg: float
    iris_r: float
    pupil_r: float
    pupil: np.ndarray
    sclera: np.ndarray
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_arch: float
    brow_slope: float
    brow_inner: float  # inner brow end, x offset from the eye centre towards the nose
    nose_w: float
    nose_tip_axes: np.ndarray  # (2,)
    nose_tip_color: np.ndarray
    nostril_axes: np.ndarray
    nostril_dx: float
    nostril_dy: float
    bridge_w: float
    lip_upper: float
    lip_lower: float
    lip_bow: float
    mouth_curve: float
    blush: float
    side_shade: float
    freckles: np.ndarray  # (k, 2), relative to the eye midpoint
    moles: np.ndarray  # (k, 3): dx, dy relative to the eye midpoint, radius
    wrinkles: bool
    folds: bool
    moustache: bool
    beard: str  # "none", "stubble", "full"
    glasses: bool
    glasses_color: np.ndarray
    glasses_thick: int
    glasses_pad: np.ndarray  # (2,) lens half-axes minus eye half-axes
    glasses_round: bool
    hair_streaks: np.ndarray | None  # (k, 3, 2) short polylines inside the hair (texture)
    streak_color: np.ndarray
    earrings: np.ndarray | None  # colour
    mark: np.ndarray | None  # (5,): dx (from the face centre), dy (from the eye line), axes (2), angle
    mark_color: np.ndarray
    eyeshadow: np.ndarray | None


def _rgba(c) -> tuple[float, float, float, float]:
    return (float(c[0]), float(c[1]), float(c[2]), 255.0)


def _mix(a, b, t: float) -> np.ndarray:
    return np.asarray(a, np.float64) * (1.0 - t) + np.asarray(b, np.float64) * t


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _pick(cum: list[float], x: float) -> int:
    """Class index of a uniform draw ``x`` given cumulative probabilities ``cum``."""
    return bisect.bisect_right(cum, x)


def _superellipse(cx, cy, half_w, up, down, n_top, n_bot, num=48, taper=0.0) -> np.ndarray:
    """Closed outline: superellipse upper half (height ``up``), lower half (height ``down``)."""
    th = np.linspace(0.0, 2.0 * np.pi, num, endpoint=False)
    c, s = np.cos(th), np.sin(th)
    lower = s > 0
    n = np.where(lower, n_bot, n_top)
    x = np.sign(c) * np.abs(c) ** (2.0 / n)
    y = np.sign(s) * np.abs(s) ** (2.0 / n)
    x = x * np.where(lower, 1.0 - taper * y**2, 1.0)
    return np.stack([cx + half_w * x, cy + np.where(lower, down, up) * y], axis=1)


def _make_identity(seed: int, identity: int) -> IdentityParams:
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_IDENTITY, seed, identity]))
    ua = rng.random(96)  # fixed-order scalars (Python floats below: cheaper than numpy scalars)
    u = ua.tolist()
    nrm = rng.standard_normal(32).tolist()
    t = ARCFACE_TEMPLATE.astype(np.float64)

    # --- keypoints
    eye_mid = (t[0] + t[1]) / 2 + np.array([1.0 * nrm[0], 1.6 * nrm[1]])
    eye_dist = 35.24 * _clamp(math.exp(0.075 * nrm[2]), 0.85, 1.16)
    tilt = 0.025 * nrm[3]
    axis = np.array([math.cos(tilt), math.sin(tilt)])
    le, re = eye_mid - axis * eye_dist / 2, eye_mid + axis * eye_dist / 2
    nose_len = 20.1 * _clamp(math.exp(0.1 * nrm[4]), 0.8, 1.22)
    nose = eye_mid + np.array([0.8 * nrm[5], nose_len])
    mouth_dy = max(40.7 * _clamp(math.exp(0.06 * nrm[6]), 0.88, 1.12), nose_len + 14.0)
    mouth_w = 29.2 * _clamp(math.exp(0.1 * nrm[7]), 0.78, 1.25)
    mouth_c = eye_mid + np.array([0.8 * nrm[8], mouth_dy])
    mtilt = tilt + 0.02 * nrm[9]
    maxis = np.array([math.cos(mtilt), math.sin(mtilt)])
    lm, rm = mouth_c - maxis * mouth_w / 2, mouth_c + maxis * mouth_w / 2
    kp = np.stack([le, re, nose, lm, rm]).astype(np.float32)

    # --- colours
    skin = _skin_ramp(u[0]) + (ua[1:4] - 0.5) * 16.0
    skin[0] += (u[4] - 0.4) * 14.0  # redness
    skin = np.clip(skin, 40, 255)
    hair = np.clip(_HAIR[_pick(_HAIR_CUM, u[70])] * (0.85 + 0.3 * u[5]) + (ua[6:9] - 0.5) * 20.0, 10, 240)
    if u[75] < 0.04:  # dyed
        hair = _DYED[min(int(u[76] * len(_DYED)), len(_DYED) - 1)] * (0.8 + 0.3 * u[5])
    iris = np.clip(_IRIS[_pick(_IRIS_CUM, u[71])] * (0.8 + 0.4 * u[9]), 10, 230)
    lip = np.clip(skin * np.array([0.80, 0.55, 0.58]) * (0.85 + 0.25 * u[10]) + np.array([22, 0, 4]) * u[11], 20, 255)
    if u[77] < 0.15:  # lipstick
        lip = _LIPSTICK[min(int(u[78] * len(_LIPSTICK)), len(_LIPSTICK) - 1)] * (0.85 + 0.25 * u[10])
    brow = np.clip(_mix(hair, [20, 16, 14], 0.2 + 0.5 * u[12]), 8, 200)
    sclera = np.array([240.0, 236.0, 228.0]) * (0.86 + 0.12 * u[13])
    pupil = np.array([18.0, 14.0, 14.0]) * (0.6 + 0.8 * u[74])

    # --- eyes and brows
    eye_half_w = 5.0 + 2.6 * u[14]
    eye_half_h = 2.2 + 1.4 * u[15]
    eye_tilt = (u[16] - 0.5) * 16.0
    iris_r = min(2.3 + 1.1 * u[17], eye_half_h + 0.4)
    pupil_r = 0.95 + 0.35 * u[18]
    brow_gap = 7.0 + 4.5 * u[19]
    brow_len = 13.0 + 7.0 * u[20]
    brow_thick = 1.6 + 2.4 * u[21]
    brow_arch = 0.5 + 3.5 * u[22]
    brow_slope = (u[23] - 0.5) * 5.0
    brow_inner = 1.5 + 4.0 * u[24]

    # --- face outline
    half_w = eye_dist / 2 + eye_half_w + 8.0 + 7.0 * u[25]
    cx = eye_mid[0] + 0.6 * nrm[10]
    cy = eye_mid[1] + 3.0 + 6.0 * u[26]
    top_y = eye_mid[1] - 40.0 - 12.0 * u[27]
    chin_y = mouth_c[1] + 13.0 + 9.0 * u[28]
    n_top = 2.0 + 0.8 * u[29]
    n_bot = 1.6 + 1.5 * u[30]
    taper = 0.25 * u[31]
    outline = _superellipse(cx, cy, half_w, cy - top_y, chin_y - cy, n_top, n_bot, taper=taper)

    # --- hair
    style = _HAIR_STYLES[_pick(_HAIR_STYLE_CUM, u[72])]
    if style == "buzz":
        hair = _mix(hair, skin, 0.45)
    volume = {"bald": 0.0, "buzz": 1.0 + 1.5 * u[32]}.get(style, 3.0 + 10.0 * u[32])
    side = {"bald": 0.0, "buzz": 1.0}.get(style, 2.0 + 4.0 * u[33] + (6.0 * u[34] if style == "long" else 0.0))
    brow_y = eye_mid[1] - brow_gap - brow_arch
    hairline = eye_mid[1] - 22.0 - 14.0 * u[35]
    hairline = min(hairline, brow_y - 5.0)
    if style == "bald":
        hairline = top_y + 6.0
    curve = -4.0 + 12.0 * u[36]  # > 0: hairline recedes at the temples
    part = (u[37] - 0.5) * 10.0
    hair_back = hair_front = None
    if style != "bald":
        hw, up = half_w + side, cy - top_y + volume
        th = np.linspace(np.pi, 2 * np.pi, 25)
        arc = np.stack([cx + hw * np.sign(np.cos(th)) * np.abs(np.cos(th)) ** (2 / n_top),
                        cy - up * np.abs(np.sin(th)) ** (2 / n_top)], axis=1)  # left -> right over the top
        if style in ("medium", "long"):
            end = eye_mid[1] + (18.0 + 22.0 * u[38] if style == "medium" else 80.0)
            hair_back = np.concatenate([arc, [[cx + hw, end], [cx - hw, end]]])
        xs = np.linspace(-1.0, 1.0, 15)
        line = np.stack([cx + xs * (half_w + 1.0), hairline - curve * xs**2 + part * xs], axis=1)
        temple = eye_mid[1] - 3.0 - 5.0 * u[39]
        hair_front = np.concatenate([[[cx - hw, temple]], line, [[cx + hw, temple]], arc[::-1]])
    hair_streaks = None
    if hair_front is not None and style != "buzz":
        # texture: strands from the hairline up to the crown, identity-specific density, sweep and wave
        every = 1 + int(u[79] * 2)
        line_pts = hair_front[1:16:every]
        top_pts = arc[np.round(np.linspace(0, 24, 15)[::every]).astype(int)]
        sweep = np.array([(u[80] - 0.5) * 12.0, 0.0])
        wave = np.array([(u[81] - 0.5) * 6.0, 0.0])
        a = line_pts + (top_pts - line_pts) * 0.1
        b = top_pts + (line_pts - top_pts) * 0.1 + sweep
        hair_streaks = np.stack([a, (a + b) / 2 + wave, b], axis=1)
    streak_color = np.clip(hair * (0.6 + 0.9 * u[82]) + 12.0, 0, 255)

    # --- nose, mouth
    nose_w = 6.0 + 3.0 * u[40]
    tip_axes = np.array([2.4 + 1.4 * u[41], 1.9 + 0.9 * u[42]])
    tip_color = np.clip(skin + (255.0 - skin) * (0.18 + 0.14 * u[43]), 0, 255)
    nostril_axes = np.array([1.3 + 0.9 * u[44], 0.8 + 0.5 * u[45]])
    nostril_dx = max(0.55 * nose_w, tip_axes[0] + 1.1 * nostril_axes[0] + 0.4)  # clear of the tip highlight
    nostril_dy = 1.4 + 1.2 * u[46]
    bridge_w = 2.0 + 2.0 * u[47]
    lip_upper = 1.8 + 2.2 * u[48]
    lip_lower = 2.2 + 2.8 * u[49]
    lip_bow = 0.6 * u[50]
    mouth_curve = (u[51] - 0.5) * 2.0

    # --- texture and attributes
    blush = 0.1 * u[52]
    side_shade = 0.04 + 0.08 * u[53]
    n_freckles = int(12 + 20 * u[55]) if u[54] < 0.18 else 0
    freckles = np.stack([(rng.random(n_freckles) - 0.5) * 40.0, 8.0 + rng.random(n_freckles) * 16.0], axis=1)
    n_moles = _pick(_MOLES_CUM, u[73])
    moles = np.stack([(rng.random(n_moles) - 0.5) * 2 * (half_w - 6.0), -25.0 + rng.random(n_moles) * 55.0,
                      0.7 + 0.8 * rng.random(n_moles)], axis=1)
    wrinkles = bool(u[56] < 0.2)
    folds = bool(u[57] < 0.4)
    beard = "full" if u[58] < 0.14 else ("stubble" if u[58] < 0.26 else "none")
    moustache = bool(u[59] < 0.18 or (beard == "full" and u[59] < 0.8))
    glasses = bool(u[60] < 0.15)
    glasses_color = np.clip(_mix([20, 20, 24], rng.random(3) * 255, 0.35 * u[61]), 0, 255)
    glasses_thick = 1 if u[62] < 0.6 else 2
    glasses_pad = np.array([3.0 + 2.5 * u[63], 3.5 + 2.5 * u[64]])
    glasses_round = bool(u[65] < 0.5)
    earrings = _mix([212, 175, 55], [200, 200, 210], u[84]) if u[83] < 0.12 else None
    mark = None
    if u[85] < 0.08:  # birthmark / tattoo
        mark = np.array([(u[86] - 0.5) * 2 * (half_w - 8.0), -22.0 + 46.0 * u[87], 1.8 + 2.5 * u[88],
                         1.4 + 2.0 * u[89], 180.0 * u[90]])
    mark_color = _mix(skin, [[120, 40, 40], [60, 60, 120], [90, 60, 40]][min(int(u[91] * 3), 2)], 0.7)
    eyeshadow = rng.random(3) * 255.0 if u[92] < 0.1 else None

    return IdentityParams(
        identity=identity, keypoints=kp, skin=skin, hair=hair, iris=iris, lip=lip, brow=brow, hair_style=style,
        outline=outline, face_centre=np.array([cx, cy]), face_half_width=half_w, chin_y=chin_y, top_y=top_y,
        hair_back=hair_back, hair_front=hair_front, ear_axes=np.array([4.0 + 3.0 * u[66], 9.0 + 5.0 * u[67]]),
        ear_dy=3.0 + 6.0 * u[68], neck_half_width=half_w * (0.5 + 0.15 * u[69]), eye_half_w=eye_half_w,
        eye_half_h=eye_half_h, eye_tilt_deg=eye_tilt, iris_r=iris_r, pupil_r=pupil_r, pupil=pupil, sclera=sclera,
        brow_gap=brow_gap, brow_len=brow_len, brow_thick=brow_thick, brow_arch=brow_arch, brow_slope=brow_slope,
        brow_inner=brow_inner, nose_w=nose_w, nose_tip_axes=tip_axes, nose_tip_color=tip_color,
        nostril_axes=nostril_axes, nostril_dx=nostril_dx, nostril_dy=nostril_dy, bridge_w=bridge_w, lip_upper=lip_upper,
        lip_lower=lip_lower, lip_bow=lip_bow, mouth_curve=mouth_curve, blush=blush, side_shade=side_shade,
        freckles=freckles, moles=moles, wrinkles=wrinkles, folds=folds, moustache=moustache, beard=beard,
        glasses=glasses, glasses_color=glasses_color, glasses_thick=glasses_thick, glasses_pad=glasses_pad,
        glasses_round=glasses_round, hair_streaks=hair_streaks, streak_color=streak_color, earrings=earrings,
        mark=mark, mark_color=mark_color, eyeshadow=eyeshadow,
    )


def _skin_ramp(t: float) -> np.ndarray:
    pos = t * (len(_SKIN_RAMP) - 1)
    i = min(int(pos), len(_SKIN_RAMP) - 2)
    return _mix(_SKIN_RAMP[i], _SKIN_RAMP[i + 1], pos - i)


@dataclass
class _Nuisance:
    yaw: float
    pitch: float
    smile: float
    mouth_open: float
    brow_raise: float
    blink: float
    clothes: np.ndarray
    attached: str  # "none", "sunglasses", "mask", "cap"
    attached_color: np.ndarray


# --- drawing: canonical-frame shapes straight into output pixels ------------------------------------------


_UNIT_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                         np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)


@functools.lru_cache(maxsize=64)
def _unit_arc(start: float, end: float) -> np.ndarray:
    th = np.radians(np.linspace(start, end, max(3, int(abs(end - start) / 12.0) + 2)))
    return np.stack([np.cos(th), np.sin(th)], axis=1)


class _Pen:
    """Draws shapes given in canonical 112-px coordinates into ``img`` through the 2 x 3 pose matrix.

    Every shape is a polygon or polyline whose vertices are mapped by the same affine matrix as the
    keypoints, so features and keypoints agree exactly; vertices go to cv2 in 1/16 px fixed point with
    anti-aliasing. Line widths scale with the pose's scale. Shapes are recorded and drawn in order by
    :meth:`flush`, which maps all vertices with one matrix product (per-shape numpy overhead dominates
    otherwise).
    """

    __slots__ = ("img", "m", "t", "lw", "cmds", "pts", "n")

    def __init__(self, img: np.ndarray, mat: np.ndarray) -> None:
        self.img = img
        self.m = mat[:, :2].T * _FP
        self.t = mat[:, 2] * _FP
        self.lw = math.sqrt(abs(float(np.linalg.det(mat[:, :2]))))
        self.cmds: list[tuple] = []
        self.pts: list[np.ndarray] = []
        self.n = 0

    def _add(self, kind: int, pts, color, width: int = 1, extra=False) -> None:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        self.cmds.append((kind, self.n, self.n + len(pts), color, width, extra))
        self.pts.append(pts)
        self.n += len(pts)

    def width(self, thickness: float) -> int:
        return max(1, int(round(thickness * self.lw)))

    def poly(self, pts, color) -> None:
        self._add(0, pts, color)

    def polyline(self, pts, color, thickness: float = 1.0, closed: bool = False) -> None:
        self._add(1, pts, color, self.width(thickness), closed)

    def polylines(self, pts, color, thickness: float = 1.0) -> None:
        """Several open polylines of equal length: ``pts`` is (k, m, 2)."""
        self._add(2, pts, color, self.width(thickness), int(np.shape(pts)[1]))

    def dots(self, pts, color) -> None:
        """One anti-aliased ~1 px dot per point."""
        self._add(3, pts, color)

    def ellipse(self, centre, axes, angle, color, thickness: float = -1, start: float = 0.0, end: float = 360.0):
        r = math.radians(angle)
        co, si = math.cos(r), math.sin(r)
        ax, ay = float(axes[0]), float(axes[1])
        rot = np.array([[ax * co, ax * si], [-ay * si, ay * co]])
        full = end - start >= 360.0
        unit = _UNIT_CIRCLE if full else _unit_arc(float(start), float(end))
        pts = unit @ rot + (float(centre[0]), float(centre[1]))
        if thickness < 0:
            self.poly(pts, color)
        else:
            self.polyline(pts, color, thickness, closed=full)

    def flush(self) -> None:
        if not self.cmds:
            return
        fp = np.rint(np.concatenate(self.pts) @ self.m + self.t).astype(np.int32)
        img = self.img
        for kind, a, b, color, width, extra in self.cmds:
            seg = fp[a:b]
            if kind == 0:
                cv2.fillPoly(img, [seg], color, _AA, _SHIFT)
            elif kind == 1:
                cv2.polylines(img, [seg], extra, color, width, _AA, _SHIFT)
            elif kind == 2:
                cv2.polylines(img, list(seg.reshape(-1, extra, 2)), False, color, width, _AA, _SHIFT)
            else:
                cv2.polylines(img, list(seg.reshape(-1, 1, 1, 2)), True, color, 1, _AA, _SHIFT)
        self.cmds, self.pts, self.n = [], [], 0


def _rot(deg: float) -> np.ndarray:
    r = math.radians(deg)
    return np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])


def _frame_keypoints(p: IdentityParams, nz: _Nuisance) -> np.ndarray:
    """Canonical keypoints of this image: identity geometry + expression + parallax (before the pose)."""
    kp = p.keypoints.astype(np.float64).copy()
    d = np.array([nz.yaw, nz.pitch])
    kp[:2] += d
    kp[2] += 1.5 * d
    u = kp[4] - kp[3]
    u /= np.linalg.norm(u)
    n = np.array([-u[1], u[0]])
    widen = 1.6 * nz.smile
    kp[3] += d - u * widen - n * 1.5 * nz.smile
    kp[4] += d + u * widen - n * 1.5 * nz.smile
    return kp


def _draw_face(pen: _Pen, p: IdentityParams, nz: _Nuisance, kp: np.ndarray) -> None:
    skin = p.skin
    cx, cy = p.face_centre
    hw = p.face_half_width
    d = np.array([nz.yaw, nz.pitch])
    le, re, nose, lm, rm = kp
    eye_mid = (le + re) / 2

    # back hair, clothes, neck, ears, face
    if p.hair_back is not None and p.hair_style in ("medium", "long"):
        pen.poly(p.hair_back, _rgba(p.hair * 0.8))
    bottom = CANON + 80.0  # far below the frame (cv2 clips)
    nw = p.neck_half_width
    shoulder = p.chin_y + 14.0
    pen.poly([[cx - 2.6 * hw, bottom], [cx - 1.9 * hw, shoulder + 10], [cx - nw - 4, shoulder],
              [cx + nw + 4, shoulder], [cx + 1.9 * hw, shoulder + 10], [cx + 2.6 * hw, bottom]], _rgba(nz.clothes))
    pen.poly([[cx - nw, cy], [cx + nw, cy], [cx + nw, shoulder + 3], [cx, shoulder + 9], [cx - nw, shoulder + 3]],
             _rgba(skin * 0.8))
    if p.hair_back is not None and p.hair_style == "long":
        for sgn in (-1, 1):  # strands falling in front of the shoulders
            x0 = cx + sgn * (hw + 1.0)
            pen.poly([[x0, cy], [x0 + sgn * 8.0, cy], [x0 + sgn * 12.0, bottom], [x0 - sgn * 2.0, bottom]],
                     _rgba(p.hair * 0.9))
    ear_y = eye_mid[1] + p.ear_dy
    for sgn in (-1, 1):
        ec = [cx + sgn * (hw - 1.0) - 0.3 * nz.yaw, ear_y]
        pen.ellipse(ec, p.ear_axes, sgn * 8.0, _rgba(skin * 0.93))
        if p.earrings is not None:
            pen.ellipse([ec[0] + sgn * 0.5, ec[1] + p.ear_axes[1] * 0.85], [1.6, 1.6], 0.0, _rgba(p.earrings))
        pen.ellipse([ec[0] + sgn * 1.0, ec[1]], p.ear_axes * 0.55, sgn * 8.0, _rgba(skin * 0.78))
    pen.poly(p.outline, _rgba(skin))

    # skin texture: side shading, blush, under-eye, freckles, moles, wrinkles, folds
    for sgn in (-1, 1):
        pen.ellipse([cx + sgn * (hw - 3.0), cy + 6.0], [5.0, 0.55 * (p.chin_y - cy) + 4], 0.0,
                    _rgba(skin * (1.0 - p.side_shade)))
    if p.blush > 0.02:
        blush = _rgba(_mix(skin, [230, 80, 90], p.blush))
        for e in (le, re):
            pen.ellipse([e[0], lm[1] - 9.0], [7.5, 5.5], 0.0, blush)
    under = _rgba(skin * 0.94)
    for e in (le, re):
        pen.ellipse([e[0], e[1] + p.eye_half_h + 1.2], [p.eye_half_w + 0.5, 2.2], 0.0, under)
    if len(p.freckles):
        pen.dots(p.freckles + eye_mid, _rgba(skin * 0.8))
    for x, y, r in p.moles:
        pen.ellipse([cx + x + 0.7 * d[0], eye_mid[1] + y], [r, r], 0.0, _rgba(_mix(skin, [60, 38, 30], 0.75)))
    if p.mark is not None:
        m = p.mark
        pen.ellipse([cx + m[0] + 0.7 * d[0], eye_mid[1] + m[1]], m[2:4], m[4], _rgba(p.mark_color))
    if p.wrinkles:
        wr = _rgba(skin * 0.86)
        for k in range(3):
            y = eye_mid[1] - p.brow_gap - 8.0 - 3.0 * k
            pen.ellipse([eye_mid[0], y + 12.0], [10.0 - k, 12.0], 0.0, wr, 1, 240, 300)
    if p.folds:
        fo = _rgba(skin * 0.84)
        for sgn, m in ((-1, lm), (1, rm)):
            a = nose + [sgn * (p.nose_w + 1.5), 0.5]
            b = m + [sgn * 4.5, -2.5]
            pen.polyline([a, (a + b) / 2 + [sgn * 1.2, 0.0], b], fo)

    # hair over the forehead and temples
    if p.hair_front is not None:
        pen.poly(p.hair_front, _rgba(p.hair))
        if p.hair_streaks is not None:
            pen.polylines(p.hair_streaks, _rgba(p.streak_color))
    elif p.hair_style == "bald":
        for sgn in (-1, 1):
            pen.ellipse([cx + sgn * (hw - 1.0), eye_mid[1] - 6.0], [3.0, 9.0], 0.0, _rgba(_mix(p.hair, skin, 0.3)))

    # brows
    raise_ = nz.brow_raise
    for sgn, e in ((-1, le), (1, re)):
        t = np.linspace(0.0, 1.0, 7)
        x = e[0] - sgn * p.brow_inner + sgn * t * p.brow_len
        y = e[1] - p.brow_gap - raise_ - p.brow_arch * np.sin(np.pi * t**0.8) + p.brow_slope * t
        th = p.brow_thick * (1.0 - 0.45 * t)
        upper = np.stack([x, y - th / 2], axis=1)
        lower = np.stack([x, y + th / 2], axis=1)
        pen.poly(np.concatenate([upper, lower[::-1]]), _rgba(p.brow))

    # eyes (pupil centre = keypoint)
    lid = _rgba(skin * 0.97)
    for sgn, e in ((-1, le), (1, re)):
        ang = sgn * p.eye_tilt_deg
        socket = skin * 0.9 if p.eyeshadow is None else _mix(skin, p.eyeshadow, 0.6)
        pen.ellipse(e + [0.0, -0.8], [p.eye_half_w + 2.0, p.eye_half_h + 2.6], ang, _rgba(socket))
        pen.ellipse(e, [p.eye_half_w, p.eye_half_h], ang, _rgba(p.sclera))
        pen.ellipse(e, [p.iris_r, p.iris_r], 0.0, _rgba(p.iris))
        pen.ellipse(e, [p.pupil_r, p.pupil_r], 0.0, _rgba(p.pupil))
        tt = np.linspace(0.0, np.pi, 11)
        r = _rot(ang)
        top = np.stack([-p.eye_half_w * np.cos(tt), -(p.eye_half_h + 1.6) * np.sin(tt)], axis=1) @ r.T + e
        if nz.blink > 0.0:
            edge = np.stack([-p.eye_half_w * np.cos(tt), p.eye_half_h * (2.0 * nz.blink - 1.0) * np.sin(tt)], 1)
            edge = edge @ r.T + e
            pen.poly(np.concatenate([top, edge[::-1]]), lid)
        else:
            edge = np.stack([-p.eye_half_w * np.cos(tt), -p.eye_half_h * np.sin(tt)], axis=1) @ r.T + e
        pen.polyline(edge, _rgba(p.brow * 0.6), 1)
        pen.ellipse(e, [p.eye_half_w, p.eye_half_h], ang, _rgba(skin * 0.6), 1, 20, 160)

    # nose (centre of the tip highlight = keypoint)
    bridge = _rgba(skin * 0.88)
    for sgn in (-1, 1):
        pen.polyline([[eye_mid[0] + sgn * p.bridge_w, eye_mid[1] + 3.0],
                      [nose[0] + sgn * (p.bridge_w + 0.5), nose[1] - 6.0],
                      [nose[0] + sgn * p.nose_w * 0.9, nose[1] - 1.0]], bridge)
        pen.ellipse(nose + [sgn * p.nose_w * 0.75, 1.0], [2.6, 3.0], 0.0, _rgba(skin * 0.82), 1, 200, 430)
    pen.ellipse(nose + [0.0, 2.0], [p.nose_w * 0.8, 2.2], 0.0, _rgba(skin * 0.9))
    pen.ellipse(nose, p.nose_tip_axes, 0.0, _rgba(p.nose_tip_color))
    for sgn in (-1, 1):
        pen.ellipse(nose + [sgn * p.nostril_dx, p.nostril_dy], p.nostril_axes, sgn * 20.0, _rgba(skin * 0.35))

    # mouth (polygon tips = corner keypoints)
    u = rm - lm
    width = float(np.linalg.norm(u))
    u = u / width
    n = np.array([-u[1], u[0]])
    t = np.linspace(0.0, 1.0, 15)[:, None]
    s = np.sin(np.pi * t)
    base = lm + t * (rm - lm)
    line = base + n * ((p.mouth_curve + 3.0 * nz.smile) * s)
    bow = 1.0 - p.lip_bow * np.exp(-(((t - 0.5) / 0.09) ** 2))
    top = line - n * (p.lip_upper * s**0.6 * bow)
    gap = nz.mouth_open * s
    bot = line + n * (gap + p.lip_lower * s**0.7)
    pen.poly(np.concatenate([top, bot[::-1]]), _rgba(p.lip))
    if nz.mouth_open > 0.8:
        inner = np.concatenate([line, (line + n * gap)[::-1]])
        pen.poly(inner, _rgba([45, 18, 22]))
        pen.poly(np.concatenate([line, (line + n * np.minimum(gap, 1.6))[::-1]]), _rgba([225, 220, 210]))
    else:
        pen.polyline(line, _rgba(p.lip * 0.5), 1)

    # facial hair
    if p.beard != "none":
        col = p.hair * 0.9 if p.beard == "full" else _mix(skin, p.hair, 0.3)
        lower = p.outline[p.outline[:, 1] > lm[1] - 6.0]
        lower = lower[np.argsort(-lower[:, 0])]  # right -> left along the jaw
        under = bot[2:-2] + n * 2.0  # left -> right under the lower lip
        upper = np.concatenate([[lm - u * 5.0 + n * 4.0], under, [rm + u * 5.0 + n * 4.0]])
        pen.poly(np.concatenate([lower, upper]), _rgba(col))
    if p.moustache:
        tt = t[2:-2]
        mid = top[2:-2] - n * 1.5
        thick = 2.0 + 1.5 * np.sin(np.pi * tt) + (1.5 if p.beard == "full" else 0.0)
        pen.poly(np.concatenate([mid, (mid - n * thick)[::-1]]), _rgba(p.hair * 0.85))

    # glasses (lenses are rings around the eyes, pupils stay visible)
    if p.glasses:
        gc = _rgba(p.glasses_color)
        ax = np.array([p.eye_half_w, p.eye_half_h]) + p.glasses_pad
        for sgn, e in ((-1, le), (1, re)):
            if p.glasses_round:
                pen.ellipse(e, ax, 0.0, gc, p.glasses_thick)
            else:
                c = [[-ax[0], -ax[1]], [ax[0], -ax[1]], [ax[0], ax[1]], [-ax[0], ax[1]]]
                pen.polyline(np.asarray(c) + e, gc, p.glasses_thick, closed=True)
            pen.polyline([e + [sgn * ax[0], -ax[1] * 0.3], [cx + sgn * hw, e[1] - 1.0]], gc, p.glasses_thick)
        pen.polyline([le + [ax[0], -1.0], eye_mid + [0.0, -2.0], re + [-ax[0], -1.0]], gc, p.glasses_thick)

    # occluders attached to the face
    if nz.attached == "sunglasses":
        col = _rgba(nz.attached_color)
        ax = np.array([p.eye_half_w + 4.0, p.eye_half_h + 4.0])
        for e in (le, re):
            pen.ellipse(e, ax, 0.0, col)
        pen.polyline([le + [ax[0], -1.0], re + [-ax[0], -1.0]], col, 2)
    elif nz.attached == "mask":
        y0 = nose[1] - 8.0
        pen.poly([[cx - hw - 2, y0 + 4], [eye_mid[0], y0], [cx + hw + 2, y0 + 4], [cx + hw, p.chin_y - 8],
                  [cx, p.chin_y + 2], [cx - hw, p.chin_y - 8]], _rgba(nz.attached_color))
    elif nz.attached == "cap":
        y0 = eye_mid[1] - p.brow_gap - 6.0
        pen.poly([[cx - hw - 6, y0], [cx + hw + 6, y0], [cx + hw + 2, p.top_y - 14.0], [cx - hw - 2, p.top_y - 14.0]],
                 _rgba(nz.attached_color))
        pen.poly([[cx - hw - 2, y0 - 1], [cx + hw + 2, y0 - 1], [cx + hw * 0.8, y0 + 5], [cx - hw * 0.8, y0 + 5]],
                 _rgba(nz.attached_color * 0.7))


class SyntheticFaces:
    """A population of ``num_identities`` synthetic identities; images rendered on demand.

    ``render(i, j)`` is a pure function of ``(seed, i, j)`` and the config. Identity parameters are
    kept in a bounded LRU cache (``cache_size`` identities, a few kB each) and re-derived on a miss.
    """

    def __init__(self, num_identities: int, seed: int = 0, config: SyntheticConfig | None = None,
                 cache_size: int = 4096) -> None:
        if num_identities < 1:
            raise ValueError(f"num_identities must be >= 1, got {num_identities}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_identities = int(num_identities)
        self.seed = int(seed)
        self.config = config if config is not None else SyntheticConfig()
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, IdentityParams] = OrderedDict()

    # --- identities
    def identity(self, i: int) -> IdentityParams:
        i = int(i)
        if not 0 <= i < self.num_identities:
            raise IndexError(f"identity {i} out of range [0, {self.num_identities})")
        p = self._cache.get(i)
        if p is not None:
            self._cache.move_to_end(i)
            return p
        p = _make_identity(self.seed, i)
        self._cache[i] = p
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return p

    # --- images
    @staticmethod
    def _nuisance(u: list[float], cfg: SyntheticConfig) -> _Nuisance:
        e = cfg.expression_strength
        blink = 0.35 + 0.65 * u[11] if u[10] < cfg.blink_prob else 0.0
        occ = "none"
        if u[12] < cfg.occluder_prob:
            occ = ("sunglasses", "mask", "cap", "blob", "bar")[min(int(u[13] * 5), 4)]
        clothes = np.clip(np.array([u[14], u[15], u[16]]) * 255.0 * max(cfg.color_jitter, 0.0)
                          + 110.0 * (1 - min(cfg.color_jitter, 1.0)), 0, 255)
        if occ == "sunglasses":
            occ_color = np.array([15.0 + 40 * u[17]] * 3)
        else:
            occ_color = np.array([u[17], u[18], u[19]]) * 255.0
        return _Nuisance(
            yaw=(2 * u[5] - 1) * cfg.max_yaw_px,
            pitch=(2 * u[6] - 1) * cfg.max_pitch_px,
            smile=(1.2 * u[7] - 0.2) * e,
            mouth_open=max(0.0, 7.0 * u[8] - 2.0) * e,
            brow_raise=(3.5 * u[9] - 1.0) * e,
            blink=blink,
            clothes=clothes,
            attached=occ,
            attached_color=occ_color,
        )

    def render(self, identity: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` of ``identity``: (H x W x 3 uint8 RGB, 5 x 2 float32 keypoints in its pixels)."""
        p = self.identity(identity)
        if index < 0:
            raise ValueError(f"image index must be >= 0, got {index}")
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([_TAG_IMAGE, self.seed, int(identity), int(index)]))
        u = rng.random(64).tolist()  # fixed-order per-image scalars
        nz = self._nuisance(u, cfg)
        size = cfg.img_size

        kp = _frame_keypoints(p, nz)  # canonical keypoints of this image (expression, parallax)

        # pose: canonical frame -> output pixels (pixel centres at integers in both)
        rot = (2 * u[0] - 1) * cfg.max_rotation_deg
        scale = math.exp((2 * u[1] - 1) * math.log(cfg.max_scale))
        aspect = 1.0 + (2 * u[2] - 1) * cfg.max_aspect
        shear = (2 * u[3] - 1) * cfg.max_shear
        shift = (np.array([u[4], u[20]]) * 2 - 1) * cfg.max_shift_px
        lin = _rot(rot) @ np.array([[scale * aspect, shear * scale], [0.0, scale / aspect]])
        k = size / CANON
        a_lin = k * lin
        a_t = k * (_POSE_CENTRE + shift - lin @ _POSE_CENTRE + 0.5) - 0.5
        mat = np.concatenate([a_lin, a_t[:, None]], axis=1)
        keypoints = (kp @ a_lin.T + a_t).astype(np.float32)

        # background: smooth random colour field + clutter
        field = (rng.random((3, 3, 3)) * 255.0).astype(np.uint8)
        shapes = rng.random((_MAX_CLUTTER, 8))
        light_field = rng.random((3, 3)) - 0.5  # drawn even when unused: the stream never depends on the config
        img = cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)
        n_clutter = int(u[21] * (cfg.max_clutter + 1))
        for j in range(n_clutter):
            q = shapes[j]
            col = (int(q[5] * 255), int(q[6] * 255), int(q[7] * 255))
            x0, y0 = int(q[1] * size), int(q[2] * size)
            r = int(4 + q[3] * size / 4)
            kind = int(q[0] * 3)
            if kind == 0:
                cv2.rectangle(img, (x0 - r, y0 - r // 2), (x0 + r, y0 + r), col, -1, _AA)
            elif kind == 1:
                cv2.circle(img, (x0, y0), r, col, -1, _AA)
            else:
                cv2.line(img, (x0 - r, y0 - r), (x0 + r, y0 + int((q[4] - 0.5) * 2 * r)), col, 1 + int(q[4] * 4), _AA)

        # the face, drawn through the pose matrix
        pen = _Pen(img, mat)
        _draw_face(pen, p, nz, kp)
        pen.flush()

        # free-floating occluders (in output pixels)
        if nz.attached in ("blob", "bar"):
            q = u[22:30]
            col = (int(q[0] * 255), int(q[1] * 255), int(q[2] * 255))
            c = (int(size * (0.2 + 0.6 * q[3])), int(size * (0.25 + 0.65 * q[4])))
            if nz.attached == "blob":
                ax = (int(size * (0.08 + 0.14 * q[5])), int(size * (0.08 + 0.14 * q[6])))
                cv2.ellipse(img, c, ax, float(q[7] * 180), 0, 360, col, -1, _AA)
            else:
                ang = q[5] * math.pi
                dx, dy = int(size * 0.6 * math.cos(ang)), int(size * 0.6 * math.sin(ang))
                cv2.line(img, (c[0] - dx, c[1] - dy), (c[0] + dx, c[1] + dy), col,
                         max(2, int(size * (0.04 + 0.06 * q[6]))), _AA)

        # photometric: illumination (gain x colour cast x smooth light field), grayscale, blur, low-res, noise
        il, cj = cfg.illumination_strength, cfg.color_jitter
        blur = u[37] < cfg.blur_prob and cfg.max_blur_sigma > 0
        lowres = u[39] < cfg.lowres_prob
        noisy = u[41] < cfg.noise_prob and cfg.max_noise_std > 0
        gray = u[36] < cfg.grayscale_prob
        if not (il > 0 or cj > 0 or blur or lowres or noisy or gray):
            return img, keypoints
        img = img.astype(np.float32)
        if il > 0 or cj > 0:
            gain = math.exp((2 * u[30] - 1) * 0.35 * il)
            grad = (np.array([u[31], u[32]]) * 2 - 1) * 0.5 * il
            cast = 1.0 + (np.array([u[33], u[34], u[35]]) * 2 - 1) * 0.08 * cj
            pos = np.array([-1.0, 0.0, 1.0])
            light = 1.0 + grad[0] * pos[None, :] + grad[1] * pos[:, None] + 0.15 * il * light_field
            light = (gain * light[:, :, None] * cast).astype(np.float32)
            img = cv2.multiply(img, cv2.resize(light, (size, size), interpolation=cv2.INTER_LINEAR))
        if gray:
            img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if blur:
            img = cv2.GaussianBlur(img, (0, 0), (0.4 + 0.6 * u[38]) * cfg.max_blur_sigma * k)
        if lowres:
            small = max(8, int(size * (0.3 + 0.35 * u[40])))
            img = cv2.resize(cv2.resize(img, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                             interpolation=cv2.INTER_LINEAR)
        if noisy:
            # uniform noise of standard deviation ``std`` (int8 draws: ~10x cheaper than normal floats)
            std = u[42] * cfg.max_noise_std
            noise = rng.integers(-128, 128, (size, size, 3), dtype=np.int8)
            img = cv2.scaleAdd(noise.astype(np.float32), std / 73.9, img)
        out = cv2.add(img, 0.0, dtype=cv2.CV_8U)  # round and saturate
        if il > 0:
            gamma = math.exp((2 * u[43] - 1) * 0.25 * il)
            if abs(gamma - 1.0) > 1e-3:
                lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
                out = cv2.LUT(out, lut)
        return out, keypoints

    def batch(self, identities: Sequence[int], indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Render ``(identities[b], indices[b])`` for every b: (B, H, W, 3) uint8 and (B, 5, 2) float32."""
        if len(identities) != len(indices):
            raise ValueError(f"{len(identities)} identities but {len(indices)} indices")
        s = self.config.img_size
        images = np.empty((len(identities), s, s, 3), np.uint8)
        kps = np.empty((len(identities), 5, 2), np.float32)
        for b, (i, j) in enumerate(zip(identities, indices)):
            images[b], kps[b] = self.render(int(i), int(j))
        return images, kps


def generate(num_identities: int, images_per_identity: int, seed: int = 0,
             config: SyntheticConfig | None = None) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
    """Yield ``(image, label, keypoints)`` in identity-major order: identity 0 images 0..n-1, identity 1, ..."""
    faces = SyntheticFaces(num_identities, seed=seed, config=config, cache_size=1)
    for i in range(num_identities):
        for j in range(images_per_identity):
            image, kp = faces.render(i, j)
            yield image, i, kp


def synthetic_pair_indices(faces: SyntheticFaces, num_pairs: int, seed: int, first_index: int = 1000,
                           identities: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`synthetic_pairs` renders: identity ids (2P,), image indices (2P,) and issame (P,).

    Exactly ``P // 2`` pairs are genuine (two different image indices of one identity) and the rest
    impostors (two different identities), shuffled. Indices are drawn from ``[first_index, first_index + 2**30)``.
    """
    pool = np.arange(faces.num_identities) if identities is None else np.asarray(list(identities), np.int64)
    if len(pool) < 2:
        raise ValueError("pairs need at least 2 identities")
    if pool.min() < 0 or pool.max() >= faces.num_identities:
        raise ValueError(f"identities must lie in [0, {faces.num_identities})")
    if first_index < 0:
        raise ValueError(f"first_index must be >= 0, got {first_index}")
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_PAIRS, int(seed)]))
    issame = np.zeros(num_pairs, bool)
    issame[: num_pairs // 2] = True
    rng.shuffle(issame)
    ia = rng.integers(0, len(pool), num_pairs)
    ib = (ia + rng.integers(1, len(pool), num_pairs)) % len(pool)  # != ia
    a = pool[ia]
    b = np.where(issame, a, pool[ib])
    span = 1 << 30
    ja = rng.integers(0, span, num_pairs)
    jb = (ja + rng.integers(1, span, num_pairs)) % span  # != ja
    ids = np.stack([a, b], axis=1).reshape(-1)
    idx = first_index + np.stack([ja, jb], axis=1).reshape(-1)
    return ids, idx, issame


def synthetic_pairs(faces: SyntheticFaces, num_pairs: int, seed: int, first_index: int = 1000,
                    identities: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verification pairs: images (2P, H, W, 3) uint8, issame (P,) bool, keypoints (2P, 5, 2) float32.

    Images ``2k`` and ``2k + 1`` form pair ``k`` (insightface ``.bin`` order). Exactly ``P // 2`` pairs are
    genuine (two different images of one identity), the rest impostors (two different identities), in a
    random order. Every image index is ``>= first_index`` so that pairs never reuse training images
    ``0 .. first_index - 1``. ``identities`` restricts the identity pool (e.g. held-out identities);
    default: all of ``faces``. Deterministic in ``(faces, seed, first_index, identities)``; see
    :func:`synthetic_pair_indices` for the identities and indices used.
    """
    ids, idx, issame = synthetic_pair_indices(faces, num_pairs, seed, first_index, identities)
    images, kps = faces.batch(ids.tolist(), idx.tolist())
    return images, issame, kps


def raw_pixel_pair_scores(images: np.ndarray) -> np.ndarray:
    """The no-learning baseline of the hardness contract: cosine of pairs (2k, 2k+1) of flattened,
    mean-subtracted grayscale images. Its AUC on :func:`synthetic_pairs` should stay near chance."""
    g = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    g = g.reshape(len(g), -1)
    g -= g.mean(axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-8
    return (g[0::2] * g[1::2]).sum(axis=1)
