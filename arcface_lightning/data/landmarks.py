"""Face alignment by five landmarks (eyes, nose tip, mouth corners), as the field aligns faces for ArcFace models:
a least-squares similarity transform (rotation, uniform scale, translation) from the detected points onto fixed
reference points, then the image warped by it. NumPy only.

- The reference points are insightface's for a 112 × 112 crop (`REFERENCE_112`, from its face_align.py). Other sizes
  follow its rule: a multiple of 112 scales them; otherwise they are scaled as for 128 and shifted right by
  8 · size / 128.
- The transform: the 4 parameters (a, b, tx, ty) of [[a, −b, tx], [b, a, ty]] that minimise the squared distance
  between the mapped landmarks and the reference points, solved as linear least squares. This is the same
  minimiser as Umeyama's closed form, which skimage's SimilarityTransform (insightface's choice) computes.
- The warp has OpenCV's `warpAffine` geometry (pixel centres at integer coordinates, bilinear, zero outside the
  image), with exact float weights where OpenCV quantises coordinates and weights to 1/32 of a pixel: the two differ
  by at most a grey level or two (tests/test_landmarks.py, against OpenCV and skimage in a side environment).
"""

from __future__ import annotations

import numpy as np

from arcface_lightning.core.checks import DataError

REFERENCE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def reference_points(image_size: int) -> np.ndarray:
    """Where the five landmarks land in an `image_size` square crop (insightface's rule)."""
    if image_size % 112 == 0:
        return REFERENCE_112 * (image_size / 112)
    ratio = image_size / 128
    return REFERENCE_112 * ratio + np.array([8.0 * ratio, 0.0])


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 × 3 similarity matrix M minimising Σ ‖M · [source_i, 1] − target_i‖² (float64)."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"landmarks of shape {source.shape} and {target.shape}; allowed: two (n ≥ 2, 2) arrays")
    x, y = source[:, 0], source[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    # rows for u = a x − b y + tx and v = b x + a y + ty
    design = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) → uint8 (size, size[, C]): output pixel p samples the input at M⁻¹ p, bilinearly,
    0 outside."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    pixels = image.astype(np.float64)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width = pixels.shape[:2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    out = np.zeros((size, size, pixels.shape[2]))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            px, py = x0 + dx, y0 + dy
            inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
            values = pixels[py.clip(0, height - 1), px.clip(0, width - 1)] * inside[..., None]
            out += wx * wy * values
    out = np.rint(out).clip(0, 255).astype(np.uint8)
    return out[..., 0] if image.ndim == 2 else out


def align_channels_first(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """`align` for a uint8 (C, H, W) image (data/files' layout), giving (C, image_size, image_size)."""
    crop = align(image[0] if len(image) == 1 else image.transpose(1, 2, 0), landmarks, image_size)
    return crop[None] if crop.ndim == 2 else crop.transpose(2, 0, 1)


def align(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """A face crop of `image_size` with its five landmarks moved onto the reference points."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise DataError(f"landmarks of shape {landmarks.shape}; allowed: five finite (x, y) points")
    return warp_affine(image, similarity_transform(landmarks, reference_points(image_size)), image_size)
