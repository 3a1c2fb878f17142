"""In-plane augmentation of (D, H, W) patches: the slice axis D is never moved, resampled or mixed.

Geometric transforms act on image and label together (label by nearest neighbour, so instance values stay
integers); intensity transforms act on the image only. Every random choice comes from the numpy Generator passed
in, so a patch's augmentation is a pure function of that generator's state.

Image values are assumed scaled to [0, 1] (cache format); 0 (air) fills the corners a rotation uncovers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


# ------------------------------------------------------------------------------------------- geometric ops

def flip(image, label, axis: int):
    """Flip along axis 1 (y) or 2 (x)."""
    if axis not in (1, 2):
        raise ValueError(f"flip axis {axis}: expected 1 (y) or 2 (x); the slice axis 0 is never flipped.")
    return np.flip(image, axis).copy(), np.flip(label, axis).copy()


def rot90(image, label, k: int):
    """Rotate by k * 90 degrees in the (y, x) plane. Odd k needs H == W (shape kept)."""
    if k % 2 and image.shape[1] != image.shape[2]:
        raise ValueError(f"rot90 with k={k} on a non-square in-plane patch {image.shape[1:]}; expected H == W.")
    return np.rot90(image, k, axes=(1, 2)).copy(), np.rot90(label, k, axes=(1, 2)).copy()


def affine_inplane(image, label, angle_deg: float = 0.0, scale: float = 1.0, shear: float = 0.0):
    """Rotate (degrees, counter-clockwise in (y, x)), zoom (scale > 1 enlarges) and shear about the patch
    centre, slice by slice with the same map. Image linear, label nearest; outside filled with 0."""
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    fwd = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale  # input -> output
    inv = np.linalg.inv(fwd)                                                         # output -> input
    m = np.eye(3)
    m[1:, 1:] = inv
    ctr = (np.asarray(image.shape[1:], float) - 1) / 2
    off = np.zeros(3)
    off[1:] = ctr - inv @ ctr
    img = ndimage.affine_transform(image.astype(np.float32, copy=False), m, off, order=1, mode="constant",
                                   cval=0.0, prefilter=False)
    lab = ndimage.affine_transform(label, m, off, order=0, mode="constant", cval=0)
    return img.astype(np.float32), lab.astype(label.dtype)


# ------------------------------------------------------------------------------------------- intensity ops

def contrast(image, factor: float):
    """Scale about the patch mean."""
    mu = float(image.mean())
    return ((image - mu) * factor + mu).astype(np.float32)


def shift(image, delta: float):
    return (image + delta).astype(np.float32)


def gamma(image, g: float):
    """image ** g on [0, 1] (values clipped to [0, 1] first)."""
    return np.power(np.clip(image, 0.0, 1.0), g).astype(np.float32)


def noise(image, sigma: float, rng: np.random.Generator):
    return (image + rng.normal(0.0, sigma, size=image.shape)).astype(np.float32)


def blur(image, sigma: float):
    """Gaussian blur in-plane only (sigma in voxels, 0 along z)."""
    return ndimage.gaussian_filter(image.astype(np.float32), (0.0, sigma, sigma), mode="nearest")


def coarsen(image, factor: float):
    """In-plane pixels ``factor`` (>= 1) times coarser and back to this grid: what a scan acquired at coarser
    pixels looks like after resampling (an anti-aliasing Gaussian of sigma (factor - 1) / 2 voxels, linear down
    to round(H / factor) x round(W / factor), linear back up; the slice axis untouched). Shape kept."""
    if factor < 1.0:
        raise ValueError(f"coarsen factor {factor}: expected >= 1 (coarser pixels)")
    img = np.asarray(image, np.float32)
    d, h, w = img.shape
    hs, ws = max(2, int(round(h / factor))), max(2, int(round(w / factor)))
    if (hs, ws) == (h, w):
        return img.copy()
    smooth = ndimage.gaussian_filter(img, (0.0, (factor - 1) / 2, (factor - 1) / 2), mode="nearest")
    small = ndimage.zoom(smooth, (1, hs / h, ws / w), order=1, mode="nearest", grid_mode=True)
    back = ndimage.zoom(small, (1, h / hs, w / ws), order=1, mode="nearest", grid_mode=True)
    return back.astype(np.float32)


# ------------------------------------------------------------------------------------------- policies

@dataclass
class Augment:
    """Standard in-plane policy, callable as ``aug(image (D,H,W), label (D,H,W), rng) -> (image, label)``.

    p_flip per axis (y, x); p_rot90 for a random k in {1, 2, 3} (odd k only when H == W); p_affine for a
    rotation in +-rotate_deg and a zoom in [scale_min, scale_max]; p_intensity for contrast (1 +- contrast),
    shift (+- shift_max), gamma (in [gamma_min, gamma_max]); p_blur for an in-plane Gaussian blur of sigma up to
    blur_max voxels (a softer reconstruction kernel or coarser pixels; off by default, and then no random number
    is drawn for it, so the standard policy's draws are unchanged); p_coarsen for pixels up to coarsen_max times
    coarser and back (``coarsen``; off by default in the same way); p_noise for Gaussian noise of sd up to
    noise_std.
    randaugment=(N, M): instead of the above, N ops drawn uniformly (with replacement) from RANDAUG_OPS, each
    at magnitude M on a 0..10 scale (M = 10 is each op's maximum below), sign random.
    """

    p_flip: float = 0.5
    p_rot90: float = 0.5
    p_affine: float = 0.3
    rotate_deg: float = 15.0
    scale_min: float = 0.85
    scale_max: float = 1.15
    p_intensity: float = 0.5
    contrast: float = 0.15
    shift_max: float = 0.05
    gamma_min: float = 0.7
    gamma_max: float = 1.5
    p_blur: float = 0.0
    blur_max: float = 1.0
    p_coarsen: float = 0.0
    coarsen_max: float = 1.4
    p_noise: float = 0.2
    noise_std: float = 0.02
    randaugment: tuple | None = None

    def __call__(self, image, label, rng: np.random.Generator):
        image = np.asarray(image, np.float32)
        label = np.asarray(label)
        if self.randaugment is not None:
            n, m = self.randaugment
            return rand_augment(image, label, rng, int(n), float(m))
        for axis in (1, 2):
            if rng.random() < self.p_flip:
                image, label = flip(image, label, axis)
        if rng.random() < self.p_rot90:
            square = image.shape[1] == image.shape[2]
            k = int(rng.choice([1, 2, 3] if square else [2]))
            image, label = rot90(image, label, k)
        if rng.random() < self.p_affine:
            ang = rng.uniform(-self.rotate_deg, self.rotate_deg)
            sc = rng.uniform(self.scale_min, self.scale_max)
            image, label = affine_inplane(image, label, ang, sc)
        if rng.random() < self.p_intensity:
            image = contrast(image, rng.uniform(1 - self.contrast, 1 + self.contrast))
            image = shift(image, rng.uniform(-self.shift_max, self.shift_max))
            image = gamma(image, np.exp(rng.uniform(np.log(self.gamma_min), np.log(self.gamma_max))))
        if self.p_blur > 0 and rng.random() < self.p_blur:
            image = blur(image, rng.uniform(0, self.blur_max))
        if self.p_coarsen > 0 and rng.random() < self.p_coarsen:
            image = coarsen(image, rng.uniform(1.0, self.coarsen_max))
        if rng.random() < self.p_noise:
            image = noise(image, rng.uniform(0, self.noise_std), rng)
        return image, label


# name -> (geometric?, maximum magnitude at M = 10)
RANDAUG_OPS = {
    "identity": (False, 0.0),
    "flip_y": (True, 0.0),
    "flip_x": (True, 0.0),
    "rot90": (True, 0.0),
    "rotate": (True, 30.0),     # degrees
    "zoom": (True, 0.3),        # scale 1 +- 0.3
    "shear": (True, 0.3),
    "contrast": (False, 0.5),   # factor 1 +- 0.5
    "shift": (False, 0.2),
    "gamma": (False, 0.7),      # exp(+- 0.7)
    "noise": (False, 0.06),     # sd
    "blur": (False, 1.5),       # sigma, voxels
}


def rand_augment(image, label, rng: np.random.Generator, n: int = 2, m: float = 5.0):
    """RandAugment-style: n ops uniform with replacement from RANDAUG_OPS, magnitude m in [0, 10]."""
    if not 0 <= m <= 10:
        raise ValueError(f"RandAugment magnitude {m}: expected a value in [0, 10].")
    names = list(RANDAUG_OPS)
    frac = m / 10.0
    for j in rng.integers(len(names), size=n):
        name = names[int(j)]
        mag = RANDAUG_OPS[name][1] * frac
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if name == "flip_y":
            image, label = flip(image, label, 1)
        elif name == "flip_x":
            image, label = flip(image, label, 2)
        elif name == "rot90":
            k = int(rng.choice([1, 2, 3])) if image.shape[1] == image.shape[2] else 2
            image, label = rot90(image, label, k)
        elif name == "rotate":
            image, label = affine_inplane(image, label, angle_deg=sign * mag)
        elif name == "zoom":
            image, label = affine_inplane(image, label, scale=1.0 + sign * mag)
        elif name == "shear":
            image, label = affine_inplane(image, label, shear=sign * mag)
        elif name == "contrast":
            image = contrast(image, 1.0 + sign * mag)
        elif name == "shift":
            image = shift(image, sign * mag)
        elif name == "gamma":
            image = gamma(image, float(np.exp(sign * mag)))
        elif name == "noise":
            image = noise(image, mag, rng)
        elif name == "blur" and mag > 0:
            image = blur(image, mag)
    return image, label
