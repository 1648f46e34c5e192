"""Writes tests/data/insightface/aligned_by_opencv.npz: faces aligned the way insightface aligns them (skimage's
SimilarityTransform estimated from five landmarks onto the 112 × 112 reference points, then cv2.warpAffine), on a
real MNIST digit, for tests/test_landmarks.py to compare data/landmarks.py against. Not a project dependency: run it
in a side environment, from the repository root:

    python3 -m venv /tmp/cvvenv && /tmp/cvvenv/bin/pip install opencv-python-headless scikit-image
    /tmp/cvvenv/bin/python tests/data/insightface/align_with_opencv.py <MNIST raw folder> tests/data/insightface
"""

import sys
from pathlib import Path

import cv2
import numpy as np
import skimage
from skimage.transform import SimilarityTransform

REFERENCE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def main(raw: Path, out: Path) -> None:
    digits = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    image = cv2.resize(digits[0], (96, 80), interpolation=cv2.INTER_LINEAR)  # not square, not the crop's size
    image = np.stack([image, 255 - image, image // 2], axis=-1)  # three distinct channels
    rng = np.random.default_rng(0)
    cases = {"landmarks": [], "matrices": [], "aligned": []}
    for angle in (0.0, 0.3, -0.5):  # the reference points rotated, scaled, moved, and jittered
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        landmarks = REFERENCE_112 @ rotation.T * 0.6 + np.array([10.0, 5.0]) + rng.normal(0, 1.5, (5, 2))
        transform = SimilarityTransform.from_estimate(landmarks, REFERENCE_112)
        matrix = transform.params[:2]
        cases["landmarks"].append(landmarks)
        cases["matrices"].append(matrix)
        cases["aligned"].append(cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0))
    np.savez_compressed(
        out / "aligned_by_opencv.npz",
        image=image,
        **{k: np.stack(v) for k, v in cases.items()},
        versions=np.array([cv2.__version__, skimage.__version__]),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
