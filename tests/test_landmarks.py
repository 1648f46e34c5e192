"""Face alignment by five landmarks (data/landmarks.py) against the field's own pipeline: skimage's
SimilarityTransform and OpenCV's warpAffine, run in a side environment on a real MNIST digit
(tests/data/insightface/align_with_opencv.py wrote the answers), and against closed forms in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arcface_lightning.core.checks import DataError
from arcface_lightning.data.landmarks import REFERENCE_112, align, reference_points, similarity_transform, warp_affine

ORACLE = np.load(Path(__file__).parent / "data" / "insightface" / "aligned_by_opencv.npz")


def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Umeyama's closed form (1991) for a similarity without reflection, in float64: the independent oracle."""
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    u, d, vt = np.linalg.svd(t.T @ s / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / s.var(0).sum()
    return np.hstack([scale * rotation, (mean_t - scale * rotation @ mean_s)[:, None]])


def test_the_transform_is_the_least_squares_similarity() -> None:
    rng = np.random.default_rng(1)
    angle, scale, shift = 0.7, 1.8, np.array([3.0, -4.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = rng.uniform(0, 100, (5, 2))
    exact = similarity_transform(source, source @ (scale * rotation).T + shift)
    np.testing.assert_allclose(exact, np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    noisy = source @ (scale * rotation).T + shift + rng.normal(0, 2.0, (5, 2))
    np.testing.assert_allclose(similarity_transform(source, noisy), umeyama(source, noisy), atol=1e-9)


def test_the_transform_and_the_crop_match_skimage_and_opencv() -> None:
    for landmarks, matrix, aligned in zip(ORACLE["landmarks"], ORACLE["matrices"], ORACLE["aligned"], strict=True):
        ours = similarity_transform(landmarks, REFERENCE_112)
        np.testing.assert_allclose(ours, matrix, atol=1e-9)
        crop = align(ORACLE["image"], landmarks, 112)
        difference = np.abs(crop.astype(int) - aligned.astype(int))
        # OpenCV quantises sampling positions and weights to 1/32 pixel; the crops agree to a grey level or two
        assert crop.shape == aligned.shape == (112, 112, 3) and difference.max() <= 2, difference.max()
        assert (difference == 0).mean() > 0.9
        assert (aligned > 0).any() and (aligned == 0).any()  # the oracle has both image and zero border


def test_reference_points_follow_insightfaces_rule_for_other_sizes() -> None:
    np.testing.assert_array_equal(reference_points(112), REFERENCE_112)
    np.testing.assert_allclose(reference_points(224), REFERENCE_112 * 2)
    np.testing.assert_allclose(reference_points(128), REFERENCE_112 + np.array([8.0, 0.0]))
    np.testing.assert_allclose(reference_points(96), REFERENCE_112 * 0.75 + np.array([6.0, 0.0]))


def test_the_warp_keeps_integer_pixel_centres_and_fills_zero_outside() -> None:
    image = np.arange(1, 26, dtype=np.uint8).reshape(5, 5)
    assert np.array_equal(warp_affine(image, np.array([[1.0, 0, 0], [0, 1.0, 0]]), 5), image)
    shifted = warp_affine(image, np.array([[1.0, 0, 2], [0, 1.0, 1]]), 5)  # output (x, y) = input (x − 2, y − 1)
    assert np.array_equal(shifted[1:, 2:], image[:4, :3]) and not shifted[0].any() and not shifted[:, :2].any()
    half = warp_affine(image, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), 5)
    np.testing.assert_array_equal(half[:, :4], np.rint((image[:, :4].astype(float) + image[:, 1:]) / 2))


@pytest.mark.parametrize("landmarks", [np.zeros((4, 2)), np.full((5, 2), np.nan)], ids=["four points", "nan"])
def test_bad_landmarks_are_one_line(landmarks: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"^landmarks of shape \(\d, 2\); allowed: five finite \(x, y\) points$"):
        align(np.zeros((10, 10), np.uint8), landmarks)
